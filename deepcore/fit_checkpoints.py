"""The fit loop's files: checking where a checkpoint goes, writing one each epoch (model,
optimizer, schedule, history, callbacks, run settings, architecture), resuming from one, and
the last good parameters when training diverges."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .callbacks import Callback, History, TrainingDiverged
from .distributed import (
    Communicator,
)
from .nn.module import Module


def check_checkpoint_path(path: Path, probe: bool = True) -> None:
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


def same_file(a: str | os.PathLike[str] | None, b: str | os.PathLike[str]) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def diverged(exc: TrainingDiverged, checkpoint: str | os.PathLike[str] | None, saved_epoch: int | None,
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
            save(last_good, model, optimizer, scheduler, None, history, callbacks, settings=settings,
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


def save(path: Path, model: Module, optimizer: Any, scheduler: Any, epoch: int | None, history: History,
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
    architecture = architecture_or_none(model)
    if architecture is not None:  # `deepcore evaluate` / `predict` rebuild the model from it
        extra["architecture"] = architecture
    if callbacks:
        extra["callbacks"] = [{"type": type(cb).__name__, "state": cb.state_dict()} for cb in callbacks]
    save_checkpoint(path, model, optimizer, epoch=epoch, extra=extra)


def architecture_or_none(model: Module) -> dict[str, Any] | None:
    """The model's JSON architecture (:mod:`deepcore.nn.spec`), or None for a model of custom layers."""
    from .nn.spec import ArchitectureError, architecture_of

    try:
        return architecture_of(model)
    except ArchitectureError:
        return None


def resume(path: Path, model: Module, optimizer: Any, scheduler: Any,
            callbacks: Sequence[Callback] = (), *, epochs: int | None = None,
            loss_scaler: Any = None) -> tuple[int, History]:
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
    scaler_state = extra.get("loss_scaler")
    if loss_scaler is not None and scaler_state is not None and not isinstance(scaler_state, dict):
        raise ValueError(f"fit: {str(path)!r} has a malformed loss scaler state (a dict expected)")
    load_callback_states(path, callbacks, extra.get("callbacks"))
    ckpt.restore(model, optimizer)  # the very file checked above, not read a second time
    if scheduler is not None and saved is not None:
        scheduler.load_state_dict(saved)
    if loss_scaler is not None and scaler_state is not None:
        loss_scaler.load_state_dict(scaler_state)
    return start, History.from_dict(extra.get("history", {}), f"{str(path)!r}")


def load_callback_states(path: Path, callbacks: Sequence[Callback], saved: Any) -> None:
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
