"""Optimizers: GD, SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW.

Each applies exactly PyTorch's update rule (``torch.optim.SGD``/``Adam``/``AdamW``
with foreach and fused off). The arithmetic lives in the backend
(``Backend.sgd_update``/``adam_update``): NumPy updates in place with ``out=``,
CuPy in one fused kernel per parameter, any other array-API library through
the reference. ``step()`` checks every gradient before it changes anything, so
a failed step leaves parameters and optimizer state as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from ..backend import Backend, BackendMismatchError, backend_of, get_backend, to_backend
from ..backend.base import Array
from ..backend.registry import known_backend
from ..nn.module import Param

__all__ = ["GD", "SGD", "Adam", "AdamW", "Optimizer"]

_STATE_DICT_KEYS = ("type", "hyperparams", "step_count", "state")


class Optimizer:
    """Base class: the parameter list, per-parameter state, checked steps and state dicts.

    Subclasses name their constructor hyperparameters in ``HYPERPARAMS`` (what
    ``state_dict()["hyperparams"]`` holds), their per-parameter arrays in
    ``STATE_ARRAYS`` and integers in ``STATE_INTS``, and implement
    ``_check_hyperparams`` and ``_update``.
    """

    HYPERPARAMS: ClassVar[tuple[str, ...]] = ("lr",)
    STATE_ARRAYS: ClassVar[tuple[str, ...]] = ()
    STATE_INTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[Param], **hyperparams: Any) -> None:
        fn = type(self).__name__
        checked = self._check_hyperparams(hyperparams)
        self.params: list[Param] = _check_params(params, fn)
        self._set_hyperparams(checked)
        #: Successful ``step()`` calls; Adam's bias correction uses each parameter's own count.
        self.step_count = 0
        #: One dict per parameter (empty until the parameter's first update).
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    # ------------------------------------------------------- hyperparameters
    @property
    def lr(self) -> float:
        """The learning rate; schedules set it between steps."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _learning_rate(value, type(self).__name__)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        """Every attribute to set, validated, from the constructor's (or a state dict's) values."""
        return {"lr": _learning_rate(h["lr"], cls.__name__)}

    def _set_hyperparams(self, checked: Mapping[str, Any]) -> None:
        for name, value in checked.items():
            setattr(self, name, value)

    def hyperparams(self) -> dict[str, Any]:
        """The constructor's hyperparameters, JSON-able (tuples as lists)."""
        return {name: _jsonable(getattr(self, name)) for name in self.HYPERPARAMS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({len(self.params)} params, {args})"

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
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            # The usual case, checked without a look-up or a copy: a gradient of the parameter's own
            # type, dtype and shape on a one-device library, and state already where it lives.
            value, state = p.value, states[i]
            backend = known_backend(type(value))
            if (backend is not None and backend.single_device and type(grad) is type(value)
                    and grad.dtype == value.dtype and grad.shape == value.shape and backend.is_floating(value)
                    and all(_in_place_of(state[name], value, backend) for name in self.STATE_ARRAYS
                            if name in state)):
                plan.append((i, backend, grad, state))
            else:
                plan.append(self._prepare(i, p))
        for i, backend, grad, state in plan:
            self.state[i] = state
            self._update(self.params[i], backend, grad, state)
        self.step_count += 1

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any]) -> None:
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
        """``{"type", "hyperparams", "step_count", "state"}``; ``state`` maps each parameter's index
        (a string) to its dict of arrays and ints (empty before its first update). The arrays are the
        optimizer's own, not copies: convert or copy them before the next ``step()``."""
        return {
            "type": type(self).__name__,
            "hyperparams": self.hyperparams(),
            "step_count": self.step_count,
            "state": {str(i): dict(s) for i, s in enumerate(self.state)},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` returned, with arrays from any backend (NumPy from a file, say)
        converted to each parameter's backend, device and dtype. Everything (type, parameter indices,
        keys, shapes, hyperparameters) is checked before anything changes. A missing parameter entry
        means "no state yet"."""
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
        checked = self._check_hyperparams({**self.hyperparams(), **hyper})
        step_count = _state_int(state_dict["step_count"], "'step_count'", fn)
        entries = state_dict["state"]
        if not isinstance(entries, Mapping):
            raise TypeError(f"{fn}: 'state' must be a dict, got {type(entries).__name__}")
        new_state: list[dict[str, Any]] = [{} for _ in self.params]
        for key, entry in entries.items():
            i = _param_index(key, len(self.params), fn)
            new_state[i] = self._load_entry(i, entry, fn)
        self._set_hyperparams(checked)
        self.step_count = step_count
        self.state = new_state

    def _load_entry(self, i: int, entry: Any, fn: str) -> dict[str, Any]:
        where = f"state[{str(i)!r}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{fn}: {where} must be a dict, got {type(entry).__name__}")
        if not entry:
            return {}
        expected = set(self.STATE_ARRAYS) | set(self.STATE_INTS)
        if set(entry) != expected:
            raise ValueError(f"{fn}: {where} must have keys {sorted(expected)}, got {sorted(entry)}")
        p = self.params[i]
        backend = get_backend(p.value)
        out: dict[str, Any] = {name: _state_int(entry[name], f"{where}[{name!r}]", fn) for name in self.STATE_INTS}
        for name in self.STATE_ARRAYS:
            value = entry[name]
            if _backend_or_none(value) is None:
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

    def __init__(self, params: Iterable[Param], lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        fn = cls.__name__
        momentum = _real(h.get("momentum", 0.0), "momentum", fn, ">= 0", lambda x: x >= 0)
        dampening = _real(h.get("dampening", 0.0), "dampening", fn, "(any finite number)", lambda x: True)
        nesterov = h.get("nesterov", False)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"{fn}: nesterov must be True or False, got {nesterov!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, "
                             f"got momentum={momentum}, dampening={dampening}")
        return {
            "lr": _learning_rate(h["lr"], fn),
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": bool(nesterov),
            "weight_decay": _real(h.get("weight_decay", 0.0), "weight_decay", fn, ">= 0", lambda x: x >= 0),
        }

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any]) -> None:
        buf = state.get("momentum_buffer")
        p.value, buf = backend.sgd_update(
            p.value, grad, buf, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
            nesterov=self.nesterov, weight_decay=self.weight_decay, first_step=buf is None,
        )
        if buf is not None:
            state["momentum_buffer"] = buf


class GD(SGD):
    """The course's full-batch gradient descent ``W <- W - lr·dL/dW`` (SGD without momentum or decay)."""

    HYPERPARAMS = ("lr",)

    def __init__(self, params: Iterable[Param], lr: float) -> None:
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

    def __init__(self, params: Iterable[Param], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        fn = cls.__name__
        betas = h["betas"]
        try:
            pair = tuple(betas)
        except TypeError:
            pair = ()
        if len(pair) != 2:
            raise ValueError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
        checked = tuple(_real(b, f"betas[{k}]", fn, "in [0, 1)", lambda x: 0 <= x < 1) for k, b in enumerate(pair))
        return {
            "lr": _learning_rate(h["lr"], fn),
            "betas": checked,
            "eps": _real(h["eps"], "eps", fn, ">= 0", lambda x: x >= 0),
            "weight_decay": _real(h["weight_decay"], "weight_decay", fn, ">= 0", lambda x: x >= 0),
        }

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any]) -> None:
        if not state:
            xp = backend.xp
            state.update(step=0, exp_avg=xp.zeros_like(p.value), exp_avg_sq=xp.zeros_like(p.value))
        state["step"] += 1
        beta1, beta2 = self.betas
        p.value, state["exp_avg"], state["exp_avg_sq"] = backend.adam_update(
            p.value, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], lr=self.lr, beta1=beta1,
            beta2=beta2, eps=self.eps, weight_decay=self.weight_decay, decoupled=self.DECOUPLED,
        )


class AdamW(Adam):
    """AdamW as ``torch.optim.AdamW``: ``p *= 1 - lr·wd`` (decoupled weight decay), then Adam's step without L2."""

    DECOUPLED = True

    def __init__(self, params: Iterable[Param], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ------------------------------------------------------------------ helpers
def _check_params(params: Any, fn: str) -> list[Param]:
    if isinstance(params, Param):
        raise TypeError(f"{fn}: params must be a list of Params (e.g. model.parameters()), got a single Param; "
                        f"wrap it in a list")
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(f"{fn}: params must be a list of deepcore.nn.Param (e.g. model.parameters()), "
                        f"got {type(params).__name__}")
    items = list(params)
    if not items:
        raise ValueError(f"{fn}: params must not be empty, got an empty list (does the model have parameters?)")
    seen: dict[int, int] = {}
    for i, p in enumerate(items):
        if not isinstance(p, Param):
            raise TypeError(f"{fn}: params[{i}] must be a deepcore.nn.Param (pass model.parameters()), "
                            f"got {type(p).__name__}")
        if id(p) in seen:
            raise ValueError(f"{fn}: params[{i}] ({p.name!r}) is the same Param as params[{seen[id(p)]}]; "
                             f"each parameter may appear once")
        seen[id(p)] = i
    return items


def _real(value: Any, name: str, fn: str, expected: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a Python float (so float32 arrays stay float32), if finite and ``ok``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a number {expected}, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or not ok(x):
        raise ValueError(f"{fn}: {name} must be a finite number {expected}, got {value!r}")
    return x


def _learning_rate(value: Any, fn: str) -> float:
    return _real(value, "lr", fn, ">= 0", lambda x: x >= 0)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _label(i: int, p: Param) -> str:
    return f"parameter {i} ({p.name!r})" if p.name else f"parameter {i}"


def _state_int(value: Any, name: str, fn: str) -> int:
    """A non-negative integer from an int, a NumPy integer, or a 0-d integer array of any backend."""
    raw = value
    if hasattr(value, "shape") and not isinstance(value, np.generic):
        backend = _backend_or_none(value)
        if tuple(value.shape) != () or backend is None:
            raise TypeError(f"{fn}: {name} must be a non-negative integer, got an array of shape {tuple(value.shape)}")
        value = backend.to_numpy(value)[()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0:
        return int(value)
    raise ValueError(f"{fn}: {name} must be a non-negative integer, got {raw!r}")


def _param_index(key: Any, n: int, fn: str) -> int:
    try:
        i = int(key) if isinstance(key, (str, int, np.integer)) and not isinstance(key, bool) else -1
    except ValueError:
        i = -1
    if not 0 <= i < n or str(i) != str(key):
        raise ValueError(f"{fn}: 'state' has an entry for parameter {key!r}, but this optimizer has {n} "
                         f"parameters (keys '0' to '{n - 1}')")
    return i


def _backend_or_none(x: Any) -> Backend | None:
    try:
        return get_backend(x)
    except (TypeError, ValueError):
        return None


def _convert(x: Array, p: Param, backend: Backend) -> Array:
    """A new array with ``x``'s values on ``p``'s backend and device, in ``p``'s dtype."""
    y = to_backend(x, backend, device=backend.device(p.value))
    y = backend.astype(y, p.value.dtype)
    return backend.copy(y) if y is x else y


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
    same = _backend_or_none(x) is backend and (backend.single_device or backend.device(x) == backend.device(p.value))
    if same and x.dtype == p.value.dtype:
        return x
    return _convert(x, p, backend)
