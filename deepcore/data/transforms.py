"""Feature transforms on host arrays: standardisation, one-hot labels, polynomial features."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

__all__ = ["Standardizer", "num_polynomial_features", "one_hot", "polynomial_features"]


def _floating(x: np.ndarray) -> np.dtype:
    """The dtype results take: x's own if floating (float32 stays float32), else float32."""
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)


class Standardizer:
    """Per-feature ``(x - mean) / std``, with mean and std fitted on training data only.

    Statistics are taken over axis 0 in float64. A constant feature gets
    ``std = 1`` (so it maps to 0 rather than dividing by zero). Results keep
    x's floating dtype (integers give float32).
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, x: Any) -> Standardizer:
        """Fit mean and std of each feature of ``x`` (shape ``(N, ...)``, N >= 1); returns self."""
        x = np.asarray(x)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"Standardizer.fit: x must have shape (N, features...) with N >= 1, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("Standardizer.fit: x contains NaN or inf")
        if x.dtype == np.bool_:
            x = x.astype(np.uint8)
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        # Exactly constant features: the computed std may be a rounding residue (~1e-17), not 0.
        std[np.ptp(x, axis=0) == 0] = 1.0
        self.mean, self.std = mean, std
        return self

    def _check(self, x: Any, fn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"Standardizer.{fn}: call fit() first (or from_state())")
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.mean.shape:
            raise ValueError(f"Standardizer.{fn}: x must have shape (N, {', '.join(map(str, self.mean.shape))}) "
                             f"as fitted, got {x.shape}")
        return x, self.mean, self.std

    def transform(self, x: Any) -> np.ndarray:
        """``(x - mean) / std`` in x's floating dtype."""
        x, mean, std = self._check(x, "transform")
        dt = _floating(x)
        return ((x - mean.astype(dt)) / std.astype(dt)).astype(dt, copy=False)

    def fit_transform(self, x: Any) -> np.ndarray:
        return self.fit(x).transform(x)

    def inverse_transform(self, z: Any) -> np.ndarray:
        """``z * std + mean`` in z's floating dtype."""
        z, mean, std = self._check(z, "inverse_transform")
        dt = _floating(z)
        return (z * std.astype(dt) + mean.astype(dt)).astype(dt, copy=False)

    def state(self) -> dict[str, Any]:
        """``{"mean": [...], "std": [...]}`` as nested lists of floats: JSON-able, exact in float64."""
        if self.mean is None or self.std is None:
            raise RuntimeError("Standardizer.state: call fit() first")
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Standardizer:
        """A fitted Standardizer from :meth:`state`'s output."""
        out = cls()
        mean = np.asarray(state["mean"], dtype=np.float64)
        std = np.asarray(state["std"], dtype=np.float64)
        if mean.shape != std.shape or not np.all(std > 0):
            raise ValueError(f"Standardizer.from_state: mean {mean.shape} and std {std.shape} must have one "
                             f"shape and std must be > 0")
        out.mean, out.std = mean, std
        return out


def one_hot(labels: Any, num_classes: int, dtype: Any = "float32") -> np.ndarray:
    """``(N, num_classes)`` array with a 1 in column ``labels[i]`` of row ``i``."""
    labels = np.asarray(labels)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"one_hot: num_classes must be an integer >= 1, got {num_classes!r}")
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise TypeError(f"one_hot: labels must be a 1-D integer array, got dtype {labels.dtype} "
                        f"shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"one_hot: labels must be in [0, {num_classes}), got labels[{bad[0]}] = {labels[bad[0]]}")
    out = np.zeros((labels.shape[0], int(num_classes)), dtype=np.dtype(dtype))
    out[np.arange(labels.shape[0]), labels.astype(np.intp)] = 1
    return out


def num_polynomial_features(num_inputs: int, degree: int, include_bias: bool = True) -> int:
    """``C(d + degree, degree)`` monomials of total degree <= degree in d inputs (minus 1 without bias).

    For ``degree = 2`` with the bias this is the course's ``(d+1)(d+2)/2``.
    """
    return math.comb(num_inputs + degree, degree) - (0 if include_bias else 1)


def polynomial_features(x: Any, degree: int, include_bias: bool = True) -> np.ndarray:
    """Every monomial of total degree <= ``degree`` of the columns of ``x``.

    ``x`` is ``(N, d)`` (a 1-D ``x`` is one feature). Columns are ordered by
    degree, then lexicographically by input index: ``1, x0, x1, x0^2, x0 x1,
    x1^2, ...``; ``include_bias=False`` drops the leading 1. Floating inputs
    keep their dtype, integers give float64 (powers of integers overflow).
    """
    x = np.asarray(x)
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"polynomial_features: degree must be an integer >= 0, got {degree!r}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"polynomial_features: x must have shape (N, d) or (N,), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise TypeError(f"polynomial_features: x must be numeric, got dtype {x.dtype}")
    dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    x = x.astype(dt, copy=False)
    n, d = x.shape
    count = num_polynomial_features(d, int(degree), include_bias)
    if count == 0:
        raise ValueError("polynomial_features: degree 0 without the bias gives no features")
    out = np.empty((n, count), dtype=dt)
    col = 0
    if include_bias:
        out[:, 0] = 1
        col = 1
    # Each degree-k monomial is a degree-(k-1) one times one more input, so reuse the previous block.
    prev: dict[tuple[int, ...], int] = {}
    for k in range(1, int(degree) + 1):
        cur: dict[tuple[int, ...], int] = {}
        for combo in itertools.combinations_with_replacement(range(d), k):
            if k == 1:
                out[:, col] = x[:, combo[0]]
            else:
                np.multiply(out[:, prev[combo[:-1]]], x[:, combo[-1]], out=out[:, col])
            cur[combo] = col
            col += 1
        prev = cur
    return out
