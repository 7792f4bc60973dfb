"""Learning-rate schedules with PyTorch's semantics, stepped per epoch or per optimizer step.

A schedule reads each parameter group's learning rate when it is built (``base_lrs``),
sets every group's ``"lr"`` for step 0 at once, and for step ``e`` at the ``e``-th
``step()``, as ``torch.optim.lr_scheduler`` does (each group scaled from its own
base rate). The rate is computed in closed form from ``(base_lrs, last_epoch)``, so a
schedule's state is a few numbers and resuming is exact. Schedules do not stack on one
optimizer; :class:`SequentialSchedule` runs them one after another (warm-up, then cosine).

``interval`` says what one ``step()`` is: ``"epoch"`` (the default, once after each
epoch) or ``"step"`` (once after each optimizer step; :class:`OneCycleLR`'s default), so
``LinearWarmup(opt, 500, interval="step")`` warms up over 500 batches. ``fit`` reads it.
``OneCycleLR`` (:mod:`.onecycle`) steps per batch; ``ReduceLROnPlateau`` (:mod:`.plateau`)
per epoch on a metric, ``sched.step(val_loss)``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .._checks import check_int
from .checks import learning_rate, real, state_int
from .optimizers import Optimizer

__all__ = ["INTERVALS", "CosineAnnealingLR", "ExponentialLR", "LRSchedule", "LinearWarmup", "SequentialSchedule",
           "StepLR"]

#: What one ``step()`` of a schedule stands for.
INTERVALS = ("epoch", "step")


class LRSchedule:
    """Base class: subclasses name their hyperparameters in ``HYPERPARAMS`` and implement ``_lr(base_lr, epoch)``
    (or ``lrs_at``)."""

    HYPERPARAMS: ClassVar[tuple[str, ...]] = ()
    #: The ``interval`` a schedule gets when its constructor is not told.
    DEFAULT_INTERVAL: ClassVar[str] = "epoch"
    #: True for schedules whose ``step`` takes a metric (:class:`ReduceLROnPlateau`).
    needs_metric: ClassVar[bool] = False

    def __init__(self, optimizer: Optimizer, *, interval: str | None = None, **hyperparams: Any) -> None:
        fn = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{fn}: optimizer must be a deepcore.optim optimizer, got {type(optimizer).__name__}")
        checked = self._check(hyperparams)
        self.optimizer = optimizer
        self.__dict__.update(checked)
        #: ``"epoch"`` or ``"step"``: whether ``step()`` is called once per epoch or once per optimizer step.
        self.interval = _interval(self.DEFAULT_INTERVAL if interval is None else interval, fn)
        #: Each group's learning rate when the schedule was built.
        self.base_lrs: list[float] = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply(0)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    @property
    def base_lr(self) -> float:
        """The first group's base rate (setting it sets every group's)."""
        return self.base_lrs[0]

    @base_lr.setter
    def base_lr(self, value: float) -> None:
        self.base_lrs = [learning_rate(value, type(self).__name__)] * len(self.base_lrs)

    def _lr(self, base_lr: float, epoch: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not implement _lr")

    def lrs_at(self, epoch: int) -> list[float]:
        """Every group's rate at step ``epoch``."""
        return [self._lr(base, epoch) for base in self.base_lrs]

    def lr_at(self, epoch: int) -> float:
        """The first group's rate at step ``epoch``."""
        return self.lrs_at(epoch)[0]

    def step(self) -> None:
        """Advance one epoch (or one optimizer step, ``interval="step"``) and set every group's rate for it."""
        self._apply(self.last_epoch + 1)
        self.last_epoch += 1

    def get_last_lr(self) -> float:
        """The learning rate this schedule last set (the first group's)."""
        return self._last_lrs[0]

    def get_last_lrs(self) -> list[float]:
        """Every group's rate as this schedule last set it (``torch``'s ``get_last_lr()``)."""
        return list(self._last_lrs)

    def _apply(self, epoch: int) -> None:
        """Set every group's values for step ``epoch``; on an error (past a one-cycle's end) nothing changes."""
        lrs = [float(lr) for lr in self.lrs_at(epoch)]
        _set_groups(self.optimizer, [{"lr": lr} for lr in lrs], type(self).__name__)
        self._last_lrs = lrs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"type", "base_lrs", "last_epoch", "interval", <hyperparameters>}``."""
        return {"type": type(self).__name__, "base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch,
                "interval": self.interval, **{name: _json(getattr(self, name)) for name in self.HYPERPARAMS}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s values (all checked first) and set the optimizer's rates to match.
        A state from before groups and intervals (one ``base_lr``, no ``interval``) still loads."""
        fn = f"{type(self).__name__}.load_state_dict"
        _check_type(state, self, fn)
        _check_keys(state, {"type", "last_epoch", *self.HYPERPARAMS}, fn)
        checked = self._check({name: state[name] for name in self.HYPERPARAMS})
        base_lrs = _base_lrs(state, len(self.optimizer.param_groups), fn)
        last_epoch = state_int(state["last_epoch"], "'last_epoch'", fn)
        _same_interval(state, self.interval, fn)
        before = {name: getattr(self, name) for name in self.HYPERPARAMS}
        old = (self.base_lrs, self.last_epoch)
        self.__dict__.update(checked)
        self.base_lrs, self.last_epoch = base_lrs, last_epoch
        try:
            self._apply(last_epoch)
        except Exception:
            self.__dict__.update(before)
            self.base_lrs, self.last_epoch = old
            raise

    def __repr__(self) -> str:
        args = "".join(f"{name}={getattr(self, name)!r}, " for name in self.HYPERPARAMS)
        return (f"{type(self).__name__}({args}base_lrs={self.base_lrs!r}, interval={self.interval!r}, "
                f"last_epoch={self.last_epoch})")


