"""Minibatches of an :class:`ArrayDataset`, in an order fixed by ``(seed, epoch)``.

The permutation for epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(n)``
and depends on nothing else (no global RNG state, no count of earlier
iterations), so a run resumed at epoch ``e`` sees exactly the batches the
original run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .._checks import check_int
from ..backend import get_backend, to_backend
from .datasets import ArrayDataset

__all__ = ["BatchIterator", "batches", "epoch_order"]


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """The sample order of one epoch: ``default_rng([seed, epoch]).permutation(n)``, or ``arange(n)``."""
    n = check_int(n, "n", "epoch_order", 0)
    if not shuffle:
        return np.arange(n)
    seed, epoch = check_int(seed, "seed", "epoch_order", 0), check_int(epoch, "epoch", "epoch_order", 0)
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchIterator:
    """Iterates ``(x_batch, y_batch)`` over ``dataset`` for the current epoch.

    ``len()`` is the number of batches. Iterating twice gives the same order;
    call :meth:`set_epoch` before each epoch to get that epoch's order.
    With ``drop_last`` a final batch smaller than ``batch_size`` is skipped.
    With ``backend`` (a name, module or Backend) each batch is converted with
    :func:`deepcore.to_backend`; otherwise batches are NumPy arrays.
    ``y_batch`` is None for a dataset without targets.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, drop_last: bool = False, backend: Any = None) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"batches: dataset must be an ArrayDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = check_int(batch_size, "batch_size", "batches", 1)
        self.shuffle = bool(shuffle)
        self.seed = check_int(seed, "seed", "batches", 0)
        self.epoch = check_int(epoch, "epoch", "batches", 0)
        self.drop_last = bool(drop_last)
        # Resolved now so an unknown backend name fails here, not in the middle of an epoch.
        self.backend = None if backend is None else get_backend(backend)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = check_int(epoch, "epoch", "batches", 0)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        order = epoch_order(len(self.dataset), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        x, y = self.dataset.x, self.dataset.y
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            # np.take gathers into a fresh contiguous array of the stored dtype (float32 stays
            # float32), and the caller may modify a batch without touching the dataset.
            xb = np.take(x, idx, axis=0)
            yb = None if y is None else np.take(y, idx, axis=0)
            if self.backend is not None:
                xb = to_backend(xb, self.backend)
                yb = None if yb is None else to_backend(yb, self.backend)
            yield xb, yb


def batches(dataset: ArrayDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
            drop_last: bool = False, backend: Any = None) -> BatchIterator:
    """A :class:`BatchIterator` over ``dataset`` for ``epoch`` (order a function of ``(seed, epoch)``)."""
    return BatchIterator(dataset, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                         drop_last=drop_last, backend=backend)
