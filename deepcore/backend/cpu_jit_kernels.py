"""The numba kernels behind :mod:`deepcore.backend.cpu_jit` (this module imports numba: only
``cpu_jit`` imports it, on first use).

Each loop does, per element, the rounded operations of the NumPy form it replaces, in the same
order and the arrays' own precision (numba contracts no ``a*b + c`` into an FMA without
``fastmath``), so both give the same bits; what changes is that each array is read and written
once instead of once per operation.
"""

from __future__ import annotations

import numba
import numpy as np


def _compiled(signatures: list[str], **options: object):  # type: ignore[no-untyped-def]
    """``numba.njit`` for ``signatures`` (compiled now), cached on disk where numba finds a writable
    place (``NUMBA_CACHE_DIR``, beside this file, the user's cache directory), uncached where it finds
    none."""
    def compile_(fn):  # type: ignore[no-untyped-def]
        try:
            return numba.njit(signatures, cache=True, nogil=True, boundscheck=False, **options)(fn)
        except RuntimeError as e:  # "cannot cache function ...: no locator available"
            if "cannot cache" not in str(e):
                raise
            return numba.njit(signatures, cache=False, nogil=True, boundscheck=False, **options)(fn)
    return compile_


_SGD_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, boolean)" for t in ("float32", "float64")]


@_compiled(_SGD_SIGNATURES)
def sgd_momentum(value, grad, buf, momentum, neg_lr, tiny, flush):  # type: ignore[no-untyped-def]
    """``buf = μ buf + g; value += (-lr) buf`` in one pass (``momentum`` = μ, ``neg_lr`` = -lr, of
    the arrays' dtype); with ``flush``, a buffer entry below ``tiny`` (the smallest normal) in
    magnitude becomes +0 after its update, before the parameter reads it, as
    ``numpy_backend.flush_subnormals`` does (±0 and subnormals; NaN and ±inf compare false)."""
    zero = tiny - tiny  # +0 of the arrays' dtype: a float literal would make b a float64
    for i in range(value.shape[0]):
        b = buf[i] * momentum
        b = b + grad[i]
        if flush and abs(b) < tiny:
            b = zero
        buf[i] = b
        value[i] = value[i] + b * neg_lr


_ADAM_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, int64, "
                    f"boolean)" for t in ("float32", "float64")]


@_compiled(_ADAM_SIGNATURES, error_model="numpy")
def adam(value, grad, m, v, one_minus_beta1, one_minus_beta2, beta2, bc2_sqrt, eps, neg_step_size, decay, tiny,
         decay_mode, flush):  # type: ignore[no-untyped-def]
    """Adam's step in one pass, as ``NumpyBackend.adam_update`` spells it:
    ``m += (1-β1)(g - m); v = β2 v + (1-β2) g g; value += -step_size m / (sqrt(v) / sqrt(1-β2^t) + eps)``,
    the scalars of the arrays' dtype. ``decay_mode`` 1: L2 decay, ``g = decay value + g`` first;
    2: decoupled (AdamW), ``value *= decay`` first; 0: none. With ``flush``, an ``m`` entry below
    ``tiny`` in magnitude becomes +0 before the parameter reads it (``v`` is never flushed: see
    ``adam_update``). Division by zero gives inf or NaN, as in NumPy (``error_model="numpy"``)."""
    zero = tiny - tiny
    for i in range(value.shape[0]):
        p = value[i]
        if decay_mode == 2:
            p = p * decay
        g = grad[i]
        if decay_mode == 1:
            t = p * decay
            g = t + g
        mi = m[i]
        d = g - mi
        d = d * one_minus_beta1
        mi = mi + d
        s = g * one_minus_beta2
        s = s * g
        vi = v[i] * beta2
        vi = vi + s
        if flush and abs(mi) < tiny:
            mi = zero
        m[i] = mi
        v[i] = vi
        q = np.sqrt(vi)
        q = q / bc2_sqrt
        q = q + eps
        q = mi / q
        q = q * neg_step_size
        value[i] = p + q
