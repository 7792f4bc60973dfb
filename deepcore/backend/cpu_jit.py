"""Optional fused CPU loops for the NumPy backend, compiled with numba (``pip install deepcore[jit]``).

NumPy runs SGD's momentum step ``buf = μ buf + g; value -= lr buf`` as four passes over memory
(``buf *= μ``, ``buf += g``, ``t = -lr buf``, ``value += t``) and Adam's step as about twelve; a
parameter larger than the cache streams from memory on each. One compiled loop reads and writes
each array once, with NumPy's own rounded operations per element (the same bits): SGD momentum
0.39-0.43x NumPy's time from 100k to 3.1M float32 weights on the EPYC of benchmarks/README.md,
Adam 0.39x at 200k.

numba is never imported by ``import deepcore``: the first call of :func:`sgd_momentum` or
:func:`adam` imports it and loads the kernels (about 0.3 s to import numba and 0.5 s to load the
kernels from numba's on-disk cache; the first compile on a machine about 2 s more), which the
NumPy backend makes only for a parameter of at least ``numpy_backend._FUSED_MIN`` weights. Where
the kernels cannot be had (numba not installed or refusing this NumPy, ``DEEPCORE_JIT=0``, a
compile that failed) both return None, the NumPy forms run, and :func:`status` keeps the reason
(``deepcore info`` prints it). numba imports SciPy where it is installed (a version check), and
with it SciPy's own OpenBLAS, idle but with its own thread pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

#: The kernels' module once loaded; None before the first try or where it failed.
_kernels: Any = None
#: Why the kernels are unavailable ("" while untried or loaded).
_reason = ""
_tried = False


def _disabled() -> str:
    flag = os.environ.get("DEEPCORE_JIT", "").strip().lower()
    return f"disabled by DEEPCORE_JIT={os.environ['DEEPCORE_JIT']}" if flag in ("0", "false", "off", "no") else ""


def _load() -> Any:
    """The kernels' module, loaded on the first call (numba imported, the kernels compiled or read
    from numba's cache), or None with the reason kept."""
    global _kernels, _reason, _tried
    if _tried:
        return _kernels
    _tried = True
    _reason = _disabled()
    if _reason:
        return None
    try:
        from . import cpu_jit_kernels
    except ImportError as e:  # numba missing, or an installed numba that refuses this NumPy
        _reason = f"numba unavailable: {e}"
    except Exception as e:  # noqa: BLE001  # numba present but the compile failed: the NumPy forms still work
        _reason = f"numba failed to compile the kernels: {type(e).__name__}: {e}"
    else:
        _kernels = cpu_jit_kernels
    return _kernels


def sgd_momentum() -> Callable[..., None] | None:
    """The fused momentum loop ``(value, grad, buf, momentum, neg_lr, tiny, flush)`` over 1-D
    C-contiguous float32 or float64 arrays of one dtype (scalars of that dtype), or None where the
    kernels are unavailable (see :func:`status`). The first call imports numba and loads them."""
    kernels = _load()
    return None if kernels is None else kernels.sgd_momentum


def adam() -> Callable[..., None] | None:
    """The fused Adam loop (see ``cpu_jit_kernels.adam``), or None where the kernels are unavailable."""
    kernels = _load()
    return None if kernels is None else kernels.adam


def status() -> dict[str, Any]:
    """What the loader has found so far, without trying: ``{"tried", "loaded", "reason"}``
    (``reason`` empty while untried or loaded)."""
    return {"tried": _tried, "loaded": _kernels is not None, "reason": _reason or _disabled()}


def reset() -> None:
    """Forget the outcome so the next call tries again (after installing numba, or in tests)."""
    global _kernels, _reason, _tried
    _kernels, _reason, _tried = None, "", False
