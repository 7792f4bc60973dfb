"""Where the fit loop's batches come from: gathered on the host and moved per batch, or, on an
asynchronous device with room for it, from the data set kept on the device.

Kept on the device, the data set is moved once per ``fit``, each epoch's order (the same
``epoch_order`` as on the host, so the batches are the same) once per epoch, and a batch is a gather
on the device: no host-to-device copy inside a step, whose pageable-memory copy would make the host
wait for the device. The host keeps the labels too, for what the loop computes there (each batch's
loss denominator and counted rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .backend import to_backend
from .backend.base import Backend
from .data import ArrayDataset, epoch_order

__all__ = ["DEVICE_SHARE", "Batches", "ResidentData", "resident_data"]

#: The data set stays on the device when it takes at most this share of the device's free memory,
#: which leaves the rest to the model, its activations and the allocator's pool.
DEVICE_SHARE = 0.25


class Batches:
    """``(x, y, y_host)`` per batch: ``x`` and ``y`` on the model's backend, ``y_host`` the labels on the host.
    ``host`` is a ``data.BatchIterator`` or a ``ShardedBatches``; with a ``BatchIterator``, :meth:`batch`
    gathers any batch of the epoch again (for a replay, fit_window.py)."""

    def __init__(self, host: Any, backend: Backend) -> None:
        self._host, self._backend = host, backend
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._host)

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        backend = self._backend
        for xb, yb in self._host:
            yield to_backend(xb, backend), None if yb is None else to_backend(yb, backend), yb

    def batch(self, k: int) -> tuple[Any, Any]:
        """Batch ``k`` of the epoch, on the backend, as the iteration gave it."""
        it = self._host
        if self._order is None:
            self._order = epoch_order(len(it.dataset), seed=it.seed, epoch=it.epoch, shuffle=it.shuffle)
        idx = self._order[k * it.batch_size:(k + 1) * it.batch_size]
        y = it.dataset.y
        return (to_backend(np.take(it.dataset.x, idx, axis=0), self._backend),
                None if y is None else to_backend(np.take(y, idx, axis=0), self._backend))


class ResidentData:
    """A data set kept on the device; :meth:`batches` gathers an epoch's batches there."""

    def __init__(self, ds: ArrayDataset, backend: Backend) -> None:
        self.ds, self.backend = ds, backend
        self.x = to_backend(ds.x, backend)
        self.y = None if ds.y is None else to_backend(ds.y, backend)

    def batches(self, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool) -> _ResidentEpoch:
        return _ResidentEpoch(self, batch_size, epoch_order(len(self.ds), seed=seed, epoch=epoch, shuffle=shuffle),
                              drop_last)


class _ResidentEpoch:
    def __init__(self, data: ResidentData, batch_size: int, order: np.ndarray, drop_last: bool) -> None:
        self.data, self.batch_size, self.order = data, batch_size, order
        n = order.shape[0]
        self.n_batches = n // batch_size if drop_last else -(-n // batch_size)
        self._device_order: Any = None

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        b, y_host = self.batch_size, self.data.ds.y
        for k in range(self.n_batches):
            yield (*self.batch(k), None if y_host is None else y_host[self.order[k * b:(k + 1) * b]])

    def batch(self, k: int) -> tuple[Any, Any]:
        """Batch ``k`` of the epoch, gathered on the device (the order moved there once)."""
        data, b = self.data, self.batch_size
        if self._device_order is None:
            self._device_order = to_backend(self.order.astype(np.int64), data.backend)
        xp = data.backend.xp
        idx = self._device_order[k * b:(k + 1) * b]
        return xp.take(data.x, idx, axis=0), None if data.y is None else xp.take(data.y, idx, axis=0)


def resident_data(ds: ArrayDataset, backend: Backend) -> ResidentData | None:
    """``ds`` kept on ``backend``'s device when the backend is asynchronous and reports free memory
    that holds it within :data:`DEVICE_SHARE`; None otherwise (batches then come from the host)."""
    if not backend.asynchronous:
        return None
    free = getattr(backend, "free_memory", None)
    budget = free() if free is not None else None
    arrays: Iterable[Any] = (a for a in (ds.x, ds.y) if a is not None)
    if budget is None or sum(int(np.asarray(a).nbytes) for a in arrays) > DEVICE_SHARE * budget:
        return None
    return ResidentData(ds, backend)
