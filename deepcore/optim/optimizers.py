"""Optimizers: GD, SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW.

Each applies exactly PyTorch's update rule (``torch.optim.SGD``/``Adam``/``AdamW``
with foreach and fused off). The arithmetic lives in the backend
(``Backend.sgd_update_many``, a run of one group's parameters in one call, and
``adam_update``): NumPy updates in place with ``out=``, CuPy in one fused kernel
per parameter, any other array-API library through the reference. ``step()``
checks every gradient before it changes anything, so a step refused for a bad
gradient or state leaves parameters and optimizer state as they were.

Parameters come as a list (one group) or as PyTorch's parameter groups,
``[{"params": [...], "lr": 0.01, "weight_decay": 0.0}, ...]``, each group
overriding any of the constructor's hyperparameters; ``opt.param_groups`` holds
them (:class:`~deepcore.optim.groups.ParamGroup`, checked dicts) and schedules
set each group's ``"lr"``. ``opt.lr`` (and ``opt.momentum`` etc.) read the first
group and set every group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from ..backend import Backend, BackendMismatchError, backend_of, get_backend, to_backend
from ..backend.base import Array
from ..backend.registry import _by_type as _BACKEND_BY_TYPE
from ..backend.registry import backend_or_none
from ..nn.module import Param
from .checks import jsonable, learning_rate, real, state_int
from .groups import NAME_KEY, ParamGroup, parse_param_groups
from .steady import SteadyPlan, update_run

__all__ = ["GD", "SGD", "Adam", "AdamW", "Optimizer"]

_STATE_DICT_KEYS = ("type", "hyperparams", "step_count", "state")


class Optimizer:
    """Base class: parameter groups, per-parameter state, checked steps and state dicts.

    Subclasses name their constructor hyperparameters in ``HYPERPARAMS`` (what
    ``state_dict()["hyperparams"]`` and each saved group hold, and what a group may override),
    their per-parameter arrays in ``STATE_ARRAYS`` (those a state may lack in ``STATE_OPTIONAL``)
    and integers in ``STATE_INTS``, and implement ``_check_hyperparams`` and ``_update``.
    """

    HYPERPARAMS: ClassVar[tuple[str, ...]] = ("lr",)
    STATE_ARRAYS: ClassVar[tuple[str, ...]] = ()
    STATE_INTS: ClassVar[tuple[str, ...]] = ()
    STATE_OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], **hyperparams: Any) -> None:
        fn = type(self).__name__
        defaults = self._check_hyperparams(hyperparams)
        specs = parse_param_groups(params, fn, self.HYPERPARAMS)
        groups = [self._make_group(members, overrides, defaults, fn if label is None else f"{fn}: {label}")
                  for members, overrides, label in specs]
        d = self.__dict__
        #: The constructor's hyperparameters: what a group (or ``add_param_group``) does not set.
        d["defaults"] = defaults
        #: The groups (``ParamGroup`` dicts): ``"params"`` and every hyperparameter.
        d["param_groups"] = groups
        #: Every parameter, group after group (``state`` and state dicts number them in this order).
        d["params"] = [p for group in groups for p in group["params"]]
        d["_group_of"] = [group for group in groups for _ in group["params"]]
        #: Successful ``step()`` calls; Adam's bias correction uses each parameter's own count.
        self.step_count = 0
        #: One dict per parameter (empty until the parameter's first update).
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def _make_group(self, members: list[Param], overrides: Mapping[str, Any], defaults: Mapping[str, Any],
                    where: str) -> ParamGroup:
        cls = type(self)
        name = {NAME_KEY: overrides[NAME_KEY]} if NAME_KEY in overrides else {}
        hyper = {k: v for k, v in overrides.items() if k != NAME_KEY}

        def check(h: Mapping[str, Any]) -> dict[str, Any]:
            return cls._check_hyperparams({k: v for k, v in h.items() if k != NAME_KEY}, fn=where)

        checked = cls._check_hyperparams({**defaults, **hyper}, fn=where) if hyper else dict(defaults)
        return ParamGroup(list(members), {**checked, **name}, check, self.HYPERPARAMS, where)

    def add_param_group(self, group: Mapping[str, Any]) -> None:
        """Add a group (``{"params": [...], <hyperparameter>: value}``, the rest from ``defaults``),
        as ``torch.optim.Optimizer.add_param_group``; its parameters must be new to this optimizer.
        Schedules built before do not know the new group: build them after."""
        fn = f"{type(self).__name__}.add_param_group"
        if not isinstance(group, Mapping):
            raise TypeError(f"{fn}: expected a dict with a 'params' key, got {type(group).__name__}")
        ((members, overrides, _),) = parse_param_groups([group], fn, self.HYPERPARAMS)
        known = {id(p): i for i, p in enumerate(self.params)}
        for p in members:
            if id(p) in known:
                raise ValueError(f"{fn}: {_label(known[id(p)], p)} is already in a group of this optimizer")
        where = f"{type(self).__name__}: params[{len(self.param_groups)}]"
        new = self._make_group(members, overrides, self.defaults, where)
        self.param_groups.append(new)
        self.params.extend(members)
        self._group_of.extend(new for _ in members)
        self.state.extend({} for _ in members)

    # ------------------------------------------------------- hyperparameters
    @property
    def lr(self) -> float:
        """The first group's learning rate; setting it sets every group's (and the default)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self._set_everywhere("lr", value)

    def __getattr__(self, name: str) -> Any:
        # opt.momentum, opt.betas, ...: the first group's value, as opt.lr.
        d = self.__dict__
        if "defaults" in d and name in d["defaults"]:
            return d["param_groups"][0][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "lr" and name in self.HYPERPARAMS and "param_groups" in self.__dict__:
            self._set_everywhere(name, value)
        else:
            object.__setattr__(self, name, value)

    def _set_everywhere(self, name: str, value: Any) -> None:
        """``name = value`` in the defaults and every group, all checked before any changes."""
        checked = [group.validate({name: value}) for group in self.param_groups]
        defaults = self._check_hyperparams({**self.defaults, name: value})
        for group, values in zip(self.param_groups, checked, strict=True):
            group.set_checked(values)
        self.defaults[name] = defaults[name]

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any], fn: str | None = None) -> dict[str, Any]:
        """Every hyperparameter, validated, from the constructor's (a group's, a state dict's) values;
        ``fn`` names the caller in messages (the class name by default)."""
        return {"lr": learning_rate(h["lr"], fn or cls.__name__)}

    def hyperparams(self) -> dict[str, Any]:
        """The defaults (the constructor's hyperparameters, as set since), JSON-able (tuples as lists)."""
        return {name: jsonable(self.defaults[name]) for name in self.HYPERPARAMS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        groups = f", {len(self.param_groups)} groups" if len(self.param_groups) > 1 else ""
        return f"{type(self).__name__}({len(self.params)} params{groups}, {args})"

    # ------------------------------------------------------------------ steps
    def zero_grad(self) -> None:
        """Forget every gradient (``grad = None``, PyTorch's ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient; parameters whose ``grad`` is None are skipped.

        All gradients (and stored state) are checked first; only then is anything written.
        """
        plan = []
        states = self.state
        names = self.STATE_ARRAYS
        by_type = _BACKEND_BY_TYPE
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            # The usual case, checked without a call, a look-up beyond one dict or a copy: a gradient of
            # the parameter's own type, dtype and shape on a one-device library, and state already where
            # it lives (what _in_place_of says, inline).
            value = p.value
            array_type = type(value)
            backend = by_type.get(array_type)
            if (backend is not None and type(grad) is array_type and backend.single_device
                    and grad.dtype == (dtype := value.dtype) and grad.shape == (shape := value.shape)
                    and backend.is_floating(value)):
                state = states[i]
                for name in names:
                    if name in state:
                        x = state[name]
                        if not (type(x) is array_type and x.dtype == dtype and x.shape == shape):
                            break
                else:
                    plan.append((i, backend, grad, state))
                    continue
            plan.append(self._prepare(i, p))
        self._apply(plan)
        self.__dict__["step_count"] = self.step_count + 1  # not through __setattr__: no hyperparameter

    def _apply(self, plan: list[tuple[int, Backend, Array, dict[str, Any]]]) -> None:
        """Write the checked ``plan`` (index, backend, gradient, state per parameter): ``_update`` each."""
        group_of, params, states, update = self._group_of, self.params, self.state, self._update
        for i, backend, grad, state in plan:
            states[i] = state
            update(params[i], backend, grad, state, group_of[i])

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any], group: ParamGroup) -> None:
        """Update ``p`` (with ``grad`` in its dtype) and ``state`` in place, with ``group``'s hyperparameters."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _update")

    def _prepare(self, i: int, p: Param) -> tuple[int, Backend, Array, dict[str, Any]]:
        """Check parameter ``i``'s gradient; return it in the parameter's dtype, with the parameter's
        state moved to its backend, device and dtype (new arrays only: nothing is written here).

        The usual case (gradient and state where the parameter is, right shape, floating point)
        is checked without building any message; anything else goes through
        :meth:`_prepare_checked`, which raises with the parameter named."""
        grad, value = p.grad, p.value
        try:
            backend = backend_of(grad, value)
        except (BackendMismatchError, TypeError):
            return self._prepare_checked(i, p)
        if tuple(grad.shape) != tuple(value.shape) or not backend.is_floating(value) or not backend.is_floating(grad):
            return self._prepare_checked(i, p)
        state = self.state[i]
        if not state:
            return i, backend, backend.astype(grad, value.dtype), {}
        state = dict(state)
        for name in self.STATE_ARRAYS:
            if name in state and not _in_place_of(state[name], value, backend):
                return self._prepare_checked(i, p)
        return i, backend, backend.astype(grad, value.dtype), state

    def _prepare_checked(self, i: int, p: Param) -> tuple[int, Backend, Array, dict[str, Any]]:
        fn = f"{type(self).__name__}.step"
        label = _label(i, p)
        grad = p.grad
        try:
            # Gradient first, so the registry's hint reads "move the gradient to the parameter's backend".
            backend = backend_of(grad, p.value, names=(f"the gradient of {label}", label))
        except BackendMismatchError as exc:
            raise BackendMismatchError(f"{fn}: {exc}") from None
        except TypeError:
            raise TypeError(f"{fn}: the gradient of {label} must be an array, got {type(grad).__name__}") from None
        if tuple(grad.shape) != tuple(p.value.shape):
            raise ValueError(f"{fn}: the gradient of {label} must have the parameter's shape "
                             f"{tuple(p.value.shape)}, got {tuple(grad.shape)}")
        if not backend.is_floating(p.value):
            raise TypeError(f"{fn}: {label} must be a floating-point array to be optimized, got dtype {p.value.dtype}")
        if not backend.is_floating(grad):
            raise TypeError(f"{fn}: the gradient of {label} must be floating-point, got dtype {grad.dtype}")
        grad = backend.astype(grad, p.value.dtype)
        state = dict(self.state[i])
        for name in self.STATE_ARRAYS:
            if name in state:
                state[name] = _match(state[name], p, backend, f"{fn}: the {name!r} state of {label}")
        return i, backend, grad, state

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"type", "hyperparams", "step_count", "state", "param_groups"}``: ``hyperparams`` the defaults;
        ``state`` maps each parameter's index (a string) to its dict of arrays and ints (empty before
        its first update); ``param_groups`` one dict per group, its parameters' indices under ``"params"``
        with its hyperparameters (and ``"name"``), as ``torch.optim.Optimizer.state_dict`` holds them.
        The arrays are the optimizer's own, not copies: convert or copy them before the next ``step()``."""
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            saved = {"params": list(range(start, start + n)),
                     **{name: jsonable(group[name]) for name in self.HYPERPARAMS}}
            if NAME_KEY in group:
                saved[NAME_KEY] = group[NAME_KEY]
            groups.append(saved)
            start += n
        return {
            "type": type(self).__name__,
            "hyperparams": self.hyperparams(),
            "step_count": self.step_count,
            "state": {str(i): dict(s) for i, s in enumerate(self.state)},
            "param_groups": groups,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` returned, with arrays from any backend (NumPy from a file, say)
        converted to each parameter's backend, device and dtype. Everything (type, groups, parameter
        indices, keys, shapes, hyperparameters) is checked before anything changes. A missing parameter
        entry means "no state yet". A state dict without ``param_groups`` (written before groups existed)
        is one group holding every parameter with ``hyperparams``' values."""
        fn = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{fn}: expected a dict as returned by state_dict(), got {type(state_dict).__name__}")
        missing = [k for k in _STATE_DICT_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"{fn}: the state dict must have keys {list(_STATE_DICT_KEYS)}, missing {missing}")
        if state_dict["type"] != type(self).__name__:
            raise ValueError(f"{fn}: the state dict is for a {state_dict['type']!r} optimizer, "
                             f"expected {type(self).__name__!r}")
        hyper = state_dict["hyperparams"]
        if not isinstance(hyper, Mapping):
            raise TypeError(f"{fn}: 'hyperparams' must be a dict, got {type(hyper).__name__}")
        unknown = sorted(set(hyper) - set(self.HYPERPARAMS))
        if unknown:
            raise ValueError(f"{fn}: unknown hyperparameters {unknown}; {type(self).__name__} has "
                             f"{list(self.HYPERPARAMS)}")
        defaults = self._check_hyperparams({**self.defaults, **hyper}, fn=fn)
        saved_groups = state_dict.get("param_groups")
        if saved_groups is None:
            saved_groups = [{"params": list(range(len(self.params))), **hyper}]
        group_values = self._load_groups(saved_groups, defaults, fn)
        step_count = state_int(state_dict["step_count"], "'step_count'", fn)
        entries = state_dict["state"]
        if not isinstance(entries, Mapping):
            raise TypeError(f"{fn}: 'state' must be a dict, got {type(entries).__name__}")
        new_state: list[dict[str, Any]] = [{} for _ in self.params]
        for key, entry in entries.items():
            i = _param_index(key, len(self.params), fn)
            new_state[i] = self._load_entry(i, entry, fn)
        self.defaults.update(defaults)
        for group, values in zip(self.param_groups, group_values, strict=True):
            group.set_checked(values)
        self.step_count = step_count
        self.state = new_state

    def _load_groups(self, saved: Any, defaults: Mapping[str, Any], fn: str) -> list[dict[str, Any]]:
        """Each saved group's hyperparameters, checked; the groups must hold the same parameters as ours."""
        if not isinstance(saved, list) or not all(isinstance(g, Mapping) for g in saved):
            raise TypeError(f"{fn}: 'param_groups' must be a list of dicts, got {saved!r:.80}")
        ours = [len(g["params"]) for g in self.param_groups]
        if len(saved) != len(ours):
            raise ValueError(f"{fn}: the state dict has {len(saved)} parameter groups, this optimizer has "
                             f"{len(ours)}; build the optimizer with the same groups")
        out, start = [], 0
        for g, (entry, n) in enumerate(zip(saved, ours, strict=True)):
            where = f"param_groups[{g}]"
            indices = entry.get("params")
            if not isinstance(indices, (list, tuple)):
                raise TypeError(f"{fn}: {where}['params'] must be a list of parameter indices, got {indices!r:.80}")
            indices = [state_int(i, f"{where}['params']", fn) for i in indices]
            if indices != list(range(start, start + n)):
                raise ValueError(f"{fn}: {where} holds parameters {indices}, but this optimizer's group {g} holds "
                                 f"{list(range(start, start + n))}; build the optimizer with the same groups")
            unknown = sorted(set(entry) - {"params", NAME_KEY, *self.HYPERPARAMS})
            if unknown:
                raise ValueError(f"{fn}: {where} has unknown keys {unknown}; {type(self).__name__} has "
                                 f"{list(self.HYPERPARAMS)}")
            values = {k: v for k, v in entry.items() if k in self.HYPERPARAMS}
            checked = self._check_hyperparams({**defaults, **values}, fn=f"{fn}: {where}")
            if NAME_KEY in entry:
                if not isinstance(entry[NAME_KEY], str):
                    raise TypeError(f"{fn}: {where}['{NAME_KEY}'] must be a string, got {entry[NAME_KEY]!r}")
                checked[NAME_KEY] = entry[NAME_KEY]
            out.append(checked)
            start += n
        return out

    def _load_entry(self, i: int, entry: Any, fn: str) -> dict[str, Any]:
        where = f"state[{str(i)!r}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{fn}: {where} must be a dict, got {type(entry).__name__}")
        if not entry:
            return {}
        allowed = set(self.STATE_ARRAYS) | set(self.STATE_INTS)
        required = allowed - set(self.STATE_OPTIONAL)
        if not required <= set(entry) <= allowed:
            expected = sorted(required) + [f"{k} (optional)" for k in sorted(allowed - required)]
            raise ValueError(f"{fn}: {where} must have keys {expected}, got {sorted(entry)}")
        p = self.params[i]
        backend = get_backend(p.value)
        out: dict[str, Any] = {name: state_int(entry[name], f"{where}[{name!r}]", fn) for name in self.STATE_INTS}
        for name in self.STATE_ARRAYS:
            if name not in entry:
                continue
            value = entry[name]
            if backend_or_none(value) is None:
                value = np.asarray(value)
            shape = tuple(value.shape)
            if shape != p.shape:
                raise ValueError(f"{fn}: {where}[{name!r}] has shape {shape}, but {_label(i, p)} has shape {p.shape}")
            out[name] = _convert(value, p, backend)
        return out


class SGD(Optimizer):
    """Stochastic gradient descent as ``torch.optim.SGD``: ``d = g + wd·p``;
    ``b = d`` (first step) else ``μ·b + (1-τ)·d``; ``p -= lr·(d + μ·b if nesterov else b)`` (``p -= lr·d`` if μ = 0)."""

    HYPERPARAMS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
    STATE_ARRAYS = ("momentum_buffer",)

    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any], fn: str | None = None) -> dict[str, Any]:
        fn = fn or cls.__name__
        momentum = real(h.get("momentum", 0.0), "momentum", fn, ">= 0", lambda x: x >= 0)
        dampening = real(h.get("dampening", 0.0), "dampening", fn, "(any finite number)", lambda x: True)
        nesterov = h.get("nesterov", False)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"{fn}: nesterov must be True or False, got {nesterov!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, "
                             f"got momentum={momentum}, dampening={dampening}")
        return {
            "lr": learning_rate(h["lr"], fn),
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": bool(nesterov),
            "weight_decay": real(h.get("weight_decay", 0.0), "weight_decay", fn, ">= 0", lambda x: x >= 0),
        }

    def step(self) -> None:
        """As :meth:`Optimizer.step`; a step like the last one (every parameter with a gradient of its
        type, dtype and shape, nothing replaced) re-uses that step's checked plan (see ``steady.py``)."""
        d = self.__dict__
        plan = d.get("_steady")
        if plan is not None and self._runs_in_groups() and plan.step(self):
            return
        d["_steady"] = None
        super().step()
        if self._runs_in_groups():
            d["_steady"] = SteadyPlan.after_step(self)

    def __getstate__(self) -> dict[str, Any]:
        # The plan holds backends (and through them modules): copies and pickles build their own.
        return {k: v for k, v in self.__dict__.items() if k != "_steady"}

    def _runs_in_groups(self) -> bool:
        """Whether steps go through ``sgd_update_many`` (no subclass or instance ``_update``/``_apply``)."""
        cls, d = type(self), self.__dict__
        return cls._update is SGD._update and cls._apply is SGD._apply and "_update" not in d and "_apply" not in d

    def _apply(self, plan: list[tuple[int, Backend, Array, dict[str, Any]]]) -> None:
        """The plan's parameters in runs of one group on one backend, each run one
        ``Backend.sgd_update_many`` call (the per-parameter ``_update`` where a subclass overrides it)."""
        if type(self)._update is not SGD._update or "_update" in self.__dict__:
            return super()._apply(plan)
        group_of, states, params = self._group_of, self.state, self.params
        runs: list[tuple[Backend, ParamGroup, list[int], list[Array], list[Array], list[Array | None]]] = []
        backend = group = None
        for i, entry_backend, grad, state in plan:
            # Recorded before any update, as Optimizer._apply: a run that fails keeps the others' state.
            states[i] = state
            if entry_backend is not backend or group_of[i] is not group:
                backend, group = entry_backend, group_of[i]
                runs.append((backend, group, indices := [], values := [], grads := [], bufs := []))
            indices.append(i)
            values.append(params[i].value)
            grads.append(grad)
            bufs.append(state.get("momentum_buffer"))
        step = self.step_count + 1
        for backend, group, indices, values, grads, bufs in runs:
            new_values, new_bufs = update_run(backend, group, values, grads, bufs, step)
            for i, value, buf in zip(indices, new_values, new_bufs, strict=True):
                params[i].value = value
                if buf is not None:
                    states[i]["momentum_buffer"] = buf

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any], group: ParamGroup) -> None:
        buf = state.get("momentum_buffer")
        p.value, buf = backend.sgd_update(
            p.value, grad, buf, lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], weight_decay=group["weight_decay"], first_step=buf is None,
        )
        if buf is not None:
            state["momentum_buffer"] = buf


class GD(SGD):
    """The course's full-batch gradient descent ``W <- W - lr·dL/dW`` (SGD without momentum or decay)."""

    HYPERPARAMS = ("lr",)

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], lr: float) -> None:
        super().__init__(params, lr)


class Adam(Optimizer):
    """Adam as ``torch.optim.Adam``: ``g += wd·p`` (L2); ``m += (1-β1)(g - m)``; ``v = β2·v + (1-β2)·g²``;
    ``p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)``, ``t`` counted per parameter."""

    HYPERPARAMS = ("lr", "betas", "eps", "weight_decay")
    STATE_ARRAYS = ("exp_avg", "exp_avg_sq")
    STATE_INTS = ("step",)
    #: AdamW's weight decay ``p *= 1 - lr·wd`` instead of Adam's L2 term in the gradient.
    DECOUPLED: ClassVar[bool] = False

    betas: tuple[float, float]
    eps: float
    weight_decay: float

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any], fn: str | None = None) -> dict[str, Any]:
        fn = fn or cls.__name__
        betas = h["betas"]
        try:
            pair = tuple(betas)
        except TypeError:
            pair = ()
        if len(pair) != 2:
            raise ValueError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
        checked = tuple(real(b, f"betas[{k}]", fn, "in [0, 1)", lambda x: 0 <= x < 1) for k, b in enumerate(pair))
        return {
            "lr": learning_rate(h["lr"], fn),
            "betas": checked,
            "eps": real(h["eps"], "eps", fn, ">= 0", lambda x: x >= 0),
            "weight_decay": real(h["weight_decay"], "weight_decay", fn, ">= 0", lambda x: x >= 0),
        }

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any], group: ParamGroup) -> None:
        if not state:
            xp = backend.xp
            state.update(step=0, exp_avg=xp.zeros_like(p.value), exp_avg_sq=xp.zeros_like(p.value))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        p.value, state["exp_avg"], state["exp_avg_sq"] = backend.adam_update(
            p.value, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], decoupled=self.DECOUPLED,
        )


class AdamW(Adam):
    """AdamW as ``torch.optim.AdamW``: ``p *= 1 - lr·wd`` (decoupled weight decay), then Adam's step without L2."""

    DECOUPLED = True

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ------------------------------------------------------------------ helpers
def _label(i: int, p: Param) -> str:
    return f"parameter {i} ({p.name!r})" if p.name else f"parameter {i}"


def _param_index(key: Any, n: int, fn: str) -> int:
    try:
        i = int(key) if isinstance(key, (str, int, np.integer)) and not isinstance(key, bool) else -1
    except ValueError:
        i = -1
    if not 0 <= i < n or str(i) != str(key):
        raise ValueError(f"{fn}: 'state' has an entry for parameter {key!r}, but this optimizer has {n} "
                         f"parameters (keys '0' to '{n - 1}')")
    return i


def _convert(x: Array, p: Param, backend: Backend) -> Array:
    """A new array with ``x``'s values on ``p``'s backend and device, in ``p``'s dtype."""
    # copy=True: a shared buffer would let this optimizer's in-place updates write into the state's owner.
    return backend.astype(to_backend(x, backend, device=backend.device(p.value), copy=True), p.value.dtype)


def _in_place_of(x: Array, value: Array, backend: Backend) -> bool:
    """True when state ``x`` already matches ``value``: same array type (hence backend), dtype,
    shape and device, so :func:`_match` would return it as it is."""
    return (type(x) is type(value) and x.dtype == value.dtype and tuple(x.shape) == tuple(value.shape)
            and (backend.single_device or backend.device(x) == backend.device(value)))


def _match(x: Array, p: Param, backend: Backend, what: str) -> Array:
    """Stored state where ``p`` now lives (after ``model.to(...)``): ``x`` itself when it already does."""
    if tuple(x.shape) != p.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)} but the parameter now has shape {p.shape}; "
                         f"the parameter was replaced: build a new optimizer")
    same = backend_or_none(x) is backend and (backend.single_device or backend.device(x) == backend.device(p.value))
    if same and x.dtype == p.value.dtype:
        return x
    return _convert(x, p, backend)
