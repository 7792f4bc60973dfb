"""``OneCycleLR``: the 1cycle policy of ``torch.optim.lr_scheduler.OneCycleLR``, stepped once per batch,
with the momentum (or Adam's beta1) cycled the other way."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._checks import check_int
from .checks import learning_rate, real
from .optimizers import Optimizer
from .schedules import LRSchedule, _list, _per_group, _set_groups

__all__ = ["OneCycleLR"]


class OneCycleLR(LRSchedule):
    """The 1cycle policy, ``torch.optim.lr_scheduler.OneCycleLR`` step for step, stepped once per batch.

    The rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of
    ``total_steps`` (or ``epochs * steps_per_epoch``), then falls to ``max_lr / div_factor /
    final_div_factor`` (``three_phase=True``: back to the start first, then down), annealed by
    cosine or linearly. The groups' own rates are ignored, as in PyTorch; ``max_lr`` (and the
    momenta) may be one number or one per group. ``cycle_momentum`` (on by default, as in PyTorch)
    moves SGD's and RMSprop's ``momentum``, or Adam's and AdamW's ``beta1``, the other way between
    ``max_momentum`` and ``base_momentum``; an optimizer without either (GD, Adagrad) needs
    ``cycle_momentum=False``. Stepping past ``total_steps`` raises, as there; at ``total_steps`` itself (the
    step after the last batch) a linear anneal would go below zero, where the rate stays at 0."""

    HYPERPARAMS = ("max_lrs", "total_steps", "pct_start", "anneal_strategy", "div_factor", "final_div_factor",
                   "three_phase", "cycle_momentum", "base_momentums", "max_momentums")
    DEFAULT_INTERVAL = "step"
    max_lrs: list[float]
    total_steps: int
    pct_start: float
    anneal_strategy: str
    div_factor: float
    final_div_factor: float
    three_phase: bool
    cycle_momentum: bool
    base_momentums: list[float]
    max_momentums: list[float]

    def __init__(self, optimizer: Optimizer, max_lr: float | Sequence[float], total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float | Sequence[float] = 0.85, max_momentum: float | Sequence[float] = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False, *,
                 interval: str = "step") -> None:
        fn = "OneCycleLR"
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{fn}: optimizer must be a deepcore.optim optimizer, got {type(optimizer).__name__}")
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError(f"{fn}: give total_steps, or both epochs and steps_per_epoch")
            total_steps = check_int(epochs, "epochs", fn, 1) * check_int(steps_per_epoch, "steps_per_epoch", fn, 1)
        n = len(optimizer.param_groups)
        if cycle_momentum and not {"momentum", "betas"} & set(optimizer.HYPERPARAMS):
            raise ValueError(f"{fn}: cycle_momentum=True needs an optimizer with momentum or betas (SGD, RMSprop, "
                             f"Adam, AdamW); {type(optimizer).__name__} has neither: pass cycle_momentum=False")
        super().__init__(optimizer, interval=interval, max_lrs=_per_group(max_lr, n, "max_lr", fn),
                         total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal_strategy,
                         div_factor=div_factor, final_div_factor=final_div_factor, three_phase=three_phase,
                         cycle_momentum=cycle_momentum,
                         base_momentums=_per_group(base_momentum, n, "base_momentum", fn),
                         max_momentums=_per_group(max_momentum, n, "max_momentum", fn))

    @classmethod
    def _check(cls, h: Mapping[str, Any]) -> dict[str, Any]:
        fn = cls.__name__
        strategy = h["anneal_strategy"]
        if strategy not in ("cos", "linear"):
            raise ValueError(f"{fn}: anneal_strategy must be 'cos' or 'linear', got {strategy!r}")
        flags = {}
        for name in ("three_phase", "cycle_momentum"):
            if not isinstance(h[name], bool):
                raise TypeError(f"{fn}: {name} must be True or False, got {h[name]!r}")
            flags[name] = h[name]
        positive = ("> 0", lambda x: x > 0)
        return {
            "max_lrs": [learning_rate(v, fn) for v in _list(h["max_lrs"], "max_lr", fn)],
            "total_steps": check_int(h["total_steps"], "total_steps", fn, 1),
            "pct_start": real(h["pct_start"], "pct_start", fn, "in [0, 1]", lambda x: 0 <= x <= 1),
            "anneal_strategy": strategy,
            "div_factor": real(h["div_factor"], "div_factor", fn, *positive),
            "final_div_factor": real(h["final_div_factor"], "final_div_factor", fn, *positive),
            **flags,
            "base_momentums": [real(v, "base_momentum", fn, "", lambda x: True)
                               for v in _list(h["base_momentums"], "base_momentum", fn)],
            "max_momentums": [real(v, "max_momentum", fn, "", lambda x: True)
                              for v in _list(h["max_momentums"], "max_momentum", fn)],
        }

    def _phases(self) -> list[tuple[float, str, str, str, str]]:
        """``(end_step, start_lr, end_lr, start_momentum, end_momentum)`` per phase, as PyTorch builds them."""
        total, pct = self.total_steps, self.pct_start
        if self.three_phase:
            return [(float(pct * total) - 1, "initial", "max", "max", "base"),
                    (float(2 * pct * total) - 2, "max", "initial", "base", "max"),
                    (total - 1, "initial", "min", "max", "max")]
        return [(float(pct * total) - 1, "initial", "max", "max", "base"),
                (total - 1, "max", "min", "base", "max")]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _values_at(self, step: int) -> list[tuple[float, float]]:
        """``(lr, momentum)`` per group at ``step`` (PyTorch's ``get_lr``, operation for operation)."""
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR: tried to step {step} times, but total_steps is {self.total_steps}")
        phases = self._phases()
        out = []
        for max_lr, base_m, max_m in zip(self.max_lrs, self.base_momentums, self.max_momentums, strict=True):
            initial = max_lr / self.div_factor
            lrs = {"initial": initial, "max": max_lr, "min": initial / self.final_div_factor}
            momenta = {"base": base_m, "max": max_m}
            start_step = 0.0
            for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
                if step <= end_step or i == len(phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    # Only the step after the last (allowed, as in PyTorch) can take a linear anneal below
                    # zero; PyTorch would set that negative rate, a rate here is never below 0.
                    lr = max(self._anneal(lrs[lr0], lrs[lr1], pct), 0.0)
                    out.append((lr, self._anneal(momenta[m0], momenta[m1], pct)))
                    break
                start_step = end_step
        return out

    def lrs_at(self, epoch: int) -> list[float]:
        return [lr for lr, _ in self._values_at(epoch)]

    def _apply(self, epoch: int) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.max_lrs):
            raise ValueError(f"OneCycleLR: the optimizer has {len(groups)} parameter groups, this schedule was "
                             f"built for {len(self.max_lrs)}")
        values = self._values_at(epoch)
        changes: list[dict[str, Any]] = [{"lr": float(lr)} for lr, _ in values]
        if self.cycle_momentum:
            for change, group, (_, m) in zip(changes, groups, values, strict=True):
                if "betas" in group:
                    change["betas"] = (m, *group["betas"][1:])
                else:
                    change["momentum"] = m
        _set_groups(self.optimizer, changes, "OneCycleLR")
        self._last_lrs = [c["lr"] for c in changes]
