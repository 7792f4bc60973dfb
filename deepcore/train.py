"""The fit loop: minibatch training with metrics, callbacks, progress, checkpoints and resume.

One step is the course's recipe: forward, loss ``L = mean L_i + λ R(W)``,
back-propagation by the chain rule (each layer's closure), an optimizer
update, then any constraint (max-norm). The batch order of epoch ``e`` depends
only on ``(seed, e)``, and dropout masks only on each layer's seed and call
count, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import losses as _losses
from ._checks import check_int
from ._progress import Progress
from .backend import to_backend
from .backend.base import Array
from .callbacks import Callback, EarlyStopping, History, TrainingDiverged, to_host
from .data import ArrayDataset, batches
from .distributed import (
    Communicator,
    GradientReducer,
    ShardedBatches,
    abort_on_error,
    broadcast_module,
    get_communicator,
)
from .fit_batches import Batches, resident_data
from .fit_checkpoints import check_checkpoint_path as _check_checkpoint_path
from .fit_checkpoints import diverged as _diverged
from .fit_checkpoints import resume as _resume
from .fit_checkpoints import same_file as _same_file
from .fit_checkpoints import save as _save
from .fit_step import MicroBatch, StepPlan, run_step, target_check
from .fit_window import CheckWindow
from .mixed_precision import HalfWeights, check_precision
from .nn.batchnorm import BatchNorm1d
from .nn.module import Module

__all__ = [
    "Callback",
    "EarlyStopping",
    "History",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "predict",
    "get_loss",
]

LossFn = Callable[..., tuple[Array, Array]]

#: The losses by the names the CLI and configs use.
LOSSES: dict[str, LossFn] = {
    "softmax-ce": _losses.softmax_cross_entropy,
    "hinge": _losses.multiclass_hinge,
    "bce": _losses.binary_cross_entropy_with_logits,
    "l2": _losses.l2_loss,
    "l1": _losses.l1_loss,
}


def get_loss(loss: str | LossFn) -> LossFn:
    """The loss function named ``loss`` (a key of :data:`LOSSES`), or ``loss`` itself if callable."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be a callable or one of {sorted(LOSSES)}, got {loss!r}")
    return LOSSES[loss]


def _as_dataset(data: Any, name: str) -> ArrayDataset:
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayDataset(np.asarray(data[0]), np.asarray(data[1]))
    raise TypeError(f"{name} must be an ArrayDataset or an (x, y) pair of arrays, got {type(data).__name__}")


def _distributed(fn: Callable[..., History]) -> Callable[..., History]:
    """Resolve ``comm`` (None: :func:`deepcore.distributed.get_communicator`) and, with more than one
    rank, turn an exception on any rank into the end of the whole job (see ``abort_on_error``);
    :class:`TrainingDiverged` is decided on all ranks together and propagates normally."""

    @functools.wraps(fn)
    def wrapper(model: Module, *args: Any, comm: Communicator | None = None, **kwargs: Any) -> History:
        comm = get_communicator(model) if comm is None else comm
        with abort_on_error(comm, passthrough=(TrainingDiverged,)):
            return fn(model, *args, comm=comm, **kwargs)

    return wrapper


