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

import numpy as np

from .backend import Backend
from .backend.base import Array
from .callbacks import History, TrainingDiverged
from .distributed import GradientReducer
from .mixed_precision import HalfWeights
from .nn.module import Module

LossFn = Callable[..., tuple[Array, Array]]


@dataclass
class StepPlan:
    """What every step of one ``fit`` run does (fixed for the run, but for the one-shot ``check_targets``)."""

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
    # An asynchronous device (CuPy): the step reads nothing back, its loss and counts stay 0-d device
    # arrays, and fit_window.CheckWindow reads a window of steps at once and handles a divergence.
    deferred: bool = False
    # Checks the whole data set's targets once, at the first forward (which tells the class count); after it
    # the loss is called with validate=False, so no step pays for (or waits on) a per-batch label check.
    check_targets: Callable[[Array], bool] | None = None


@dataclass
class MicroBatch:
    x: Array
    y: Array
    share: float  # this micro-batch's part of the step's loss denominator


@dataclass
class StepResult:
    # Host numbers, or with a deferred plan 0-d device arrays (and plain numbers where nothing was computed).
    loss: Any  # the step's loss, the mean over ranks (plus the penalty)
    local_losses: list[Any]  # each micro-batch's own mean loss on this rank (plus the penalty)
    correct: list[Any]  # each micro-batch's correct predictions (None: not classification)
    stepped: bool  # False when the loss scaler skipped the update (a non-finite gradient)
    # Deferred only: the regularizer's penalty, not yet in loss and local_losses (CheckWindow adds it on
    # the host in float64, as the synchronous path does).
    penalty: Any = 0.0


def run_step(plan: StepPlan, micro: list[MicroBatch], epoch: int, step: int, history: History) -> StepResult:
    model, backend, optimizer = plan.model, plan.backend, plan.optimizer
    # Buffers (BatchNorm statistics) are replaced, never mutated, by a forward pass, and extra
    # states are plain values, so keeping references is enough to undo this step. The old
    # gradients go first, so the snapshot does not keep them alive through this step.
    optimizer.zero_grad()
    before = model.snapshot()
    group_value: Any = 0.0
    local_losses: list[Any] = []
    correct: list[Any] = []
    # Divergence is detected below and reported with its epoch and step, so NumPy's own
    # overflow warnings along the way would only be noise.
    try:
        with backend.silent_fp():
            for mb in micro:
                xb = mb.x if plan.half is None else plan.half.cast_input(mb.x)
                with _weights(plan):
                    pred, backward = model.forward(xb, train=True)
                    if plan.check_targets is not None:
                        if plan.check_targets(pred):
                            plan.loss_kwargs = {**plan.loss_kwargs, "validate": False}
                        plan.check_targets = None
                    value, grad = plan.loss_fn(pred, mb.y, **plan.loss_kwargs)
                    if mb.share != 1.0:
                        grad = grad * mb.share
                    if plan.scaler is not None:
                        grad = plan.scaler.scale(grad)
                    backward(grad)  # the batch is data: its gradient is not formed (nn.module's input-gradient rule)
                counts = not (mb.share == 0.0 and len(micro) > 1)
                if plan.deferred:
                    local_losses.append(value if counts else 0.0)
                else:
                    local = float(value)
                    # A micro-batch of which nothing counts (every row ignored, or weighing 0) while the
                    # others do: its NaN mean must not stand for the step's, as one batch k times as large shows.
                    local_losses.append(local if counts else 0.0)
                    if counts and not math.isfinite(local) and plan.reducer is None:
                        diverge(model, optimizer, before, local, epoch, step, history)
                if counts:
                    group_value = group_value + value * mb.share if len(micro) > 1 else value
                correct.append(count_correct(pred, mb.y, backend, plan.loss_kwargs.get("ignore_index"),
                                             to_host=not plan.deferred))
            # Several ranks: every gradient becomes its mean over ranks, and the loss too, so all ranks
            # see the same value and stop together below if it is not finite.
            if plan.reducer is not None:
                loss_value = plan.reducer.reduce(group_value)
            else:
                loss_value = group_value if plan.deferred else float(group_value)
            if plan.scaler is not None:
                plan.scaler.unscale(plan.params)
            penalty: Any = 0.0
            if plan.regularizer is not None:
                penalty = plan.regularizer(plan.params)
                if not plan.deferred:
                    penalty = float(penalty)
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
    if not plan.deferred and not math.isfinite(loss_value):
        diverge(model, optimizer, before, loss_value, epoch, step, history)
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
    return StepResult(loss_value, local_losses, correct, stepped, penalty if plan.deferred else 0.0)


