"""The embedded default data set: 1,797 8x8 handwritten digits (UCI, CC BY 4.0).

Shipped as ``digits.npz`` inside the package (plain arrays, no pickle), so
the quick start trains without a download. Provenance, licence and the
recipe that made the file: ``DIGITS_PROVENANCE.md`` beside this module.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from .datasets import ArrayDataset, DatasetSplits, split_indices
from .errors import DataFormatError

__all__ = ["DIGITS_CLASSES", "load_digits", "load_digits_arrays"]

DIGITS_CLASSES = tuple(str(i) for i in range(10))
_N, _SIDE, _MAX = 1797, 8, 16


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw embedded arrays: ``x`` uint8 ``(1797, 64)`` with values 0..16, ``y`` uint8 ``(1797,)``."""
    ref = resources.files(__package__).joinpath("digits.npz")
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        x, y = npz["x"], npz["y"]
    if x.shape != (_N, _SIDE * _SIDE) or y.shape != (_N,) or x.dtype != np.uint8 or y.dtype != np.uint8 \
            or int(x.max()) > _MAX or int(y.max()) > 9:
        raise DataFormatError(f"deepcore/data/digits.npz is damaged: x {x.dtype}{x.shape}, y {y.dtype}{y.shape}; "
                              f"reinstall deepcore")
    return x, y


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """The digits as float32 ``(N, 64)`` in [0, 1] (pixel / 16), int64 labels 0..9.

    The train/test split is stratified by class and fixed by ``(test_fraction,
    seed)``: ``round(test_fraction * 1797)`` test images (359 by default).
    """
    x8, y8 = load_digits_arrays()
    x = x8.astype(np.float32) / np.float32(_MAX)
    y = y8.astype(np.int64)
    train, test = split_indices(y, test_fraction, seed=seed, stratify=True, fn="load_digits")
    parts = [ArrayDataset(np.take(x, idx, axis=0), np.take(y, idx, axis=0), name="digits", classes=DIGITS_CLASSES)
             for idx in (train, test)]
    return DatasetSplits(train=parts[0], test=parts[1], name="digits", input_shape=(_SIDE, _SIDE),
                         classes=DIGITS_CLASSES)