@_distributed
def fit(model: Module, loss: str | LossFn, optimizer: Any, train: Any, val: Any = None, *, epochs: int = 10,
        batch_size: int = 32, regularizer: Any = None, constraint: Any = None, scheduler: Any = None,
        callbacks: Sequence[Callback] = (), seed: int = 0, shuffle: bool = True, drop_last: bool = False,
        verbose: bool = True, checkpoint: str | os.PathLike[str] | None = None,
        resume: str | os.PathLike[str] | None = None, log: Callable[[str], None] | None = None,
        loss_kwargs: dict[str, Any] | None = None, run_settings: dict[str, Any] | None = None,
        precision: str = "fp32", loss_scaler: Any = None, accumulate: int = 1,
        clip_grad_norm: float | None = None, comm: Communicator | None = None) -> History:
    """Train ``model`` for ``epochs`` epochs of minibatches; returns the :class:`History`.

    ``train``/``val`` are :class:`~deepcore.data.ArrayDataset` or ``(x, y)`` pairs of host
    arrays; each batch is moved to the model's backend. ``regularizer`` (``L2``, ``L1``,
    ``ElasticNet``) adds ``λ R(W)`` to the loss and its gradient; ``constraint``
    (``MaxNorm``) is projected after every step; ``scheduler`` steps once per epoch, or after every
    optimizer step when its ``interval`` is ``"step"`` (``OneCycleLR``); a ``ReduceLROnPlateau``
    is given the epoch's value of the metric it monitors (``val_loss`` by default).

    ``precision="fp16"`` / ``"bf16"`` runs forward and backward in float16 / bfloat16 with the
    float32 parameters as master weights (:mod:`deepcore.mixed_precision`); fp16 scales the loss
    with ``loss_scaler`` (default ``LossScaler()``, GradScaler's rules: a step whose gradient is not
    finite is skipped and the scale halved). ``accumulate=k`` makes one optimizer step of every
    ``k`` batches, the same step as one batch ``k`` times as large (BatchNorm's statistics aside);
    ``clip_grad_norm`` rescales the gradients to that global L2 norm when they exceed it
    (:func:`deepcore.optim.clip_grad_norm`), after unscaling and before the step.
    ``checkpoint`` writes model, optimizer, scheduler and history after every epoch
    (atomically), with ``run_settings`` (any JSON-able dict: what the run was made of, as
    ``deepcore train`` records its flags) under ``extra["settings"]``; ``resume`` continues from
    such a file, ``epochs`` counting the whole run (so it must exceed the epochs already done).
    A NaN/inf loss raises :class:`TrainingDiverged` naming the epoch and step, with the model as
    it was before that step; with a ``checkpoint``, those parameters are also written to
    ``diverged-last-good<suffix>`` beside it, and the message names that file and the last epoch's
    checkpoint.

    The logged ``loss`` is the loss's own mean over the whole epoch (plus the penalty): each
    batch's mean times its denominator, summed, over the summed denominators, the denominator
    being the number of rows, or with ``ignore_index`` / ``class_weights`` in ``loss_kwargs`` the
    summed class weight of the rows not ignored (PyTorch's ``cross_entropy``); so with the model
    held fixed it equals the loss of one batch of the whole set. ``accuracy`` counts only the
    rows not labelled ``ignore_index``, as :func:`evaluate` does. Every callback sees every epoch;
    training stops after it when any of them asked to. Callbacks' ``state_dict()`` (an
    :class:`EarlyStopping`'s best value, wait count and best weights) go into ``checkpoint`` and
    come back on ``resume``.

    Refused before anything changes: an empty ``train`` or ``val``, an :class:`EarlyStopping`
    monitoring a ``val_`` metric without ``val``. A model holding a ``BatchNorm1d`` cannot train
    on a batch of one sample: ``batch_size=1`` is refused, and when each epoch (each rank's share,
    under several ranks) would end with a batch of one sample, that last batch is dropped every
    epoch, as PyTorch's ``drop_last=True`` would, with a note in the log.

    Data parallel over ``comm`` (a :class:`deepcore.distributed.Communicator`; None picks one:
    a single process unless started by ``mpirun``, NCCL for CuPy parameters, else MPI), when it
    has ``N > 1`` ranks, every rank calling ``fit`` with the same arguments:

    * rank 0's parameters and buffers are broadcast to all ranks first;
    * ``batch_size`` is per rank: each epoch's order (the same on every rank) is padded to a
      multiple of ``N`` by repeating its start and rank ``r`` trains on ``order[r::N]``, as
      PyTorch's ``DistributedSampler``; so ``N`` ranks with batch ``B`` make the same steps as
      one process with batch ``N*B`` (up to float rounding and the few repeated samples);
    * gradients are averaged over ranks before each optimizer step, a few ~25 MiB messages per
      step (:class:`~deepcore.distributed.GradientReducer`), the loss with them, so a NaN on any
      rank raises :class:`TrainingDiverged` on all; the regularizer is applied on every rank;
    * the logged loss and accuracy are over all ranks' samples (repeated samples included);
      validation runs on every rank on the whole ``val`` set; a stop requested by a callback
      on any rank stops all of them;
    * BatchNorm normalises with each rank's own batch statistics (no SyncBN, as PyTorch DDP);
      its running statistics are rank 0's, broadcast at each epoch's end (as DDP's default
      ``broadcast_buffers``), so every rank validates and saves the same model;
    * only rank 0 prints (``log``, progress) and writes ``checkpoint``, followed by a barrier;
      ``resume`` is read by every rank (the file must be visible to all), and a checkpoint
      from any number of ranks resumes on any other number;
    * an exception on one rank prints ``rank r of N failed: ...`` and aborts the job
      (``MPI_Abort``) instead of leaving the other ranks waiting forever.
    """
    # Every argument is checked here, before the model, optimizer or any file changes.
    loss_fn = get_loss(loss)
    loss_kwargs = _loss_kwargs(loss_kwargs, "fit")
    half_dtype = check_precision(precision, "fit")
    check_int(accumulate, "accumulate", "fit", 1)
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                       or not clip_grad_norm > 0):
        raise ValueError(f"fit: clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    if loss_scaler is not None and precision != "fp16":
        raise ValueError(f"fit: loss_scaler is for precision='fp16', got precision={precision!r}")
    check_int(epochs, "epochs", "fit", 0)
    check_int(batch_size, "batch_size", "fit", 1)
    check_int(seed, "seed", "fit", 0)
    train_ds = _as_dataset(train, "train")
    val_ds = None if val is None else _as_dataset(val, "val")
    if len(train_ds) == 0:
        raise ValueError("fit: train must hold at least one sample, got an empty data set")
    if val_ds is not None and len(val_ds) == 0:
        raise ValueError("fit: val must hold at least one sample or be None, got an empty data set")
    callbacks = list(callbacks)  # iterated once per epoch: a generator would be spent after the first
    for i, cb in enumerate(callbacks):
        if isinstance(cb, EarlyStopping) and cb.monitor.startswith("val_") and val_ds is None:
            raise ValueError(f"fit: callbacks[{i}] is an EarlyStopping that monitors {cb.monitor!r}, which needs "
                             f"validation data, but val is None; pass val=(x, y) or monitor a training metric "
                             f"such as 'loss'")
    monitor = getattr(scheduler, "monitor", None) if getattr(scheduler, "needs_metric", False) else None
    if monitor is not None and monitor.startswith("val_") and val_ds is None:
        raise ValueError(f"fit: the scheduler {type(scheduler).__name__} monitors {monitor!r}, which needs validation "
                         f"data, but val is None; pass val=(x, y) or monitor='loss'")
    drop_last, batch_note = _batch_plan(model, len(train_ds), batch_size, comm.size, drop_last)
    if checkpoint is not None:
        _check_checkpoint_path(Path(checkpoint), probe=comm.is_root)
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"fit: resume={str(resume)!r} is not a checkpoint file")
    if run_settings is not None:
        from .checkpoint import json_dict

        json_dict(run_settings, "run_settings", "fit")
    distributed = comm.size > 1
    emit = log or (print if verbose else (lambda _msg: None))
    if not comm.is_root:
        emit, verbose = (lambda _msg: None), False
    params = model.parameters()
    backend = model.backend
    half = None if precision == "fp32" else HalfWeights(model, half_dtype, backend)
    if precision == "fp16" and loss_scaler is None:
        from .optim import LossScaler

        loss_scaler = LossScaler()
    history = History()
    start = 0
    if resume is not None:
        start, history = _resume(Path(resume), model, optimizer, scheduler, callbacks, epochs=epochs,
                                 loss_scaler=loss_scaler)
        emit(f"resumed from {resume} at epoch {start + 1}")
    if batch_note is not None:
        emit(batch_note)

    ignore_index = loss_kwargs.get("ignore_index")
    class_weights = loss_kwargs.get("class_weights")
    if class_weights is not None:
        class_weights = np.asarray(to_host(class_weights) if hasattr(class_weights, "shape") else class_weights,
                                   dtype=np.float64)
    reducer = None
    if distributed:
        broadcast_module(model, comm)
        reducer = GradientReducer(params, comm)
    for cb in callbacks:
        cb.on_train_begin(model)
    # An asynchronous device (CuPy) reads nothing back inside a step (fit_window.py): not with several
    # ranks (the reducer averages the loss on the host) nor with a loss scaler (its skip is decided there).
    deferred = backend.asynchronous and reducer is None and loss_scaler is None
    plan = StepPlan(model, loss_fn, loss_kwargs, optimizer, params, backend, regularizer, constraint, reducer,
                    half, loss_scaler, None if clip_grad_norm is None else float(clip_grad_norm), deferred,
                    target_check(loss_fn, loss_kwargs, train_ds.y, "train"))
    resident = None if distributed else resident_data(train_ds, backend)
    per_step_schedule = scheduler is not None and getattr(scheduler, "interval", "epoch") == "step"
    more = (lambda: {}) if loss_scaler is None else (lambda: {"loss_scaler": loss_scaler.state_dict()})
    # The last epoch whose end is in the per-epoch checkpoint file, for a divergence's message.
    saved_epoch = start - 1 if start and checkpoint is not None and _same_file(resume, checkpoint) else None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = float(getattr(optimizer, "lr", float("nan")))
        # The epoch loss is the loss's own mean over the epoch: sum over batches of (batch mean x the
        # batch's denominator), over the summed denominators (see _loss_denominator).
        tally, steps, skipped = _Tally(ignore_index), 0, 0
        if distributed:
            it: Any = Batches(ShardedBatches(train_ds, batch_size, rank=comm.rank, size=comm.size, shuffle=shuffle,
                                             seed=seed, epoch=epoch, drop_last=drop_last), backend)
        elif resident is not None:
            it = resident.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        else:
            it = Batches(batches(train_ds, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last),
                         backend)
        progress = Progress(len(it), f"epoch {epoch + 1}/{epochs}", enabled=None if verbose else False,
                            unit="batch")

        window = CheckWindow(plan, it, scheduler, per_step_schedule) if plan.deferred else None
        try:
            group: list[tuple[Any, Any, Any]] = []
            for i, batch in enumerate(it):
                group.append(batch)
                if len(group) < accumulate and i + 1 < len(it):
                    continue
                labels = [yh for _, _, yh in group]
                denominators = [_loss_denominator(yh, int(xb.shape[0]), ignore_index, class_weights)
                                for xb, _, yh in group]
                whole = sum(denominators)
                micro = [MicroBatch(xb, yb, d / whole if whole > 0 else 1.0 / len(group))
                         for (xb, yb, _), d in zip(group, denominators, strict=True)]
                group = []
                if window is not None:
                    window.add(steps, list(range(i + 1 - len(micro), i + 1)), micro, epoch, history,
                               (labels, denominators))
                    steps += 1
                    try:
                        if per_step_schedule:
                            scheduler.step()
                    except BaseException:
                        # A step that diverged before this error is what the synchronous loop would report.
                        window.read(epoch, history)
                        raise
                    if window.full or i + 1 == len(it):
                        for pending, result in window.read(epoch, history):
                            tally.add(*pending.extra, result, progress)
                    continue
                result = run_step(plan, micro, epoch, steps, history)
                tally.add(labels, denominators, result, progress)
                steps += 1
                skipped += not result.stepped
                if per_step_schedule:
                    scheduler.step()
        except TrainingDiverged as exc:
            raise _diverged(exc, checkpoint, saved_epoch, model, optimizer, scheduler, history, callbacks,
                            run_settings, comm) from None
        finally:
            progress.close()
        if distributed:
            tally.total, tally.weight, tally.correct, tally.counted = (
                float(v) for v in comm.allreduce_host([tally.total, tally.weight, tally.correct, tally.counted]))
            broadcast_module(model, comm, parameters=False)
        logs: dict[str, float] = {"epoch": epoch + 1, "loss": tally.total / tally.weight if tally.weight
                                  else float("nan"), "lr": lr}
        if tally.classification:
            logs["accuracy"] = tally.correct / max(tally.counted, 1)
        if val_ds is not None:
            for k, v in evaluate(model, loss_fn, val_ds, batch_size=max(batch_size, 256),
                                 loss_kwargs=loss_kwargs).items():
                logs[f"val_{k}"] = v
        if loss_scaler is not None:
            logs["loss_scale"] = float(loss_scaler.get_scale())
            logs["skipped_steps"] = skipped
        if scheduler is not None and not per_step_schedule:
            if getattr(scheduler, "needs_metric", False):
                scheduler.step(logs[scheduler.monitor])
            else:
                scheduler.step()
        logs["time"] = time.perf_counter() - t0
        history.epochs.append(logs)
        emit(_format_logs(logs, epochs))
        # A list, not a generator in any(): every callback sees the epoch, then any of them may stop.
        stop = any([bool(cb.on_epoch_end(epoch, logs, model)) for cb in callbacks])
        if distributed:
            stop = bool(comm.allreduce_host([float(stop)])[0] > 0)
        if checkpoint is not None:
            if comm.is_root:
                _save(Path(checkpoint), model, optimizer, scheduler, epoch, history, callbacks, settings=run_settings,
                      more=more())
            comm.barrier()
            saved_epoch = epoch
        if stop:
            emit(f"early stop after epoch {epoch + 1}")
            break
    for cb in callbacks:
        cb.on_train_end(model)
    return history


