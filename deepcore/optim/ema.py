"""An exponential moving average of a model's weights, evaluated in place of them.

```python
ema = dc.optim.EMA(model, decay=0.999)
for xb, yb in batches:
    ...; opt.step()
    ema.update()                  # avg <- avg + (1 - decay)(w - avg)
with ema.applied():               # the averages stand in for the weights, then the weights come back
    dc.train.evaluate(model, ...)
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..backend import get_backend, to_backend
from ..backend.base import Array, Backend
from ..backend.registry import backend_or_none
from ..nn.module import Module, Param
from .checks import real, state_int

__all__ = ["EMA"]

_STATE_KEYS = ("type", "decay", "warmup", "num_updates", "include_buffers", "params", "buffers")


class EMA:
    """``avg_t = avg_{t-1} + (1 - d)(w_t - avg_{t-1})`` for every parameter after each :meth:`update`
    (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``: ``avg.lerp_(w, 1 - d)``),
    starting from the weights the model has when the EMA is built.

    ``warmup=True`` uses ``d_t = min(decay, (1 + t) / (10 + t))`` at the ``t``-th update (``t`` from 0, as
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so early averages follow the weights
    closely instead of remembering the initialisation for thousands of steps. ``include_buffers=True``
    (the default) averages floating-point buffers too (BatchNorm's running statistics) and copies the
    others (``num_batches_tracked``); False leaves buffers to the model.

    The averages live on the model's backend, in each parameter's dtype, as copies (never the model's
    own arrays); :meth:`applied` swaps copies of them in and restores the weights after.
    """

    def __init__(self, model: Module, decay: float = 0.999, *, warmup: bool = False,
                 include_buffers: bool = True) -> None:
        fn = "EMA"
        if not isinstance(model, Module):
            raise TypeError(f"{fn}: model must be a deepcore.nn.Module, got {type(model).__name__}")
        self.decay = real(decay, "decay", fn, "in [0, 1]", lambda x: 0 <= x <= 1)
        for name, flag in (("warmup", warmup), ("include_buffers", include_buffers)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{fn}: {name} must be True or False, got {flag!r}")
        self.model = model
        self.warmup = bool(warmup)
        self.include_buffers = bool(include_buffers)
        #: ``update()`` calls so far.
        self.num_updates = 0
        #: The averaged parameters by dotted name.
        self.params: dict[str, Array] = {name: _copy(p.value) for name, p in self._named_params()}
        #: The averaged (or copied) buffers by dotted name; empty with ``include_buffers=False``.
        self.buffers: dict[str, Array] = ({name: _copy(b) for name, b in model.named_buffers()}
                                          if self.include_buffers else {})

    def _named_params(self) -> Iterator[tuple[str, Param]]:
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.warmup:
            t = self.num_updates
            return min(self.decay, (1 + t) / (10 + t))
        return self.decay

    def update(self) -> None:
        """Move every average towards the model's current weights (and buffers)."""
        d = self.current_decay()
        weight = 1.0 - d
        params = dict(self._named_params())
        if set(params) != set(self.params):
            raise ValueError(f"EMA.update: the model's parameters {sorted(params)} are not those the EMA was built "
                             f"with {sorted(self.params)}")
        current = dict(self.model.named_buffers()) if self.include_buffers else {}
        if set(current) != set(self.buffers):
            raise ValueError(f"EMA.update: the model's buffers {sorted(current)} are not those the EMA was "
                             f"built with {sorted(self.buffers)}")
        # Shapes first, so an error changes no average.
        for kind, averages, values in (("parameter", self.params, {n: p.value for n, p in params.items()}),
                                       ("buffer", self.buffers, current)):
            for name, value in values.items():
                if tuple(averages[name].shape) != tuple(value.shape):
                    raise ValueError(f"EMA.update: {kind} {name!r} has shape {tuple(value.shape)}, its average "
                                     f"{tuple(averages[name].shape)}")
        for name, p in params.items():
            self.params[name] = _lerp(self.params[name], p.value, weight)
        for name, b in current.items():
            self.buffers[name] = _lerp(self.buffers[name], b, weight) if get_backend(b).is_floating(b) else _copy(b)
        self.num_updates += 1

    def copy_to(self, model: Module | None = None) -> None:
        """Give ``model`` (the EMA's own by default) copies of the averages as its weights (and buffers), for
        good: to save or export the averaged model. The optimizer keeps working on the new arrays."""
        model = self.model if model is None else model
        params = {name: p for name, p in model.named_parameters()}
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"EMA.copy_to: the model has no parameters {missing}")
        values = {}
        for name, avg in self.params.items():
            p = params[name]
            if tuple(avg.shape) != p.shape:
                raise ValueError(f"EMA.copy_to: parameter {name!r} has shape {p.shape}, the average {tuple(avg.shape)}")
            values[name] = _like(avg, p.value)
        current = dict(model.named_buffers())
        buffers = {name: _like(avg, current[name]) for name, avg in self.buffers.items()}
        for name, value in values.items():
            params[name].value = value
        if buffers:
            model.set_buffers(buffers)

    @contextlib.contextmanager
    def applied(self) -> Iterator[Module]:
        """Within the block the model holds (copies of) the averages; its weights, gradients, buffers and
        extra states come back on exit, even after an error (``Module.snapshot`` / ``restore``). Meant for
        evaluation: a training step taken inside is undone on exit."""
        snapshot = self.model.snapshot()
        try:
            self.copy_to(self.model)
            yield self.model
        finally:
            self.model.restore(snapshot)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"type", "decay", "warmup", "num_updates", "include_buffers", "params", "buffers"}``; the arrays
        (under ``params`` / ``buffers`` by dotted name) are the EMA's own: copy them before the next update."""
        return {"type": "EMA", "decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "include_buffers": self.include_buffers, "params": dict(self.params), "buffers": dict(self.buffers)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s values, arrays from any backend (NumPy from a file) converted to the
        model's; the names and shapes must be the model's. Everything is checked before anything changes."""
        fn = "EMA.load_state_dict"
        if not isinstance(state, Mapping) or state.get("type") != "EMA":
            raise ValueError(f"{fn}: expected the state of an EMA, got {state!r:.80}")
        if set(state) != set(_STATE_KEYS):
            raise ValueError(f"{fn}: the state must have keys {sorted(_STATE_KEYS)}, got {sorted(state)}")
        decay = real(state["decay"], "decay", fn, "in [0, 1]", lambda x: 0 <= x <= 1)
        num_updates = state_int(state["num_updates"], "'num_updates'", fn)
        flags = {}
        for name in ("warmup", "include_buffers"):
            if not isinstance(state[name], (bool, np.bool_)):
                raise TypeError(f"{fn}: {name!r} must be True or False, got {state[name]!r}")
            flags[name] = bool(state[name])
        params = {name: p.value for name, p in self._named_params()}
        buffers = dict(self.model.named_buffers()) if flags["include_buffers"] else {}
        new_params = _load_arrays(state["params"], params, "params", fn)
        new_buffers = _load_arrays(state["buffers"], buffers, "buffers", fn)
        self.decay, self.num_updates = decay, num_updates
        self.warmup, self.include_buffers = flags["warmup"], flags["include_buffers"]
        self.params, self.buffers = new_params, new_buffers

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, warmup={self.warmup}, include_buffers={self.include_buffers}, "
                f"num_updates={self.num_updates}, {len(self.params)} params)")


# ------------------------------------------------------------------ helpers
def _copy(x: Array) -> Array:
    return get_backend(x).copy(x)


def _like(x: Array, target: Array) -> Array:
    """A new array with ``x``'s values on ``target``'s backend and device, in ``target``'s dtype."""
    backend = get_backend(target)
    return backend.astype(to_backend(x, backend, device=backend.device(target), copy=True), target.dtype)


def _lerp(avg: Array, value: Array, weight: float) -> Array:
    """``avg + weight (value - avg)``, in ``avg`` itself where the library writes in place; ``avg`` first
    moved where ``value`` lives (after ``model.to(...)``)."""
    backend: Backend = get_backend(value)
    if backend_or_none(avg) is not backend or avg.dtype != value.dtype:
        avg = _like(avg, value)
    return backend.add_into(avg, (backend.astype(value, avg.dtype) - avg) * weight)


def _load_arrays(saved: Any, current: dict[str, Array], what: str, fn: str) -> dict[str, Array]:
    if not isinstance(saved, Mapping):
        raise TypeError(f"{fn}: {what!r} must be a dict of arrays by name, got {type(saved).__name__}")
    if set(saved) != set(current):
        raise ValueError(f"{fn}: {what!r} has {sorted(saved)}, the model has {sorted(current)}")
    out = {}
    for name, value in saved.items():
        if backend_or_none(value) is None:
            value = np.asarray(value)
        if tuple(value.shape) != tuple(current[name].shape):
            raise ValueError(f"{fn}: {what}[{name!r}] has shape {tuple(value.shape)}, the model's "
                             f"{tuple(current[name].shape)}")
        out[name] = _like(value, current[name])
    return out
