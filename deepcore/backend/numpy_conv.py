"""Convolution and pooling for the NumPy backend: im2col plus one GEMM per group, strided views for pooling.

Convolution, ``y[n,o,i,j] = b[o] + sum_{c,p,q} w[o,c,p,q] xpad[n, g(o) C/G + c, i sh + p dh, j sw + q dw]``,
is one matrix product per group on a channel-major im2col buffer
``cols[(c,p,q), (n,i,j)] = xpad[n, c, i sh + p dh, j sw + q dw]`` of shape (C KH KW, N OH OW):
``Y = W cols`` with W as (O, C/G KH KW), then one transposed copy from (O, N, OH, OW) to NCHW.
Backward: ``dW^T = cols dY^T``, ``db = sum dY``, ``dcols = W^T dY``, and col2im adds ``dcols`` back
into ``dx`` one kernel offset at a time; ``need_dx=False`` skips ``dcols`` and col2im.

Why this layout (``benchmarks/conv_layouts.py``, forward + backward): 1.4-2.2x faster than Chainer's
(n, c, kh, kw, oh, ow) with ``tensordot`` at 1 BLAS thread (1.5-2.6x at 2), and the fastest of the four
measured at 32 input channels and on the large 64-channel layer, where a network spends its time. A
per-sample buffer with batched ``matmul`` (N small GEMMs) wins on 1-3 input channels (1.8x vs 1.4-1.6x)
but loses 1.1-1.5x at 32-64 channels, and fell to 0.5x Chainer's speed with 2 BLAS threads on a busy
machine; an NHWC gather is a little faster only at 64 channels on 8x8.

The im2col buffer is filled by one strided copy per kernel offset (KH KW copies, none per sample); padding
is never materialised: each offset copies the rectangle of outputs whose input lies inside ``x`` and zeroes
the stripes that would read padding. col2im adds into the same rectangles, so there is no ``np.add.at``.

Buffers (the im2col buffer, the (O, N OH OW) product and ``dY`` copy, ``dcols``) come from a per-shape
pool, :data:`buffer_pool`: above glibc's mmap threshold (32 MiB with deepcore's allocator tuning) a fresh
buffer is mapped and page-faulted anew on every call, some 11 ms per 75 MB here; that measured 0-10% of
a layer's forward + backward (often within the noise of a shared machine), so the pool is a small gain.
Safety: the im2col buffer saved for the backward returns to the pool only when the ``saved`` object is
garbage (a ``weakref.finalize``), never when the backward runs, and ``dcols`` gets a buffer of its own.
So two forwards before their backwards, an evaluation forward in between, or a backward run twice each
see their own intact buffer; the other buffers live only inside one call. The pool keeps at
most :attr:`BufferPool.limit_bytes` of idle buffers (least recently used shapes dropped first).

Pooling uses strided views of ``x``, one per kernel offset (kh kw of them, no loop over windows or
samples), for every geometry: the reshape trick for kernel == stride ((N, C, OH, kh, OW, kw) reduced over
two axes) measured 7x slower than these kh kw elementwise passes for the sum on NumPy 2.4, and worse
for the max. Max pooling keeps the winning offset per output (uint8), PyTorch's rule: the first maximum
in row-major window order, padding never a candidate, a NaN beats everything (the last NaN of the
window wins, as in PyTorch's CPU kernel). float16 (and bfloat16) convolution and average pooling
accumulate in float32 and cast the results back; float32 and float64 stay in their dtype.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

Pair = tuple[int, int]


class BufferPool:
    """Idle NumPy buffers by (shape, dtype), handed out uninitialised; at most ``limit_bytes`` kept idle."""

    def __init__(self, limit_bytes: int = 1 << 30) -> None:
        self.limit_bytes = limit_bytes
        self._free: OrderedDict[tuple[Any, ...], list[np.ndarray]] = OrderedDict()
        self._bytes = 0
        # Reentrant: a finalizer that gives a buffer back may run inside take/give, when an allocation
        # there sets off the garbage collector.
        self._lock = threading.RLock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (shape, dtype.str)
        with self._lock:
            free = self._free.get(key)
            if free:
                buf = free.pop()
                self._bytes -= buf.nbytes
                self._free.move_to_end(key)
                return buf
        return np.empty(shape, dtype=dtype)

    def give(self, buf: np.ndarray) -> None:
        """Return ``buf`` for reuse; the caller must hold no other reference to it."""
        if buf.nbytes > self.limit_bytes:
            return
        key = (buf.shape, buf.dtype.str)
        with self._lock:
            self._free.setdefault(key, []).append(buf)
            self._free.move_to_end(key)
            self._bytes += buf.nbytes
            while self._bytes > self.limit_bytes:
                oldest = next(iter(self._free))
                free = self._free[oldest]
                self._bytes -= free.pop(0).nbytes
                if not free:
                    del self._free[oldest]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0

    @property
    def idle_bytes(self) -> int:
        return self._bytes


#: The pool the convolution draws its large temporaries from.
buffer_pool = BufferPool()


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _spans(out_size: int, in_size: int, kernel: int, stride: int, dilation: int, pad_lo: int) -> list[Pair | None]:
    """Per kernel offset p: ``(lo, hi)``, the outputs ``i`` in [lo, hi) whose input row
    ``i*stride + p*dilation - pad_lo`` lies in [0, in_size); None where there are none."""
    spans: list[Pair | None] = []
    for p in range(kernel):
        off = p * dilation - pad_lo
        lo = max(0, -(off // stride) if off < 0 else 0)  # ceil(-off / stride)
        hi = min(out_size, (in_size - 1 - off) // stride + 1)
        spans.append((lo, hi) if hi > lo else None)
    return spans


def _in_slice(span: Pair, p: int, stride: int, dilation: int, pad_lo: int) -> slice:
    lo, hi = span
    start = lo * stride + p * dilation - pad_lo
    return slice(start, start + (hi - lo - 1) * stride + 1, stride)


# ---------------------------------------------------------------------------------------------- convolution

def _copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[b, a] = src[a, b]`` for (A, B, H, W) ``src``, as three axes (H*W merged) when the strides
    allow it: NumPy's transposed copy then runs over whole rows, twice as fast as over W alone."""
    a, b, h, w = src.shape
    if h == 1 or w == 1 or src.strides[2] == w * src.strides[3]:
        np.copyto(dst.reshape(b, a, h * w), src.reshape(a, b, h * w).transpose(1, 0, 2), casting="same_kind")
    else:
        np.copyto(dst, src.transpose(1, 0, 2, 3), casting="same_kind")


