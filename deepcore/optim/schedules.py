"""Learning-rate schedules with PyTorch's semantics, stepped once per epoch.

A schedule reads the optimizer's learning rate when it is built (``base_lr``),
sets ``optimizer.lr`` for epoch 0 at once, and for epoch ``e`` at the ``e``-th
``step()``, as ``torch.optim.lr_scheduler`` does. The rate is computed in
closed form from ``(base_lr, last_epoch)``, so a schedule's state is two
numbers and resuming is exact. Schedules do not stack on one optimizer;
:class:`SequentialSchedule` runs them one after another (warm-up, then cosine).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from .._checks import check_int
from .optimizers import Optimizer, _learning_rate, _real, _state_int

__all__ = ["CosineAnnealingLR", "ExponentialLR", "LRSchedule", "LinearWarmup", "SequentialSchedule", "StepLR"]


class LRSchedule:
    """Base class: subclasses name their hyperparameters in ``HYPERPARAMS`` and implement ``lr_at``."""

    HYPERPARAMS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, optimizer: Optimizer, **hyperparams: Any) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: optimizer must be a deepcore.optim optimizer, "
                            f"got {type(optimizer).__name__}")
        checked = self._check(hyperparams)
        self.optimizer = optimizer
        self.__dict__.update(checked)
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        self._apply()

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not implement lr_at")

    def step(self) -> None:
        """Advance one epoch and set the optimizer's learning rate for it."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The learning rate this schedule last set."""
        return self._last_lr

    def _apply(self) -> None:
        self._last_lr = float(self.lr_at(self.last_epoch))
        self.optimizer.lr = self._last_lr

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"type", "base_lr", "last_epoch", <hyperparameters>}``."""
        return {"type": type(self).__name__, "base_lr": self.base_lr, "last_epoch": self.last_epoch,
                **{name: getattr(self, name) for name in self.HYPERPARAMS}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s values (all checked first) and set the optimizer's rate to match."""
        fn = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{fn}: expected a dict as returned by state_dict(), got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"{fn}: the state is for a {state.get('type')!r} schedule, "
                             f"expected {type(self).__name__!r}")
        expected = {"type", "base_lr", "last_epoch", *self.HYPERPARAMS}
        if set(state) != expected:
            raise ValueError(f"{fn}: the state must have keys {sorted(expected)}, got {sorted(state)}")
        checked = self._check({name: state[name] for name in self.HYPERPARAMS})
        base_lr = _learning_rate(state["base_lr"], fn)
        last_epoch = _state_int(state["last_epoch"], "'last_epoch'", fn)
        self.__dict__.update(checked)
        self.base_lr, self.last_epoch = base_lr, last_epoch
        self._apply()

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.HYPERPARAMS)
        return f"{type(self).__name__}({args}, base_lr={self.base_lr!r}, last_epoch={self.last_epoch})"


class StepLR(LRSchedule):
    """``lr = base_lr · gamma^(epoch // step_size)`` (``torch.optim.lr_scheduler.StepLR``)."""

    HYPERPARAMS = ("step_size", "gamma")
    step_size: int
    gamma: float

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer, step_size=step_size, gamma=gamma)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"step_size": check_int(h["step_size"], "step_size", cls.__name__, 1),
                "gamma": _gamma(h["gamma"], cls.__name__)}

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRSchedule):
    """``lr = base_lr · gamma^epoch`` (``torch.optim.lr_scheduler.ExponentialLR``)."""

    HYPERPARAMS = ("gamma",)
    gamma: float

    def __init__(self, optimizer: Optimizer, gamma: float) -> None:
        super().__init__(optimizer, gamma=gamma)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"gamma": _gamma(h["gamma"], cls.__name__)}

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma**epoch


