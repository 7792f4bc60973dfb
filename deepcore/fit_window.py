"""The fit loop on an asynchronous device (CuPy): no host synchronisation inside a step.

Reading a loss back (``float(loss)``) makes the host wait for the device, so on such a backend a
step reads nothing: its loss and correct counts stay 0-d device arrays (``StepPlan.deferred``),
and a :class:`CheckWindow` reads the values of ``every`` steps at once, in one transfer, for the
epoch's figures and the progress line.

Divergence keeps the loop's contract: a non-finite loss stops training with the model exactly as
it was before the first step whose loss was not finite. The window keeps the state at its start
(parameter values and optimizer state copied on the device, buffers and extra states by
reference, the per-step schedule's state) and which batches its steps took; on a non-finite step
it puts that state back, replays the window's finite steps (the same batches, gathered again, the
same dropout masks and schedule, so the same arithmetic) with the host checks on, and raises
:class:`TrainingDiverged` for the bad step.
Copying the state costs one pass over the parameters and optimizer state per window, a fraction
``1/every`` of the optimizer's own traffic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .callbacks import History
from .fit_step import MicroBatch, StepPlan, StepResult, diverged_error, run_step

__all__ = ["CHECK_EVERY", "CheckWindow", "PendingStep"]

#: Steps between two reads of the device's values: often enough for a live progress line, rare
#: enough that the transfer and the state copy cost nothing measurable.
CHECK_EVERY = 32


@dataclasses.dataclass
class PendingStep:
    step: int
    batches: list[int]  # the epoch's batches the step's micro-batches were (gathered again for a replay)
    shares: list[float]  # and their shares of the step's loss
    result: StepResult
    extra: Any  # what the caller needs back with the step (its host labels and denominators)


class CheckWindow:
    """Steps of one epoch whose values are still on the device; :meth:`read` brings them back."""

    def __init__(self, plan: StepPlan, batches: Any, scheduler: Any, per_step_schedule: bool,
                 every: int | None = None) -> None:
        """``batches.batch(k)`` gives the epoch's batch ``k`` again, ``(x, y)`` on the device: a window keeps
        no batch alive, only where to find it."""
        self.plan = plan
        self.batches = batches
        self.scheduler = scheduler if per_step_schedule else None
        self.every = CHECK_EVERY if every is None else every
        self.pending: list[PendingStep] = []
        self._start: _State | None = None

    def add(self, step: int, batches: list[int], micro: list[MicroBatch], epoch: int, history: History,
            extra: Any) -> None:
        """Run step ``step`` on ``micro`` (the epoch's batches ``batches``), keeping what :meth:`read` and a
        replay need."""
        if self._start is None:
            self._start = _State.take(self.plan, self.scheduler)
        try:
            result = run_step(self.plan, micro, epoch, step, history)
        except BaseException:
            # The failed step undid itself; a pending step that diverged before it is what the synchronous
            # loop would have stopped at, so that is raised instead.
            self.read(epoch, history)
            raise
        self.pending.append(PendingStep(step, batches, [mb.share for mb in micro], result, extra))

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.every

    def read(self, epoch: int, history: History) -> list[tuple[PendingStep, StepResult]]:
        """Every pending step with its values on the host, in order; the window is then empty.
        A non-finite step loss restores and replays as the module says, then raises."""
        if not self.pending:
            return []
        backend = self.plan.backend
        slots: list[Any] = []
        for p in self.pending:
            slots.append(p.result.loss)
            slots.append(p.result.penalty)
            slots.extend(p.result.local_losses)
            slots.extend(c for c in p.result.correct if c is not None)
        values = iter(_to_host(backend, slots))
        out = []
        for p in self.pending:
            # The penalty is added here, in float64, as the synchronous path adds float(penalty).
            loss, penalty = next(values), next(values)
            loss += penalty
            local = [next(values) + penalty for _ in p.result.local_losses]
            correct = [None if c is None else int(next(values)) for c in p.result.correct]
            if not math.isfinite(loss):
                self._diverged(p, loss, epoch, history)
            out.append((p, StepResult(loss, local, correct, p.result.stepped)))
        self.pending = []
        self._start = None
        return out

    def _diverged(self, bad: PendingStep, value: float, epoch: int, history: History) -> None:
        assert self._start is not None
        self._start.restore(self.plan, self.scheduler)
        checked = dataclasses.replace(self.plan, deferred=False)
        for p in self.pending:
            if p is bad:
                break
            micro = [MicroBatch(*self.batches.batch(k), share) for k, share in zip(p.batches, p.shares, strict=True)]
            run_step(checked, micro, epoch, p.step, history)
            if self.scheduler is not None:
                self.scheduler.step()
        self.pending = []
        self._start = None
        self.plan.optimizer.zero_grad()
        raise diverged_error(value, epoch, bad.step, history)


def _to_host(backend: Any, values: list[Any]) -> list[float]:
    """``values`` (0-d device arrays and plain numbers) as floats, in one device-to-host transfer: one
    stack per dtype (the losses, the counts), widened to float64, which holds both exactly."""
    xp = backend.xp
    out = [math.nan if hasattr(v, "shape") else float(v) for v in values]
    by_dtype: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        if hasattr(v, "shape"):
            by_dtype.setdefault(v.dtype, []).append(i)
    if by_dtype:
        parts = [backend.astype(xp.stack([xp.reshape(values[i], ()) for i in idx]), xp.float64)
                 for idx in by_dtype.values()]
        host = backend.to_numpy(parts[0] if len(parts) == 1 else xp.concat(parts)).tolist()
        for i, h in zip((i for idx in by_dtype.values() for i in idx), host, strict=True):
            out[i] = h
    return out


@dataclasses.dataclass
class _State:
    """The state a window starts from: parameter values and optimizer state copied (they are updated in
    place), buffers and extra states by reference (a forward pass replaces them), the schedule's state."""

    params: list[tuple[Any, Any]]
    buffers: dict[str, Any]
    extra: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None

    @classmethod
    def take(cls, plan: StepPlan, scheduler: Any) -> _State:
        backend, model = plan.backend, plan.model
        copy = backend.copy
        opt = plan.optimizer.state_dict()
        opt["state"] = {k: {name: copy(v) if hasattr(v, "shape") else v for name, v in entry.items()}
                        for k, entry in opt["state"].items()}
        return cls([(p, copy(p.value)) for p in model.parameters()], dict(model.named_buffers()),
                   model.extra_states(), opt, None if scheduler is None else scheduler.state_dict())

    def restore(self, plan: StepPlan, scheduler: Any) -> None:
        for p, value in self.params:
            p.value = value
            p.grad = None
        plan.model.set_buffers(self.buffers)
        plan.model.load_extra_states(self.extra)
        plan.optimizer.load_state_dict(self.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