class StepLR(LRSchedule):
    """``lr = base_lr · gamma^(epoch // step_size)`` (``torch.optim.lr_scheduler.StepLR``)."""

    HYPERPARAMS = ("step_size", "gamma")
    step_size: int
    gamma: float

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, *, interval: str = "epoch") -> None:
        super().__init__(optimizer, step_size=step_size, gamma=gamma, interval=interval)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"step_size": check_int(h["step_size"], "step_size", cls.__name__, 1),
                "gamma": _gamma(h["gamma"], cls.__name__)}

    def _lr(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRSchedule):
    """``lr = base_lr · gamma^epoch`` (``torch.optim.lr_scheduler.ExponentialLR``)."""

    HYPERPARAMS = ("gamma",)
    gamma: float

    def __init__(self, optimizer: Optimizer, gamma: float, *, interval: str = "epoch") -> None:
        super().__init__(optimizer, gamma=gamma, interval=interval)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"gamma": _gamma(h["gamma"], cls.__name__)}

    def _lr(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma**epoch


class CosineAnnealingLR(LRSchedule):
    """``lr = eta_min + (base_lr - eta_min)(1 + cos(π·epoch/T_max))/2``, the closed form of
    ``torch.optim.lr_scheduler.CosineAnnealingLR`` (periodic beyond ``T_max``, as there)."""

    HYPERPARAMS = ("T_max", "eta_min")
    T_max: int
    eta_min: float

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, *, interval: str = "epoch") -> None:
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min, interval=interval)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"T_max": check_int(h["T_max"], "T_max", cls.__name__, 1),
                "eta_min": real(h["eta_min"], "eta_min", cls.__name__, ">= 0", lambda x: x >= 0)}

    def _lr(self, base_lr: float, epoch: int) -> float:
        # PyTorch's _get_closed_form_lr, operation for operation.
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class LinearWarmup(LRSchedule):
    """``lr = base_lr · (s + (1 - s)·min(epoch, warmup_steps)/warmup_steps)`` with ``s = start_factor``:
    ``torch.optim.lr_scheduler.LinearLR(start_factor=s, end_factor=1.0, total_iters=warmup_steps)``.
    ``interval="step"`` warms up over ``warmup_steps`` optimizer steps instead of epochs."""

    HYPERPARAMS = ("warmup_steps", "start_factor")
    warmup_steps: int
    start_factor: float

    def __init__(self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.1, *,
                 interval: str = "epoch") -> None:
        super().__init__(optimizer, warmup_steps=warmup_steps, start_factor=start_factor, interval=interval)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        return {"warmup_steps": check_int(h["warmup_steps"], "warmup_steps", cls.__name__, 1),
                "start_factor": real(h["start_factor"], "start_factor", cls.__name__, "in (0, 1]",
                                     lambda x: 0 < x <= 1)}

    def _lr(self, base_lr: float, epoch: int) -> float:
        s = self.start_factor
        return base_lr * (s + (1.0 - s) * min(self.warmup_steps, epoch) / self.warmup_steps)


