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
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import losses as _losses
from ._checks import check_int
from ._io import write_bytes_atomic
from ._progress import Progress
from .backend import Backend, to_backend
from .backend.base import Array
from .data import ArrayDataset, batches
from .distributed import (
    Communicator,
    GradientReducer,
    ShardedBatches,
    abort_on_error,
    broadcast_module,
    get_communicator,
)
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the model keeps its parameters from before that step."""

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


@dataclass
class History:
    """Per-epoch records: ``epoch``, ``loss``, ``accuracy`` (classification), ``val_loss``,
    ``val_accuracy``, ``lr``, ``time`` (seconds)."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    def __getitem__(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs if key in e]

    def __len__(self) -> int:
        return len(self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls([dict(e) for e in d.get("epochs", [])])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON, atomically (a temp file renamed over ``path``)."""
        return write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode())


class Callback:
    """Hooks into :func:`fit`. ``on_epoch_end`` returning True stops training after that epoch."""

    def on_train_begin(self, model: Module) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict[str, float], model: Module) -> bool | None:
        return None

    def on_train_end(self, model: Module) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs;
    with ``restore_best`` the model gets back its parameters from the best epoch."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0, mode: str = "auto",
                 restore_best: bool = True) -> None:
        check_int(patience, "patience", "EarlyStopping", 0)
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.restore_best = restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._best_state: dict[str, np.ndarray] | None = None
        self._wait = 0

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, epoch: int, logs: dict[str, float], model: Module) -> bool:
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping: monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
        value = logs[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best:
                self._best_state = {k: _host(v) for k, v in model.state_dict().items()}
            return False
        self._wait += 1
        return self._wait >= self.patience

    def on_train_end(self, model: Module) -> None:
        if self.restore_best and self._best_state is not None:
            model.load_state_dict(self._best_state)


def get_loss(loss: str | LossFn) -> LossFn:
    """The loss function named ``loss`` (a key of :data:`LOSSES`), or ``loss`` itself if callable."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be a callable or one of {sorted(LOSSES)}, got {loss!r}")
    return LOSSES[loss]


