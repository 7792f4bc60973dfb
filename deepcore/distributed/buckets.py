"""Bucketed collectives: many small arrays travel as a few large contiguous messages.

One collective per parameter would pay the latency of a message (microseconds on
shared memory, tens of microseconds over a network) dozens of times per step.
Instead the arrays are grouped into buckets of about :data:`DEFAULT_BUCKET_BYTES`
(25 MiB, PyTorch DDP's default): arrays of one backend, dtype and device, in model
order, a bucket closed when the next array would overflow it (an array larger than
the cap gets a bucket to itself). Each bucket is flattened into one contiguous
buffer, reduced or broadcast in one call, and unflattened back.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._checks import check_int
from ..backend import get_backend
from .comm import Communicator

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "GradientReducer",
    "broadcast_arrays",
    "broadcast_module",
    "flatten",
    "plan_buckets",
    "unflatten",
]

#: The size cap of one bucket, as in PyTorch's DistributedDataParallel (``bucket_cap_mb=25``).
DEFAULT_BUCKET_BYTES = 25 * 2**20


def _itemsize(a: Any) -> int:
    name = get_backend(a).dtype_name(a.dtype)
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def _key(a: Any) -> tuple[Any, ...]:
    backend = get_backend(a)
    device = None if backend.single_device else str(backend.device(a))
    return (backend.name, backend.dtype_name(a.dtype), device)


def plan_buckets(arrays: Sequence[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``arrays`` per bucket: grouped by (backend, dtype, device) in order of first
    appearance, each group cut into consecutive runs of at most ``bucket_bytes`` (an array larger
    than that is a bucket alone). Every index appears exactly once."""
    check_int(bucket_bytes, "bucket_bytes", "plan_buckets", 1)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(_key(a), []).append(i)
    buckets: list[list[int]] = []
    for indices in groups.values():
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = math.prod(arrays[i].shape) * _itemsize(arrays[i])
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            buckets.append(current)
    return buckets


def flatten(arrays: Sequence[Any], xp: Any) -> Any:
    """One new contiguous 1-D array holding ``arrays`` one after another (C order)."""
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays])


def unflatten(flat: Any, shapes: Sequence[tuple[int, ...]], xp: Any) -> list[Any]:
    """Arrays of ``shapes`` read from consecutive stretches of ``flat`` (views where the library
    makes them); the inverse of :func:`flatten`."""
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(xp.reshape(flat[offset:offset + n], tuple(shape)))
        offset += n
    if offset != flat.shape[0]:
        raise ValueError(f"unflatten: shapes cover {offset} elements but the buffer has {flat.shape[0]}")
    return out


def broadcast_arrays(comm: Communicator, arrays: Sequence[Any], *, root: int = 0,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Any]:
    """``root``'s values of ``arrays`` on every rank, as new arrays (one broadcast per bucket)."""
    arrays = list(arrays)
    if comm.size == 1:
        return arrays
    out: list[Any] = list(arrays)
    for bucket in plan_buckets(arrays, bucket_bytes):
        backend = get_backend(arrays[bucket[0]])
        xp = backend.xp
        flat = comm.broadcast(flatten([arrays[i] for i in bucket], xp), root)
        for i, part in zip(bucket, unflatten(flat, [tuple(arrays[i].shape) for i in bucket], xp), strict=True):
            out[i] = backend.copy(part)
    return out


def broadcast_module(model: Any, comm: Communicator, *, root: int = 0, parameters: bool = True,
                     buffers: bool = True) -> None:
    """Give every rank ``root``'s parameters (with the modules' extra state: dropout seeds and
    positions, so all ranks draw the same masks) and/or buffers (BatchNorm running statistics)."""
    if comm.size == 1:
        return
    if parameters:
        params = model.parameters()
        for p, value in zip(params, broadcast_arrays(comm, [p.value for p in params], root=root), strict=True):
            p.value = value
        model.load_extra_states(_broadcast_json(comm, model.extra_states(), root))
    if buffers:
        named = dict(model.named_buffers())
        model.set_buffers(dict(zip(named, broadcast_arrays(comm, list(named.values()), root=root), strict=True)))