def target_check(loss_fn: LossFn, loss_kwargs: dict[str, Any], y: Any, what: str) -> Callable[[Array], bool] | None:
    """For the built-in losses whose ``validate`` checks only the targets, the check of all of ``y`` (the
    data set's targets, on the host) that makes per-batch validation unnecessary: it raises on a bad
    target and says whether it checked (False: targets of a kind it does not know, which the loss
    keeps validating). None for other losses, or when the caller set ``validate`` in ``loss_kwargs``."""
    from . import losses

    if y is None or "validate" in loss_kwargs or loss_fn not in (
            losses.softmax_cross_entropy, losses.multiclass_hinge, losses.binary_cross_entropy_with_logits,
            losses.binary_hinge):
        return None
    y = np.asarray(y)
    ignore = loss_kwargs.get("ignore_index") if loss_fn is losses.softmax_cross_entropy else None

    bce = loss_fn is losses.binary_cross_entropy_with_logits

    def check(pred: Array) -> bool:
        bad, allowed = None, ""
        if y.dtype.kind in "iu" and y.ndim == 1 and len(pred.shape) == 2 and loss_fn is not losses.binary_hinge:
            c = int(pred.shape[1])
            bad = (y < 0) | (y >= c)
            if ignore is not None:
                bad &= y != ignore
            allowed = f"labels must be in [0, {c})" + (f" or ignore_index={ignore}" if ignore is not None else "")
            allowed += f" for the model's {c} outputs"
        elif loss_fn is losses.binary_hinge:
            bad, allowed = (y != -1) & (y != 1), "targets must be -1 or 1"
        elif bce:
            bad, allowed = ~((y >= 0) & (y <= 1)), "targets must be in [0, 1]"
        else:
            return False  # not labels (float targets for softmax-CE): the loss's own checks give the error
        if bad is not None and bad.any():
            i = np.unravel_index(int(np.argmax(bad)), y.shape)
            at = ", ".join(str(int(k)) for k in i)
            raise ValueError(f"fit: {what} {allowed}, got y[{at}] = {y[i].item()}")
        return True

    return check


def count_correct(pred: Array, y: Array, backend: Backend, ignore_index: int | None = None, *,
                  to_host: bool = True) -> Any:
    """Correct arg-max predictions for class labels, rows labelled ``ignore_index`` not counted (an int,
    or with ``to_host=False`` a 0-d integer array left on the device); None when the targets are not labels."""
    if not (pred.ndim == 2 and y.ndim == 1 and backend.is_integer(y)):
        return None
    xp = backend.xp
    hit = xp.argmax(pred, axis=1) == y
    if ignore_index is not None:
        hit = hit & (y != ignore_index)
    if str(getattr(xp, "__array_api_version__", "")) >= "2024.12":  # count_nonzero: one call, not two
        total = xp.count_nonzero(hit)
    else:
        total = xp.sum(xp.astype(hit, xp.int64))
    return int(total) if to_host else total


def _weights(plan: StepPlan) -> Any:
    import contextlib

    return contextlib.nullcontext() if plan.half is None else plan.half.applied()


def diverge(model: Module, optimizer: Any, before: Any, value: float, epoch: int, step: int,
            history: History) -> None:
    """Put ``before`` back and raise :class:`TrainingDiverged` for (0-based) ``epoch`` and ``step``."""
    model.restore(before)
    optimizer.zero_grad()
    raise diverged_error(value, epoch, step, history)


def diverged_error(value: float, epoch: int, step: int, history: History) -> TrainingDiverged:
    return TrainingDiverged(
        f"loss became {value} at epoch {epoch + 1}, step {step + 1}; training stopped and the model "
        f"keeps its parameters from before that step (try a smaller learning rate)", history,
        epoch=epoch + 1, step=step + 1)
