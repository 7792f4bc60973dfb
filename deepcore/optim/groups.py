"""Parameter groups as in PyTorch: ``ParamGroup`` (a checked dict), the parsing of an optimizer's
``params`` argument, and :func:`param_groups`, which keeps biases and normalisation weights out of
weight decay.

```python
groups = dc.optim.param_groups(model, weight_decay=0.05)   # [{"params": [...], "weight_decay": 0.05},
opt = dc.optim.AdamW(groups, lr=1e-3)                      #  {"params": [...], "weight_decay": 0.0}]
opt.param_groups[1]["lr"] = 5e-4                           # checked as the constructor checks it
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..nn.module import Module, Param
from .checks import real

__all__ = ["ParamGroup", "param_groups", "params_of"]

#: A group's optional label (a string), kept and saved as PyTorch users keep theirs.
NAME_KEY = "name"


class ParamGroup(dict):  # type: ignore[type-arg]
    """One parameter group: ``"params"`` (a list of :class:`~deepcore.nn.Param`) and every
    hyperparameter of its optimizer, as ``torch.optim.Optimizer.param_groups`` holds them.

    Setting a hyperparameter (``group["lr"] = 0.01``, what a schedule does) checks the value as the
    optimizer's constructor does, together with the group's other values (SGD's nesterov needs
    momentum); an unknown key, deleting a key or replacing ``"params"`` raises. Copies
    (``copy.deepcopy``, pickling) are plain dicts."""

    __slots__ = ("_check", "_editable", "_owner")

    def __init__(self, params: list[Param], hyperparams: Mapping[str, Any],
                 check: Callable[[Mapping[str, Any]], dict[str, Any]], editable: Iterable[str], owner: str) -> None:
        super().__init__(params=params, **hyperparams)
        self._check, self._editable, self._owner = check, frozenset(editable), owner

    def hyperparams(self) -> dict[str, Any]:
        """Everything but ``"params"``."""
        return {k: v for k, v in self.items() if k != "params"}

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise TypeError(f"{self._owner}: a group's 'params' cannot be replaced; build a new optimizer "
                            f"or call add_param_group")
        if key == NAME_KEY:
            dict.__setitem__(self, key, _group_name(value, self._owner))
            return
        self.set_checked(self.validate({key: value}))

    def validate(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """``changes`` (hyperparameter: value) checked together with the group's other values, as the
        optimizer's constructor checks them; the checked values are returned and nothing is set."""
        unknown = sorted(set(changes) - self._editable)
        if unknown:
            raise KeyError(f"{self._owner}: a parameter group has no hyperparameter {unknown[0]!r}; it has "
                           f"{sorted(self._editable)}")
        checked = self._check({**self.hyperparams(), **changes})
        return {k: checked[k] for k in changes}

    def set_checked(self, values: Mapping[str, Any]) -> None:
        """Set what :meth:`validate` returned (no further check), e.g. after validating every group."""
        for key, value in values.items():
            dict.__setitem__(self, key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Set several values, checked together (``momentum`` and ``nesterov`` in either order)."""
        changes = dict(*args, **kwargs)
        if "params" in changes:
            self["params"] = changes["params"]  # raises
        name = {NAME_KEY: _group_name(changes.pop(NAME_KEY), self._owner)} if NAME_KEY in changes else {}
        self.set_checked({**self.validate(changes), **name})

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self._owner}: keys cannot be removed from a parameter group")

    __delitem__ = pop = popitem = clear = _refuse  # type: ignore[assignment]

    def __ior__(self, other: Any) -> ParamGroup:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)

    def __repr__(self) -> str:
        names = [p.name or "?" for p in self["params"]]
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"ParamGroup(params=[{shown}], {hyper})"


def parse_param_groups(params: Any, fn: str,
                       editable: Sequence[str]) -> list[tuple[list[Param], dict[str, Any], str | None]]:
    """An optimizer's ``params`` argument as ``[(params, overrides, label), ...]``: a list of Params is one
    group without overrides (label None); a list of dicts ``{"params": ..., <hyperparameter>: value,
    "name": str}`` is one group each (labelled ``"params[g]"`` for messages). Every Param appears once in
    all; at least one Param in all."""
    if isinstance(params, Param):
        raise TypeError(f"{fn}: params must be a list of Params (e.g. model.parameters()), got a single Param; "
                        f"wrap it in a list")
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(f"{fn}: params must be a list of deepcore.nn.Param (e.g. model.parameters()) or a list "
                        f"of parameter groups (dicts with a 'params' key), got {type(params).__name__}")
    items = list(params)
    if not items:
        raise ValueError(f"{fn}: params must not be empty, got an empty list (does the model have parameters?)")
    if not any(isinstance(item, Mapping) for item in items):
        return [(_check_param_list(items, fn, "params", {}), {}, None)]
    seen: dict[int, str] = {}
    out = []
    for g, item in enumerate(items):
        where = f"params[{g}]"
        if not isinstance(item, Mapping):
            raise TypeError(f"{fn}: {where} must be a parameter group (a dict with a 'params' key) like the "
                            f"others, got {type(item).__name__}")
        if "params" not in item:
            raise ValueError(f"{fn}: {where} must have a 'params' key (the group's list of Params)")
        unknown = sorted(set(item) - {"params", NAME_KEY, *editable})
        if unknown:
            raise ValueError(f"{fn}: {where} has unknown keys {unknown}; a group may set {sorted(editable)} "
                             f"and '{NAME_KEY}'")
        members = item["params"]
        if isinstance(members, Param):
            members = [members]
        if isinstance(members, (str, bytes, Mapping)) or not isinstance(members, Iterable):
            raise TypeError(f"{fn}: {where}['params'] must be a list of deepcore.nn.Param, "
                            f"got {type(members).__name__}")
        group_params = _check_param_list(list(members), fn, f"{where}['params']", seen)
        overrides = {k: v for k, v in item.items() if k != "params"}
        if NAME_KEY in overrides:
            overrides[NAME_KEY] = _group_name(overrides[NAME_KEY], fn)
        out.append((group_params, overrides, where))
    if not seen:
        raise ValueError(f"{fn}: every parameter group is empty (does the model have parameters?)")
    return out


def _check_param_list(items: list[Any], fn: str, where: str, seen: dict[int, str]) -> list[Param]:
    local: dict[int, str] = seen
    for i, p in enumerate(items):
        label = f"{where}[{i}]"
        if not isinstance(p, Param):
            raise TypeError(f"{fn}: {label} must be a deepcore.nn.Param (pass model.parameters()), "
                            f"got {type(p).__name__}")
        if id(p) in local:
            raise ValueError(f"{fn}: {label} ({p.name!r}) is the same Param as {local[id(p)]}; "
                             f"each parameter may appear once")
        local[id(p)] = label
    return items


def _group_name(value: Any, fn: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: a parameter group's '{NAME_KEY}' must be a string, got {value!r}")
    return value


def params_of(params: Any, fn: str) -> list[Param]:
    """The Params of an optimizer, a Module, one Param or an iterable of Params."""
    if hasattr(params, "param_groups") and isinstance(getattr(params, "params", None), list):
        return list(params.params)  # an optimizer (imported here it would make a cycle)
    if isinstance(params, Module):
        return params.parameters()
    if isinstance(params, Param):
        return [params]
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(f"{fn}: expected an optimizer, a Module or a list of Params, got {type(params).__name__}")
    items = list(params)
    for i, p in enumerate(items):
        if not isinstance(p, Param):
            raise TypeError(f"{fn}: params[{i}] must be a deepcore.nn.Param, got {type(p).__name__}")
    return items


# ---------------------------------------------------------------- the helper
def param_groups(model: Module, *, weight_decay: float | None = None,
                 no_decay: Sequence[str] = ("bias", "norm")) -> list[dict[str, Any]]:
    """Two parameter groups for an optimizer: the weights that decay, and the rest with
    ``weight_decay=0``.

    A parameter goes to the no-decay group when one of the ``no_decay`` substrings occurs (ignoring
    case) in its dotted name (``"0.bias"``) or in the class name of the layer that holds it, so
    ``"norm"`` catches every ``BatchNorm1d`` (whose parameters are called ``weight`` and ``bias``),
    ``LayerNorm`` and the like. ``weight_decay`` is the first group's rate; None leaves the
    optimizer's own default. An empty group is left out; the groups keep the model's parameter
    order, so checkpoints line up from run to run. ``no_decay=()`` puts everything in one group.
    """
    fn = "param_groups"
    if not isinstance(model, Module):
        raise TypeError(f"{fn}: model must be a deepcore.nn.Module, got {type(model).__name__}")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    keys = []
    for k in no_decay:
        if not isinstance(k, str) or not k:
            raise TypeError(f"{fn}: no_decay must be a sequence of non-empty strings, got {no_decay!r}")
        keys.append(k.lower())
    if weight_decay is not None:
        weight_decay = real(weight_decay, "weight_decay", fn, ">= 0", lambda x: x >= 0)
    decay: list[Param] = []
    keep: list[Param] = []
    for name, owner, p in _owned_parameters(model):
        text = f"{name.lower()} {type(owner).__name__.lower()}"
        (keep if any(k in text for k in keys) else decay).append(p)
    first: dict[str, Any] = {"params": decay}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    groups = [first, {"params": keep, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{fn}: the model has no parameters")
    return groups


def _owned_parameters(model: Module) -> Iterator[tuple[str, Module, Param]]:
    """``(dotted name, holding module, Param)`` in :meth:`Module.named_parameters`'s order."""
    owner: dict[int, Module] = {}
    for _, module in model.named_modules():
        for p in module._params.values():
            owner.setdefault(id(p), module)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:  # a parameter shared by two layers is listed once
            seen.add(id(p))
            yield name, owner[id(p)], p
