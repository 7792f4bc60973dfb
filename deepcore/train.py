"""The fit loop: minibatch training with metrics, callbacks, progress, checkpoints and resume.

One step is the course's recipe: forward, loss ``L = mean L_i + λ R(W)``,
back-propagation by the chain rule (each layer's closure), an optimizer
update, then any constraint (max-norm). The batch order of epoch ``e`` depends
only on ``(seed, e)``, and dropout masks only on each layer's seed and call
count, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import base64
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the model keeps its parameters from before that step.

    ``epoch`` and ``step`` count from 1; ``checkpoint``: the file :func:`fit` wrote those parameters
    to (with a ``checkpoint`` configured), else None."""

    def __init__(self, message: str, history: History, checkpoint: Path | None = None, *,
                 epoch: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.history = history
        self.checkpoint = checkpoint
        self.epoch, self.step = epoch, step


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
    def from_dict(cls, d: dict[str, Any], source: str = "history") -> History:
        """The inverse of :meth:`to_dict`; ``source`` names where ``d`` came from in errors."""
        epochs = d.get("epochs", []) if isinstance(d, dict) else None
        if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
            raise ValueError(f"{source}: a history must be {{'epochs': [{{...}}, ...]}}, a list of per-epoch "
                             f"dicts; got {type(d).__name__ if epochs is None else type(epochs).__name__}")
        return cls([dict(e) for e in epochs])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON, atomically (a temp file renamed over ``path``)."""
        return write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode())


class Callback:
    """Hooks into :func:`fit`. ``on_epoch_end`` returning True stops training after that epoch
    (every callback still sees that epoch first).

    :meth:`state_dict` / :meth:`load_state_dict` carry what a callback must remember across a
    checkpoint and resume (a JSON-able dict; none by default): :func:`fit` saves the states of its
    callbacks in its ``checkpoint`` and gives them back on ``resume``, matched by position and type.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__}.load_state_dict: this callback keeps no state, "
                             f"got keys {sorted(state)}")

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

    _STATE_KEYS = frozenset({"monitor", "mode", "best", "best_epoch", "wait", "best_state"})

    def state_dict(self) -> dict[str, Any]:
        """``monitor``, ``mode``, ``best``, ``best_epoch``, ``wait`` and, with ``restore_best``, the best
        epoch's model state (each array as dtype, shape and base64 bytes, so it is JSON and exact)."""
        best_state = None
        if self.restore_best and self._best_state is not None:
            best_state = {k: _encode_array(v) for k, v in self._best_state.items()}
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "wait": self._wait, "best_state": best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fn = "EarlyStopping.load_state_dict"
        if not isinstance(state, dict) or set(state) != self._STATE_KEYS:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{fn}: state must have the keys {sorted(self._STATE_KEYS)}, got {got}")
        if (state["monitor"], state["mode"]) != (self.monitor, self.mode):
            raise ValueError(f"{fn}: the state monitors {state['monitor']!r} (mode {state['mode']!r}), "
                             f"but this EarlyStopping monitors {self.monitor!r} (mode {self.mode!r})")
        if self.restore_best and state["best"] is not None and state["best_state"] is None:
            raise ValueError(f"{fn}: restore_best=True, but the state holds no best weights "
                             f"(it was saved with restore_best=False)")
        wait = check_int(state["wait"], "wait", fn, 0)
        best_state = None
        if self.restore_best and state["best_state"] is not None:
            best_state = {k: _decode_array(v, f"{fn}: best_state[{k!r}]") for k, v in state["best_state"].items()}
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self._wait = wait
        self._best_state = best_state


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode_array(d: Any, what: str) -> np.ndarray:
    try:
        dtype = np.dtype(d["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"dtype {dtype} is not numeric")
        return np.frombuffer(base64.b64decode(d["base64"], validate=True), dtype=dtype).reshape(d["shape"]).copy()
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be {{'dtype', 'shape', 'base64'}} of a numeric array: {exc}") from None


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
        loss_kwargs: dict[str, Any] | None = None, run_settings: dict[str, Any] | None = None,
        comm: Communicator | None = None) -> History:
    """Train ``model`` for ``epochs`` epochs of minibatches; returns the :class:`History`.

    ``train``/``val`` are :class:`~deepcore.data.ArrayDataset` or ``(x, y)`` pairs of host
    arrays; each batch is moved to the model's backend. ``regularizer`` (``L2``, ``L1``,
    ``ElasticNet``) adds ``λ R(W)`` to the loss and its gradient; ``constraint``
    (``MaxNorm``) is projected after every step; ``scheduler`` steps once per epoch.
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
    drop_last, batch_note = _batch_plan(model, len(train_ds), batch_size, comm.size, drop_last)
    if checkpoint is not None:
        _check_checkpoint_path(Path(checkpoint), probe=comm.is_root)
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"fit: resume={str(resume)!r} is not a checkpoint file")
    if run_settings is not None:
        _json_settings(run_settings)
    distributed = comm.size > 1
    emit = log or (print if verbose else (lambda _msg: None))
    if not comm.is_root:
        emit, verbose = (lambda _msg: None), False
    params = model.parameters()
    history = History()
    start = 0
    if resume is not None:
        start, history = _resume(Path(resume), model, optimizer, scheduler, callbacks, epochs=epochs)
        emit(f"resumed from {resume} at epoch {start + 1}")
    if batch_note is not None:
        emit(batch_note)

    ignore_index = loss_kwargs.get("ignore_index")
    class_weights = loss_kwargs.get("class_weights")
    if class_weights is not None:
        class_weights = np.asarray(_host(class_weights) if hasattr(class_weights, "shape") else class_weights,
                                   dtype=np.float64)
    reducer = None
    if distributed:
        broadcast_module(model, comm)
        reducer = GradientReducer(params, comm)
    for cb in callbacks:
        cb.on_train_begin(model)
    backend = model.backend
    # The last epoch whose end is in the per-epoch checkpoint file, for a divergence's message.
    saved_epoch = start - 1 if start and checkpoint is not None and _same_file(resume, checkpoint) else None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = float(getattr(optimizer, "lr", float("nan")))
        # The epoch loss is the loss's own mean over the epoch: sum over batches of (batch mean x the
        # batch's denominator), over the summed denominators (see _loss_denominator).
        total, weight, correct, counted, steps, classification = 0.0, 0.0, 0, 0, 0, False
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
                value, local_value, n_correct = _step(model, loss_fn, loss_kwargs, optimizer, regularizer,
                                                      constraint, params, xb, yb, backend, epoch, steps, history,
                                                      reducer)
                denominator = _loss_denominator(yb_host, int(xb.shape[0]), ignore_index, class_weights)
                total += local_value * denominator
                weight += denominator
                if n_correct is not None:
                    classification = True
                    correct += n_correct
                    counted += _counted_rows(yb_host, ignore_index)
                steps += 1
                progress.update(loss=value)
        except TrainingDiverged as exc:
            raise _diverged(exc, checkpoint, saved_epoch, model, optimizer, scheduler, history, callbacks,
                            run_settings, comm) from None
        finally:
            progress.close()
        if distributed:
            total, weight, correct, counted = (float(v) for v in
                                               comm.allreduce_host([total, weight, correct, counted]))
            broadcast_module(model, comm, parameters=False)
        logs: dict[str, float] = {"epoch": epoch + 1, "loss": total / weight if weight else float("nan"), "lr": lr}
        if classification:
            logs["accuracy"] = correct / max(counted, 1)
        if val_ds is not None:
            for k, v in evaluate(model, loss_fn, val_ds, batch_size=max(batch_size, 256),
                                 loss_kwargs=loss_kwargs).items():
                logs[f"val_{k}"] = v
        if scheduler is not None:
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
                _save(Path(checkpoint), model, optimizer, scheduler, epoch, history, callbacks, settings=run_settings)
            comm.barrier()
            saved_epoch = epoch
        if stop:
            emit(f"early stop after epoch {epoch + 1}")
            break
    for cb in callbacks:
        cb.on_train_end(model)
    return history


def _step(model: Module, loss_fn: LossFn, loss_kwargs: dict[str, Any], optimizer: Any, regularizer: Any,
          constraint: Any, params: list[Any], xb: Array, yb: Array, backend: Backend, epoch: int, step: int,
          history: History, reducer: GradientReducer | None = None) -> tuple[float, float, int | None]:
    """(the step's loss, the mean over ranks; this rank's own loss; correct predictions or None)."""
    # Buffers (BatchNorm statistics) are replaced, never mutated, by a forward pass, and
    # extra states are plain values, so keeping references is enough to undo this step. The old
    # gradients go first, so the snapshot does not keep them alive through this step.
    optimizer.zero_grad()
    before = model.snapshot()
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
    local_value = loss_value if reducer is None else float(value)
    if not math.isfinite(loss_value):
        model.restore(before)
        optimizer.zero_grad()
        raise TrainingDiverged(
            f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; training stopped and the model "
            f"keeps its parameters from before that step (try a smaller learning rate)", history,
            epoch=epoch + 1, step=step + 1)
    optimizer.step()
    if constraint is not None:
        constraint.project(params)
    return loss_value, local_value, _count_correct(pred, yb, backend, loss_kwargs.get("ignore_index"))


def _count_correct(pred: Array, y: Array, backend: Backend, ignore_index: int | None = None) -> int | None:
    """Correct arg-max predictions for class labels, rows labelled ``ignore_index`` not counted;
    None when the targets are not labels."""
    if not (pred.ndim == 2 and y.ndim == 1 and backend.is_integer(y)):
        return None
    xp = backend.xp
    hit = xp.argmax(pred, axis=1) == y
    if ignore_index is not None:
        hit = hit & (y != ignore_index)
    return int(xp.sum(xp.astype(hit, xp.int64)))


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


def _check_checkpoint_path(path: Path, probe: bool = True) -> None:
    """Refuse, before training, a checkpoint path that the first epoch's save would fail on; ``probe``:
    also try creating a file in its folder (the rank that writes it), as mode bits do not tell."""
    from ._io import writable_problem
    from .checkpoint import SUFFIXES

    if path.suffix not in SUFFIXES:
        raise ValueError(f"fit: checkpoint must end in {' or '.join(SUFFIXES)}, got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"fit: checkpoint folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"fit: checkpoint {str(path)!r} is a folder, not a file")
    problem = writable_problem(path.parent) if probe else None
    if problem is not None:
        raise PermissionError(f"fit: cannot write the checkpoint in {str(path.parent)!r}: {problem}")


def _json_settings(settings: Any) -> None:
    if not isinstance(settings, dict):
        raise TypeError(f"fit: run_settings must be a dict, got {type(settings).__name__}")
    try:
        json.dumps(settings)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fit: run_settings must be JSON-serialisable: {exc}") from None


def _same_file(a: str | os.PathLike[str] | None, b: str | os.PathLike[str]) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _diverged(exc: TrainingDiverged, checkpoint: str | os.PathLike[str] | None, saved_epoch: int | None,
              model: Module, optimizer: Any, scheduler: Any, history: History, callbacks: Sequence[Callback],
              settings: dict[str, Any] | None, comm: Communicator) -> TrainingDiverged:
    """``exc`` (raised by ``_step``, the model already back to its parameters from before the step) with
    those parameters written next to ``checkpoint`` on the root rank, and a message naming the files."""
    if checkpoint is None:
        return exc
    head = str(exc).partition(";")[0]  # "loss became nan at epoch E, step S"
    path = Path(checkpoint)
    last_good = path.with_name(f"diverged-last-good{path.suffix}")
    problem = None
    if comm.is_root:
        try:
            _save(last_good, model, optimizer, scheduler, None, history, callbacks, settings=settings,
                  more={"diverged": {"epoch": exc.epoch, "step": exc.step, "message": head}})
        except Exception as err:  # the divergence is the error to report; say why the file is missing
            problem = f"{type(err).__name__}: {err}"
    comm.barrier()
    finished = (f"the end of epoch {saved_epoch + 1} is in {str(path)!r}" if saved_epoch is not None
                else "no epoch of this run finished") + " (try a smaller learning rate)"
    if problem is not None:
        return TrainingDiverged(f"{head}; training stopped, and writing the parameters from before that step to "
                                f"{str(last_good)!r} failed ({problem}); {finished}", exc.history,
                                epoch=exc.epoch, step=exc.step)
    return TrainingDiverged(f"{head}; training stopped: the parameters from before that step are in "
                            f"{str(last_good)!r}; {finished}", exc.history, last_good, epoch=exc.epoch, step=exc.step)


def _save(path: Path, model: Module, optimizer: Any, scheduler: Any, epoch: int | None, history: History,
          callbacks: Sequence[Callback] = (), *, settings: dict[str, Any] | None = None,
          more: dict[str, Any] | None = None) -> None:
    """The per-epoch checkpoint; ``settings``: the run's (``fit``'s ``run_settings``); ``more``: further extras."""
    from .checkpoint import save_checkpoint

    extra: dict[str, Any] = {"history": history.to_dict()}
    if settings is not None:
        extra["settings"] = settings
    extra.update(more or {})
    if scheduler is not None:
        extra["scheduler"] = scheduler.state_dict()
    architecture = _architecture_or_none(model)
    if architecture is not None:  # `deepcore evaluate` / `predict` rebuild the model from it
        extra["architecture"] = architecture
    if callbacks:
        extra["callbacks"] = [{"type": type(cb).__name__, "state": cb.state_dict()} for cb in callbacks]
    save_checkpoint(path, model, optimizer, epoch=epoch, extra=extra)


def _architecture_or_none(model: Module) -> dict[str, Any] | None:
    """The model's JSON architecture (:mod:`deepcore.nn.spec`), or None for a model of custom layers."""
    from .nn.spec import ArchitectureError, architecture_of

    try:
        return architecture_of(model)
    except ArchitectureError:
        return None