class _ConvSaved:
    """What ``conv2d_backward`` needs; its im2col buffer returns to the pool when this object dies."""

    __slots__ = ("cols", "weight", "weight_dtype", "x_shape", "x_dtype", "has_bias", "stride", "padding",
                 "dilation", "groups", "kernel", "out_hw", "__weakref__")


def _im2col(x: np.ndarray, cols6: np.ndarray, rows: list, cols: list, stride: Pair, dilation: Pair,
            padding: tuple[int, int, int, int]) -> None:
    """Fill ``cols6`` (C, KH, KW, N, OH, OW) from ``x`` (N, C, H, W): one strided copy per offset."""
    xt = x.transpose(1, 0, 2, 3)
    oh, ow = cols6.shape[4:]
    sh, sw = stride
    dh, dw = dilation
    for p, rs in enumerate(rows):
        for q, cs in enumerate(cols):
            dst = cols6[:, p, q]
            if rs is None or cs is None:
                dst[...] = 0
                continue
            (ilo, ihi), (jlo, jhi) = rs, cs
            # Stripes whose input is padding; a pooled buffer holds stale values there.
            if ilo > 0:
                dst[:, :, :ilo] = 0
            if ihi < oh:
                dst[:, :, ihi:] = 0
            if jlo > 0:
                dst[:, :, ilo:ihi, :jlo] = 0
            if jhi < ow:
                dst[:, :, ilo:ihi, jhi:] = 0
            dst[:, :, ilo:ihi, jlo:jhi] = xt[:, :, _in_slice(rs, p, sh, dh, padding[0]),
                                             _in_slice(cs, q, sw, dw, padding[2])]


