"""The numba loops behind :mod:`deepcore.backend.cpu_jit` (this module imports numba: only
``cpu_jit`` imports it, on first use).

Each update loop does, per element, the rounded operations of the NumPy form it replaces, in the
same order and the arrays' own precision (numba contracts no ``a*b + c`` into an FMA without
``fastmath``), so both give the same bits (the loss loop at the end is the exception); what
changes is that each array is read and written once instead of once per operation. The functions
below are the loops' Python source; :func:`loop` compiles one (or reads it from numba's on-disk
cache) the first time it is asked for, so a process pays only for the loops its optimizer uses
(about 10 ms each from the cache, half a second to compile; the first also starts numba's
compiler, about half a second more).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

#: Each loop's Python source, signatures and numba options, by name.
_SOURCES: dict[str, tuple[Callable[..., None], list[str], dict[str, Any]]] = {}
#: The loops compiled so far, by name.
_COMPILED: dict[str, Callable[..., None]] = {}


def _loop(signatures: list[str], **options: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register the decorated function as a loop for ``signatures`` (compiled by :func:`loop`)."""
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        _SOURCES[fn.__name__] = (fn, signatures, options)
        return fn
    return register


def loop(name: str) -> Callable[..., None]:
    """The loop ``name`` compiled for its signatures: ``numba.njit``, cached on disk where numba finds
    a writable place (``NUMBA_CACHE_DIR``, beside this file, the user's cache directory), uncached
    where it finds none. Compiled on the first call (callers hold ``cpu_jit``'s lock), then kept."""
    compiled = _COMPILED.get(name)
    if compiled is not None:
        return compiled
    fn, signatures, options = _SOURCES[name]
    try:
        compiled = numba.njit(signatures, cache=True, nogil=True, boundscheck=False, **options)(fn)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        if "cannot cache" not in str(e):
            raise
        compiled = numba.njit(signatures, cache=False, nogil=True, boundscheck=False, **options)(fn)
    _COMPILED[name] = compiled
    return compiled


_SGD_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, boolean)" for t in ("float32", "float64")]


@_loop(_SGD_SIGNATURES)
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


_SGD_GENERAL_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, {t}, {t}, boolean, boolean, boolean, "
                           f"boolean)" for t in ("float32", "float64")]


@_loop(_SGD_GENERAL_SIGNATURES)
def sgd(value, grad, buf, weight_decay, momentum, one_minus_dampening, neg_lr, tiny, decay, dampen, nesterov,
        flush):  # type: ignore[no-untyped-def]
    """SGD's steady step with a momentum buffer in one pass, as ``NumpyBackend._sgd`` spells it
    (PyTorch's rule): ``d = wd value + g`` (with ``decay``, else ``d = g``);
    ``buf = μ buf + (1 - dampening) d`` (the factor only with ``dampen``); ``value += -lr (μ buf + d)``
    with ``nesterov``, else ``value += -lr buf``; the scalars of the arrays' dtype. With ``flush``, a
    buffer entry below ``tiny`` in magnitude becomes +0 after its update, before anything reads it."""
    zero = tiny - tiny
    for i in range(value.shape[0]):
        p = value[i]
        d = grad[i]
        if decay:
            t = p * weight_decay
            d = t + d
        b = buf[i] * momentum
        if dampen:
            b = b + d * one_minus_dampening
        else:
            b = b + d
        if flush and abs(b) < tiny:
            b = zero
        buf[i] = b
        if nesterov:
            s = b * momentum
            s = s + d
        else:
            s = b
        value[i] = p + s * neg_lr


_PLAIN_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}, {t}, boolean)" for t in ("float32", "float64")]


@_loop(_PLAIN_SIGNATURES)
def sgd_plain(value, grad, weight_decay, neg_lr, decay):  # type: ignore[no-untyped-def]
    """SGD's step without momentum in one pass: ``value += -lr (wd value + g)`` with ``decay``, else
    ``value += -lr g``."""
    for i in range(value.shape[0]):
        p = value[i]
        d = grad[i]
        if decay:
            t = p * weight_decay
            d = t + d
        value[i] = p + d * neg_lr


_ADAM_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, {t}, {t}, {t}, {t}, {t}, int64, "
                    f"boolean)" for t in ("float32", "float64")]


@_loop(_ADAM_SIGNATURES, error_model="numpy")
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


_RMSPROP_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, {t}, {t}, {t}, {t}, "
                       f"{t}, boolean, boolean, boolean, boolean)" for t in ("float32", "float64")]