def _resume(path: Path, model: Module, optimizer: Any, scheduler: Any,
            callbacks: Sequence[Callback] = (), *, epochs: int | None = None) -> tuple[int, History]:
    from .checkpoint import load_checkpoint

    # Read and check first, so a mismatched scheduler fails before the model is overwritten.
    ckpt = load_checkpoint(path)
    extra = ckpt.extra or {}
    start = 0 if ckpt.epoch is None else int(ckpt.epoch) + 1
    diverged = extra.get("diverged")
    if isinstance(diverged, dict):
        raise ValueError(f"fit: {str(path)!r} holds the parameters from within epoch {diverged.get('epoch')}, "
                         f"written when training diverged, and cannot be resumed; resume from the checkpoint of "
                         f"the last finished epoch, or inspect it with load_checkpoint")
    if epochs is not None and epochs <= start:
        raise ValueError(f"fit: epochs={epochs} counts the whole run, but {str(path)!r} has already trained "
                         f"{start} epoch{'s' if start != 1 else ''}; pass epochs > {start} to train on")
    saved = extra.get("scheduler")
    if scheduler is not None and saved is not None and saved.get("type") != type(scheduler).__name__:
        raise ValueError(f"fit: {str(path)!r} holds a {saved.get('type')!r} schedule, "
                         f"but the scheduler given is a {type(scheduler).__name__}")
    _load_callback_states(path, callbacks, extra.get("callbacks"))
    ckpt.restore(model, optimizer)  # the very file checked above, not read a second time
    if scheduler is not None and saved is not None:
        scheduler.load_state_dict(saved)
    return start, History.from_dict(extra.get("history", {}), f"{str(path)!r}")


def _load_callback_states(path: Path, callbacks: Sequence[Callback], saved: Any) -> None:
    """Give each callback its state from the checkpoint, matched by position and type: all of them or,
    when one refuses its state, none (the others get their own states back). A checkpoint without
    callback states (or callbacks beyond the saved ones) leaves them as they are."""
    if not callbacks or saved is None:
        return
    if not isinstance(saved, list) or not all(isinstance(e, dict) and {"type", "state"} <= set(e) for e in saved):
        raise ValueError(f"fit: {str(path)!r} has malformed callback states (a list of {{'type', 'state'}} expected)")
    for i, (cb, entry) in enumerate(zip(callbacks, saved, strict=False)):
        if entry["type"] != type(cb).__name__:
            raise ValueError(f"fit: {str(path)!r} holds the state of a {entry['type']!r} as callback {i}, "
                             f"but callbacks[{i}] is a {type(cb).__name__}")
    before = [cb.state_dict() for cb in callbacks]
    try:
        for cb, entry in zip(callbacks, saved, strict=False):
            cb.load_state_dict(entry["state"])
    except BaseException:
        for cb, state in zip(callbacks, before, strict=True):
            cb.load_state_dict(state)
        raise
