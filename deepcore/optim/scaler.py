"""Dynamic loss scaling for float16 training, with ``torch.amp.GradScaler``'s rules.

```python
scaler = dc.optim.LossScaler()
for xb, yb in batches:
    opt.zero_grad()
    pred, backward = model.forward(xb, train=True)
    loss, dloss = dc.losses.softmax_cross_entropy(pred, yb)
    backward(scaler.scale(dloss))       # gradients come out multiplied by the scale
    scaler.unscale(opt)                 # optional: before clipping, say
    dc.optim.clip_grad_norm(model, 1.0)
    scaler.step(opt)                    # False (and nothing changed) if a gradient was inf/NaN
    scaler.update()                     # halve after a skipped step, double after 2000 clean ones
```

Host synchronisation: one per step, in :meth:`LossScaler.step`, which must know on the host
whether any gradient was inf or NaN to decide whether to step (PyTorch's ``GradScaler.step``
makes the same one ``.item()`` call). :meth:`~LossScaler.unscale` keeps its finiteness flags on
the device; the scale itself is a Python float, so scaling and updating never read the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..backend import get_backend
from ..backend.base import Array
from .checks import real, state_int
from .groups import params_of
from .optimizers import Optimizer

__all__ = ["LossScaler"]

_STATE_KEYS = ("type", "scale", "growth_factor", "backoff_factor", "growth_interval", "growth_tracker", "enabled")


class LossScaler:
    """Scale the loss's gradient so float16 gradients do not underflow, unscale before the step, skip
    steps whose gradients overflowed, and adapt the scale as ``torch.amp.GradScaler`` does: start at
    ``init_scale``; after a step with an inf/NaN gradient multiply it by ``backoff_factor`` and
    restart the count; after ``growth_interval`` clean steps in a row multiply it by
    ``growth_factor``. The scale is kept as a float32 value, as PyTorch keeps it.

    ``enabled=False`` makes every method a pass-through (``scale`` returns its argument, ``step``
    always steps), so one loop serves fp32 and fp16.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True) -> None:
        fn = "LossScaler"
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"{fn}: enabled must be True or False, got {enabled!r}")
        self.enabled = bool(enabled)
        self._scale = _f32(real(init_scale, "init_scale", fn, "> 0", lambda x: x > 0))
        self.growth_factor = real(growth_factor, "growth_factor", fn, "> 1", lambda x: x > 1)
        self.backoff_factor = real(backoff_factor, "backoff_factor", fn, "in (0, 1)", lambda x: 0 < x < 1)
        self.growth_interval = _positive_int(growth_interval, "growth_interval", fn)
        self._growth_tracker = 0
        self._new_step()

    def _new_step(self) -> None:
        self._unscaled: set[int] = set()  # ids of the Params unscaled since the last update()
        self._flags: dict[tuple[int, str], Any] = {}  # per backend and device: "every gradient unscaled is finite"
        self._found_inf: bool | None = None
        self._stepped = False

    # ---------------------------------------------------------------- a step
    def get_scale(self) -> float:
        """The current scale (1.0 when disabled, as PyTorch answers)."""
        return self._scale if self.enabled else 1.0

    def is_enabled(self) -> bool:
        return self.enabled

    def scale(self, loss_grad: Array) -> Array:
        """``loss_grad · scale``: the gradient of the loss to hand to ``backward``. Half-precision input is
        multiplied in float32 and cast back, so the scale itself (65536 is beyond float16) never overflows."""
        if not self.enabled:
            return loss_grad
        backend = get_backend(loss_grad)
        wide = backend.compute_dtype(loss_grad.dtype)
        if wide == loss_grad.dtype:
            return loss_grad * self._scale
        return backend.astype(backend.astype(loss_grad, wide) * self._scale, loss_grad.dtype)

    def unscale(self, params: Any) -> None:
        """Divide every gradient of ``params`` (an optimizer, a Module, Params) by the scale, once per step:
        a parameter already unscaled since the last :meth:`update` is left alone, so calling this before
        clipping and again through :meth:`step` is harmless. Each unscaled gradient is stored in its
        parameter's dtype (a float16 gradient of a float32 master weight becomes float32, so small values
        do not underflow) and checked for inf/NaN on the device, without a host sync."""
        if not self.enabled:
            return
        if self._stepped:
            raise RuntimeError("LossScaler.unscale: step() already ran since the last update(); call update() "
                               "once per iteration, after step()")
        inv = float(np.float32(1.0 / np.float64(self._scale)))  # PyTorch: the reciprocal in double, as float32
        for p in params_of(params, "LossScaler.unscale"):
            if p.grad is None or id(p) in self._unscaled:
                continue
            grad = p.grad
            backend = get_backend(grad)
            out_dtype = p.value.dtype if backend.is_floating(p.value) else grad.dtype
            wide = backend.compute_dtype(out_dtype)
            unscaled = backend.astype(backend.astype(grad, wide) * inv, out_dtype)
            finite = backend.xp.all(backend.xp.isfinite(unscaled))
            key = (id(backend), str(backend.device(unscaled)))
            self._flags[key] = finite if key not in self._flags else self._flags[key] & finite
            p.grad = unscaled
            self._unscaled.add(id(p))
        self._found_inf = None

    def found_inf(self) -> bool:
        """Whether any gradient unscaled in this step was inf or NaN (the step's one host sync)."""
        if self._found_inf is None:
            self._found_inf = not all(bool(flag) for flag in self._flags.values())
        return self._found_inf

    def step(self, optimizer: Optimizer) -> bool:
        """Unscale ``optimizer``'s gradients (where :meth:`unscale` has not), then ``optimizer.step()``
        unless a gradient is inf or NaN. Returns whether the step was taken; a skipped step changes no
        parameter and no optimizer state (the gradients stay, unscaled, until ``zero_grad``)."""
        if not self.enabled:
            optimizer.step()
            return True
        if self._stepped:
            raise RuntimeError("LossScaler.step: already called since the last update()")
        self.unscale(optimizer)
        self._stepped = True
        if self.found_inf():
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        """Adapt the scale to this step's outcome (PyTorch's ``_amp_update_scale_``) and start a new step.
        Call it once per iteration, after :meth:`step` (or :meth:`unscale`)."""
        if not self.enabled:
            return
        if not self._unscaled and not self._stepped:
            raise RuntimeError("LossScaler.update: no gradients were unscaled or stepped since the last update(); "
                               "call step(optimizer) first")
        if self.found_inf():
            self._scale = _f32(self._scale * self.backoff_factor)
            self._growth_tracker = 0
        else:
            successful = self._growth_tracker + 1
            if successful == self.growth_interval:
                grown = _f32(self._scale * self.growth_factor)
                if np.isfinite(grown):
                    self._scale = grown
                self._growth_tracker = 0
            else:
                self._growth_tracker = successful
        self._new_step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"type", "scale", "growth_factor", "backoff_factor", "growth_interval",
        "growth_tracker", "enabled"}``."""
        return {"type": "LossScaler", "scale": self._scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": self._growth_tracker, "enabled": self.enabled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s values (all checked first); a step in progress is forgotten."""
        fn = "LossScaler.load_state_dict"
        if not isinstance(state, Mapping) or state.get("type") != "LossScaler":
            raise ValueError(f"{fn}: expected the state of a LossScaler, got {state!r:.80}")
        if set(state) != set(_STATE_KEYS):
            raise ValueError(f"{fn}: the state must have keys {sorted(_STATE_KEYS)}, got {sorted(state)}")
        fresh = LossScaler(state["scale"], state["growth_factor"], state["backoff_factor"], state["growth_interval"],
                           state["enabled"])
        fresh._growth_tracker = state_int(state["growth_tracker"], "'growth_tracker'", fn)
        if fresh._growth_tracker >= fresh.growth_interval:
            raise ValueError(f"{fn}: growth_tracker must be below growth_interval, got {fresh._growth_tracker}")
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (f"LossScaler(scale={self._scale}, growth_factor={self.growth_factor}, "
                f"backoff_factor={self.backoff_factor}, growth_interval={self.growth_interval}, "
                f"growth_tracker={self._growth_tracker}, enabled={self.enabled})")


def _f32(x: float) -> float:
    """``x`` rounded to float32 (PyTorch keeps the scale in a float32 tensor), as a Python float."""
    return float(np.float32(x))


def _positive_int(value: Any, name: str, fn: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    return int(value)