def _broadcast_json(comm: Communicator, value: Any, root: int) -> Any:
    """``root``'s JSON-able ``value`` on every rank: its length, then its UTF-8 bytes."""
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    size = comm.broadcast(np.array([data.size], dtype=np.int64), root)
    buf = np.zeros(int(size[0]), dtype=np.uint8)
    if comm.rank == root:
        buf[:] = data
    return json.loads(comm.broadcast(buf, root).tobytes().decode())


class GradientReducer:
    """Averages the gradients of ``params`` over the ranks of ``comm``, one allreduce per bucket.

    :meth:`reduce` takes this rank's loss and returns the mean loss over ranks, which travels in
    the last bucket together with one flag per parameter (did this rank have a gradient?), so a
    parameter without a gradient on every rank keeps ``grad = None`` and is skipped by the
    optimizer, as in one process. A missing gradient on some ranks counts as zeros there.

    ``comm_seconds`` accumulates the wall time spent inside the collectives (with ``timed=True``
    the GPU stream is synchronised around each, so the time is the transfer's, not the enqueue's).
    """

    def __init__(self, params: Sequence[Any], comm: Communicator, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timed: bool = False) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("GradientReducer: params must not be empty")
        self.comm = comm
        self.timed = timed
        self.buckets = plan_buckets([p.value for p in self.params], bucket_bytes)
        self.comm_seconds = 0.0
        self.calls = 0

    @property
    def bucket_sizes(self) -> list[int]:
        """Bytes of gradient per bucket (the last one also carries the loss and the flags)."""
        return [sum(math.prod(self.params[i].shape) * _itemsize(self.params[i].value) for i in b)
                for b in self.buckets]

    def reduce(self, loss: Any = 0.0) -> float:
        """Replace every ``param.grad`` by its mean over ranks; return the mean of ``loss`` over ranks."""
        size = self.comm.size
        mean_loss = float("nan")
        for k, bucket in enumerate(self.buckets):
            first = self.params[bucket[0]].value
            backend = get_backend(first)
            xp, dtype, device = backend.xp, first.dtype, backend.device(first)
            parts = [_flat_grad(self.params[i], xp, dtype, device) for i in bucket]
            last = k == len(self.buckets) - 1
            # A half-precision bucket would turn a loss of 70000 into inf: the loss then goes on
            # its own, as float64 on the host (one more short message).
            loss_apart = last and getattr(dtype, "itemsize", 4) < 4
            if last:
                flags = [0.0 if p.grad is None else 1.0 for p in self.params]
                parts.append(xp.reshape(_as_array(0.0 if loss_apart else loss, xp, dtype, device), (1,)))
                parts.append(xp.asarray(flags, dtype=dtype, device=device))
            flat = xp.concat(parts)
            self._sync(flat)
            t0 = time.perf_counter()
            flat = self.comm.allreduce(flat, "sum")
            self._sync(flat)
            self.comm_seconds += time.perf_counter() - t0
            if size > 1:
                flat *= 1.0 / size
            n_grad = sum(math.prod(self.params[i].shape) for i in bucket)
            grads = unflatten(flat[:n_grad], [self.params[i].shape for i in bucket], xp)
            for i, g in zip(bucket, grads, strict=True):
                self.params[i].grad = g
            if last:
                tail = backend.to_numpy(flat[n_grad:])
                mean_loss = float(tail[0])
                if loss_apart:
                    mean_loss = float(self.comm.allreduce_host([float(loss)])[0]) / size
                for p, present in zip(self.params, tail[1:], strict=True):
                    if present <= 0:
                        p.grad = None
        self.calls += 1
        return mean_loss

    def _sync(self, buf: Any) -> None:
        if self.timed and type(buf).__module__.split(".")[0] == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()


def _flat_grad(p: Any, xp: Any, dtype: Any, device: Any) -> Any:
    if p.grad is None:
        return xp.zeros((math.prod(p.shape),), dtype=dtype, device=device)
    g = p.grad if p.grad.dtype == dtype else xp.astype(p.grad, dtype)
    return xp.reshape(g, (-1,))


def _as_array(value: Any, xp: Any, dtype: Any, device: Any) -> Any:
    if hasattr(value, "shape") and not isinstance(value, (float, int, np.generic)):
        return xp.astype(value, dtype)
    return xp.asarray(float(value), dtype=dtype, device=device)
