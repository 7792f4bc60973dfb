"""Dask arrays, through array-api-compat's ``dask.array`` namespace: the reference ops, built lazily.

Two things differ from the reference. Dask arrays have no ``.device``, so the device is asked of the
namespace (``array_api_compat.device``: always the CPU). And every optimizer update persists the new
parameter and state (``dask.persist``: computed once, kept in memory), so a parameter's graph is one
step deep instead of growing with every step, which would make step ``k`` recompute the ``k`` before it.
Anything that needs a value (a loss as a float, the label checks) computes its graph then. Imported only
by the registry's factory.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import array_api_compat.dask.array as dask_compat
import dask

from .base import Array, Backend


class DaskBackend(Backend):
    """The reference on Dask arrays, with the device from array-api-compat and persisted optimizer updates."""

    def __init__(self) -> None:
        super().__init__(dask_compat, name="dask")

    def device(self, x: Array) -> Any:
        return array_api_compat.device(x)

    def sgd_update(self, value: Array, grad: Array, buf: Array | None, **kw: Any) -> tuple[Array, Array | None]:
        value, buf = super().sgd_update(value, grad, buf, **kw)
        if buf is None:
            return dask.persist(value)[0], None
        return dask.persist(value, buf)

    def adam_update(self, value: Array, grad: Array, m: Array, v: Array, **kw: Any) -> tuple[Array, Array, Array]:
        return dask.persist(*super().adam_update(value, grad, m, v, **kw))