class SequentialSchedule(LRSchedule):
    """``schedules[i]`` sets the rate from epoch ``milestones[i-1]`` on, starting at its own epoch 0
    (``torch.optim.lr_scheduler.SequentialLR``); e.g. ``LinearWarmup`` for 5 epochs, then cosine.
    Every child must have the same ``interval``, which the sequence takes."""

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
            if sched.needs_metric:
                raise ValueError(f"{fn}: schedules[{i}] is a {type(sched).__name__}, whose steps need a metric; "
                                 f"it cannot run in a sequence")
        intervals = sorted({s.interval for s in schedules})
        if len(intervals) > 1:
            raise ValueError(f"{fn}: every schedule must have the same interval, got {intervals}")
        self.schedules, self.milestones = schedules, milestones
        # The first child read the optimizer's rates before any schedule changed them; later
        # children (and the groups now) already see the first child's epoch-0 rates.
        base_lrs = list(schedules[0].base_lrs)
        for sched in schedules:
            sched.base_lrs = list(base_lrs)
        super().__init__(optimizer, interval=intervals[0])
        self.base_lrs = base_lrs
        self._apply(0)

    def lrs_at(self, epoch: int) -> list[float]:
        i = bisect.bisect_right(self.milestones, epoch)
        return self.schedules[i].lrs_at(epoch - (self.milestones[i - 1] if i else 0))

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch,
                "interval": self.interval, "milestones": list(self.milestones),
                "schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fn = "SequentialSchedule.load_state_dict"
        if not isinstance(state, Mapping) or state.get("type") != type(self).__name__:
            raise ValueError(f"{fn}: expected the state of a SequentialSchedule, got {state!r:.80}")
        same_milestones = list(state.get("milestones", [])) == self.milestones
        if not same_milestones or len(state.get("schedules", [])) != len(self.schedules):
            raise ValueError(f"{fn}: the state's milestones/schedules do not match this schedule's {self.milestones}")
        base_lrs = _base_lrs(state, len(self.optimizer.param_groups), fn)
        last_epoch = state_int(state["last_epoch"], "'last_epoch'", fn)
        _same_interval(state, self.interval, fn)
        lrs, before = [g["lr"] for g in self.optimizer.param_groups], [s.state_dict() for s in self.schedules]
        try:
            for sched, sub in zip(self.schedules, state["schedules"], strict=True):
                sched.load_state_dict(sub)
            self.base_lrs, self.last_epoch = base_lrs, last_epoch
            self._apply(last_epoch)
        except Exception:
            # A bad child state must not leave the earlier children (or the rates) half-loaded.
            for sched, sub in zip(self.schedules, before, strict=True):
                sched.load_state_dict(sub)
            _set_groups(self.optimizer, [{"lr": lr} for lr in lrs], fn)
            raise

    def __repr__(self) -> str:
        return f"SequentialSchedule({self.schedules!r}, milestones={self.milestones}, last_epoch={self.last_epoch})"


# ------------------------------------------------------------------ helpers
def _set_groups(optimizer: Optimizer, changes: list[dict[str, Any]], fn: str) -> None:
    """Set ``changes[g]`` in group ``g``: every group checked first, so an error changes nothing."""
    groups = optimizer.param_groups
    if len(groups) != len(changes):
        raise ValueError(f"{fn}: the optimizer has {len(groups)} parameter groups, the schedule was built for "
                         f"{len(changes)}; build schedules after add_param_group")
    checked = [group.validate(change) for group, change in zip(groups, changes, strict=True)]
    for group, values in zip(groups, checked, strict=True):
        group.set_checked(values)


def _interval(value: Any, fn: str) -> str:
    if value not in INTERVALS:
        raise ValueError(f"{fn}: interval must be 'epoch' (step once per epoch) or 'step' (once per optimizer "
                         f"step), got {value!r}")
    return value


def _list(value: Any, name: str, fn: str) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{fn}: {name} must be a list of numbers (one per parameter group), got {value!r:.80}")
    return list(value)


def _per_group(value: Any, n: int, name: str, fn: str) -> list[Any]:
    """One number for every group, or a list with one per group (PyTorch's ``_format_param``)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{fn}: {name} has {len(value)} values, but the optimizer has {n} parameter groups")
        return list(value)
    return [value] * n


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_type(state: Any, sched: LRSchedule, fn: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{fn}: expected a dict as returned by state_dict(), got {type(state).__name__}")
    if state.get("type") != type(sched).__name__:
        raise ValueError(f"{fn}: the state is for a {state.get('type')!r} schedule, expected {type(sched).__name__!r}")


def _check_keys(state: Mapping[str, Any], required: set[str], fn: str) -> None:
    """``required`` plus one of ``base_lrs`` / ``base_lr`` (a state from before groups), and ``interval``
    where the state has one."""
    keys = set(state) - {"interval"}
    if keys not in (required | {"base_lrs"}, required | {"base_lr"}):
        raise ValueError(f"{fn}: the state must have keys {sorted(required | {'base_lrs', 'interval'})}, "
                         f"got {sorted(state)}")


def _base_lrs(state: Mapping[str, Any], n: int, fn: str) -> list[float]:
    if "base_lrs" in state:
        lrs = [learning_rate(v, fn) for v in _list(state["base_lrs"], "base_lrs", fn)]
    elif n == 1:
        lrs = [learning_rate(state["base_lr"], fn)]
    else:
        raise ValueError(f"{fn}: the state (one 'base_lr', saved before parameter groups) is for one parameter "
                         f"group, the optimizer has {n}")
    if len(lrs) != n:
        raise ValueError(f"{fn}: the state is for {len(lrs)} parameter groups, the optimizer has {n}")
    return lrs


def _same_interval(state: Mapping[str, Any], interval: str, fn: str) -> None:
    saved = state.get("interval", "epoch")
    if saved != interval:
        raise ValueError(f"{fn}: the state was saved by a schedule stepped per {saved!r}, this one steps per "
                         f"{interval!r}")


def _gamma(value: Any, fn: str) -> float:
    return real(value, "gamma", fn, "> 0", lambda x: x > 0)