def _col2im(dcols6: np.ndarray, dxt: np.ndarray, rows: list, cols: list, stride: Pair, dilation: Pair,
            padding: tuple[int, int, int, int]) -> None:
    """Add ``dcols6`` (C, KH, KW, N, OH, OW) into the zeroed ``dxt`` (C, N, H, W), one offset at a time."""
    sh, sw = stride
    dh, dw = dilation
    for p, rs in enumerate(rows):
        if rs is None:
            continue
        r = _in_slice(rs, p, sh, dh, padding[0])
        for q, cs in enumerate(cols):
            if cs is None:
                continue
            dst = dxt[:, :, r, _in_slice(cs, q, sw, dw, padding[2])]
            dst += dcols6[:, p, q, :, rs[0]:rs[1], cs[0]:cs[1]]


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, *, stride: Pair,
           padding: tuple[int, int, int, int], dilation: Pair, groups: int) -> tuple[np.ndarray, _ConvSaved]:
    """``y = W cols + b`` per group on the channel-major im2col buffer (the module docstring)."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    top, bottom, left, right = padding
    (sh, sw), (dh, dw) = stride, dilation
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    dt = _compute_dtype(x.dtype)
    rows = _spans(oh, h, kh, sh, dh, top)
    cols = _spans(ow, w, kw, sw, dw, left)

    nl = n * oh * ow
    buf = buffer_pool.take((c * kh * kw, nl), dt)
    _im2col(x, buf.reshape(c, kh, kw, n, oh, ow), rows, cols, stride, dilation, padding)

    g, og, kg = groups, o // groups, cg * kh * kw
    w3 = weight.reshape(g, og, kg).astype(dt, copy=False)
    prod = buffer_pool.take((o, nl), dt)
    if g == 1:
        np.matmul(w3[0], buf, out=prod)
    else:
        np.matmul(w3, buf.reshape(g, kg, nl), out=prod.reshape(g, og, nl))
    if bias is not None:
        prod += bias.astype(dt, copy=False)[:, None]  # contiguous rows: far cheaper than after the transpose
    y = np.empty((n, o, oh, ow), dtype=x.dtype)
    _copy_transposed(y, prod.reshape(o, n, oh, ow))
    buffer_pool.give(prod)

    saved = _ConvSaved()
    saved.cols, saved.weight, saved.weight_dtype = buf, w3, weight.dtype
    saved.x_shape, saved.x_dtype, saved.has_bias = x.shape, x.dtype, bias is not None
    saved.stride, saved.padding, saved.dilation, saved.groups = stride, padding, dilation, groups
    saved.kernel, saved.out_hw = (kh, kw), (oh, ow)
    weakref.finalize(saved, buffer_pool.give, buf).atexit = False
    return y, saved


def conv2d_backward(dy: np.ndarray, saved: _ConvSaved, *, need_dx: bool = True,
                    need_bias: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """``dW = dY cols^T``, ``db = sum_{n,i,j} dY``, ``dx = col2im(W^T dY)`` (skipped unless ``need_dx``)."""
    cols, w3 = saved.cols, saved.weight
    g, og, kg = w3.shape
    o = g * og
    n, c, h, w = saved.x_shape
    kh, kw = saved.kernel
    oh, ow = saved.out_hw
    nl = n * oh * ow
    dt = cols.dtype

    dy2 = buffer_pool.take((o, nl), dt)
    _copy_transposed(dy2.reshape(o, n, oh, ow), dy)
    db = dy2.sum(axis=1).astype(saved.x_dtype, copy=False) if need_bias and saved.has_bias else None
    # dW^T = cols dY^T: OpenBLAS runs this orientation of the long-K product faster (up to 4x at 1x6 outputs).
    if g == 1:
        dwt = np.matmul(cols, dy2.T)
    else:
        dwt = np.matmul(cols.reshape(g, kg, nl), dy2.reshape(g, og, nl).transpose(0, 2, 1)).transpose(0, 2, 1)
    dw = np.empty((o, c // g, kh, kw), dtype=saved.weight_dtype)
    np.copyto(dw.reshape(g, og, kg), dwt.T if g == 1 else dwt, casting="same_kind")
    if not need_dx:
        buffer_pool.give(dy2)
        return None, dw, db

    # dcols gets its own buffer: the saved im2col buffer stays intact, so a second backward is still right.
    dcols = buffer_pool.take(cols.shape, dt)
    if g == 1:
        np.matmul(w3[0].T, dy2, out=dcols)
    else:
        np.matmul(w3.transpose(0, 2, 1), dy2.reshape(g, og, nl), out=dcols.reshape(g, kg, nl))
    buffer_pool.give(dy2)
    stride, dilation, padding = saved.stride, saved.dilation, saved.padding
    rows = _spans(oh, h, kh, stride[0], dilation[0], padding[0])
    cols_ = _spans(ow, w, kw, stride[1], dilation[1], padding[2])
    dxt = np.zeros((c, n, h, w), dtype=dt)
    _col2im(dcols.reshape(c, kh, kw, n, oh, ow), dxt, rows, cols_, stride, dilation, padding)
    buffer_pool.give(dcols)
    dx = np.empty((n, c, h, w), dtype=saved.x_dtype)
    _copy_transposed(dx, dxt)
    return dx, dw, db


# -------------------------------------------------------------------------------------------------- pooling

class _PoolSaved:
    """Geometry of a pooling call plus, for max pooling, the winning offset of every output."""

    __slots__ = ("argmax", "divisor", "x_shape", "x_dtype", "out_shape", "kernel", "stride", "padding", "rows",
                 "cols")


def _pool_geometry(x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair) -> _PoolSaved:
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    s = _PoolSaved()
    s.x_shape, s.x_dtype, s.out_shape = x.shape, x.dtype, (n, c, oh, ow)
    s.kernel, s.stride, s.padding = (kh, kw), (sh, sw), (ph, pw)
    s.rows, s.cols = _spans(oh, h, kh, sh, 1, ph), _spans(ow, w, kw, sw, 1, pw)
    s.argmax = s.divisor = None
    return s


def _windows(s: _PoolSaved):
    """``(k, out_rect, in_rect)`` per kernel offset in row-major order (k = p*kw + q), where any output
    reads inside the input: the outputs' index rectangle and the strided input rectangle under it."""
    kw, (sh, sw), (ph, pw) = s.kernel[1], s.stride, s.padding
    for p, rs in enumerate(s.rows):
        if rs is None:
            continue
        r_in = _in_slice(rs, p, sh, 1, ph)
        for q, cs in enumerate(s.cols):
            if cs is not None:
                yield p * kw + q, (..., slice(*rs), slice(*cs)), (..., r_in, _in_slice(cs, q, sw, 1, pw))


