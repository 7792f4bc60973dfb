"""GPU cases of the benchmark suite: ``pytest benchmarks/test_gpu_kernels.py -m gpu --benchmark-only``.

Every test carries the ``gpu`` marker and skips, with the reason, where its library has no GPU
(deepcore's CuPy backend unavailable, or PyTorch without CUDA). ``benchmarks/gpu_check.py`` runs
them on a GPU machine and prints a table from pytest-benchmark's JSON.

Cases, each for ``cupy`` (deepcore on its CuPy backend) and ``torch-cuda`` (PyTorch eager):

- ``copy``: a 2 GiB device-to-device copy (``cudaMemcpyAsync`` / ``Tensor.copy_``), bytes read plus
  bytes written: the bandwidth ceiling the other rows are compared with;
- ``softmax_ce``: loss and gradient, mean reduction, int64 labels, at 128x10, 8192x32768 and
  16384x131072 in float32 and bfloat16: deepcore's public ``losses.softmax_cross_entropy(...,
  validate=False)`` (the fused kernel; a training run checks its labels once per data set, not
  per step) against ``F.cross_entropy`` + ``backward()``;
- ``conv``: ``Conv2d(64, 64, 3, padding=1)`` forward + backward (dx, dW) on (128, 64, 32, 32)
  float32, and ``cnn_step``: one training step of the LeNet-like network ``deepcore train --model
  cnn`` builds for MNIST at batch 128 (both ``deepcore.bench`` workloads).

Timing follows the lent GPU machine's method: the device is synchronised before each clock read
(``synced_clock``, pytest-benchmark's timer for these tests) and a round is ``calls_per_round``
calls back to back, enough for 20 ms, so the stats are per call and the launches queue as they do
in training. A warm-up call compiles the kernels first. Inputs are random, never zeros; the large
shapes are many times the L2 cache, so no rotation of inputs is needed, and 128x10 is launch-bound.
Before timing, each softmax-CE result is checked once against a float64 reference on sampled rows
(gradient and per-row loss), its mean loss against the mean of the per-row losses, and the whole
gradient for non-finite values; a wrong result fails the test.

``extra_info``: ``case``, ``size``, ``dtype``, ``contender``, ``gpu`` (the device's name),
``bytes`` (the fewest bytes a call must move: softmax-CE logits read once, gradient written once,
labels; conv inputs and outputs once each), ``gb_per_s`` = bytes / median, ``flops`` and
``gflop_per_s`` where counted, ``calls_per_round``, ``check``, and library versions.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

CONTENDERS = ("cupy", "torch-cuda")
SCE_SHAPES = ((128, 10), (8192, 32768), (16384, 131072))
SCE_DTYPES = ("float32", "bfloat16")
ITEMSIZE = {"float32": 4, "bfloat16": 2}
COPY_BYTES = 2 << 30
#: Relative error allowed against the float64 reference (||out - ref|| / ||ref||).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
CHECK_ROWS = 64
ROUND_MIN_S = 0.02
#: Seconds of timing per test (the suite's DEEPCORE_BENCH_BUDGET; at least 5 rounds).
BUDGET_S = float(os.environ.get("DEEPCORE_BENCH_BUDGET", "1.0"))
#: Where the torch contender runs ("cuda"; tests/test_gpu_check_script.py runs these paths on "cpu").
DEVICE = "cuda"

_sync: list[Callable[[], None]] = [lambda: None]


def synced_clock() -> float:
    """The timer pytest-benchmark uses here: wait for the device, then read the host clock."""
    _sync[0]()
    return time.perf_counter()


def sce_bytes(n: int, c: int, dtype: str) -> int:
    """Logits read once, gradient written once, int64 labels read once."""
    return 2 * n * c * ITEMSIZE[dtype] + 8 * n


def conv_bytes(n: int, c: int, o: int, hw: int, k: int = 3, padding: int = 1) -> int:
    """float32 x, dy and W read once; y, dx and dW written once."""
    out = hw + 2 * padding - k + 1
    return 4 * (2 * n * c * hw * hw + 2 * n * o * out * out + 2 * o * c * k * k)


# ------------------------------------------------------------------ libraries
def _cupy() -> Any:
    import deepcore as dc

    status = dc.available_backends().get("cupy")
    if status is not True:
        pytest.skip(f"deepcore's CuPy backend unavailable: {status}")
    import cupy

    _sync[0] = cupy.cuda.runtime.deviceSynchronize
    return cupy


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError as exc:
        pytest.skip(f"PyTorch is not installed ({exc})")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    _sync[0] = torch.cuda.synchronize
    return torch


def _library(contender: str) -> Any:
    return _cupy() if contender == "cupy" else _torch_cuda()


def _gpu_name(contender: str) -> str:
    if contender == "cupy":
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    import torch

    return torch.cuda.get_device_name()


@pytest.fixture(autouse=True)
def _free_device_memory():
    """Each case's buffers (up to ~40 GiB at 16384x131072) go back to the device after it."""
    yield
    gc.collect()
    if "cupy" in sys.modules:
        try:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:  # no device: nothing was allocated
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time(benchmark: Any, bench_env: dict, fn: Callable[[], Any], contender: str, info: dict[str, Any]) -> None:
    """Time ``fn`` (which does not synchronise) in rounds of back-to-back calls; fill extra_info."""
    fn()  # warm-up: NVRTC / cuDNN / cuBLAS set-up stays out of the timing
    t0 = synced_clock()
    fn()
    one = max(synced_clock() - t0, 1e-7)
    per_round = max(1, math.ceil(ROUND_MIN_S / one))
    rounds = int(min(200, max(5, BUDGET_S // (per_round * one))))
    benchmark.group = f"{info['case']}[{info['size']}-{info['dtype']}]"
    benchmark.extra_info.update(info, contender=contender, gpu=_gpu_name(contender), calls_per_round=per_round,
                                versions={k: bench_env[k] for k in ("deepcore", "numpy", "torch", "cupy")
                                          if k in bench_env})
    benchmark.pedantic(fn, rounds=rounds, iterations=per_round, warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        if info.get("bytes"):
            benchmark.extra_info["gb_per_s"] = info["bytes"] / stats.median / 1e9
        if info.get("flops"):
            benchmark.extra_info["gflop_per_s"] = info["flops"] / stats.median / 1e9


# ------------------------------------------------------------------ copy: the ceiling
@pytest.mark.benchmark(timer=synced_clock)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_gpu_copy(benchmark, bench_env, contender):
    lib = _library(contender)
    n = COPY_BYTES // 4
    if contender == "cupy":
        src = lib.random.RandomState(7).standard_normal(n, dtype=lib.float32)
        dst = lib.empty_like(src)
        rt = lib.cuda.runtime

        def fn() -> None:
            rt.memcpyAsync(dst.data.ptr, src.data.ptr, COPY_BYTES, rt.memcpyDeviceToDevice,
                           lib.cuda.get_current_stream().ptr)
    else:
        src = lib.randn(n, device=DEVICE, generator=lib.Generator(device=DEVICE).manual_seed(7))
        dst = lib.empty_like(src)

        def fn() -> None:
            dst.copy_(src)
    fn()
    _sync[0]()
    assert bool((dst[:: 1 << 16] == src[:: 1 << 16]).all()), "the copy is wrong"
    _time(benchmark, bench_env, fn, contender,
          {"case": "copy", "size": f"{COPY_BYTES >> 30} GiB", "dtype": "float32", "bytes": 2 * COPY_BYTES})


# ------------------------------------------------------------------ softmax cross-entropy
def _sce_inputs(lib: Any, contender: str, n: int, c: int, dtype: str) -> tuple[Any, Any]:
    """N(0, 3^2) logits of ``dtype`` and uniform int64 labels, made on the device in row chunks."""
    chunk = max(1, (256 << 20) // (4 * c))
    if contender == "cupy":
        rs = lib.random.RandomState(1000 + n)
        if dtype == "bfloat16":
            import ml_dtypes

            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = np.dtype(dtype)
        try:
            x = lib.empty((n, c), dtype=dt)
            for r0 in range(0, n, chunk):
                part = rs.standard_normal((min(n, r0 + chunk) - r0, c), dtype=lib.float32)
                part *= 3.0
                x[r0:r0 + chunk] = part.astype(dt)
        except Exception as exc:  # bfloat16 needs CuPy >= 14 with ml_dtypes
            pytest.skip(f"CuPy cannot make {dtype} arrays here: {type(exc).__name__}: {exc}")
        y = rs.randint(0, c, size=n).astype(lib.int64)
        return x, y
    g = lib.Generator(device=DEVICE).manual_seed(1000 + n)
    dt = getattr(lib, dtype)
    x = lib.empty((n, c), dtype=dt, device=DEVICE)
    for r0 in range(0, n, chunk):
        x[r0:r0 + chunk] = (lib.randn((min(n, r0 + chunk) - r0, c), device=DEVICE, generator=g) * 3.0).to(dt)
    y = lib.randint(0, c, (n,), device=DEVICE, generator=g, dtype=lib.int64)
    return x.requires_grad_(True), y


def _host64(lib: Any, a: Any) -> np.ndarray:
    """A device array (CuPy or torch, any float dtype) as float64 NumPy."""
    if hasattr(a, "detach"):
        return a.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(lib.asnumpy(a)).astype(np.float64)


def _all_finite(lib: Any, a: Any) -> bool:
    if hasattr(a, "detach"):
        return bool(lib.isfinite(a).all())
    if a.dtype.itemsize == 2:  # bfloat16 / float16 by their exponent bits, which needs no float kernel
        bits = a.view(lib.uint16)
        mask = 0x7F80 if a.dtype.name == "bfloat16" else 0x7C00
        return not bool(((bits & mask) == mask).any())
    return bool(lib.isfinite(a).all())


def check_softmax_ce(xs: np.ndarray, ys: np.ndarray, n: int, grad_rows: np.ndarray, loss_rows: np.ndarray,
                     mean_loss: float, all_rows_mean: float) -> dict[str, float]:
    """Relative errors of sampled rows against float64: the gradient (mean reduction, so / n), the
    per-row loss, and the mean loss against the mean of every row's loss."""
    m = xs.max(axis=1, keepdims=True)
    e = np.exp(xs - m)
    se = e.sum(axis=1, keepdims=True)
    idx = np.arange(len(xs))
    ref_loss = (m[:, 0] + np.log(se[:, 0])) - xs[idx, ys]
    ref_grad = e / se
    ref_grad[idx, ys] -= 1.0
    ref_grad /= n
    return {"grad_rel_err": float(np.linalg.norm(grad_rows - ref_grad) / np.linalg.norm(ref_grad)),
            "loss_rel_err": float(np.linalg.norm(loss_rows - ref_loss) / np.linalg.norm(ref_loss)),
            "mean_rel_err": float(abs(mean_loss - all_rows_mean) / abs(all_rows_mean))}


def _sce_case(lib: Any, contender: str, n: int, c: int, dtype: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The timed call and its one-off check."""
    x, y = _sce_inputs(lib, contender, n, c, dtype)
    rows = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(n).integers(0, n, CHECK_ROWS)]))
    if contender == "cupy":
        import deepcore as dc

        def fn() -> Any:
            return dc.losses.softmax_cross_entropy(x, y, validate=False)

        loss, grad = fn()
        per_row = dc.losses.softmax_cross_entropy(x, y, reduction="none", validate=False)[0]
    else:
        F = lib.nn.functional

        def fn() -> Any:
            x.grad = None
            loss = F.cross_entropy(x, y)
            loss.backward()
            return loss

        loss = fn()
        grad = x.grad
        with lib.no_grad():
            per_row = F.cross_entropy(x, y, reduction="none")
    # Row by row (basic indexing: views, no gather kernel, which bfloat16 may lack) to the host.
    xs, gs = (np.stack([_host64(lib, a[int(r)]) for r in rows]) for a in (x, grad))
    ls = _host64(lib, per_row)
    labels = y.cpu().numpy() if hasattr(y, "cpu") else np.asarray(lib.asnumpy(y))
    finite = _all_finite(lib, grad)
    check = check_softmax_ce(xs, labels[rows], n, gs, ls[rows], float(_host64(lib, loss.reshape(1))[0]),
                             float(ls.mean()))
    check["rows_checked"] = len(rows)
    check["grad_finite"] = finite
    del loss, grad, per_row
    tol = TOLERANCE[dtype]
    bad = {k: v for k, v in check.items() if k.endswith("rel_err") and not v <= tol}
    assert finite and not bad, f"{contender} {n}x{c} {dtype}: wrong result {check} (tolerance {tol})"
    return fn, check


@pytest.mark.benchmark(timer=synced_clock)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", SCE_DTYPES)
@pytest.mark.parametrize("shape", SCE_SHAPES, ids=[f"{n}x{c}" for n, c in SCE_SHAPES])
def test_gpu_softmax_ce(benchmark, bench_env, shape, dtype, contender):
    lib = _library(contender)
    n, c = shape
    fn, check = _sce_case(lib, contender, n, c, dtype)
    _time(benchmark, bench_env, fn, contender,
          {"case": "softmax_ce", "size": f"{n}x{c}", "dtype": dtype, "bytes": sce_bytes(n, c, dtype),
           "reduction": "mean", "check": check})


# ------------------------------------------------------------------ convolution, the CNN step
def _bench_workload(contender: str, case: str, **params: Any) -> Any:
    lib = _library(contender)
    from deepcore import bench

    try:
        wl = bench.make_workload(case, contender, **params)
    except bench.NotApplicable as exc:
        pytest.skip(str(exc))
    except ValueError as exc:  # a deepcore.bench without this case
        pytest.skip(f"deepcore.bench: {exc}")
    info: dict[str, Any] = {k: v for k, v in wl.info.items() if k not in ("case", "contender", "device")}
    if contender == "torch-cuda":
        info["torch_cudnn_tf32"] = bool(lib.backends.cudnn.allow_tf32)
        info["torch_matmul_tf32"] = bool(lib.backends.cuda.matmul.allow_tf32)
    return wl, info


@pytest.mark.benchmark(timer=synced_clock)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_gpu_conv(benchmark, bench_env, contender):
    n, c, o, hw = 128, 64, 64, 32
    wl, info = _bench_workload(contender, "conv", n=n, c=c, o=o, hw=hw)
    _time(benchmark, bench_env, wl.fn, contender,
          {**info, "case": "conv", "size": f"{n}x{c}x{hw}x{hw}->{o}", "dtype": "float32",
           "bytes": conv_bytes(n, c, o, hw)})


@pytest.mark.benchmark(timer=synced_clock)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_gpu_lenet_step(benchmark, bench_env, contender):
    wl, info = _bench_workload(contender, "cnn_step", batch=128)
    _time(benchmark, bench_env, wl.fn, contender, {**info, "case": "cnn_step", "size": "lenet-b128",
                                                   "dtype": "float32"})
