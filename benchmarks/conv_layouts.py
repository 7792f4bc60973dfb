"""im2col layouts for a NumPy convolution, forward + backward, timed against Chainer's layout.

    python benchmarks/conv_layouts.py                          # 1 and 2 BLAS threads, every layer (~1.5-3 min)
    python benchmarks/conv_layouts.py --threads 1 --rounds 5 --layers conv3-32

Every candidate computes ``y = conv2d(x, W) + b`` and then ``dx, dW, db`` (stride 1, float32) with
one im2col buffer and matrix products; they differ in the buffer's layout:

- ``chainer``: Chainer's ``(n, c, kh, kw, oh, ow)`` buffer (``np.pad``, one strided copy per offset),
  ``np.tensordot`` for the three products (which copies the buffer into the order it needs) and
  ``np.rollaxis`` for the output, as ``chainer.functions.convolution_2d``'s CPU path does; its
  output is left a transposed view, as Chainer leaves it (the others return contiguous NCHW).
- ``channel-major``: deepcore's :mod:`deepcore.backend.numpy_conv`: ``(c kh kw, n oh ow)``, one 2-D
  GEMM each way, padding never materialised, buffers from the per-shape pool.
- ``channel-major-nopool``: the same with the pool switched off (every buffer a fresh ``np.empty``),
  the cost of the pool's absence.
- ``per-sample``: ``(n, c kh kw, oh ow)`` (the same memory as Chainer's) with batched ``np.matmul``:
  the output comes out NCHW with no transpose, but dW is n small GEMMs and a sum.
- ``nhwc``: ``x`` transposed to NHWC and gathered into ``(n oh ow, kh kw c)``, one GEMM each way.

All candidates run in the same process (one process for every layout is acceptable for this
micro-benchmark: they share the allocator's state, and the allocator is tuned as deepcore's NumPy
backend tunes it). Each round times every candidate on every layer, in a rotated order; a
candidate's figure is the median over rounds of its per-call time (forward + backward, each call
timed once after a warm-up), and each ratio is the median over rounds of Chainer's time over the
candidate's in that round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import deepcore
from deepcore import sysinfo
from deepcore.backend import numpy_conv

#: name -> (N, C, H, W, O, K, padding): square kernels, stride 1, symmetric padding.
LAYERS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "conv3-32": (128, 3, 32, 32, 32, 3, 1),     # CIFAR's first layer
    "conv32-64": (128, 32, 16, 16, 64, 3, 1),   # a middle layer
    "conv64-64": (128, 64, 8, 8, 64, 3, 1),     # a late layer
    "lenet1-6": (128, 1, 28, 28, 6, 5, 0),      # LeNet-5's first layer on MNIST
    "conv64-64-big": (32, 64, 32, 32, 64, 3, 1),  # buffers above glibc's mmap threshold (75 MB of im2col)
}
LAYER_TEXT = {
    "conv3-32": "3->32, 3x3 pad 1, 32x32",
    "conv32-64": "32->64, 3x3 pad 1, 16x16",
    "conv64-64": "64->64, 3x3 pad 1, 8x8",
    "lenet1-6": "1->6, 5x5 pad 0, 28x28",
    "conv64-64-big": "64->64, 3x3 pad 1, 32x32, batch 32",
}


# ------------------------------------------------------------------------------------------- chainer
def _chainer_im2col(img: np.ndarray, k: int, p: int) -> np.ndarray:
    n, c, h, w = img.shape
    oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
    img = np.pad(img, ((0, 0), (0, 0), (p, p), (p, p)), mode="constant")
    col = np.ndarray((n, c, k, k, oh, ow), dtype=img.dtype)
    for j in range(k):
        for i in range(k):
            col[:, :, j, i, :, :] = img[:, :, j:j + oh, i:i + ow]
    return col


def _chainer_col2im(col: np.ndarray, p: int, h: int, w: int) -> np.ndarray:
    n, c, k, _, oh, ow = col.shape
    img = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=col.dtype)
    for j in range(k):
        for i in range(k):
            img[:, :, j:j + oh, i:i + ow] += col[:, :, j, i]
    return img[:, :, p:h + p, p:w + p]


def chainer_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, p: int) -> tuple[np.ndarray, Any]:
    col = _chainer_im2col(x, w.shape[2], p)
    y = np.tensordot(col, w, ((1, 2, 3), (1, 2, 3))).astype(x.dtype, copy=False)
    y += b
    return np.rollaxis(y, 3, 1), (col, w, x.shape, p)


def chainer_backward(gy: np.ndarray, saved: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    col, w, (_, _, h, wd), p = saved
    gw = np.tensordot(gy, col, ((0, 2, 3), (0, 4, 5))).astype(w.dtype, copy=False)
    gcol = np.rollaxis(np.tensordot(w, gy, (0, 1)).astype(gy.dtype, copy=False), 3)
    return _chainer_col2im(gcol, p, h, wd), gw, gy.sum(axis=(0, 2, 3))


# ------------------------------------------------------------------------------------- channel-major
def cm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, p: int) -> tuple[np.ndarray, Any]:
    return numpy_conv.conv2d(x, w, b, stride=(1, 1), padding=(p, p, p, p), dilation=(1, 1), groups=1)


def cm_backward(dy: np.ndarray, saved: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return numpy_conv.conv2d_backward(dy, saved)


# ---------------------------------------------------------------------------------------- per-sample
def ps_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, p: int) -> tuple[np.ndarray, Any]:
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = h + 2 * p - k + 1, wd + 2 * p - k + 1
    xp = np.zeros((n, c, h + 2 * p, wd + 2 * p), dtype=x.dtype)
    xp[:, :, p:p + h, p:p + wd] = x
    cols = np.empty((n, c, k, k, oh, ow), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + oh, j:j + ow]
    cols3 = cols.reshape(n, c * k * k, oh * ow)
    y = np.matmul(w.reshape(o, -1), cols3)  # (n, o, oh ow): NCHW already
    y += b[:, None]
    return y.reshape(n, o, oh, ow), (cols, w, x.shape, p)


def ps_backward(dy: np.ndarray, saved: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols, w, (n, c, h, wd), p = saved
    o, _, k, _ = w.shape
    oh, ow = cols.shape[4:]
    dy3 = dy.reshape(n, o, oh * ow)
    cols3 = cols.reshape(n, c * k * k, oh * ow)
    dw = np.matmul(dy3, cols3.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    dcols = np.matmul(w.reshape(o, -1).T, dy3).reshape(cols.shape)
    dxp = np.zeros((n, c, h + 2 * p, wd + 2 * p), dtype=dy.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + oh, j:j + ow] += dcols[:, :, i, j]
    return np.ascontiguousarray(dxp[:, :, p:p + h, p:p + wd]), dw, dy.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------- nhwc
def nhwc_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, p: int) -> tuple[np.ndarray, Any]:
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = h + 2 * p - k + 1, wd + 2 * p - k + 1
    xp = np.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=x.dtype)
    xp[:, p:p + h, p:p + wd, :] = x.transpose(0, 2, 3, 1)
    cols = np.empty((n, oh, ow, k, k, c), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, :, i, j, :] = xp[:, i:i + oh, j:j + ow, :]
    wr = w.transpose(0, 2, 3, 1).reshape(o, -1)
    y2 = np.matmul(cols.reshape(n * oh * ow, -1), wr.T)  # (n oh ow, o): NHWC
    y2 += b
    y = np.ascontiguousarray(y2.reshape(n, oh * ow, o).transpose(0, 2, 1)).reshape(n, o, oh, ow)
    return y, (cols, wr, w.shape, x.shape, p)


def nhwc_backward(dy: np.ndarray, saved: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols, wr, wshape, (n, c, h, wd), p = saved
    o, _, k, _ = wshape
    oh, ow = cols.shape[1:3]
    dy2 = np.ascontiguousarray(dy.reshape(n, o, oh * ow).transpose(0, 2, 1)).reshape(-1, o)
    dw = np.matmul(dy2.T, cols.reshape(n * oh * ow, -1)).reshape(o, k, k, c).transpose(0, 3, 1, 2)
    dcols = np.matmul(dy2, wr).reshape(cols.shape)
    dxp = np.zeros((n, h + 2 * p, wd + 2 * p, c), dtype=dy.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, i:i + oh, j:j + ow, :] += dcols[:, :, :, i, j, :]
    dx = np.ascontiguousarray(dxp[:, p:p + h, p:p + wd, :].transpose(0, 3, 1, 2))
    return dx, np.ascontiguousarray(dw), dy.sum(axis=(0, 2, 3))


class _NoPool:
    """The channel-major candidate with the buffer pool switched off for the duration of a call."""

    def __enter__(self) -> None:
        self.limit = numpy_conv.buffer_pool.limit_bytes
        numpy_conv.buffer_pool.limit_bytes = 0
        numpy_conv.buffer_pool.clear()

    def __exit__(self, *exc: object) -> None:
        numpy_conv.buffer_pool.limit_bytes = self.limit


Forward = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, Any]]
Backward = Callable[[np.ndarray, Any], tuple[np.ndarray, np.ndarray, np.ndarray]]
CANDIDATES: dict[str, tuple[Forward, Backward, bool]] = {  # name -> (forward, backward, pool off)
    "chainer": (chainer_forward, chainer_backward, False),
    "channel-major": (cm_forward, cm_backward, False),
    "channel-major-nopool": (cm_forward, cm_backward, True),
    "per-sample": (ps_forward, ps_backward, False),
    "nhwc": (nhwc_forward, nhwc_backward, False),
}


def _inputs(layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    n, c, h, w, o, k, p = LAYERS[layer]
    rng = np.random.default_rng(0)
    oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    weight = rng.standard_normal((o, c, k, k), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    dy = rng.standard_normal((n, o, oh, ow), dtype=np.float32)
    return x, weight, b, dy, p


def check_agreement(layer: str) -> None:
    """Every candidate's y, dx, dW, db against channel-major's (float32, relative to the largest value)."""
    x, w, b, dy, p = _inputs(layer)
    y0, s0 = cm_forward(x, w, b, p)
    ref = (y0, *cm_backward(dy, s0))
    for name, (fwd, bwd, _) in CANDIDATES.items():
        y, s = fwd(x, w, b, p)
        for what, got, want in zip(("y", "dx", "dW", "db"), (y, *bwd(dy, s)), ref, strict=True):
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            if got.shape != want.shape or err > 1e-4:
                raise AssertionError(f"{name} on {layer}: {what} differs from channel-major ({err:.2e})")


def time_once(name: str, layer_inputs: tuple[Any, ...]) -> tuple[float, float]:
    """One forward and one backward of candidate ``name``: their wall times in seconds."""
    fwd, bwd, nopool = CANDIDATES[name]
    x, w, b, dy, p = layer_inputs
    ctx = _NoPool() if nopool else None
    if ctx:
        ctx.__enter__()
    try:
        t0 = time.perf_counter()
        y, saved = fwd(x, w, b, p)
        t1 = time.perf_counter()
        bwd(dy, saved)
        t2 = time.perf_counter()
        del y, saved  # the saved buffer goes back (or, without the pool, is freed) inside the candidate's time
        t3 = time.perf_counter()
    finally:
        if ctx:
            ctx.__exit__()
    return t1 - t0, t2 - t1 + (t3 - t2)


def run(threads: int, layers: list[str], rounds: int) -> dict[str, dict[str, list[tuple[float, float]]]]:
    from threadpoolctl import threadpool_limits

    names = list(CANDIDATES)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {lay: {nm: [] for nm in names} for lay in layers}
    with threadpool_limits(threads):
        inputs = {lay: _inputs(lay) for lay in layers}
        for lay in layers:  # warm-up: buffers, BLAS threads, the pool's shapes
            for nm in names:
                time_once(nm, inputs[lay])
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for lay in layers:
                for nm in order:
                    results[lay][nm].append(time_once(nm, inputs[lay]))
    return results


def table(results: dict[str, dict[str, list[tuple[float, float]]]], threads: int) -> str:
    lines = [f"BLAS threads: {threads}", "",
             "| layer (float32, batch 128 unless said) | layout | forward ms | backward ms | fwd+bwd ms | vs chainer |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for lay, per in results.items():
        base = [f + b for f, b in per["chainer"]]
        for nm, samples in per.items():
            tot = [f + b for f, b in samples]
            ratio = statistics.median(bt / t for bt, t in zip(base, tot, strict=True))
            lines.append(f"| {LAYER_TEXT[lay]} | {nm} | {statistics.median(f for f, _ in samples) * 1e3:.1f} | "
                         f"{statistics.median(b for _, b in samples) * 1e3:.1f} | "
                         f"{statistics.median(tot) * 1e3:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="BLAS thread counts (default 1 2)")
    ap.add_argument("--rounds", type=int, default=9, help="alternated rounds (default 9)")
    ap.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=list(LAYERS))
    args = ap.parse_args(argv)
    deepcore.get_backend("numpy")  # the allocator tuned as in training
    for lay in args.layers:
        check_agreement(lay)
    print(f"CPU: {sysinfo.cpu_model()}, {sysinfo.cpu_count()} cores; NumPy {np.__version__}; "
          f"BLAS: {sysinfo.describe_blas()}")
    print(f"{args.rounds} rounds, medians; every layout in this one process; forward + backward with dx.\n")
    for t in args.threads:
        load = os.getloadavg()[0]
        text = table(run(t, args.layers, args.rounds), t)
        # Other processes on the cores (the load average) slow a 2-thread BLAS most: say what there was.
        print(text.replace("\n", f" (1-minute load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)\n", 1))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