def _first_valid(spans: list[Pair | None], size: int) -> np.ndarray:
    """Per output index: the first kernel offset whose input is not padding."""
    first = np.zeros(size, dtype=np.intp)
    for p in reversed(range(len(spans))):
        if spans[p] is not None:
            first[slice(*spans[p])] = p
    return first


def _max_scan(x: np.ndarray, s: _PoolSaved, y: np.ndarray, argmax: np.ndarray, nan_wins: bool) -> None:
    """``y = max`` over each window; ``argmax`` the first maximal offset (with ``nan_wins``, the last NaN).

    Offsets go in row-major order k = 0, 1, ...; where offset k beats the running maximum, argmax
    becomes k, computed as ``max(argmax, k * beats)`` (argmax < k until then): NumPy's masked
    assignment (``copyto(where=)``) costs some 50 times as much as that multiply and maximum.
    """
    windows = list(_windows(s))
    if s.padding == (0, 0):
        _, out0, in0 = windows.pop(0)
        np.copyto(y, x[in0])
        argmax.fill(0)
    else:
        # Padding is never a candidate: start at -inf with the first offset inside the input, so a
        # window of -inf values points at its first real cell, as PyTorch's does.
        y.fill(-np.inf)
        kw = s.kernel[1]
        argmax[...] = _first_valid(s.rows, y.shape[2])[:, None] * kw + _first_valid(s.cols, y.shape[3])
    beats = np.empty(y.shape, dtype=bool)
    step = np.empty(y.shape, dtype=argmax.dtype)
    # A view with a column stride > 1 is read twice below; NumPy's comparisons run several times
    # slower on it than on a contiguous copy, so copy it once.
    scratch = np.empty(y.shape, dtype=x.dtype) if s.stride[1] > 1 else None
    for k, out, inp in windows:
        v, yr, br = x[inp], y[out], beats[out]
        if scratch is not None:
            np.copyto(scratch[out], v)
            v = scratch[out]
        np.greater(v, yr, out=br)
        if nan_wins:
            br |= np.isnan(v)
        np.maximum(yr, v, out=yr)  # NaN-propagating, as PyTorch's value
        np.multiply(br, argmax.dtype.type(k), out=step[out])
        np.maximum(argmax[out], step[out], out=argmax[out])


