"""Host side of 2-D convolution and pooling on CUDA: the gather kernels of ``kernels/conv2d.cu``
around cuBLAS GEMMs, written against an ``xp`` and a ``get_function`` so that the CPU emulator
(tools/cuda_emulator, with ``xp=numpy``) runs exactly the code a GPU runs.

Convolution is im2col + GEMM:
``y[n, o, i, j] = b[o] + sum_{c,p,q} w[o, c, p, q] xpad[n, g(o) Cg + c, i sh + p dh, j sw + q dw]``,
``dw = dy2d @ cols^T``, ``dx = col2im(W2d^T @ dy2d)``, ``db = sum_{n,i,j} dy``.

Column layout. For a chunk of ``nb`` samples, ``cols`` is ``(C*KH*KW, nb*OH*OW)`` with row
``(c*KH + p)*KW + q`` and column ``n*OH*OW + i*OW + j``. Why:

- group ``g`` owns the contiguous row block ``[g*Cg*KH*KW, (g+1)*Cg*KH*KW)``, so each group's
  GEMM takes 2-D views without a copy, ``y2d[g] = W2d[g] @ cols[g]`` with ``W2d = w.reshape(O, -1)``
  (every product stays 2-D: batched bfloat16 matmul crashes in CuPy 14);
- the GEMM's wide dimension is ``nb*OH*OW``, the whole chunk: one large GEMM per group and chunk,
  where a per-sample layout would issue N small ones (OH*OW is 49 at the end of a ResNet);
- the backward uses the same views: ``dW2d[g] = dy2d[g] @ cols[g]^T``, ``dcols[g] = W2d[g]^T @ dy2d[g]``.

The price is that ``y2d`` is ``(O, nb*OH*OW)``: one transposing copy to NCHW (fused with the bias
add), and one of ``dy`` back in the backward. ``cols`` is KH*KW times the size of ``x``, so the batch
goes through in chunks whose ``cols`` fits ``max_cols_bytes``, and the backward recomputes ``cols``
per chunk instead of keeping it from the forward: an im2col pass costs little next to the GEMMs,
while keeping KH*KW copies of every conv input for a whole forward would cost most of the memory.

im2col runs one thread per (channel, column), each copying its KH*KW taps (three index divisions
per thread instead of per element); col2im gathers, one thread per ``dx`` element summing the column
entries that read it. Pooling runs one thread per output element forward, per input element backward:
max: ``y = max over the window`` (implicit -inf padding), its argmax saved (first maximum in
row-major window order; a NaN wins), ``dx[h, w] = sum of dy over the windows whose argmax is (h, w)``;
avg: ``y = sum / d`` (``d = kh*kw`` with ``count_include_pad``, else the window's real cells),
``dx[h, w] = sum over the windows containing (h, w) of dy / d``.

Every kernel gathers, so each output element is written once, without atomics, and each sum is taken
in a fixed order: the results are deterministic. Sums accumulate in float32 (float64 for float64).
CuPy is imported inside :func:`cupy_function` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy

from .cuda_kernels import CONV_CTYPES, CONV_SOURCE, compiled_function

__all__ = [
    "COLS_BUDGET_BYTES",
    "THREADS",
    "AvgPoolSaved",
    "ConvSaved",
    "MaxPoolSaved",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "cupy_function",
    "im2col",
    "max_pool2d_backward",
    "max_pool2d_forward",
]

# Must equal conv::kThreads in kernels/conv2d.cu: __launch_bounds__ there promises
# ptxas this block size, and a larger launch fails.
THREADS = 256
# Every kernel loops with a grid stride, so any cap is correct; this one keeps the
# grid well inside CUDA's limits.
_MAX_GRID = 1 << 20
# The largest im2col buffer one chunk of the batch may take (at least one sample always goes).
COLS_BUDGET_BYTES = 1 << 28
# The kernels keep coordinates inside a row or plane in 32 bits.
_INT_MAX = 2**31 - 1

Pair = tuple[int, int]


@dataclass(frozen=True, eq=False)
class ConvSaved:
    """What :func:`conv2d_backward` needs: the (contiguous) input and weight, and the geometry."""

    x: Any
    weight: Any
    has_bias: bool
    stride: Pair
    padding: tuple[int, int, int, int]
    dilation: Pair
    groups: int


@dataclass(frozen=True, eq=False)
class MaxPoolSaved:
    argmax: Any  # int32 (N, C, OH, OW): the flat index h*W + w of each window's maximum
    x_shape: tuple[int, ...]
    kernel_size: Pair
    stride: Pair
    padding: Pair


@dataclass(frozen=True, eq=False)
class AvgPoolSaved:
    x_shape: tuple[int, ...]
    kernel_size: Pair
    stride: Pair
    padding: Pair
    count_include_pad: bool


def cupy_function(name_expression: str) -> Any:
    """The compiled kernel for one instance of ``kernels/conv2d.cu`` on the current device: NVRTC
    builds a module with that instance only, on first use (a training run needs a few of the 24)."""
    return compiled_function(CONV_SOURCE, name_expression)


# ----------------------------------------------------------------------- helpers
def _ctype(dtype: Any) -> str:
    ctype = CONV_CTYPES.get(getattr(dtype, "name", str(dtype)))
    if ctype is None:
        raise TypeError(f"the convolution kernels support {tuple(CONV_CTYPES)}, got {dtype}")
    return ctype


def _same_dtype(label: str, a: Any, dtype: Any) -> None:
    if a.dtype != dtype:
        raise TypeError(f"{label} must have the input's dtype {dtype}, got {a.dtype}")


def _acc_dtype(xp: Any, dtype: Any) -> Any:
    return xp.float64 if getattr(dtype, "name", "") == "float64" else xp.float32


def _fits_int(label: str, value: int) -> None:
    if value > _INT_MAX:
        raise ValueError(f"{label} = {value} exceeds 2**31 - 1, which the kernels index in 32 bits")


def _positive(label: str, pair: tuple[int, ...]) -> None:
    if any(int(v) < 1 for v in pair):
        raise ValueError(f"{label} must be positive, got {tuple(pair)}")


def _launch(get_function: Any, kernel: str, dtype: Any, total: int, args: tuple[Any, ...]) -> None:
    if total == 0:
        return
    blocks = min(-(-total // THREADS), _MAX_GRID)
    get_function(f"{kernel}<{_ctype(dtype)}>")((blocks,), (THREADS,), args)


class _ConvGeometry(NamedTuple):
    C: int
    H: int
    W: int
    KH: int
    KW: int
    OH: int
    OW: int
    sh: int
    sw: int
    top: int
    left: int
    dh: int
    dw: int

    @classmethod
    def of(cls, x_shape: tuple[int, ...], kernel_size: Pair, stride: Pair, padding: tuple[int, int, int, int],
           dilation: Pair) -> _ConvGeometry:
        _, C, H, W = (int(d) for d in x_shape)
        KH, KW = (int(k) for k in kernel_size)
        sh, sw = (int(s) for s in stride)
        top, bottom, left, right = (int(p) for p in padding)
        dh, dw = (int(d) for d in dilation)
        _positive("stride", (sh, sw))
        _positive("dilation", (dh, dw))
        if min(padding) < 0:
            raise ValueError(f"padding must be >= 0, got {tuple(padding)}")
        OH = (H + top + bottom - dh * (KH - 1) - 1) // sh + 1
        OW = (W + left + right - dw * (KW - 1) - 1) // sw + 1
        if OH < 1 or OW < 1:
            raise ValueError(f"the output would be {OH}x{OW}: input {H}x{W}, padding {tuple(padding)}, kernel "
                             f"{KH}x{KW}, dilation {(dh, dw)}")
        _fits_int("C*KH*KW", C * KH * KW)
        _fits_int("OH*OW", OH * OW)
        _fits_int("H*W", H * W)
        _fits_int("the padded extent", max(H + top + bottom, W + left + right))
        return cls(C, H, W, KH, KW, OH, OW, sh, sw, top, left, dh, dw)

    @property
    def rows(self) -> int:
        return self.C * self.KH * self.KW

    def args(self, nb: int) -> tuple[Any, ...]:
        return tuple(numpy.int32(v) for v in (nb, *self))


def _chunk(n: int, g: _ConvGeometry, itemsize: int, max_cols_bytes: int) -> int:
    """Samples per chunk: as many as fit in max_cols_bytes, at least one, at most n, and few enough
    that a row of cols (nb*OH*OW) and the chunk's planes (nb*C) stay 32-bit for the kernels."""
    length = g.OH * g.OW
    fit = max_cols_bytes // max(1, g.rows * length * itemsize)
    return max(1, min(n, fit, _INT_MAX // length, _INT_MAX // max(1, g.C)))


def _im2col_into(get_function: Any, x_chunk: Any, buf: Any, g: _ConvGeometry) -> Any:
    """cols (C*KH*KW, nb*OH*OW) for the samples of x_chunk, written into the front of the flat ``buf``."""
    nb = int(x_chunk.shape[0])
    cols = buf[:g.rows * nb * g.OH * g.OW].reshape(g.rows, nb * g.OH * g.OW)
    _launch(get_function, "im2col", x_chunk.dtype, cols.size, (x_chunk, cols, *g.args(nb)))
    return cols


def _col2im_into(get_function: Any, cols: Any, dx_chunk: Any, g: _ConvGeometry) -> None:
    nb = int(dx_chunk.shape[0])
    _launch(get_function, "col2im", cols.dtype, dx_chunk.size, (cols, dx_chunk, *g.args(nb)))


# -------------------------------------------------------------- im2col, col2im
def im2col(xp: Any, get_function: Any, x: Any, kernel_size: Pair, *, stride: Pair = (1, 1),
           padding: tuple[int, int, int, int] = (0, 0, 0, 0), dilation: Pair = (1, 1)) -> Any:
    """The whole batch's column matrix ``(C*KH*KW, N*OH*OW)`` (layout in the module docstring)."""
    _ctype(x.dtype)
    x = xp.ascontiguousarray(x)
    g = _ConvGeometry.of(x.shape, kernel_size, stride, padding, dilation)
    _fits_int("N*OH*OW", int(x.shape[0]) * g.OH * g.OW)
    _fits_int("N*C", int(x.shape[0]) * g.C)
    buf = xp.empty(g.rows * int(x.shape[0]) * g.OH * g.OW, dtype=x.dtype)
    return _im2col_into(get_function, x, buf, g)


def col2im(xp: Any, get_function: Any, cols: Any, x_shape: tuple[int, ...], kernel_size: Pair, *,
           stride: Pair = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0), dilation: Pair = (1, 1)) -> Any:
    """The adjoint of :func:`im2col`: ``dx (N, C, H, W)`` with each element the sum of the column
    entries im2col copies it into (zero where none does)."""
    _ctype(cols.dtype)
    g = _ConvGeometry.of(x_shape, kernel_size, stride, padding, dilation)
    n = int(x_shape[0])
    _fits_int("N*OH*OW", n * g.OH * g.OW)
    _fits_int("N*C", n * g.C)
    if tuple(cols.shape) != (g.rows, n * g.OH * g.OW):
        raise ValueError(f"cols must have shape {(g.rows, n * g.OH * g.OW)}, got {tuple(cols.shape)}")
    dx = xp.empty(tuple(int(d) for d in x_shape), dtype=cols.dtype)
    _col2im_into(get_function, xp.ascontiguousarray(cols), dx, g)
    return dx


# ------------------------------------------------------------------- conv2d
def conv2d_forward(xp: Any, get_function: Any, x: Any, weight: Any, bias: Any | None, *, stride: Pair,
                   padding: tuple[int, int, int, int], dilation: Pair, groups: int,
                   max_cols_bytes: int = COLS_BUDGET_BYTES) -> tuple[Any, ConvSaved]:
    """``(y, saved)`` of ``Backend.conv2d``: y (N, O, OH, OW), contiguous, in x's dtype."""
    _ctype(x.dtype)
    _same_dtype("weight", weight, x.dtype)
    if bias is not None:
        _same_dtype("bias", bias, x.dtype)
    x = xp.ascontiguousarray(x)
    weight = xp.ascontiguousarray(weight)
    n = int(x.shape[0])
    o, cg, kh, kw = (int(d) for d in weight.shape)
    if int(x.shape[1]) != cg * groups or o % groups:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit input channels {x.shape[1]} in {groups} groups")
    g = _ConvGeometry.of(x.shape, (kh, kw), stride, padding, dilation)
    og, k = o // groups, cg * kh * kw
    w2d = weight.reshape(o, k)
    length = g.OH * g.OW
    y = xp.empty((n, o, g.OH, g.OW), dtype=x.dtype)
    saved = ConvSaved(x, weight, bias is not None, tuple(stride), tuple(padding), tuple(dilation), groups)
    if n == 0:
        return y, saved
    chunk = _chunk(n, g, x.dtype.itemsize, max_cols_bytes)
    cols_buf = xp.empty(g.rows * chunk * length, dtype=x.dtype)
    y_buf = xp.empty(o * chunk * length, dtype=x.dtype)
    for n0 in range(0, n, chunk):
        nb = min(chunk, n - n0)
        cols = _im2col_into(get_function, x[n0:n0 + nb], cols_buf, g)
        y2d = y_buf[:o * nb * length].reshape(o, nb * length)
        for gi in range(groups):
            xp.matmul(w2d[gi * og:(gi + 1) * og], cols[gi * k:(gi + 1) * k], out=y2d[gi * og:(gi + 1) * og])
        y_nchw = y2d.reshape(o, nb, g.OH, g.OW).transpose(1, 0, 2, 3)
        if bias is None:
            y[n0:n0 + nb] = y_nchw
        else:
            xp.add(y_nchw, bias.reshape(1, o, 1, 1), out=y[n0:n0 + nb])
    return y, saved


def conv2d_backward(xp: Any, get_function: Any, dy: Any, saved: ConvSaved, *, need_dx: bool = True,
                    need_bias: bool = True, max_cols_bytes: int = COLS_BUDGET_BYTES) -> tuple[Any, Any, Any]:
    """``(dx | None, dw, db | None)`` of ``Backend.conv2d_backward``; ``need_dx=False`` skips the
    ``W^T dy`` GEMMs and col2im altogether."""
    x, weight, groups = saved.x, saved.weight, saved.groups
    dx_dtype = dy.dtype  # dx comes back in dy's dtype, dw and db in the parameters', as in the reference
    if dy.dtype != x.dtype:
        dy = dy.astype(x.dtype)
    n = int(x.shape[0])
    o, cg, kh, kw = (int(d) for d in weight.shape)
    g = _ConvGeometry.of(x.shape, (kh, kw), saved.stride, saved.padding, saved.dilation)
    if tuple(dy.shape) != (n, o, g.OH, g.OW):
        raise ValueError(f"dy must have shape {(n, o, g.OH, g.OW)}, got {tuple(dy.shape)}")
    og, k = o // groups, cg * kh * kw
    w2d = weight.reshape(o, k)
    length = g.OH * g.OW
    acc = _acc_dtype(xp, x.dtype)
    db = dy.sum(axis=(0, 2, 3), dtype=acc).astype(x.dtype) if need_bias and saved.has_bias else None
    dx = xp.empty(x.shape, dtype=x.dtype) if need_dx else None
    if n == 0:
        return dx, xp.zeros(weight.shape, dtype=x.dtype), db
    chunk = _chunk(n, g, x.dtype.itemsize, max_cols_bytes)
    single = chunk >= n
    # One chunk: the GEMMs write dw directly. Several: partial products add up, in float32 for
    # the half types so that the sum over chunks loses nothing to 16-bit roundings.
    dw2d = xp.empty((o, k), dtype=x.dtype if single else acc)
    cols_buf = xp.empty(g.rows * chunk * length, dtype=x.dtype)
    dcols_buf = xp.empty(g.rows * chunk * length, dtype=x.dtype) if need_dx else None
    for n0 in range(0, n, chunk):
        nb = min(chunk, n - n0)
        dy2d = xp.ascontiguousarray(dy[n0:n0 + nb].transpose(1, 0, 2, 3)).reshape(o, nb * length)
        cols = _im2col_into(get_function, x[n0:n0 + nb], cols_buf, g)
        for gi in range(groups):
            rows_o, rows_k = slice(gi * og, (gi + 1) * og), slice(gi * k, (gi + 1) * k)
            if single:
                xp.matmul(dy2d[rows_o], cols[rows_k].T, out=dw2d[rows_o])
            elif n0 == 0:
                dw2d[rows_o] = xp.matmul(dy2d[rows_o], cols[rows_k].T)
            else:
                dw2d[rows_o] += xp.matmul(dy2d[rows_o], cols[rows_k].T)
        if need_dx:
            dcols = dcols_buf[:g.rows * nb * length].reshape(g.rows, nb * length)
            for gi in range(groups):
                rows_o, rows_k = slice(gi * og, (gi + 1) * og), slice(gi * k, (gi + 1) * k)
                xp.matmul(w2d[rows_o].T, dy2d[rows_o], out=dcols[rows_k])
            _col2im_into(get_function, dcols, dx[n0:n0 + nb], g)
    dw = dw2d.reshape(weight.shape)
    if dx is not None and dx.dtype != dx_dtype:
        dx = dx.astype(dx_dtype)
    return dx, dw if dw.dtype == x.dtype else dw.astype(x.dtype), db


# ------------------------------------------------------------------ pooling
def _pool_geometry(x_shape: tuple[int, ...], kernel_size: Pair, stride: Pair, padding: Pair) -> tuple[int, ...]:
    n, c, h, w = (int(d) for d in x_shape)
    kh, kw = (int(v) for v in kernel_size)
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    _positive("kernel_size", (kh, kw))
    _positive("stride", (sh, sw))
    if not (0 <= ph <= kh // 2 and 0 <= pw <= kw // 2):
        raise ValueError(f"padding must be in [0, kernel_size // 2], got {(ph, pw)} for kernel {(kh, kw)}")
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the output would be {oh}x{ow}: input {h}x{w}, padding {(ph, pw)}, kernel {(kh, kw)}")
    _fits_int("H*W", h * w)
    _fits_int("OH*OW", oh * ow)
    _fits_int("the padded extent", max(h + 2 * ph, w + 2 * pw))
    return n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw


def _pool_args(geometry: tuple[int, ...]) -> tuple[Any, ...]:
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = geometry
    return (numpy.int64(n * c), *(numpy.int32(v) for v in (h, w, oh, ow, kh, kw, sh, sw, ph, pw)))


def max_pool2d_forward(xp: Any, get_function: Any, x: Any, *, kernel_size: Pair, stride: Pair,
                       padding: Pair) -> tuple[Any, MaxPoolSaved]:
    """``(y, saved)`` of ``Backend.max_pool2d``."""
    _ctype(x.dtype)
    x = xp.ascontiguousarray(x)
    geometry = _pool_geometry(x.shape, kernel_size, stride, padding)
    n, c, _, _, oh, ow = geometry[:6]
    y = xp.empty((n, c, oh, ow), dtype=x.dtype)
    argmax = xp.empty((n, c, oh, ow), dtype=xp.int32)
    _launch(get_function, "max_pool2d_forward", x.dtype, y.size, (x, y, argmax, *_pool_args(geometry)))
    return y, MaxPoolSaved(argmax, tuple(x.shape), tuple(kernel_size), tuple(stride), tuple(padding))


def max_pool2d_backward(xp: Any, get_function: Any, dy: Any, saved: MaxPoolSaved) -> Any:
    _ctype(dy.dtype)
    geometry = _pool_geometry(saved.x_shape, saved.kernel_size, saved.stride, saved.padding)
    if tuple(dy.shape) != tuple(saved.argmax.shape):
        raise ValueError(f"dy must have shape {tuple(saved.argmax.shape)}, got {tuple(dy.shape)}")
    dy = xp.ascontiguousarray(dy)
    dx = xp.empty(saved.x_shape, dtype=dy.dtype)
    _launch(get_function, "max_pool2d_backward", dy.dtype, dx.size, (dy, saved.argmax, dx, *_pool_args(geometry)))
    return dx


def avg_pool2d_forward(xp: Any, get_function: Any, x: Any, *, kernel_size: Pair, stride: Pair, padding: Pair,
                       count_include_pad: bool) -> tuple[Any, AvgPoolSaved]:
    """``(y, saved)`` of ``Backend.avg_pool2d``."""
    _ctype(x.dtype)
    x = xp.ascontiguousarray(x)
    geometry = _pool_geometry(x.shape, kernel_size, stride, padding)
    n, c, _, _, oh, ow = geometry[:6]
    y = xp.empty((n, c, oh, ow), dtype=x.dtype)
    _launch(get_function, "avg_pool2d_forward", x.dtype, y.size,
            (x, y, *_pool_args(geometry), numpy.int32(bool(count_include_pad))))
    return y, AvgPoolSaved(tuple(x.shape), tuple(kernel_size), tuple(stride), tuple(padding), bool(count_include_pad))


def avg_pool2d_backward(xp: Any, get_function: Any, dy: Any, saved: AvgPoolSaved) -> Any:
    _ctype(dy.dtype)
    geometry = _pool_geometry(saved.x_shape, saved.kernel_size, saved.stride, saved.padding)
    n, c, _, _, oh, ow = geometry[:6]
    if tuple(dy.shape) != (n, c, oh, ow):
        raise ValueError(f"dy must have shape {(n, c, oh, ow)}, got {tuple(dy.shape)}")
    dy = xp.ascontiguousarray(dy)
    dx = xp.empty(saved.x_shape, dtype=dy.dtype)
    _launch(get_function, "avg_pool2d_backward", dy.dtype, dx.size,
            (dy, dx, *_pool_args(geometry), numpy.int32(saved.count_include_pad)))
    return dx
