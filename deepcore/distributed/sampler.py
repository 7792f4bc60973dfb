"""Each rank's share of an epoch, as PyTorch's ``DistributedSampler`` deals it.

Every rank computes the same epoch order, ``epoch_order(n, seed=seed, epoch=epoch)``
(:mod:`deepcore.data.batching`), pads it to a multiple of the world size ``N`` by
repeating it from its start, and takes every ``N``-th index from its rank on:
``padded[rank::N]``. Each rank then cuts its share into batches of ``batch_size``
(the per-rank batch ``B``). Batch ``k`` of all ranks together is exactly
``padded[k*N*B:(k+1)*N*B]``, the batch ``k`` that one process with batch ``N*B``
would train on (with ``len(padded) - n < N`` samples seen twice per epoch), and
every rank runs the same number of steps with the same batch sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .._checks import check_int
from ..data import ArrayDataset
from ..data.batching import epoch_order

__all__ = ["ShardedBatches", "pad_to_multiple", "shard"]


def pad_to_multiple(order: np.ndarray, size: int) -> np.ndarray:
    """``order`` extended to a multiple of ``size`` by repeating it from its start (DistributedSampler)."""
    size = check_int(size, "size", "shard", 1)
    n = len(order)
    pad = -n % size
    if pad == 0 or n == 0:
        return order
    return np.concatenate([order, np.resize(order, pad)])


def shard(order: np.ndarray, rank: int, size: int) -> np.ndarray:
    """Rank ``rank``'s indices of ``order``: ``pad_to_multiple(order, size)[rank::size]``."""
    size = check_int(size, "size", "shard", 1)
    rank = check_int(rank, "rank", "shard", 0)
    if rank >= size:
        raise ValueError(f"shard: rank must be < size={size}, got {rank}")
    return pad_to_multiple(np.asarray(order), size)[rank::size]


class ShardedBatches:
    """Batches ``(x, y)`` (NumPy) of this rank's share of ``dataset`` for one epoch.

    ``len()`` is the number of batches, the same on every rank. With ``drop_last`` a final
    per-rank batch smaller than ``batch_size`` is skipped (on every rank alike).
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, rank: int, size: int, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, drop_last: bool = False) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"ShardedBatches: dataset must be an ArrayDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = check_int(batch_size, "batch_size", "shard", 1)
        self.indices = shard(epoch_order(len(dataset), seed=seed, epoch=epoch, shuffle=shuffle), rank, size)
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        x, y = self.dataset.x, self.dataset.y
        for b in range(len(self)):
            idx = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield np.take(x, idx, axis=0), (None if y is None else np.take(y, idx, axis=0))
