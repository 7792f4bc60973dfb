"""Optional fused CPU loops for the NumPy backend, compiled with numba (``pip install deepcore[jit]``).

NumPy runs SGD's momentum step ``buf = μ buf + g; value -= lr buf`` as four passes over memory
(``buf *= μ``, ``buf += g``, ``t = -lr buf``, ``value += t``) and Adam's step as about twelve; a
parameter larger than the cache streams from memory on each. One compiled loop reads and writes
each array once, with NumPy's own rounded operations per element (the same bits). Through the
backend's calls, on the EPYC of benchmarks/README.md (``benchmarks/fused_updates.py``): SGD momentum
0.78x NumPy's one-pass time at 65,536 float32 weights, 0.58x at 200,704, 0.37x at 3.1M (0.52x the
blocked form's, which the NumPy backend timed faster there); Adam 0.41x, 0.32x and 0.21x.

numba is never imported by ``import deepcore``: the first call of :func:`sgd_momentum` or
:func:`adam` imports it and loads the kernels (0.7-0.9 s in a fresh process on that EPYC, 0.3 s
of it importing numba; 1.8 s the first time on a machine, when they are compiled into numba's
on-disk cache), which the NumPy backend makes only for a parameter of at least
``numpy_backend._FUSED_MIN`` weights whose arrays the loops can take. Where the kernels cannot
be had (numba not installed or refusing this NumPy, ``DEEPCORE_JIT=0``, a compile that failed)
both return None, the NumPy forms run, and :func:`status` keeps the reason (``deepcore info``
prints it). numba imports SciPy where it is installed (a version check), and with it SciPy's own
OpenBLAS, idle but with its own thread pool. Unlike NumPy's operations the loops report no
floating-point errors: ``np.errstate`` / ``np.seterr`` settings (raise or warn on overflow,
invalid) do not reach a fused step, which returns inf or NaN as PyTorch's does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

#: The kernels' module once loaded; None before the first try or where it failed.
_kernels: Any = None
#: Why the kernels are unavailable ("" while untried or loaded).
_reason = ""
_tried = False
_lock = threading.Lock()


def _disabled() -> str:
    flag = os.environ.get("DEEPCORE_JIT", "").strip().lower()
    return f"disabled by DEEPCORE_JIT={os.environ['DEEPCORE_JIT']}" if flag in ("0", "false", "off", "no") else ""


def _load() -> Any:
    """The kernels' module, loaded on the first call (numba imported, the kernels compiled or read
    from numba's cache), or None with the reason kept. ``DEEPCORE_JIT`` is read then, once."""
    global _kernels, _reason, _tried
    if _tried:
        return _kernels
    with _lock:  # another thread's first call waits for this load rather than run without it
        if _tried:
            return _kernels
        reason = _disabled()
        if not reason:
            try:
                from . import cpu_jit_kernels
            except ImportError as e:  # numba missing, or an installed numba that refuses this NumPy
                reason = f"numba unavailable: {e}"
            except Exception as e:  # noqa: BLE001  # numba present but the compile failed: NumPy still works
                reason = f"numba failed to compile the kernels: {type(e).__name__}: {e}"
            else:
                _kernels = cpu_jit_kernels
        # Only an outcome is recorded: interrupted (KeyboardInterrupt), the next call tries again.
        _reason, _tried = reason, True
    return _kernels


def ruled_out() -> bool:
    """True once a load was tried and gave no kernels: callers then skip even their cheap checks."""
    return _tried and _kernels is None


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
    """What the loader has found, without trying: ``{"tried", "loaded", "reason"}``; before the first
    try ``reason`` says whether ``DEEPCORE_JIT`` will turn the kernels off, after it why they are off
    ("" when loaded)."""
    return {"tried": _tried, "loaded": _kernels is not None, "reason": _reason if _tried else _disabled()}


def reset() -> None:
    """Forget the outcome so the next call tries again (after installing numba, or in tests)."""
    global _kernels, _reason, _tried
    with _lock:
        _kernels, _reason, _tried = None, "", False
