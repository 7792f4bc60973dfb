"""``ReduceLROnPlateau``: ``torch.optim.lr_scheduler.ReduceLROnPlateau``, stepped once per epoch on a metric."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._checks import check_int
from .checks import learning_rate, real, state_int
from .optimizers import Optimizer
from .schedules import LRSchedule, _check_type, _json, _list, _per_group, _same_interval, _set_groups

__all__ = ["ReduceLROnPlateau"]


class ReduceLROnPlateau(LRSchedule):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau``: ``step(metric)`` once per epoch; after more than
    ``patience`` epochs without an improvement (``mode`` "min" or "max", by more than ``threshold``,
    relative or absolute per ``threshold_mode``), every group's rate becomes
    ``max(lr · factor, min_lr)`` (unless that changes it by no more than ``eps``), then ``cooldown``
    epochs pass before bad epochs count again. Unlike the closed-form schedules it reads and
    lowers the groups' current rates, and it changes nothing when built. ``monitor`` names the
    metric ``fit`` passes (``"val_loss"`` by default; any key of an epoch's history)."""

    HYPERPARAMS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lrs", "eps")
    needs_metric = True
    mode: str
    factor: float
    patience: int
    threshold: float
    threshold_mode: str
    cooldown: int
    min_lrs: list[float]
    eps: float

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | Sequence[float] = 0.0, eps: float = 1e-8, *, monitor: str = "val_loss") -> None:
        fn = "ReduceLROnPlateau"
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{fn}: optimizer must be a deepcore.optim optimizer, got {type(optimizer).__name__}")
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"{fn}: monitor must be the name of a metric (e.g. 'val_loss'), got {monitor!r}")
        #: The metric ``fit`` passes to ``step`` (a key of an epoch's history).
        self.monitor = monitor
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, cooldown=cooldown,
                         min_lrs=_per_group(min_lr, len(optimizer.param_groups), "min_lr", fn), eps=eps)

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        fn = cls.__name__
        if h["mode"] not in ("min", "max"):
            raise ValueError(f"{fn}: mode must be 'min' or 'max', got {h['mode']!r}")
        if h["threshold_mode"] not in ("rel", "abs"):
            raise ValueError(f"{fn}: threshold_mode must be 'rel' or 'abs', got {h['threshold_mode']!r}")
        return {
            "mode": h["mode"],
            "factor": real(h["factor"], "factor", fn, "in [0, 1)", lambda x: 0 <= x < 1),
            "patience": check_int(h["patience"], "patience", fn, 0),
            "threshold": real(h["threshold"], "threshold", fn, ">= 0", lambda x: x >= 0),
            "threshold_mode": h["threshold_mode"],
            "cooldown": check_int(h["cooldown"], "cooldown", fn, 0),
            "min_lrs": [real(v, "min_lr", fn, ">= 0", lambda x: x >= 0) for v in _list(h["min_lrs"], "min_lr", fn)],
            "eps": real(h["eps"], "eps", fn, ">= 0", lambda x: x >= 0),
        }

    def _apply(self, epoch: int) -> None:
        # Built or loaded: the rates stay as the groups (or the loaded state) have them.
        self._last_lrs = [group["lr"] for group in self.optimizer.param_groups]

    def lrs_at(self, epoch: int) -> list[float]:
        raise TypeError("ReduceLROnPlateau has no closed form: its rates depend on the metrics it was given")

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" else a > best + self.threshold

    def step(self, metric: Any = None) -> None:  # type: ignore[override]
        """One epoch's ``metric`` (a number or a 0-d array; NaN counts as no improvement)."""
        fn = "ReduceLROnPlateau.step"
        if metric is None:
            raise TypeError(f"{fn}: needs the epoch's metric (e.g. the validation loss): sched.step(val_loss)")
        try:
            current = float(metric)
        except (TypeError, ValueError):
            raise TypeError(f"{fn}: metric must be a number, got {metric!r:.80}") from None
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            raise ValueError(f"{fn}: the optimizer has {len(groups)} parameter groups, this schedule was built "
                             f"for {len(self.min_lrs)}")
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in the cooldown do not count
        if self.num_bad_epochs > self.patience:
            changes = []
            for group, min_lr in zip(groups, self.min_lrs, strict=True):
                old = float(group["lr"])
                new = max(old * self.factor, min_lr)
                changes.append({"lr": new} if old - new > self.eps else {})
            _set_groups(self.optimizer, changes, "ReduceLROnPlateau")
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lrs = [group["lr"] for group in groups]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; ``lrs`` (every group's current rate) is put back on load, so a resumed run's rates are
        right even where the optimizer's own state was not restored."""
        return {"type": type(self).__name__, "last_epoch": self.last_epoch, "interval": self.interval,
                "best": self.best, "num_bad_epochs": self.num_bad_epochs, "cooldown_counter": self.cooldown_counter,
                "lrs": [group["lr"] for group in self.optimizer.param_groups],
                **{name: _json(getattr(self, name)) for name in self.HYPERPARAMS}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fn = "ReduceLROnPlateau.load_state_dict"
        _check_type(state, self, fn)
        required = {"type", "last_epoch", "best", "num_bad_epochs", "cooldown_counter", "lrs", *self.HYPERPARAMS}
        missing = sorted(required - set(state))
        unknown = sorted(set(state) - required - {"interval"})
        if missing or unknown:
            raise ValueError(f"{fn}: the state must have keys {sorted(required)}, got {sorted(state)}")
        checked = self._check({name: state[name] for name in self.HYPERPARAMS})
        n = len(self.optimizer.param_groups)
        lrs = [learning_rate(v, fn) for v in _list(state["lrs"], "lrs", fn)]
        if len(lrs) != n or len(checked["min_lrs"]) != n:
            raise ValueError(f"{fn}: the state is for {len(lrs)} parameter groups, the optimizer has {n}")
        best = state["best"]
        if isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best):
            raise ValueError(f"{fn}: 'best' must be a number, got {best!r}")
        counters = {k: state_int(state[k], repr(k), fn) for k in ("last_epoch", "num_bad_epochs", "cooldown_counter")}
        _same_interval(state, self.interval, fn)
        _set_groups(self.optimizer, [{"lr": lr} for lr in lrs], fn)
        self.__dict__.update(checked)
        self.__dict__.update(counters)
        self.best = float(best)
        self._apply(self.last_epoch)