def _host(x: Array) -> np.ndarray:
    from .backend import get_backend

    return get_backend(x).to_numpy(x)


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
        loss_kwargs: dict[str, Any] | None = None, comm: Communicator | None = None) -> History:
    """Train ``model`` for ``epochs`` epochs of minibatches; returns the :class:`History`.

    ``train``/``val`` are :class:`~deepcore.data.ArrayDataset` or ``(x, y)`` pairs of host
    arrays; each batch is moved to the model's backend. ``regularizer`` (``L2``, ``L1``,
    ``ElasticNet``) adds ``λ R(W)`` to the loss and its gradient; ``constraint``
    (``MaxNorm``) is projected after every step; ``scheduler`` steps once per epoch.
    ``checkpoint`` writes model, optimizer, scheduler and history after every epoch
    (atomically); ``resume`` continues from such a file. A NaN/inf loss raises
    :class:`TrainingDiverged` naming the epoch and step, with the model as it was
    before that step.

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
    check_int(epochs, "epochs", "fit", 0)
    check_int(batch_size, "batch_size", "fit", 1)
    check_int(seed, "seed", "fit", 0)
    train_ds = _as_dataset(train, "train")
    val_ds = None if val is None else _as_dataset(val, "val")
    if checkpoint is not None:
        _check_checkpoint_path(Path(checkpoint))
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"fit: resume={str(resume)!r} is not a checkpoint file")
    distributed = comm.size > 1
    emit = log or (print if verbose else (lambda _msg: None))
    if not comm.is_root:
        emit, verbose = (lambda _msg: None), False
    params = model.parameters()
    history = History()
    start = 0
    if resume is not None:
        start, history = _resume(Path(resume), model, optimizer, scheduler)
        emit(f"resumed from {resume} at epoch {start + 1}")

    reducer = None
    if distributed:
        broadcast_module(model, comm)
        reducer = GradientReducer(params, comm)
    for cb in callbacks:
        cb.on_train_begin(model)
    backend = model.backend
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = float(getattr(optimizer, "lr", float("nan")))
        total, correct, count, steps, classification = 0.0, 0, 0, 0, False
        if distributed:
            it: Any = ShardedBatches(train_ds, batch_size, rank=comm.rank, size=comm.size, shuffle=shuffle,
                                     seed=seed, epoch=epoch, drop_last=drop_last)
        else:
            it = batches(train_ds, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        progress = Progress(len(it), f"epoch {epoch + 1}/{epochs}", enabled=None if verbose else False,
                            unit="batch")
        try:
            for xb_host, yb_host in it:
                xb, yb = to_backend(xb_host, backend), to_backend(yb_host, backend)
                value, n_correct = _step(model, loss_fn, loss_kwargs, optimizer, regularizer, constraint, params,
                                         xb, yb, backend, epoch, steps, history, reducer)
                n = int(xb.shape[0])
                total += value * n
                count += n
                if n_correct is not None:
                    classification = True
                    correct += n_correct
                steps += 1
                progress.update(loss=value)
        finally:
            progress.close()
        if distributed:
            total, correct, count = (float(v) for v in comm.allreduce_host([total, correct, count]))
            broadcast_module(model, comm, parameters=False)
        logs: dict[str, float] = {"epoch": epoch + 1, "loss": total / max(count, 1), "lr": lr}
        if classification:
            logs["accuracy"] = correct / max(count, 1)
        if val_ds is not None:
            for k, v in evaluate(model, loss_fn, val_ds, batch_size=max(batch_size, 256),
                                 loss_kwargs=loss_kwargs).items():
                logs[f"val_{k}"] = v
        if scheduler is not None:
            scheduler.step()
        logs["time"] = time.perf_counter() - t0
        history.epochs.append(logs)
        emit(_format_logs(logs, epochs))
        stop = any(bool(cb.on_epoch_end(epoch, logs, model)) for cb in callbacks)
        if distributed:
            stop = bool(comm.allreduce_host([float(stop)])[0] > 0)
        if checkpoint is not None:
            if comm.is_root:
                _save(Path(checkpoint), model, optimizer, scheduler, epoch, history)
            comm.barrier()
        if stop:
            emit(f"early stop after epoch {epoch + 1}")
            break
    for cb in callbacks:
        cb.on_train_end(model)
    return history


def _step(model: Module, loss_fn: LossFn, loss_kwargs: dict[str, Any], optimizer: Any, regularizer: Any,
          constraint: Any, params: list[Any], xb: Array, yb: Array, backend: Backend, epoch: int, step: int,
          history: History, reducer: GradientReducer | None = None) -> tuple[float, int | None]:
    # Buffers (BatchNorm statistics) are replaced, never mutated, by a forward pass, and
    # extra states are plain values, so keeping references is enough to undo this step.
    before = model.snapshot()
    optimizer.zero_grad()
    # Divergence is detected below and reported with its epoch and step, so NumPy's own
    # overflow warnings along the way would only be noise.
    with backend.silent_fp():
        pred, backward = model.forward(xb, train=True)
        value, grad = loss_fn(pred, yb, **loss_kwargs)
        backward(grad)  # the batch is data: its gradient is not formed (nn.module's input-gradient rule)
        if regularizer is not None:
            value = value + regularizer(params)
    # Several ranks: every gradient becomes its mean over ranks, and the loss too, so all ranks
    # see the same value and stop together below if it is not finite.
    loss_value = float(value) if reducer is None else reducer.reduce(value)
    if not math.isfinite(loss_value):
        model.restore(before)
        optimizer.zero_grad()
        raise TrainingDiverged(
            f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; training stopped and the model "
            f"keeps its parameters from before that step (try a smaller learning rate)", history)
    optimizer.step()
    if constraint is not None:
        constraint.project(params)
    return loss_value, _count_correct(pred, yb, backend)


def _count_correct(pred: Array, y: Array, backend: Backend) -> int | None:
    """Correct arg-max predictions for class labels; None when the targets are not labels."""
    if not (pred.ndim == 2 and y.ndim == 1 and backend.is_integer(y)):
        return None
    xp = backend.xp
    return int(xp.sum(xp.astype(xp.argmax(pred, axis=1) == y, xp.int64)))


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
    outs = [_host(model(to_backend(xb, backend))) for xb, _ in batches(ds, batch_size, shuffle=False)]
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


def _check_checkpoint_path(path: Path) -> None:
    from .checkpoint import SUFFIXES

    if path.suffix not in SUFFIXES:
        raise ValueError(f"fit: checkpoint must end in {' or '.join(SUFFIXES)}, got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"fit: checkpoint folder {str(path.parent)!r} does not exist")


def _save(path: Path, model: Module, optimizer: Any, scheduler: Any, epoch: int, history: History) -> None:
    from .checkpoint import save_checkpoint

    extra = {"history": history.to_dict()}
    if scheduler is not None:
        extra["scheduler"] = scheduler.state_dict()
    save_checkpoint(path, model, optimizer, epoch=epoch, extra=extra)


def _resume(path: Path, model: Module, optimizer: Any, scheduler: Any) -> tuple[int, History]:
    from .checkpoint import load_checkpoint

    # Read and check first, so a mismatched scheduler fails before the model is overwritten.
    extra = load_checkpoint(path).extra or {}
    saved = extra.get("scheduler")
    if scheduler is not None and saved is not None and saved.get("type") != type(scheduler).__name__:
        raise ValueError(f"fit: {str(path)!r} holds a {saved.get('type')!r} schedule, "
                         f"but the scheduler given is a {type(scheduler).__name__}")
    ckpt = load_checkpoint(path, model, optimizer)
    if scheduler is not None and saved is not None:
        scheduler.load_state_dict(saved)
    start = 0 if ckpt.epoch is None else int(ckpt.epoch) + 1
    return start, History.from_dict(extra.get("history", {}))