class _Tally:
    """An epoch's figures from its steps' host values: the loss's own mean and the accuracy."""

    def __init__(self, ignore_index: int | None) -> None:
        self.ignore_index = ignore_index
        self.total, self.weight, self.correct, self.counted, self.classification = 0.0, 0.0, 0, 0, False

    def add(self, labels: list[Any], denominators: list[float], result: Any, progress: Progress) -> None:
        for yb, d, local, n_correct in zip(labels, denominators, result.local_losses, result.correct, strict=True):
            if d > 0:  # a micro-batch that counts for nothing adds nothing, NaN mean or not
                self.total += local * d
            self.weight += d
            if n_correct is not None:
                self.classification = True
                self.correct += n_correct
                self.counted += _counted_rows(yb, self.ignore_index)
            progress.update(loss=result.loss)


def _counted_rows(y: np.ndarray, ignore_index: int | None) -> int:
    """The rows accuracy counts: those not labelled ``ignore_index``."""
    return int(y.shape[0]) if ignore_index is None else int(np.count_nonzero(np.asarray(y) != ignore_index))


def _loss_denominator(y: Any, n: int, ignore_index: int | None, class_weights: np.ndarray | None) -> float:
    """What the loss's "mean" divides its sum by for this batch: the summed class weight of the rows not
    ignored (PyTorch's ``cross_entropy`` with ``ignore_index`` / ``weight``), else the number of rows."""
    if ignore_index is None and class_weights is None:
        return float(n)
    labels = np.asarray(y)
    if ignore_index is not None:
        labels = labels[labels != ignore_index]
    if class_weights is None:
        return float(labels.shape[0])
    return float(np.sum(class_weights[labels]))