def max_pool2d(x: np.ndarray, *, kernel_size: Pair, stride: Pair, padding: Pair) -> tuple[np.ndarray, _PoolSaved]:
    """``y[n,c,i,j] = max_{p,q} x[n, c, i sh + p - ph, j sw + q - pw]`` over the cells inside ``x``."""
    s = _pool_geometry(x, kernel_size, stride, padding)
    y = np.empty(s.out_shape, dtype=x.dtype)
    kk = s.kernel[0] * s.kernel[1]
    argmax = np.empty(y.shape, dtype=np.uint8 if kk <= 256 else np.int32)
    _max_scan(x, s, y, argmax, nan_wins=False)
    # A NaN anywhere makes the sum NaN; only then (or on an infinite sum) look closer, and redo the
    # argmax with PyTorch's rule that a NaN beats everything, the last NaN of the window winning.
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf in the probe is no error of the caller's
        suspicious = not np.isfinite(y.sum())
    if suspicious and np.isnan(y).any():
        _max_scan(x, s, y, argmax, nan_wins=True)
    s.argmax = argmax
    return y, s


def max_pool2d_backward(dy: np.ndarray, saved: _PoolSaved) -> np.ndarray:
    """``dx`` gets each ``dy`` at its window's winning cell (summed where windows overlap)."""
    s = saved
    (kh, kw), (sh, sw) = s.kernel, s.stride
    overlap = sh < kh or sw < kw
    dt = _compute_dtype(s.x_dtype) if overlap else s.x_dtype
    dx = np.zeros(s.x_shape, dtype=dt)
    hit = np.empty(s.argmax.shape, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        # dy * hit puts 0 where the cell lost, unless dy is inf or NaN (inf * 0 = NaN): then select.
        finite = bool(np.isfinite(dy.sum()))
    part = np.empty(s.argmax.shape, dtype=dt) if overlap else None
    for k, out, inp in _windows(s):
        hr = hit[out]
        np.equal(s.argmax[out], k, out=hr)
        dst = dx[inp]
        if not overlap:
            if finite:
                np.multiply(dy[out], hr, out=dst)  # each cell of dx is written by one offset at most
            else:
                np.copyto(dst, dy[out], where=hr)
            continue
        pr = part[out]
        if finite:
            np.multiply(dy[out], hr, out=pr)
        else:
            pr[...] = 0
            np.copyto(pr, dy[out], where=hr)
        dst += pr
    return dx.astype(s.x_dtype, copy=False)


def avg_pool2d(x: np.ndarray, *, kernel_size: Pair, stride: Pair, padding: Pair,
               count_include_pad: bool) -> tuple[np.ndarray, _PoolSaved]:
    """``y = (1/d) sum_{p,q} xpad[n, c, i sh + p, j sw + q]``, ``d = kh kw`` or the count of real cells."""
    s = _pool_geometry(x, kernel_size, stride, padding)
    dt = _compute_dtype(x.dtype)
    kh, kw = s.kernel
    if count_include_pad or s.padding == (0, 0):
        s.divisor = float(kh * kw)
    else:
        oh, ow = s.out_shape[2:]
        s.divisor = np.multiply.outer(_counts(s.rows, oh), _counts(s.cols, ow)).astype(dt)
    windows = list(_windows(s))
    if s.padding == (0, 0):
        _, _, in0 = windows.pop(0)
        acc = x[in0].astype(dt)
    else:
        acc = np.zeros(s.out_shape, dtype=dt)
    for _, out, inp in windows:
        dst = acc[out]
        np.add(dst, x[inp], out=dst)
    acc /= s.divisor
    return acc.astype(x.dtype, copy=False), s


def _counts(spans: list[Pair | None], size: int) -> np.ndarray:
    """Per output index: how many kernel offsets read inside the input."""
    count = np.zeros(size, dtype=np.intp)
    for span in spans:
        if span is not None:
            count[slice(*span)] += 1
    return count


def avg_pool2d_backward(dy: np.ndarray, saved: _PoolSaved) -> np.ndarray:
    """``dx[cell] = sum over the windows holding it of dy / d``."""
    s = saved
    dt = _compute_dtype(s.x_dtype)
    (kh, kw), (sh, sw) = s.kernel, s.stride
    g = np.divide(dy, s.divisor, dtype=dt)
    dx = np.zeros(s.x_shape, dtype=dt)
    overlap = sh < kh or sw < kw
    for _, out, inp in _windows(s):
        dst = dx[inp]
        if overlap:
            dst += g[out]
        else:
            np.copyto(dst, g[out])
    return dx.astype(s.x_dtype, copy=False)
