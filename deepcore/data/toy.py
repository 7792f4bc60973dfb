"""The course's toy data: the four-point regression and the noisy curve for under-/over-fitting."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import check_int
from .datasets import ArrayDataset, DatasetSplits

__all__ = ["curve", "four_points", "noisy_curve"]


def four_points() -> ArrayDataset:
    """x = 2, 4, 6, 8 and y = 3, 4, 5, 6 as float64 ``(4, 1)`` columns.

    The least-squares line is ``y = 0.5 x + 2`` (w = 0.5, b = 2.0), fitted exactly.
    """
    x = np.array([[2.0], [4.0], [6.0], [8.0]])
    y = np.array([[3.0], [4.0], [5.0], [6.0]])
    return ArrayDataset(x, y, name="four-points")


def curve(x: Any) -> np.ndarray:
    """The smooth curve behind :func:`noisy_curve`: ``sin(2 pi x)``."""
    return np.sin(2.0 * np.pi * np.asarray(x, dtype=np.float64))


def noisy_curve(n: int = 10, *, noise: float = 0.3, seed: int = 0, n_test: int = 100) -> DatasetSplits:
    """Noisy samples ``y = sin(2 pi x) + N(0, noise^2)`` with x uniform on [0, 1].

    ``n`` training and ``n_test`` test points, float64 ``(n, 1)`` columns,
    sorted by x; the same ``seed`` gives the same points. With the default 10
    training points, polynomials of order 1 and 2 underfit, 3 and 4 fit well
    and order 12 interpolates the noise (the course's over-fitting demo).
    """
    for name, value, low in (("n", n, 1), ("n_test", n_test, 1), ("seed", seed, 0)):
        check_int(value, name, "noisy_curve", low)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noisy_curve: noise must be a number >= 0, got {noise!r}")
    # Separate child streams, so changing n_test leaves the training points unchanged.
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))

    def draw(rng: np.random.Generator, count: int) -> ArrayDataset:
        x = np.sort(rng.uniform(0.0, 1.0, size=int(count)))
        y = curve(x) + float(noise) * rng.standard_normal(int(count))
        return ArrayDataset(x[:, None], y[:, None], name="noisy-curve")

    return DatasetSplits(train=draw(train_rng, n), test=draw(test_rng, n_test), name="noisy-curve")