class CosineAnnealingLR(LRSchedule):
    """``lr = eta_min + (base_lr - eta_min)(1 + cos(π·epoch/T_max))/2``, the closed form of
    ``torch.optim.lr_scheduler.CosineAnnealingLR`` (periodic beyond ``T_max``, as there)."""

    HYPERPARAMS = ("T_max", "eta_min")
    T_max: int
    eta_min: float

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"T_max": check_int(h["T_max"], "T_max", cls.__name__, 1),
                "eta_min": _real(h["eta_min"], "eta_min", cls.__name__, ">= 0", lambda x: x >= 0)}

    def lr_at(self, epoch: int) -> float:
        # PyTorch's _get_closed_form_lr, operation for operation.
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class LinearWarmup(LRSchedule):
    """``lr = base_lr · (s + (1 - s)·min(epoch, warmup_steps)/warmup_steps)`` with ``s = start_factor``:
    ``torch.optim.lr_scheduler.LinearLR(start_factor=s, end_factor=1.0, total_iters=warmup_steps)``."""

    HYPERPARAMS = ("warmup_steps", "start_factor")
    warmup_steps: int
    start_factor: float

    def __init__(self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.1) -> None:
        super().__init__(optimizer, warmup_steps=warmup_steps, start_factor=start_factor)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"warmup_steps": check_int(h["warmup_steps"], "warmup_steps", cls.__name__, 1),
                "start_factor": _real(h["start_factor"], "start_factor", cls.__name__, "in (0, 1]",
                                      lambda x: 0 < x <= 1)}

    def lr_at(self, epoch: int) -> float:
        s = self.start_factor
        return self.base_lr * (s + (1.0 - s) * min(self.warmup_steps, epoch) / self.warmup_steps)


class SequentialSchedule(LRSchedule):
    """``schedules[i]`` sets the rate from epoch ``milestones[i-1]`` on, starting at its own epoch 0
    (``torch.optim.lr_scheduler.SequentialLR``); e.g. ``LinearWarmup`` for 5 epochs, then cosine."""

    def __init__(self, optimizer: Optimizer, schedules: list[LRSchedule], milestones: list[int]) -> None:
        fn = "SequentialSchedule"
        schedules = list(schedules)
        milestones = [check_int(m, "milestones", fn, 1) for m in milestones]
        if not schedules or len(milestones) != len(schedules) - 1:
            raise ValueError(f"{fn}: needs one milestone fewer than schedules, got {len(schedules)} schedules "
                             f"and {len(milestones)} milestones")
        if milestones != sorted(set(milestones)):
            raise ValueError(f"{fn}: milestones must be strictly increasing, got {milestones}")
        for i, sched in enumerate(schedules):
            if not isinstance(sched, LRSchedule) or sched.optimizer is not optimizer:
                raise ValueError(f"{fn}: schedules[{i}] must be a schedule of this optimizer, got {sched!r}")
        self.schedules, self.milestones = schedules, milestones
        # The first child read the optimizer's rate before any schedule changed it; later
        # children (and optimizer.lr now) already see the first child's epoch-0 rate.
        base_lr = schedules[0].base_lr
        for sched in schedules:
            sched.base_lr = base_lr
        super().__init__(optimizer)
        self.base_lr = base_lr
        self._apply()

    def lr_at(self, epoch: int) -> float:
        i = bisect.bisect_right(self.milestones, epoch)
        return self.schedules[i].lr_at(epoch - (self.milestones[i - 1] if i else 0))

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "base_lr": self.base_lr, "last_epoch": self.last_epoch,
                "milestones": list(self.milestones), "schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fn = "SequentialSchedule.load_state_dict"
        if not isinstance(state, Mapping) or state.get("type") != type(self).__name__:
            raise ValueError(f"{fn}: expected the state of a SequentialSchedule, got {state!r:.80}")
        same_milestones = list(state.get("milestones", [])) == self.milestones
        if not same_milestones or len(state.get("schedules", [])) != len(self.schedules):
            raise ValueError(f"{fn}: the state's milestones/schedules do not match this schedule's {self.milestones}")
        base_lr = _learning_rate(state["base_lr"], fn)
        last_epoch = _state_int(state["last_epoch"], "'last_epoch'", fn)
        lr, before = self.optimizer.lr, [s.state_dict() for s in self.schedules]
        try:
            for sched, sub in zip(self.schedules, state["schedules"], strict=True):
                sched.load_state_dict(sub)
        except Exception:
            # A bad child state must not leave the earlier children (or the rate) half-loaded.
            for sched, sub in zip(self.schedules, before, strict=True):
                sched.load_state_dict(sub)
            self.optimizer.lr = lr
            raise
        self.base_lr, self.last_epoch = base_lr, last_epoch
        self._apply()

    def __repr__(self) -> str:
        return f"SequentialSchedule({self.schedules!r}, milestones={self.milestones}, last_epoch={self.last_epoch})"


def _gamma(value: Any, fn: str) -> float:
    return _real(value, "gamma", fn, "> 0", lambda x: x > 0)
