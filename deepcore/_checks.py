"""Argument checks shared by losses, layers and data: each error names the argument,
what was expected and what arrived, and is raised before any state changes."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend
from .backend.base import REDUCTIONS, Array


def check_reduction(reduction: Any, fn: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def check_floating(backend: Backend, x: Array, name: str, fn: str, ndims: tuple[int, ...]) -> None:
    if not backend.is_floating(x):
        raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{fn}: {name} must be {want}, got shape {tuple(x.shape)}")


def check_int(value: Any, name: str, fn: str, low: int = 0) -> int:
    """``value`` as an int (NumPy integers accepted, bools refused), at least ``low``: TypeError
    for what is not an integer, ValueError for one out of range, both naming ``fn`` and ``name``."""
    want = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be {want}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{fn}: {name} must be {want}, got {value!r}")
    return int(value)


def check_pair(value: Any, name: str, fn: str, low: int = 0) -> tuple[int, int]:
    """An int or a pair of ints (each at least ``low``) as a pair, as PyTorch's ``_pair``; errors name ``fn``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{fn}: {name} must be an integer or a pair of integers, got {value!r}")
        return check_int(value[0], name, fn, low), check_int(value[1], name, fn, low)
    v = check_int(value, name, fn, low)
    return v, v


def check_number(value: Any, name: str, fn: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{fn}: {name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def first_bad(backend: Backend, bad: Array) -> int | None:
    """Index of the first True in the 1-D mask ``bad``, or None (one host synchronisation)."""
    xp = backend.xp
    if not bool(xp.any(bad)):
        return None
    return int(xp.argmax(xp.astype(bad, xp.int8)))


def check_labels(backend: Backend, labels: Array, n: int, num_classes: int, fn: str, *, validate: bool,
                 ignore_index: int | None = None, name: str = "labels") -> bool:
    """Integer class labels of shape (n,), each in [0, num_classes) or equal to ``ignore_index``.
    Returns True when every label was seen to be in [0, num_classes) (False when unchecked)."""
    if not backend.is_integer(labels):
        raise TypeError(f"{fn}: {name} must be an integer array of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{fn}: {name} must have shape ({n},) to match the {n} rows of predictions, "
                         f"got {tuple(labels.shape)}")
    if not validate or n == 0:
        return n == 0
    # A backend may answer "all in range" in one cheap pass (NumPy: one max over the labels read
    # as unsigned); the full mask below runs only when it says no, to name the first bad label.
    in_range = getattr(backend, "labels_in_range", None)
    if in_range is not None and in_range(labels, num_classes):
        return True
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    i = first_bad(backend, bad)
    if i is not None:
        extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{fn}: {name} must be in [0, {num_classes}){extra}, got {name}[{i}] = {int(labels[i])}")
    return False


def check_range(backend: Backend, x: Array, name: str, fn: str, low: float, high: float) -> None:
    """Every element of ``x`` in [low, high] (NaN fails), with the first offender in the message."""
    xp = backend.xp
    flat = xp.reshape(x, (-1,))
    i = first_bad(backend, ~((flat >= low) & (flat <= high)))
    if i is not None:
        idx = _unravel(i, tuple(x.shape))
        raise ValueError(f"{fn}: {name} must be in [{low}, {high}], got {name}[{idx}] = {float(flat[i])}")


def check_values_in(backend: Backend, x: Array, name: str, fn: str, allowed: tuple[float, ...]) -> None:
    xp = backend.xp
    flat = xp.reshape(x, (-1,))
    ok = flat == allowed[0]
    for v in allowed[1:]:
        ok = ok | (flat == v)
    i = first_bad(backend, ~ok)
    if i is not None:
        idx = _unravel(i, tuple(x.shape))
        values = ", ".join(map(str, allowed))
        raise ValueError(f"{fn}: {name} must take values in {{{values}}}, got {name}[{idx}] = {float(flat[i])}")


def _unravel(i: int, shape: tuple[int, ...]) -> str:
    idx = []
    for d in reversed(shape):
        idx.append(i % d)
        i //= d
    return ", ".join(str(v) for v in reversed(idx))