def _batch_plan(model: Module, n: int, batch_size: int, ranks: int, drop_last: bool) -> tuple[bool, str | None]:
    """``drop_last`` for every epoch, and a note for the log when it had to be turned on.

    BatchNorm1d cannot train on a batch of one sample (no variance); when the model holds one and
    each epoch (each rank's share, under several ranks) would end with a 1-sample batch, that batch
    is dropped, as PyTorch's ``drop_last=True`` would drop it. Refused before training: a batch size
    of 1 with BatchNorm, and a plan that leaves no batch at all."""
    per_rank = -(-n // ranks)  # DistributedSampler pads to a multiple of the ranks (ShardedBatches)
    share = f"{n} training samples" if ranks == 1 else f"{per_rank} training samples per rank"
    batchnorm = next((path or "the model" for path, m in model.named_modules() if isinstance(m, BatchNorm1d)), None)
    note = None
    if batchnorm is not None:
        if batch_size == 1 or per_rank == 1:
            what = "batch_size=1" if batch_size == 1 else share.replace("samples", "sample")
            raise ValueError(f"fit: BatchNorm1d (at {batchnorm!r}) needs batches of at least 2 samples to train, "
                             f"got {what}")
        if not drop_last and per_rank % batch_size == 1:
            drop_last = True
            note = (f"note: {share} in batches of {batch_size} end each epoch with a batch of 1 sample, on which "
                    f"BatchNorm1d (at {batchnorm!r}) cannot train; that batch is dropped (as drop_last=True)")
    if drop_last and per_rank < batch_size:
        raise ValueError(f"fit: drop_last=True with batch_size={batch_size} leaves no batch of the {share}; "
                         f"pass a batch_size of at most {per_rank}")
    return drop_last, note


def evaluate(model: Module, loss: str | LossFn, data: Any, *, batch_size: int = 1024,
             loss_kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """The loss (its "mean" over the whole data set, so ``ignore_index`` and class weights count
    as in training) and, for class labels, the accuracy over the non-ignored rows, in inference mode."""
    loss_fn = get_loss(loss)
    kwargs = _loss_kwargs(loss_kwargs, "evaluate")
    check_int(batch_size, "batch_size", "evaluate", 1)
    ds = _as_dataset(data, "data")
    backend = model.backend
    xp = backend.xp
    preds = [model(to_backend(xb, backend)) for xb, _ in batches(ds, batch_size, shuffle=False)]
    if not preds:
        raise ValueError("evaluate: data is empty")
    pred = preds[0] if len(preds) == 1 else xp.concat(preds, axis=0)
    y = to_backend(ds.y, backend)
    value, _ = loss_fn(pred, y, **kwargs)
    result = {"loss": float(value)}
    if pred.ndim == 2 and y.ndim == 1 and backend.is_integer(y):
        hit = xp.argmax(pred, axis=1) == y
        ignore = kwargs.get("ignore_index")
        counted = y != ignore if ignore is not None else xp.ones_like(hit)
        n = int(xp.sum(xp.astype(counted, xp.int64)))
        result["accuracy"] = int(xp.sum(xp.astype(hit & counted, xp.int64))) / max(n, 1)
    return result


def predict(model: Module, x: Any, *, batch_size: int = 1024) -> np.ndarray:
    """The model's outputs for ``x`` (host arrays in, host array out), in inference mode."""
    ds = ArrayDataset(np.asarray(x))
    backend = model.backend
    outs = [to_host(model(to_backend(xb, backend))) for xb, _ in batches(ds, batch_size, shuffle=False)]
    return np.concatenate(outs) if outs else np.empty((0,))


def _format_logs(logs: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(logs['epoch'])}/{epochs}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in logs:
            v = logs[key]
            parts.append(f"{key} {v:.2%}" if "accuracy" in key else f"{key} {v:.4f}")
    parts.append(f"lr {logs['lr']:.3g}")
    parts.append(f"{logs['time']:.1f}s")
    return "  ".join(parts)


def _loss_kwargs(kwargs: dict[str, Any] | None, fn: str) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    if "reduction" in kwargs:
        raise ValueError(f"{fn}: loss_kwargs must not set reduction (the loop needs the mean), got "
                         f"{kwargs['reduction']!r}")
    return kwargs


