"""Keep freed large blocks for reuse: glibc's allocator tuned for arrays of megabytes.

A training step frees and allocates the same large temporaries every time (activations, their
gradients). By default glibc serves blocks over 128 KiB with ``mmap`` and gives freed memory at
the top of the heap back to the system, so every step pays the page faults of fresh memory
again: at batch 2048 of the 784-256-10 MLP that is about a quarter of the step on a 2-core
Xeon (benchmarks/README.md). The NumPy backend therefore raises glibc's mmap threshold to its
maximum (32 MiB) and its trim threshold to 512 MiB when it is first built, as allocators made for
such workloads (jemalloc, PyTorch's caching allocators) behave: memory freed by one step is
reused by the next, and the process's resident size stays at its peak rather than shrinking.

``DEEPCORE_MALLOC_TUNING=0`` leaves the allocator alone; on a C library other than glibc
nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

ENV_VAR = "DEEPCORE_MALLOC_TUNING"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 512 << 20), (_M_TOP_PAD, 16 << 20))

_state: str | None = None


def tune() -> str:
    """Apply the settings once per process; returns what happened (for ``deepcore info``)."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off ({ENV_VAR}=0)"
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: no search for the library
        if not hasattr(libc, "gnu_get_libc_version"):
            return "not glibc: left alone"
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "no glibc mallopt: left alone"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in _SETTINGS):
        return "mallopt refused: left alone"
    return "on (mmap threshold 32 MiB, trim threshold 512 MiB)"