@_loop(_RMSPROP_SIGNATURES, error_model="numpy")
def rmsprop(value, grad, square_avg, grad_avg, buf, weight_decay, alpha, one_minus_alpha, lerp_weight,
            one_minus_lerp_weight, eps, momentum, neg_lr, decay, centered, small_lerp_weight,
            has_momentum):  # type: ignore[no-untyped-def]
    """RMSprop's step in one pass, as ``NumpyBackend.rmsprop_update`` spells it (PyTorch's rule):
    ``g = wd value + g`` (with ``decay``); ``s = α s + (1-α) g g``; centered, ``a = lerp(a, g, 1-α)``
    (torch.lerp's two spellings, by ``small_lerp_weight``) and ``q = sqrt(s - a a)``, else
    ``q = sqrt(s)``; ``u = g / (q + eps)``; with momentum ``buf = μ buf + u``, ``value += -lr buf``,
    else ``value += -lr u``. ``grad_avg`` and ``buf`` are read only when ``centered`` and
    ``has_momentum`` say so (empty arrays otherwise). Division by zero as in NumPy."""
    for i in range(value.shape[0]):
        p = value[i]
        g = grad[i]
        if decay:
            t = p * weight_decay
            g = t + g
        s = g * one_minus_alpha
        s = s * g
        sq = square_avg[i] * alpha
        sq = sq + s
        square_avg[i] = sq
        if centered:
            a = grad_avg[i]
            d = g - a
            if small_lerp_weight:
                d = d * lerp_weight
                a = a + d
            else:
                d = d * one_minus_lerp_weight
                a = g - d
            grad_avg[i] = a
            q = a * a
            q = sq - q
            q = np.sqrt(q)
        else:
            q = np.sqrt(sq)
        q = q + eps
        u = g / q
        if has_momentum:
            b = buf[i] * momentum
            b = b + u
            buf[i] = b
            u = b * neg_lr
        else:
            u = u * neg_lr
        value[i] = p + u


_ADAGRAD_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, boolean)" for t in ("float32", "float64")]


@_loop(_ADAGRAD_SIGNATURES, error_model="numpy")
def adagrad(value, grad, state_sum, weight_decay, eps, neg_clr, decay):  # type: ignore[no-untyped-def]
    """Adagrad's step in one pass, as ``NumpyBackend.adagrad_update`` spells it: ``g = wd value + g``
    (with ``decay``); ``sum += g g``; ``value += -clr g / (sqrt(sum) + eps)`` (``clr`` the decayed rate)."""
    for i in range(value.shape[0]):
        p = value[i]
        g = grad[i]
        if decay:
            t = p * weight_decay
            g = t + g
        s = g * g
        s = state_sum[i] + s
        state_sum[i] = s
        q = np.sqrt(s)
        q = q + eps
        q = g / q
        q = q * neg_clr
        value[i] = p + q


# The loss loop is the exception to this module's rule: its exp and log are numba's (the C
# library's), not NumPy's vectorised ones, and its row sums and logs are float64, so its results
# differ from the NumPy form's by rounding; cpu_jit runs it only where DEEPCORE_JIT=1 asks for
# numba from the first call, never part-way through a run. The logits and labels are typed
# read-only, which writeable arrays convert to: a read-only batch (a memory-mapped file) is taken.
_CE_SIGNATURES = [numba.types.boolean(numba.types.Array(t, 2, "C", readonly=True),
                                      numba.types.Array(numba.types.int64, 1, "A", readonly=True),
                                      t[:, ::1], t[::1], numba.types.float64, numba.types.boolean)
                  for t in (numba.types.float32, numba.types.float64)]


@_loop(_CE_SIGNATURES, error_model="numpy")
def softmax_cross_entropy(logits, labels, grad, out, scale, per_row):  # type: ignore[no-untyped-def]
    """Softmax cross-entropy's loss and gradient in one pass over each row, as Liger-Kernel's fused
    core: ``m = max_j s_j``; ``e_j = exp(s_j - m)`` (the logits' precision) summed in float64 to
    ``Z``; ``L = log Z - (s_y - m)`` (float64); ``grad_j = e_j (scale / Z) - scale [j = y]``.
    Writes ``L_i`` into ``out[i]`` (``per_row``) or ``scale * sum_i L_i`` into ``out[0]`` (a cast
    that overflows gives inf, silently), and returns True; returns False, having written nothing,
    when a label lies outside ``[0, C)``. A NaN logit makes its row NaN, as NumPy's form does."""
    n, c = logits.shape
    for i in range(n):
        if labels[i] < 0 or labels[i] >= c:
            return False
    dtype_scale = grad.dtype.type(scale)
    total = 0.0
    for i in range(n):
        m = logits[i, 0]
        for j in range(1, c):
            if logits[i, j] > m:  # (a NaN anywhere makes Z, and so the whole row, NaN)
                m = logits[i, j]
        z = 0.0
        for j in range(c):
            e = np.exp(logits[i, j] - m)
            grad[i, j] = e
            z += e
        y = labels[i]
        loss = np.log(z) - (logits[i, y] - m)
        if per_row:
            out[i] = loss
        else:
            total += loss
        f = grad.dtype.type(scale / z)
        for j in range(c):
            grad[i, j] *= f
        grad[i, y] -= dtype_scale
    if not per_row:
        out[0] = total * scale
    return True
