"""Argument and state checks shared by the optimizers, schedules, loss scaler and EMA: numbers as
Python floats, non-negative integers from a state dict (of any backend), JSON-able values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend.registry import backend_or_none

__all__ = ["jsonable", "learning_rate", "real", "state_int"]


def real(value: Any, name: str, fn: str, expected: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a Python float (so float32 arrays stay float32), if finite and ``ok``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a number {expected}, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or not ok(x):
        raise ValueError(f"{fn}: {name} must be a finite number {expected}, got {value!r}")
    return x


def learning_rate(value: Any, fn: str) -> float:
    return real(value, "lr", fn, ">= 0", lambda x: x >= 0)


def jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def state_int(value: Any, name: str, fn: str) -> int:
    """A non-negative integer from an int, a NumPy integer, or a 0-d integer array of any backend."""
    raw = value
    if hasattr(value, "shape") and not isinstance(value, np.generic):
        backend = backend_or_none(value)
        if tuple(value.shape) != () or backend is None:
            raise TypeError(f"{fn}: {name} must be a non-negative integer, got an array of shape {tuple(value.shape)}")
        value = backend.to_numpy(value)[()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0:
        return int(value)
    raise ValueError(f"{fn}: {name} must be a non-negative integer, got {raw!r}")
