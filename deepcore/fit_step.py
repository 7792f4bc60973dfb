"""One optimizer step of the fit loop: micro-batches, mixed precision, loss scaling, clipping.

A step takes ``k >= 1`` micro-batches (``fit(accumulate=k)``). Micro-batch ``i``'s loss gradient is
scaled by its share ``d_i / sum_j d_j`` of the step's denominator (rows, or summed class weights), so
the accumulated gradient is that of the mean over all ``k`` micro-batches together: the same step as
one batch ``k`` times as large (BatchNorm aside: it normalises each micro-batch with its own
statistics). Then, in this order: the mean over ranks (several processes), the loss scaler's
unscaling (fp16), the regularizer's gradient, gradient-norm clipping, the optimizer step (skipped by
the scaler on a non-finite gradient), the constraint's projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .backend.base import Array
from .callbacks import History, TrainingDiverged
from .distributed import GradientReducer
from .mixed_precision import HalfWeights
from .nn.module import Module

LossFn = Callable[..., tuple[Array, Array]]


@dataclass
class StepPlan:
    """What every step of one ``fit`` run does (fixed for the run)."""

    model: Module
    loss_fn: LossFn
    loss_kwargs: dict[str, Any]
    optimizer: Any
    params: list[Any]
    backend: Backend
    regularizer: Any = None
    constraint: Any = None
    reducer: GradientReducer | None = None
    half: HalfWeights | None = None
    scaler: Any = None
    clip_grad_norm: float | None = None


@dataclass
class MicroBatch:
    x: Array
    y: Array
    share: float  # this micro-batch's part of the step's loss denominator


@dataclass
class StepResult:
    loss: float  # the step's loss, the mean over ranks (plus the penalty)
    local_losses: list[float]  # each micro-batch's own mean loss on this rank (plus the penalty)
    correct: list[int | None]  # each micro-batch's correct predictions (None: not classification)
    stepped: bool  # False when the loss scaler skipped the update (a non-finite gradient)


def run_step(plan: StepPlan, micro: list[MicroBatch], epoch: int, step: int, history: History) -> StepResult:
    model, backend, optimizer = plan.model, plan.backend, plan.optimizer
    # Buffers (BatchNorm statistics) are replaced, never mutated, by a forward pass, and extra
    # states are plain values, so keeping references is enough to undo this step. The old
    # gradients go first, so the snapshot does not keep them alive through this step.
    optimizer.zero_grad()
    before = model.snapshot()
    group_value: Any = 0.0
    local_losses: list[float] = []
    correct: list[int | None] = []
    # Divergence is detected below and reported with its epoch and step, so NumPy's own
    # overflow warnings along the way would only be noise.
    try:
        with backend.silent_fp():
            for mb in micro:
                xb = mb.x if plan.half is None else plan.half.cast_input(mb.x)
                with _weights(plan):
                    pred, backward = model.forward(xb, train=True)
                    value, grad = plan.loss_fn(pred, mb.y, **plan.loss_kwargs)
                    if mb.share != 1.0:
                        grad = grad * mb.share
                    if plan.scaler is not None:
                        grad = plan.scaler.scale(grad)
                    backward(grad)  # the batch is data: its gradient is not formed (nn.module's input-gradient rule)
                local = float(value)
                if mb.share == 0.0 and len(micro) > 1:
                    # Nothing of this micro-batch counts (every row ignored, or weighing 0) while the others
                    # do: its NaN mean must not stand for the step's, as one batch k times as large shows.
                    local_losses.append(0.0)
                else:
                    local_losses.append(local)
                    if not math.isfinite(local) and plan.reducer is None:
                        _diverge(model, optimizer, before, local, epoch, step, history)
                    group_value = group_value + value * mb.share if len(micro) > 1 else value
                correct.append(count_correct(pred, mb.y, backend, plan.loss_kwargs.get("ignore_index")))
            # Several ranks: every gradient becomes its mean over ranks, and the loss too, so all ranks
            # see the same value and stop together below if it is not finite.
            loss_value = float(group_value) if plan.reducer is None else plan.reducer.reduce(group_value)
            if plan.scaler is not None:
                plan.scaler.unscale(plan.params)
            if plan.regularizer is not None:
                penalty = float(plan.regularizer(plan.params))
                loss_value += penalty
                local_losses = [local + penalty for local in local_losses]
    except TrainingDiverged:
        raise
    except BaseException:
        # A step that fails part-way (a bad label in a later micro-batch) leaves no gradients or
        # BatchNorm statistics of its first micro-batches behind.
        model.restore(before)
        optimizer.zero_grad()
        raise
    if not math.isfinite(loss_value):
        _diverge(model, optimizer, before, loss_value, epoch, step, history)
    if plan.clip_grad_norm is not None:
        from .optim import clip_grad_norm

        clip_grad_norm(plan.params, plan.clip_grad_norm)
    if plan.scaler is not None:
        stepped = bool(plan.scaler.step(optimizer))
        plan.scaler.update()
    else:
        optimizer.step()
        stepped = True
    if stepped and plan.constraint is not None:
        plan.constraint.project(plan.params)
    return StepResult(loss_value, local_losses, correct, stepped)


def count_correct(pred: Array, y: Array, backend: Backend, ignore_index: int | None = None) -> int | None:
    """Correct arg-max predictions for class labels, rows labelled ``ignore_index`` not counted;
    None when the targets are not labels."""
    if not (pred.ndim == 2 and y.ndim == 1 and backend.is_integer(y)):
        return None
    xp = backend.xp
    hit = xp.argmax(pred, axis=1) == y
    if ignore_index is not None:
        hit = hit & (y != ignore_index)
    return int(xp.sum(xp.astype(hit, xp.int64)))


def _weights(plan: StepPlan) -> Any:
    import contextlib

    return contextlib.nullcontext() if plan.half is None else plan.half.applied()


def _diverge(model: Module, optimizer: Any, before: Any, value: float, epoch: int, step: int,
             history: History) -> None:
    model.restore(before)
    optimizer.zero_grad()
    raise TrainingDiverged(
        f"loss became {value} at epoch {epoch + 1}, step {step + 1}; training stopped and the model "
        f"keeps its parameters from before that step (try a smaller learning rate)", history,
        epoch=epoch + 1, step=step + 1)
