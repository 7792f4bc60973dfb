"""What the fit loop reports and is steered by: ``History`` (the per-epoch metrics), ``Callback``
(hooks with a state that checkpoints keep), ``EarlyStopping``, and ``TrainingDiverged``."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_int
from ._io import write_bytes_atomic
from .backend.base import Array
from .nn.module import Module


def to_host(x: Array) -> np.ndarray:
    """``x`` as a NumPy array on the host."""
    from .backend import get_backend

    return get_backend(x).to_numpy(x)


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
                self._best_state = {k: to_host(v) for k, v in model.state_dict().items()}
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
