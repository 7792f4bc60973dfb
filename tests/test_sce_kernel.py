"""The fused softmax cross-entropy kernel (kernels/softmax_cross_entropy.cu) through its host
wrapper, against the NumPy backend in float64.

Every test runs on the CPU emulator (tools/cuda_emulator: the .cu compiled by the host C++
compiler, each CUDA thread a fiber), so the kernel's indexing, reductions, barriers and
writes are checked on every machine; the same tests run on a real GPU through CuPy where
one is usable (``-m gpu``). The emulator's NumPy hands out poisoned buffers with guard zones
on both sides, so an element the kernel never writes, or one it writes out of bounds, fails.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend import cuda_kernels as ck
from tests.helpers import load_tool

try:
    import ml_dtypes
except ImportError:  # bfloat16 cases skip
    ml_dtypes = None


emulated = load_tool("tools/cuda_emulator/emulated.py")
_cupy = None
if dc.available_backends()["cupy"] is True:
    import cupy as _cupy
gpu_marks = [pytest.mark.gpu, pytest.mark.skipif(_cupy is None, reason="no usable CUDA device")]


# ------------------------------------------------------------------ runners
class PoisonedNumpy:
    """NumPy whose ``empty``/``empty_like`` return poison-filled views with guard zones around them.

    ``guard`` elements sit on each side; an odd count (for example 3) also
    shifts the buffer off 16-byte alignment, which sends the block kernel's
    stores down its scalar path.
    """

    def __init__(self, guard: int, poison: float = np.nan) -> None:
        self.guard = guard
        self.poison = poison
        self.allocations: list[tuple[np.ndarray, int, int]] = []

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=np.float64):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = int(np.prod(shape))
        buf = np.full(size + 2 * self.guard, self.poison, dtype=dtype)
        self.allocations.append((buf, self.guard, self.guard + size))
        return buf[self.guard:self.guard + size].reshape(shape)

    def empty_like(self, a):
        return self.empty(a.shape, a.dtype)

    def check_guards(self) -> None:
        for buf, lo, hi in self.allocations:
            guards = np.concatenate([buf[:lo], buf[hi:]]).astype(np.float64)
            same = np.isnan(guards) if np.isnan(self.poison) else guards == self.poison
            assert same.all(), f"the kernel wrote outside a {buf.dtype} buffer of {hi - lo} elements"


class Emulated:
    """The kernel on the CPU emulator, the host wrapper on NumPy.

    ``shared_memory_limit`` is the dynamic shared memory the wrapper may plan with: CUDA's
    portable 48 KiB by default; "optin" raises the on-chip kernels' attribute to the emulated
    device's opt-in limit (227 KiB, an H100's) as ``cuda_kernels._sce_function`` does on a GPU."""

    def __init__(self, module, guard: int = 64, poison: float = np.nan,
                 shared_memory_limit: int | str = ck.PORTABLE_SHARED_MEMORY) -> None:
        self.module = module
        self.xp = PoisonedNumpy(guard, poison)
        self.optin = shared_memory_limit == "optin"
        self.shared_memory_limit = (module.shared_memory_optin - 1024 if self.optin else shared_memory_limit)

    def get_function(self, name):
        kernel = self.module.get_function(name)
        if self.optin and (kernel.on_chip or kernel.cluster_blocks > 1):
            kernel.max_dynamic_shared_size_bytes = self.module.shared_memory_optin
        return kernel

    def asarray(self, a):
        return np.array(a, copy=True)

    def fused(self, logits, labels, **kw):
        kw.setdefault("shared_memory_limit", self.shared_memory_limit)
        loss, grad = ck.launch_softmax_cross_entropy(self.xp, self.get_function, logits, labels, **kw)
        self.xp.check_guards()
        return np.asarray(loss), grad

    def to_numpy(self, a):
        return np.asarray(a)


class OnGpu:
    """The kernel on the GPU through CuPy; the memory pool is poisoned before each call."""

    def __init__(self, poison: float = np.nan) -> None:
        self.xp = _cupy
        self.poison = poison

    def asarray(self, a):
        try:
            return _cupy.asarray(a)
        except (TypeError, ValueError) as exc:  # bfloat16 needs CuPy >= 14 with ml_dtypes
            pytest.skip(f"CuPy cannot hold {a.dtype}: {exc}")

    def fused(self, logits, labels, **kw):
        # Freed blocks are handed out again by the pool: fill some with poison first.
        for dtype in (logits.dtype, np.float32):
            _cupy.full(logits.size + 1024, self.poison, dtype=dtype)
        if "shared_memory_limit" in kw:  # a reduced threshold, to reach sce_two_pass with short rows
            return ck.launch_softmax_cross_entropy(_cupy, ck._sce_function, logits, labels, ticket=ck._ticket(), **kw)
        return ck.fused_softmax_cross_entropy(logits, labels, **kw)

    def to_numpy(self, a):
        return _cupy.asnumpy(a)


@pytest.fixture(scope="session")
def emulator_lib(tmp_path_factory):
    if emulated.find_compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    return emulated.build(tmp_path_factory.mktemp("cuda_emulator"))


@pytest.fixture
def runner(request):
    kind = request.param
    if kind == "gpu":
        return OnGpu()  # needs no C++ compiler: GPU machines may have none
    guard = 3 if kind == "emulated-unaligned" else 64
    limit = "optin" if kind == "emulated-optin" else ck.PORTABLE_SHARED_MEMORY
    return Emulated(emulated.EmulatedModule(request.getfixturevalue("emulator_lib")), guard=guard,
                    shared_memory_limit=limit)


def _runners(emulated_kinds=("emulated",)):
    return [pytest.param(k, id=k) for k in emulated_kinds] + [pytest.param("gpu", id="gpu", marks=gpu_marks)]


def _cases(emulated_shapes, gpu_shapes):
    """(runner, shape) pairs: the emulator takes seconds per thousand rows, a GPU does not."""
    ids = lambda s: f"{s[0]}x{s[1]}"  # noqa: E731
    return ([pytest.param("emulated", s, id=f"emulated-{ids(s)}") for s in emulated_shapes]
            + [pytest.param("gpu", s, id=f"gpu-{ids(s)}", marks=gpu_marks) for s in gpu_shapes])


# ------------------------------------------------------------------ helpers
DTYPES = [
    "float32",
    "float16",
    pytest.param("bfloat16", marks=pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 needs ml_dtypes")),
]
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def _dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _reference(s, y, **kw):
    return dc.get_backend("numpy").softmax_cross_entropy(np.asarray(s).astype(np.float64), y, **kw)


def _problem(shape, dtype, options, seed=None):
    n, c = shape
    rng = np.random.default_rng(n * 7 + c if seed is None else seed)
    s = (rng.standard_normal((n, c)) * 3).astype(_dtype(dtype))
    y = rng.integers(0, c, n)
    kw = dict(options)
    if kw.get("ignore_index") is not None:
        y[::3] = kw["ignore_index"]
    if kw.pop("class_weights", None):
        kw["class_weights"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return s, y, kw


def _run(runner, s, y, kw, **extra):
    gkw = dict(kw)
    if "class_weights" in gkw:
        gkw["class_weights"] = runner.asarray(gkw["class_weights"])
    loss, grad = runner.fused(runner.asarray(s), runner.asarray(y), **gkw, **extra)
    return runner.to_numpy(loss), runner.to_numpy(grad)


def _assert_close(loss, grad, ref_loss, ref_grad, dtype):
    tol = TOL[dtype]
    assert grad.dtype == _dtype(dtype) and grad.shape == ref_grad.shape
    np.testing.assert_allclose(loss.astype(np.float64), ref_loss, rtol=tol, atol=tol)
    scale = np.abs(ref_grad).max() or 1.0
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=0, atol=tol * scale)


OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.1}, id="smooth"),
    pytest.param({"ignore_index": -100}, id="ignore"),
    pytest.param({"class_weights": True, "label_smoothing": 0.05, "ignore_index": 2}, id="weights_smooth_ignore"),
]


# -------------------------------------------------------------- correctness
# sce_on_chip: sub-warp rows (C = 10, 7), rows over several warps (1000, 1025: partial tiles,
# several blocks), a block per row (4099: odd, so the tile's scalar tail). sce_two_pass: a
# row past the portable 48 KiB of shared memory (32000 float32).
@pytest.mark.parametrize(("runner", "shape"), _cases(
    [(1, 10), (3, 7), (33, 1000), (9, 1025), (5, 4099), (2, 32000)],
    [(1, 10), (3, 7), (257, 1000), (64, 1025), (5, 4099), (64, 32000)],
), indirect=["runner"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_numpy_float64(runner, shape, dtype, options, reduction):
    s, y, kw = _problem(shape, dtype, options)
    loss, grad = _run(runner, s, y, kw, reduction=reduction)
    ref_loss, ref_grad = _reference(s, y, reduction=reduction, **kw)
    _assert_close(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize(("runner", "shape"), _cases([(1, 128256)], [(4096, 32000), (1000, 128256)]),
                         indirect=["runner"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_numpy_float64_large_vocabulary(runner, shape, dtype):
    s, y, kw = _problem(shape, dtype, {"ignore_index": -100, "label_smoothing": 0.1})
    y[-1] = shape[1] - 1  # the last class: the end of the scalar tail
    loss, grad = _run(runner, s, y, kw)
    _assert_close(loss, grad, *_reference(s, y, **kw), dtype)


@pytest.mark.parametrize("runner", _runners(("emulated", "emulated-unaligned")), indirect=True)
@pytest.mark.parametrize("c", [10, 33, 1025, 4099, 25000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
def test_rows_off_16_byte_alignment(runner, c, dtype, offset):
    """Logits starting ``offset`` elements into an allocation: the vector loop's head and tail."""
    s, y, kw = _problem((4, c), dtype, {"label_smoothing": 0.1, "class_weights": True}, seed=offset)
    base = runner.asarray(np.concatenate([np.zeros(offset, s.dtype), s.ravel()]))
    logits = base[offset:].reshape(s.shape)
    gkw = dict(kw, class_weights=runner.asarray(kw["class_weights"]))
    loss, grad = runner.fused(logits, runner.asarray(y), **gkw)
    _assert_close(runner.to_numpy(loss), runner.to_numpy(grad), *_reference(s, y, **kw), dtype)


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("label_dtype", ["int32", "int64", "uint8", "int16", "uint64"])
@pytest.mark.parametrize("c", [10, 2000])
def test_label_dtypes(runner, label_dtype, c):
    s = np.random.default_rng(1).standard_normal((6, c)).astype(np.float32)
    y = (np.arange(6) * 37 % min(c, 250)).astype(label_dtype)
    loss, grad = _run(runner, s, y, {}, reduction="none")
    _assert_close(loss, grad, *_reference(s, y.astype(np.int64), reduction="none"), "float32")


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("c", [10, 5000])
def test_strided_logits_are_read_and_left_unchanged(runner, c):
    """A transposed (non-contiguous) view is copied for the kernel; the caller's logits are never written."""
    rng = np.random.default_rng(c)
    s = rng.standard_normal((c, 33)).astype(np.float32)
    y = rng.integers(0, c, 33)
    logits = runner.asarray(s).T
    loss, grad = runner.fused(logits, runner.asarray(y))
    np.testing.assert_array_equal(runner.to_numpy(logits), s.T)
    _assert_close(runner.to_numpy(loss), runner.to_numpy(grad), *_reference(s.T, y), "float32")


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("c", [10, 4000])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_extreme_logits(runner, c, smoothing):
    s = np.zeros((5, c), dtype=np.float32)
    s[0, 0], s[1, 1], s[2, :] = 1e4, -1e4, -1e4
    s[3, 1:] = -np.inf
    s[4, ::2] = -np.inf
    y = np.array([1, 0, 2, 0, 1])
    kw = {"label_smoothing": smoothing}
    loss, grad = _run(runner, s, y, kw, reduction="none")
    ref_loss, ref_grad = _reference(s, y, reduction="none", **kw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("c", [10, 4000])
def test_labels_out_of_range_give_nan_rows_and_nan_mean(runner, c):
    """Unchecked bad labels (``validate=False`` upstream) must poison their rows, never read out of bounds."""
    # NaN is the expected value here, so poison with something else.
    if isinstance(runner, Emulated):
        runner.xp.poison = 7.0
    else:
        runner.poison = 7.0
    s = np.random.default_rng(0).standard_normal((4, c)).astype(np.float32)
    y = np.array([1, c, -1, 0])
    loss, grad = _run(runner, s, y, {}, reduction="none")
    assert np.isfinite(loss[[0, 3]]).all() and np.isnan(loss[[1, 2]]).all()
    assert np.isfinite(grad[[0, 3]]).all() and np.isnan(grad[[1, 2]]).all()
    mean, _ = _run(runner, s, y, {})
    assert np.isnan(mean)


@pytest.mark.parametrize("runner", _runners(), indirect=True)
def test_every_row_ignored_mean_is_nan_and_gradient_zero(runner):
    """As in PyTorch: the mean over no rows is 0/0; the gradient is zero everywhere."""
    s = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    y = np.full(3, -100)
    loss, grad = _run(runner, s, y, {"ignore_index": -100})
    assert np.isnan(loss)
    assert (grad == 0).all()
    total, _ = _run(runner, s, y, {"ignore_index": -100}, reduction="sum")
    assert total == 0


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(runner, reduction):
    s = np.zeros((0, 10), np.float32)
    y = np.zeros(0, np.int64)
    loss, grad = _run(runner, s, y, {}, reduction=reduction)
    ref_loss, ref_grad = _reference(s, y, reduction=reduction)
    assert grad.shape == (0, 10) and loss.shape == np.shape(ref_loss)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref_loss))


@pytest.mark.parametrize("runner", _runners(), indirect=True)
def test_bad_arguments_are_refused_before_launch(runner):
    s, y = runner.asarray(np.zeros((2, 3), np.float32)), runner.asarray(np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="reduction"):
        runner.fused(s, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        runner.fused(s, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        runner.fused(s, runner.asarray(np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match=r"class_weights must have shape \(3,\)"):
        runner.fused(s, y, class_weights=runner.asarray(np.ones(4, np.float32)))
    with pytest.raises(TypeError, match="supports"):
        runner.fused(runner.asarray(np.zeros((2, 3), np.float64)), y)


# ------------------------------------------------------- emulator-only checks
@pytest.fixture
def lib(emulator_lib):
    return emulator_lib


_CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "int32": "int",
           "int64": "long long"}
ORDERS = [pytest.param("forward", 0, id="forward"), pytest.param("reverse", 0, id="reverse"),
          pytest.param("shuffled", 1, id="shuffled1"), pytest.param("shuffled", 2, id="shuffled2")]


def _plan(kernel, shape, dtype=np.float32):
    """The wrapper's launch plan for ``shape``, forced onto ``kernel``."""
    limit = ck.PORTABLE_SHARED_MEMORY if kernel == "sce_on_chip" else 0
    plan = ck.plan_softmax_cross_entropy(*shape, np.dtype(dtype).itemsize, reduction="none",
                                         shared_memory_limit=limit)
    assert plan.kernel == kernel, plan
    return plan


def _direct(module, kernel, s, y, grid, *, smoothing=0.0, weights=None, grad=None, threads=None, xp=np):
    """Launch one instance directly with a chosen grid (the grid-stride loops the wrapper rarely
    takes), block size, and ``grad`` buffer (``grad=s``: the aliased launch the wrapper never makes),
    reduction "none". ``module`` is an EmulatedModule with NumPy arrays, or the NVRTC module with
    ``xp=cupy``."""
    n, c = s.shape
    plan = _plan(kernel, (n, c), s.dtype)
    grad = xp.full_like(s, np.nan) if grad is None else grad
    loss_row = xp.full(n, np.nan, s.dtype)
    null = np.uint64(0)
    args = (s, y, null if weights is None else weights, grad, loss_row, null, null, np.int64(n), np.int32(c),
            np.int64(-100), np.float32(smoothing), np.float32(1), np.int32(0))
    if kernel == "sce_on_chip":
        args += (np.int32(plan.threads_per_row),)
    module.get_function(f"{kernel}<{_CTYPES[s.dtype.name]}, {_CTYPES[y.dtype.name]}>")(
        (grid,), (threads or plan.threads,), args, shared_mem=plan.shared_bytes)
    return loss_row, grad


@pytest.mark.parametrize(("kernel", "c"), [("sce_on_chip", 10), ("sce_on_chip", 1000), ("sce_on_chip", 3001),
                                           ("sce_two_pass", 1025), ("sce_two_pass", 3001)])
@pytest.mark.parametrize("grid", [1, 2, 3])
def test_grid_stride_loops_cover_every_row(lib, kernel, c, grid):
    rng = np.random.default_rng(c + grid)
    n = 19
    s = rng.standard_normal((n, c)).astype(np.float32)
    y = rng.integers(0, c, n)
    y[4] = -100
    loss_row, grad = _direct(emulated.EmulatedModule(lib), kernel, s, y, grid, smoothing=0.1)
    ref_loss, ref_grad = _reference(s, y, reduction="none", ignore_index=-100, label_smoothing=0.1)
    np.testing.assert_allclose(loss_row, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize(("shape", "options", "reduction", "limit"), [
    ((600, 10), {"label_smoothing": 0.1, "class_weights": True, "ignore_index": 2}, "mean", None),
    ((37, 700), {"label_smoothing": 0.1, "class_weights": True}, "none", None),
    ((6, 5003), {"label_smoothing": 0.1, "class_weights": True}, "sum", None),
    ((6, 5003), {}, "none", 0),
])
def test_result_does_not_depend_on_thread_order(lib, shape, options, reduction, limit):
    """Running each block's threads forward, backward and shuffled between barriers gives identical bits
    (blocks run in reverse order too), the in-kernel mean and the last block's total included."""
    s, y, kw = _problem(shape, "float32", options)
    if limit is not None:
        kw["shared_memory_limit"] = limit
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2)):
        runner = Emulated(emulated.EmulatedModule(lib, order=order, seed=seed))
        results.append(_run(runner, s, y, kw, reduction=reduction))
    for loss, grad in results[1:]:
        np.testing.assert_array_equal(loss, results[0][0])
        np.testing.assert_array_equal(grad, results[0][1])


# (kernel, shape): sce_on_chip with rows of 16 lanes (32 per tile, 2 tiles per block) and of 2 warps
# (8 per tile); sce_two_pass with 2 rows per grid stride.
ALIASING_CASES = [pytest.param("sce_on_chip", (77, 100), id="on_chip-subwarp"),
                  pytest.param("sce_on_chip", (29, 300), id="on_chip-warps"),
                  pytest.param("sce_two_pass", (5, 1501), id="two_pass")]


def _aliasing_problem(shape):
    s, y, kw = _problem(shape, "float32", {"label_smoothing": 0.1, "class_weights": True, "ignore_index": -100})
    y[1] = shape[1]  # out of range: a NaN row
    return s, y, kw


def _out_of_place_and_aliased(module, kernel, s, y, kw, xp=np):
    """(loss, grad) as NumPy arrays of an out-of-place launch, and of one with grad = logits (one buffer)."""
    to_numpy = getattr(xp, "asnumpy", np.asarray)
    s, y, weights = (xp.asarray(a) for a in (s, y, kw["class_weights"]))
    launch = functools.partial(_direct, module, kernel, y=y, grid=2, smoothing=kw["label_smoothing"],
                               weights=weights, xp=xp)
    out = launch(s)
    buf = s.copy()
    aliased = launch(buf, grad=buf)
    assert aliased[1] is buf
    return [tuple(to_numpy(a) for a in result) for result in (out, aliased)]


def _assert_close_with_nan_rows(loss, grad, ref_loss, ref_grad):
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)  # NaN where the reference has NaN
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


def _same(a, b):
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("kernel", "shape"), ALIASING_CASES)
@pytest.mark.parametrize("shuffles", ["meet", "unordered"])
@pytest.mark.parametrize(("order", "seed"), ORDERS)
def test_grad_may_be_the_logits_buffer(lib, kernel, shape, shuffles, order, seed):
    """The kernels stay alias-safe (a caller whose logits are dead after the loss may pass one buffer as
    both): every element is read before the row's barrier and rewritten only by the thread that reads it
    after. Shown in every thread order, with shuffles ordering memory and, as on a GPU, not."""
    s, y, kw = _aliasing_problem(shape)
    module = emulated.EmulatedModule(lib, order=order, seed=seed, shuffles=shuffles)
    out, aliased = _out_of_place_and_aliased(module, kernel, s, y, kw)
    assert _same(aliased, out)
    _assert_close_with_nan_rows(*out, *_reference(s, y, reduction="none", **kw))


@pytest.mark.parametrize(("kernel", "shape"), ALIASING_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(_cupy is None, reason="no usable CUDA device")
def test_grad_may_be_the_logits_buffer_on_gpu(kernel, shape):
    s, y, kw = _aliasing_problem(shape)
    out, aliased = _out_of_place_and_aliased(SimpleNamespace(get_function=ck._sce_function), kernel, s, y, kw,
                                             xp=_cupy)
    assert _same(aliased, out)
    _assert_close_with_nan_rows(*out, *_reference(s, y, reduction="none", **kw))


def test_unordered_shuffles_expose_a_missing_syncwarp(lib, tmp_path):
    """On a GPU a shuffle orders no memory: sce_on_chip's __syncwarp() between a sub-warp row's first
    lane reading s_y from the tile and the row's other lanes overwriting the tile with the gradient is
    what does. Without it the loss goes wrong (in place or not) once shuffles order nothing and a lane
    runs to its writes before the first lane reads s_y; with shuffles that meet (the emulator's
    default), the bug does not show."""
    source = ck.kernel_source(ck.SCE_SOURCE)
    assert source.count("__syncwarp();") == 1  # sce_on_chip's, the one removed below
    mutant = _mutant(tmp_path, r"\n\s*__syncwarp\(\);", "")
    s, y, kw = _aliasing_problem((77, 100))
    good = _out_of_place_and_aliased(emulated.EmulatedModule(lib), "sce_on_chip", s, y, kw)[0]
    for module in (mutant, emulated.EmulatedModule(lib)):
        module.shuffles = "meet"
        for module.order, module.seed in (p.values for p in ORDERS):
            assert all(_same(r, good) for r in _out_of_place_and_aliased(module, "sce_on_chip", s, y, kw))
    mutant.shuffles = "unordered"
    caught = []
    for mutant.order, mutant.seed in (p.values for p in ORDERS):
        results = _out_of_place_and_aliased(mutant, "sce_on_chip", s, y, kw)
        caught.append(not all(_same(r, good) for r in results))
    assert caught == [False, True, True, True]  # forward order runs lane 0 first: s_y is read in time


def test_emulator_builds_every_instance_the_wrapper_launches(lib):
    assert set(emulated.EmulatedModule(lib).name_expressions) == set(ck.SCE_NAME_EXPRESSIONS)


def test_emulator_is_stricter_than_cupy_about_arguments(lib):
    module = emulated.EmulatedModule(lib, shared_memory_optin=100 * 1024)
    kernel = module.get_function("sce_on_chip<float, long long>")
    s, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    out = (np.empty_like(s), np.empty(2, np.float32), np.uint64(0), np.uint64(0))
    tail = (np.int64(-1), np.float32(0), np.float32(1), np.int32(0), np.int32(1))

    def launch(*args, block=512, shared_mem=4096, kernel=kernel):
        kernel((1,), (block,), args, shared_mem=shared_mem)

    launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail)  # as the wrapper would
    with pytest.raises(TypeError, match="labels must be int64"):
        launch(s, y.astype(np.int32), np.uint64(0), *out, np.int64(2), np.int32(3), *tail)
    with pytest.raises(TypeError, match="n_classes must be a int32 scalar"):
        launch(s, y, np.uint64(0), *out, np.int64(2), 3, *tail)
    with pytest.raises(TypeError, match="grad must be an array"):  # only the optional pointers take a null
        launch(s, y, np.uint64(0), np.uint64(0), *out[1:], np.int64(2), np.int32(3), *tail)
    with pytest.raises(TypeError, match="takes 14 arguments"):
        launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail[:-1])
    with pytest.raises(RuntimeError, match="block size"):
        launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail, block=100)
    # More than 48 KiB of dynamic shared memory needs the kernel's opt-in, within the device's limit.
    with pytest.raises(RuntimeError, match="exceed the kernel's max_dynamic_shared_size_bytes of 49152"):
        launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail, shared_mem=49153)
    with pytest.raises(RuntimeError, match="opt-in limit"):
        kernel.max_dynamic_shared_size_bytes = 100 * 1024 + 1
    kernel.max_dynamic_shared_size_bytes = 100 * 1024
    launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail, shared_mem=100 * 1024)
    with pytest.raises(RuntimeError, match="uses dynamic shared memory but the launch gave it none"):
        launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail, shared_mem=0)
    with pytest.raises(ValueError, match="reach past the grid"):
        launch(s, y, np.uint64(0), *out, np.int64(2), np.int32(3), *tail,
               kernel=emulated.EmulatedModule(lib, blocks=(0, 2)).get_function(kernel.name))


# The emulator must be able to fail: plant bugs in a copy of the kernel and watch it notice.
def _mutant_lib(tmp_path, pattern, replacement, count=1):
    source = ck.kernel_source(ck.SCE_SOURCE)
    mutated, n = re.subn(pattern, replacement, source, count=count)
    assert n == count, f"mutation {pattern!r} did not apply"
    path = tmp_path / "mutant.cu"
    path.write_text(mutated)
    return emulated.build(tmp_path, source=path, optimize=False)


def _mutant(tmp_path, pattern, replacement, count=1):
    return emulated.EmulatedModule(_mutant_lib(tmp_path, pattern, replacement, count))


# The mutants of sce_two_pass run with shared_memory_limit=0 (TWO_PASS), which sends every row there.
TWO_PASS = 0


def test_emulator_catches_a_missing_barrier(tmp_path):
    # Drop the barrier after warp 0 publishes the row's statistics: other warps read stale ones.
    module = _mutant(tmp_path, r"(row_stats\[2\] = t\.ws;\s*\}\s*\})\s*__syncthreads\(\);", r"\1")
    s, y, kw = _problem((4, 3000), "float32", {})
    loss, grad = _run(Emulated(module, shared_memory_limit=TWO_PASS), s, y, kw, reduction="none")
    ref_loss, ref_grad = _reference(s, y, reduction="none")
    assert not np.allclose(grad, ref_grad, atol=1e-6)


def test_emulator_catches_a_skipped_element(tmp_path):
    # The tail loop stops one short: the poisoned buffer shows the unwritten element.
    module = _mutant(tmp_path, r"for \(int k = tail \+ tid; k < n_classes; k \+= nthreads\) \{\n(\s*)const float wk",
                     r"for (int k = tail + tid; k < n_classes - 1; k += nthreads) {\n\1const float wk")
    s, y, kw = _problem((3, 3001), "float32", {})
    _, grad = _run(Emulated(module, shared_memory_limit=TWO_PASS), s, y, kw)
    assert np.isnan(grad[:, -1]).all() and not np.isnan(grad[:, :-1]).any()


def test_emulator_catches_a_tile_element_never_loaded(tmp_path):
    # sce_on_chip's tile tail stops one short: that element stays the emulator's poison (NaN) in
    # shared memory, and its row's loss and gradient turn NaN.
    module = _mutant(tmp_path, r"for \(int e = tail \+ tid; e < n_el; e \+= nthreads\) tile\[mis \+ e\] = x\[e\];",
                     "for (int e = tail + tid; e < n_el - 1; e += nthreads) tile[mis + e] = x[e];")
    s, y, kw = _problem((5, 101), "float32", {})  # one tile of 505 elements: its last is the tail
    loss, grad = _run(Emulated(module), s, y, kw, reduction="none")
    assert np.isnan(loss[-1]) and not np.isnan(loss[:-1]).any()
    assert np.isnan(loss[-1]) and np.isnan(grad[-1]).all() and not np.isnan(grad[:-1]).any()


def test_thread_order_exposes_a_store_before_the_tile_barrier(tmp_path):
    # Without the barrier between writing the gradient into the tile and storing the tile, a thread
    # stores elements other threads have not rewritten yet: the logits themselves leak out.
    module = _mutant(tmp_path, r"\n\s*__syncthreads\(\);(\n\n\s*// ---- store)", r"\1")
    s, y, kw = _problem((3, 3000), "float32", {})
    ref_loss, ref_grad = _reference(s, y, reduction="none")
    results = []
    for order in ("forward", "reverse"):
        module.order = order
        results.append(_run(Emulated(module), s, y, kw, reduction="none")[1])
    assert not all(np.allclose(grad, ref_grad, atol=1e-6) for grad in results)


def test_thread_order_exposes_a_read_before_the_barrier(tmp_path):
    # Without the first block barrier, warp 0 may read another warp's partial statistics
    # before that warp has stored them: forward and reverse order then disagree.
    module = _mutant(tmp_path, r"(warp_stats\[3\]\[warp\] = st\.ws;\s*\}\s*//[^\n]*)\s*__syncthreads\(\);", r"\1")
    s, y, kw = _problem((3, 3000), "float32", {})
    forward = _run(Emulated(module, shared_memory_limit=TWO_PASS), s, y, kw, reduction="none")
    module.order = "reverse"
    reverse = _run(Emulated(module, shared_memory_limit=TWO_PASS), s, y, kw, reduction="none")
    assert not np.array_equal(forward[1], reverse[1])


def test_emulator_reports_a_barrier_only_some_threads_reach(tmp_path):
    module = _mutant(tmp_path, r"if \(warp == 0\) \{", "if (warp == 0) {\n            __syncthreads();")
    s, y, kw = _problem((2, 3000), "float32", {})
    with pytest.raises(RuntimeError, match="deadlock"):
        _run(Emulated(module, shared_memory_limit=TWO_PASS), s, y, kw)


@pytest.mark.parametrize(("kernel", "c"), [("sce_on_chip", 10), ("sce_two_pass", 2000)])
def test_host_launch_shapes_match_the_kernels_launch_bounds(lib, kernel, c):
    """The wrapper's block size is the kernels' __launch_bounds__, which the emulator enforces as a GPU
    does: a block of exactly SCE_THREADS runs, one warp more is refused."""
    threads = ck.SCE_THREADS
    s, y, _ = _problem((3, c), "float32", {})
    module = emulated.EmulatedModule(lib)
    loss_row, grad = _direct(module, kernel, s, y, 1, threads=threads)
    _assert_close(loss_row, grad, *_reference(s, y, reduction="none"), "float32")
    with pytest.raises(RuntimeError, match=rf"block of {threads + 32} threads exceeds its __launch_bounds__ of "
                                           rf"{threads} \("):
        _direct(module, kernel, s, y, 1, threads=threads + 32)
    # And the wrapper launches exactly that size.
    Emulated(module, shared_memory_limit=TWO_PASS if kernel == "sce_two_pass" else ck.PORTABLE_SHARED_MEMORY
             ).fused(s, y)
    assert module.launches[-1][0].startswith(kernel) and module.launches[-1][2] == (threads,)


class _SparseGradNumpy:
    """NumPy whose ``empty_like(logits)`` is a given (memory-mapped) gradient buffer and whose
    ``empty`` is zeroed (the rows the emulator skips must not hold garbage the wrapper then casts)."""

    def __init__(self, grad):
        self.grad = grad

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=np.float64):
        return np.zeros(shape, dtype)

    def empty_like(self, a):
        assert a.shape == self.grad.shape and a.dtype == self.grad.dtype
        return self.grad


def _data_extents(path):
    """(start, end) byte ranges of ``path`` that hold data (SEEK_DATA / SEEK_HOLE), or None where the
    file system does not report holes."""
    if not hasattr(os, "SEEK_DATA"):
        return None
    extents = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, pos))
    return extents


def _covered(extents, allowed, page=4096):
    """Every data extent lies inside one of the ``allowed`` byte ranges, widened to whole pages."""
    wide = [(lo // page * page, -(-hi // page) * page) for lo, hi in allowed]
    return all(any(a <= lo and hi <= b for a, b in wide) for lo, hi in extents)


def _check_rows_past_two_to_the_31_elements(lib, tmp_path, kernel, c):
    """Rows whose first element lies past 2**31 and past 2**32 elements, in float16 logits and gradient
    that are sparse memory-mapped files of 12 GiB each (a page takes disk and memory only once touched).
    The wrapper launches its whole grid; the emulator runs only the blocks of the rows under test. A row
    offset computed in 32 bits lands 2**32 elements early, which for every row tested is inside the file
    (a 2**31-element guard precedes each buffer): it would show as a wrong loss (zeros read there) and as
    writes there, and nothing but the rows under test may be written anywhere in the gradient's file."""
    if sys.maxsize < 2**40:
        pytest.skip("needs a 64-bit address space")
    per_block = _plan(kernel, (1, c), np.float16).rows_per_tile  # "none": one tile per block
    n_rows = (1 << 32) // c + per_block  # the last block's rows start at 2**32 elements
    n_blocks = n_rows // per_block
    # A block whose rows start just past 2**31 elements, and the last block (past 2**32).
    blocks = ((1 << 31) // c // per_block + 1, n_blocks - 1)
    guard = 1 << 31
    item = np.dtype(np.float16).itemsize
    paths = [tmp_path / "logits.f16", tmp_path / "grad.f16"]
    try:
        files = [np.memmap(path, np.float16, "w+", shape=(guard + n_rows * c,)) for path in paths]
        if any(os.stat(path).st_blocks * 512 > 1 << 26 for path in paths):
            pytest.skip(f"{tmp_path} has no sparse files")
        extents = _data_extents(paths[1])
        reports_holes = bool(extents) and extents[0][0] > 0  # else every byte counts as data
        logits, grad = (f[guard:].reshape(n_rows, c) for f in files)
        rng = np.random.default_rng(c)
        weights = rng.uniform(0.5, 2.0, c).astype(np.float32)
        labels = np.zeros(n_rows, np.int64)
        for block in blocks:
            rows = slice(block * per_block, (block + 1) * per_block)
            assert rows.start * c > 2**31
            logits[rows] = (rng.standard_normal((per_block, c)) * 3).astype(np.float16)
            labels[rows] = rng.integers(0, c, per_block)
            labels[rows.stop - 1] = c - 1  # the end of the scalar tail
            module = emulated.EmulatedModule(lib, blocks=(block, block + 1))
            limit = ck.PORTABLE_SHARED_MEMORY if kernel == "sce_on_chip" else TWO_PASS
            loss, _ = ck.launch_softmax_cross_entropy(_SparseGradNumpy(grad), module.get_function, logits, labels,
                                                      class_weights=weights, label_smoothing=0.1, reduction="none",
                                                      shared_memory_limit=limit)
            plan = _plan(kernel, (n_rows, c), np.float16)
            assert module.launches == [(f"{kernel}<__half, long long>", (n_blocks,), (ck.SCE_THREADS,),
                                        plan.shared_bytes)]
            ref_loss, ref_grad = _reference(logits[rows], labels[rows], class_weights=weights, label_smoothing=0.1,
                                            reduction="none")
            _assert_close(loss[rows].astype(np.float32), np.asarray(grad[rows]), ref_loss, ref_grad, "float16")
            wrapped = guard + rows.start * c - (1 << 32)  # where 32-bit offsets would put the rows, in the file
            assert not files[1][wrapped:wrapped + per_block * c].any()
        for f in files:
            f.flush()
        if reports_holes:
            allowed = [((guard + b * per_block * c) * item, (guard + (b + 1) * per_block * c) * item) for b in blocks]
            end = (guard + n_rows * c) * item
            allowed.append((end - 1, end))  # numpy creates the file by writing its last byte
            assert _covered(_data_extents(paths[1]), allowed)
    finally:
        files = logits = grad = None
        for path in paths:
            path.unlink(missing_ok=True)


@pytest.mark.parametrize(("kernel", "c"), [("sce_on_chip", 1024), ("sce_two_pass", 1 << 16)])
def test_rows_above_two_to_the_31_elements_use_64_bit_offsets(lib, tmp_path, kernel, c):
    _check_rows_past_two_to_the_31_elements(lib, tmp_path, kernel, c)


def test_rows_above_two_to_the_31_elements_catch_32_bit_offsets(tmp_path):
    # Row offsets wrapped to 32 bits (unsigned, so defined behaviour) in both kernels.
    lib = _mutant_lib(tmp_path, r"(row0?) \* static_cast<long long>\(n_classes\)",
                      r"static_cast<long long>(static_cast<unsigned>(\1) * static_cast<unsigned>(n_classes))", count=2)
    (tmp_path / "data").mkdir()
    with pytest.raises(AssertionError):
        _check_rows_past_two_to_the_31_elements(lib, tmp_path / "data", "sce_on_chip", 1024)


def test_cupy_path_uses_the_same_wrapper(monkeypatch):
    """fused_softmax_cross_entropy is launch_softmax_cross_entropy with cupy and the NVRTC module."""
    calls = []
    fake_cupy = SimpleNamespace()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(ck, "launch_softmax_cross_entropy", lambda *a, **k: calls.append((a, k)) or (1, 2))
    monkeypatch.setattr(ck, "_shared_optin", lambda: 227 * 1024)
    monkeypatch.setattr(ck, "_ticket", lambda: "ticket")
    monkeypatch.setattr(ck, "_compute_capability", lambda: 90)
    assert ck.fused_softmax_cross_entropy("s", "y", label_smoothing=0.1) == (1, 2)
    (args, kwargs), = calls
    assert args[:2] == (fake_cupy, ck._sce_function) and kwargs["label_smoothing"] == 0.1
    # The device's opt-in shared memory less the static reserve, and the per-device, per-stream ticket.
    assert kwargs["shared_memory_limit"] == 226 * 1024 and kwargs["ticket"] == "ticket"
    # The device's compute capability, which decides whether sce_cluster may be planned.
    assert kwargs["compute_capability"] == 90


def test_the_nvrtc_kernel_opts_in_to_the_devices_shared_memory_once(monkeypatch):
    """_sce_function raises sce_on_chip's dynamic shared memory limit to what the device allows, once."""
    class Kernel:
        shared_size_bytes = 336
        max_dynamic_shared_size_bytes = 48 * 1024

    kernels = {}
    monkeypatch.setattr(ck, "compiled_function", lambda source, name: kernels.setdefault(name, Kernel()))
    monkeypatch.setattr(ck, "_shared_optin", lambda: 227 * 1024)
    monkeypatch.setattr(ck, "_OPTED_IN", set())
    on_chip, two_pass = ck._sce_function("sce_on_chip<float, int>"), ck._sce_function("sce_two_pass<float, int>")
    assert on_chip.max_dynamic_shared_size_bytes == 227 * 1024 - 336
    # sce_cluster stages its slice of a row in dynamic shared memory too.
    assert ck._sce_function("sce_cluster<float, int>").max_dynamic_shared_size_bytes == 227 * 1024 - 336
    on_chip.max_dynamic_shared_size_bytes = 0  # not set again: the opt-in is once per kernel
    assert ck._sce_function("sce_on_chip<float, int>").max_dynamic_shared_size_bytes == 0
    assert two_pass.max_dynamic_shared_size_bytes == 48 * 1024
    assert 336 < ck._STATIC_SHARED  # the wrapper plans with the opt-in limit less _STATIC_SHARED


# ------------------------------------------------ the one-launch design, path by path
SMALL_OPTIONS = [pytest.param({}, id="plain"),
                 pytest.param({"class_weights": True, "label_smoothing": 0.05, "ignore_index": 2},
                              id="weights_smooth_ignore")]


SMALL_CASES = ([pytest.param(c, "float32", r, id=f"{c}-float32-{r}") for c in (1, 2, 3, 5, 10, 31, 32, 33, 100)
                for r in ("mean", "none")]
               + [pytest.param(c, d, "mean", id=f"{c}-{d}-mean", marks=DTYPES[2].marks if d == "bfloat16" else ())
                  for c in (3, 10, 33) for d in ("float16", "bfloat16")])


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize(("c", "dtype", "reduction"), SMALL_CASES)
@pytest.mark.parametrize("options", SMALL_OPTIONS)
def test_small_class_counts_several_rows_per_warp(runner, c, dtype, options, reduction):
    """sce_on_chip with rows of 1...16 threads: a tile of rows * C elements loaded as one range (its
    vectors straddle rows), segmented shuffles, a partial last tile (N = 300 rows is not a multiple of
    the tile's) and, for "mean" with ignore_index, the denominator reduced in the kernel. A bad label
    gives a NaN row and a NaN mean; where the kernel reduces the denominator from the labels it is NaN
    too, and so is every row's gradient but the ignored rows' zeros (as before this design, when the
    host derived it)."""
    s, y, kw = _problem((300, c), dtype, options)
    if c > 3:
        y[7] = c + 5
    loss, grad = _run(runner, s, y, kw, reduction=reduction)
    ref_loss, ref_grad = _reference(s, y, reduction=reduction, **kw)
    tol = TOL[dtype]
    np.testing.assert_allclose(loss.astype(np.float64), ref_loss, rtol=tol, atol=tol)
    if reduction == "mean" and options and c > 3:
        ignored = y == kw["ignore_index"]
        assert np.isnan(loss) and np.isnan(grad[~ignored].astype(np.float32)).all() and (grad[ignored] == 0).all()
        return
    good = np.isfinite(ref_grad).all(axis=1)
    scale = np.abs(ref_grad[good]).max() if good.any() else 1.0
    # C = 1: the gradient is exactly 0, the reference's is rounding noise; hence the floor.
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=0, atol=tol * max(scale, 1e-6))


@pytest.mark.parametrize(("runner", "shape", "dtype"), [
    pytest.param("emulated-optin", (3, 32768), "float32", id="emulated-3x32768-float32"),
    pytest.param("emulated-optin", (2, 65536), "bfloat16", id="emulated-2x65536-bfloat16",
                 marks=pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 needs ml_dtypes")),
    pytest.param("emulated-optin", (2, 50001), "float16", id="emulated-2x50001-float16"),
    pytest.param("gpu", (8192, 32768), "float32", id="gpu-8192x32768-float32", marks=gpu_marks),
    pytest.param("gpu", (1024, 65536), "bfloat16", id="gpu-1024x65536-bfloat16", marks=gpu_marks),
], indirect=["runner"])
@pytest.mark.parametrize("options", OPTIONS)
def test_long_rows_stay_on_chip_up_to_the_shared_memory_limit(runner, shape, dtype, options):
    """A row of 128 KiB (32768 float32, 65536 bfloat16) is one block's tile in the 227 KiB an H100 lets
    a kernel opt in to: read from DRAM once."""
    limit = 227 * 1024 - 1024
    assert ck.plan_softmax_cross_entropy(*shape, _dtype(dtype).itemsize, shared_memory_limit=limit).kernel == \
        "sce_on_chip"
    s, y, kw = _problem(shape, dtype, options)
    y[-1] = shape[1] - 1
    loss, grad = _run(runner, s, y, kw)
    _assert_close(loss, grad, *_reference(s, y, **kw), dtype)
    if isinstance(runner, Emulated):
        assert runner.module.launches[-1][0].startswith("sce_on_chip")


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("c", [33, 1025])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rows_past_the_shared_memory_limit_take_two_passes(runner, c, dtype, options, reduction):
    """sce_two_pass, reached with short rows through a reduced limit (as rows past 227 KiB reach it)."""
    s, y, kw = _problem((7, c), dtype, options)
    loss, grad = _run(runner, s, y, kw, reduction=reduction, shared_memory_limit=64)
    _assert_close(loss, grad, *_reference(s, y, reduction=reduction, **kw), dtype)
    if isinstance(runner, Emulated):
        assert runner.module.launches[-1][0].startswith("sce_two_pass")


class _CountingNumpy:
    """NumPy that records every function the wrapper calls on it."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        value = getattr(np, name)
        if callable(value):
            def call(*args, **kwargs):
                self.calls.append(name)
                return value(*args, **kwargs)
            return call
        return value


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("c", "options"), [(10, {}), (10, {"class_weights": True, "ignore_index": 2}),
                                            (1000, {"label_smoothing": 0.1}), (3000, {"ignore_index": 0})])
@pytest.mark.parametrize("limit", [ck.PORTABLE_SHARED_MEMORY, TWO_PASS])
def test_one_launch_and_no_other_array_work(lib, reduction, c, options, limit):
    """Everything (per-row losses, the mean's denominator, the final sum, the gradient) is one launch: the
    wrapper's only other calls on xp are allocations."""
    s, y, kw = _problem((40, c), "float32", options)
    module = emulated.EmulatedModule(lib)
    fetched = []

    def get_function(name):
        fetched.append(name)
        return module.get_function(name)

    xp = _CountingNumpy()
    ticket = np.zeros(1, np.uint32)
    loss, grad = ck.launch_softmax_cross_entropy(xp, get_function, s, y, reduction=reduction, ticket=ticket,
                                                 shared_memory_limit=limit, **kw)
    assert len(module.launches) == 1 and len(fetched) == 1
    assert set(xp.calls) <= {"empty", "empty_like"}, xp.calls
    assert loss.dtype == s.dtype and loss.shape == (() if reduction != "none" else (40,))
    assert ticket[0] == 0  # the last block wrapped it back to zero, ready for the next call
    _assert_close(loss, grad, *_reference(s, y, reduction=reduction, **kw), "float32")


@pytest.mark.parametrize(("shape", "options"), [((2000, 10), {}), ((2000, 10), {"class_weights": True,
                                                                              "ignore_index": 1}),
                                                ((100, 700), {"label_smoothing": 0.1}),
                                                ((30, 3000), {"class_weights": True})])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_total_is_deterministic_and_summed_in_the_kernel(lib, shape, options, reduction):
    """The total is each block's partial summed in block order by the last block to finish: the same bits
    on every call and in every block order, close to the float64 reference. 2000 rows of 10 classes are 8
    tiles, over 8 blocks (sum) or, when every block also reduces the labels, 2 blocks looping over them."""
    s, y, kw = _problem(shape, "float32", options)
    ticket = np.zeros(1, np.uint32)
    totals = []
    for order in ("forward", "forward", "reverse"):
        runner = Emulated(emulated.EmulatedModule(lib, order=order))
        totals.append(_run(runner, s, y, kw, reduction=reduction, ticket=ticket)[0])
        assert ticket[0] == 0
    assert totals[0].tobytes() == totals[1].tobytes() == totals[2].tobytes()
    launches = runner.module.launches
    assert launches[-1][1][0] > 1  # several blocks, so the partials and the ticket matter
    ref_loss, _ = _reference(s, y, reduction=reduction, **kw)
    np.testing.assert_allclose(totals[0], ref_loss, rtol=1e-5)


@pytest.mark.parametrize("runner", _runners(), indirect=True)
@pytest.mark.parametrize("c", [10, 1000, 3000])
def test_mean_denominator_from_the_labels_in_the_kernel(runner, c):
    """sum w_y over the rows not ignored, derived by every block from the labels: ignored rows, class
    weights, an out-of-range label (NaN mean and, through the NaN denominator, NaN gradient as before),
    every row ignored (NaN mean, zero gradient)."""
    s, y, kw = _problem((50, c), "float32", {"class_weights": True, "ignore_index": 3, "label_smoothing": 0.1})
    loss, grad = _run(runner, s, y, kw)
    _assert_close(loss, grad, *_reference(s, y, **kw), "float32")
    _, kw_only_ignore = y.copy(), {"ignore_index": 3}
    loss, grad = _run(runner, s, y, kw_only_ignore)
    _assert_close(loss, grad, *_reference(s, y, **kw_only_ignore), "float32")
    bad = y.copy()
    bad[5] = -7
    loss, grad = _run(runner, s, bad, kw)
    assert np.isnan(loss)
    loss, grad = _run(runner, s, np.full(50, 3), kw)
    assert np.isnan(loss) and (grad == 0).all()



# ------------------------------------------------ sce_cluster: a row split over a thread-block cluster
# The emulator runs a cluster's 8 blocks (4096 fibers) together, about 0.15 s per row; the
# shared-memory limit is lowered so that rows of a few thousand classes take this path.
K = ck.SCE_CLUSTER_BLOCKS


def _cluster_limit(c, itemsize):
    """A dynamic shared-memory limit that a row of ``c`` classes exceeds on chip but its slice does not."""
    limit = c * itemsize // 2
    plan = ck.plan_softmax_cross_entropy(5, c, itemsize, shared_memory_limit=limit, compute_capability=90)
    assert plan.kernel == "sce_cluster" and plan.cluster_blocks == K and plan.blocks % K == 0, plan
    return limit


def _cluster_cc(runner):
    if isinstance(runner, Emulated):
        return 90
    cc = ck._compute_capability()
    if cc < 90:
        pytest.skip(f"thread-block clusters need compute capability 9.0, the device has {cc / 10}")
    return cc


# (shape, dtype, options, reduction, order, unaligned grad, a bad label): every dtype and every option
# set with every reduction once, odd C (misaligned rows: a scalar head and tail per slice) and even.
# No bad label with "mean" over weights/ignore: its NaN denominator makes every gradient NaN, which
# the float64 reference does not do (test_mean_denominator_from_the_labels_in_the_kernel).
_CLUSTER_CASES = [
    ((3, 3001), "float32", "plain", "mean", "forward", False, False),
    ((3, 5003), "float32", "smooth", "sum", "reverse", True, False),
    ((4, 4096), "float32", "ignore", "none", "shuffled", False, True),
    ((3, 20000), "float32", "weights_smooth_ignore", "mean", "forward", False, False),
    ((3, 3001), "float16", "plain", "sum", "shuffled", True, True),
    ((3, 7777), "float16", "smooth", "none", "forward", False, False),
    ((3, 3000), "float16", "ignore", "mean", "reverse", False, False),
    ((5, 3003), "float16", "weights_smooth_ignore", "none", "shuffled", False, True),
    ((3, 3005), "bfloat16", "plain", "none", "reverse", False, False),
    ((3, 9999), "bfloat16", "smooth", "mean", "shuffled", False, True),
    ((3, 3000), "bfloat16", "ignore", "sum", "forward", True, False),
    ((3, 4099), "bfloat16", "weights_smooth_ignore", "mean", "reverse", False, False),
]
_OPTION_SETS = {p.id: p.values[0] for p in OPTIONS}


def _cluster_params():
    out = []
    for shape, dtype, opt, reduction, order, unaligned, bad in _CLUSTER_CASES:
        marks = DTYPES[2].marks if dtype == "bfloat16" else ()
        case_id = (f"{shape[0]}x{shape[1]}-{dtype}-{opt}-{reduction}-{order}" + ("-unaligned" if unaligned else "")
                   + ("-bad_label" if bad else ""))
        out.append(pytest.param("emulated", shape, dtype, opt, reduction, order, unaligned, bad, id=case_id,
                                marks=marks))
    out += [pytest.param("gpu", (4096, 32000), dtype, opt, "mean", "forward", False, False,
                         id=f"gpu-4096x32000-{dtype}-{opt}", marks=gpu_marks) for dtype in ("float32", "float16")
            for opt in ("plain", "weights_smooth_ignore")]
    return out


@pytest.mark.parametrize(("kind", "shape", "dtype", "opt", "reduction", "order", "unaligned", "bad"),
                         _cluster_params())
def test_cluster_matches_numpy_float64(request, kind, shape, dtype, opt, reduction, order, unaligned, bad):
    """sce_cluster against the float64 reference: each of the cluster's blocks stages a slice of the row,
    the statistics are merged through distributed shared memory, rank 0 accounts the loss."""
    if kind == "gpu":
        runner = OnGpu()
    else:
        module = emulated.EmulatedModule(request.getfixturevalue("emulator_lib"), order=order, seed=len(order))
        runner = Emulated(module, guard=3 if unaligned else 64)
    s, y, kw = _problem(shape, dtype, _OPTION_SETS[opt])
    if bad:
        y[1] = shape[1]  # out of range: a NaN row (and a NaN mean)
    limit = _cluster_limit(shape[1], _dtype(dtype).itemsize)
    loss, grad = _run(runner, s, y, kw, reduction=reduction, shared_memory_limit=limit,
                      compute_capability=_cluster_cc(runner))
    ref_loss, ref_grad = _reference(s, y, reduction=reduction, **kw)
    tol = TOL[dtype]
    assert grad.dtype == _dtype(dtype) and grad.shape == ref_grad.shape
    np.testing.assert_allclose(loss.astype(np.float64), ref_loss, rtol=tol, atol=tol)  # NaN where the reference is
    scale = np.nanmax(np.abs(ref_grad), initial=0.0) or 1.0
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=0, atol=tol * scale)
    if isinstance(runner, Emulated):
        assert runner.module.launches[-1][0].startswith("sce_cluster<")


def test_cluster_result_does_not_depend_on_thread_order(lib):
    """The same bits in every order of the cluster's 4096 threads (and of the clusters): every block merges
    the published statistics in rank order, and the total is summed in block order."""
    s, y, kw = _problem((3, 5003), "float32", {"label_smoothing": 0.1, "class_weights": True, "ignore_index": 2})
    limit = _cluster_limit(5003, 4)
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1)):
        runner = Emulated(emulated.EmulatedModule(lib, order=order, seed=seed))
        results.append(_run(runner, s, y, kw, reduction="mean", shared_memory_limit=limit, compute_capability=90))
        assert runner.module.launches[-1][1] == (3 * K,)
    for loss, grad in results[1:]:
        assert loss.tobytes() == results[0][0].tobytes() and grad.tobytes() == results[0][1].tobytes()
    _assert_close(*results[0], *_reference(s, y, **kw), "float32")


def _cluster_direct(module, s, y, weights, grad, clusters=1):
    """sce_cluster launched directly: ``clusters`` clusters looping over the rows, reduction "none"."""
    n, c = s.shape
    loss_row = np.full(n, np.nan, s.dtype)
    null = np.uint64(0)
    shared = ck.plan_softmax_cross_entropy(n, c, s.dtype.itemsize, shared_memory_limit=_cluster_limit(c, 4),
                                           compute_capability=90).shared_bytes
    args = (s, y, weights, grad, loss_row, null, null, np.int64(n), np.int32(c), np.int64(-100), np.float32(0.1),
            np.float32(1), np.int32(0))
    module.get_function("sce_cluster<float, long long>")((clusters * K,), (ck.SCE_THREADS,), args, shared_mem=shared)
    return loss_row, grad


@pytest.mark.parametrize(("order", "seed", "shuffles"), [("forward", 0, "meet"), ("shuffled", 3, "unordered")])
def test_cluster_grad_may_be_the_logits_buffer(lib, order, seed, shuffles):
    """Alias-safe like the other kernels: a block reads only its slice of a row from global memory, all before
    a barrier, and writes it after the next. One cluster loops over a valid row, a bad label (NaN row, skipped
    by the whole cluster) and a valid row again (the other buffer of the published statistics)."""
    s, y, kw = _problem((3, 3001), "float32", {"label_smoothing": 0.1, "class_weights": True})
    y[1] = 3001
    module = emulated.EmulatedModule(lib, order=order, seed=seed, shuffles=shuffles)
    out = _cluster_direct(module, s, y, kw["class_weights"], np.full_like(s, np.nan))
    buf = s.copy()
    aliased = _cluster_direct(module, buf, y, kw["class_weights"], buf)
    assert aliased[1] is buf and _same(aliased, out)
    _assert_close_with_nan_rows(*out, *_reference(s, y, reduction="none", ignore_index=-100, **kw))


def test_emulator_catches_a_missing_cluster_sync(tmp_path):
    """Without the cluster barrier between publishing each block's statistics and reading every block's,
    a block reads statistics not yet written (the emulator's poison): the results go wrong."""
    source = ck.kernel_source(ck.SCE_SOURCE)
    assert source.count("cluster.sync();") == 2  # the row's, removed here, and the one before exiting
    module = _mutant(tmp_path, r"\n\s*cluster\.sync\(\);(\n\n\s*// ---- the row's statistics)", r"\1")
    s, y, kw = _problem((3, 3001), "float32", {})
    loss, grad = _run(Emulated(module), s, y, kw, reduction="none", shared_memory_limit=_cluster_limit(3001, 4),
                      compute_capability=90)
    ref_loss, ref_grad = _reference(s, y, reduction="none")
    assert module.launches[-1][0].startswith("sce_cluster<")
    assert not np.allclose(grad, ref_grad, atol=1e-6, equal_nan=False)


def test_emulator_reports_a_cluster_barrier_only_some_blocks_reach(tmp_path):
    module = _mutant(tmp_path, r"\n(\s*)cluster\.sync\(\);(\n\n\s*// ---- the row's statistics)",
                     r"\n\1if (rank != 0) cluster.sync();\2")
    s, y, kw = _problem((1, 3001), "float32", {})
    waiting = (K - 1) * ck.SCE_THREADS  # every block but rank 0
    with pytest.raises(RuntimeError, match=rf"deadlock in cluster 0 \(blocks 0-{K - 1}\): {waiting} thread"):
        _run(Emulated(module), s, y, kw, shared_memory_limit=_cluster_limit(3001, 4), compute_capability=90)


def test_emulator_refuses_a_grid_that_is_not_whole_clusters(lib):
    s, y, kw = _problem((2, 3001), "float32", {"label_smoothing": 0.1, "class_weights": True})
    kernel = emulated.EmulatedModule(lib).get_function("sce_cluster<float, long long>")
    assert kernel.cluster_blocks == K
    with pytest.raises(RuntimeError, match=f"not a multiple of the kernel's cluster size {K}"):
        _cluster_direct(SimpleNamespace(get_function=lambda name: lambda grid, *a, **k: kernel((K + 1,), *a, **k)),
                        s, y, kw["class_weights"], np.empty_like(s))
    with pytest.raises(RuntimeError, match="do not start and end on clusters"):
        _cluster_direct(emulated.EmulatedModule(lib, blocks=(0, K // 2)), s, y, kw["class_weights"],
                        np.empty_like(s))


@pytest.mark.parametrize("cc", [0, 70, 80, 86, 89, 90, 100, 120])
def test_cluster_is_planned_only_from_compute_capability_9(cc):
    """Rows too long for sce_on_chip take sce_cluster on sm_90+ while a slice fits one block's shared memory,
    else sce_two_pass; rows that fit on chip stay there."""
    optin = 227 * 1024 - 1024
    long_row = ck.plan_softmax_cross_entropy(16384, 131072, 4, shared_memory_limit=optin, compute_capability=cc)
    if cc >= 90:
        assert long_row.kernel == "sce_cluster" and long_row.cluster_blocks == K
        assert long_row.blocks % K == 0 and long_row.blocks == ck._MAX_PARTIALS  # "mean": capped in whole clusters
        assert long_row.shared_bytes == 512 + 131072 // K * 4 + 16  # the slice, its misalignment, the header
    else:
        assert long_row.kernel == "sce_two_pass" and long_row.cluster_blocks == 1 and long_row.shared_bytes == 0
    none = ck.plan_softmax_cross_entropy(16384, 131072, 4, reduction="none", shared_memory_limit=optin,
                                         compute_capability=cc)
    assert none.blocks == 16384 * (K if cc >= 90 else 1)  # a cluster (or block) per row
    # Past what a cluster's shared memory holds (8 x 226 KiB): two passes everywhere.
    assert ck.plan_softmax_cross_entropy(4, 8 * 60000, 4, shared_memory_limit=optin,
                                         compute_capability=cc).kernel == "sce_two_pass"
    assert ck.plan_softmax_cross_entropy(4, 32000, 4, shared_memory_limit=optin,
                                         compute_capability=cc).kernel == "sce_on_chip"
    # No rows, "sum": one cluster still writes the 0-d result.
    empty = ck.plan_softmax_cross_entropy(0, 131072, 4, reduction="sum", shared_memory_limit=optin,
                                          compute_capability=cc)
    assert empty.blocks == (K if cc >= 90 else 1)
    # "mean" with weights: the grid is capped by the labels' traffic per block, in whole clusters.
    reduced = ck.plan_softmax_cross_entropy(16384, 131072, 2, labels_reduced=True, shared_memory_limit=optin,
                                            compute_capability=cc)
    assert reduced.blocks % reduced.cluster_blocks == 0 and reduced.blocks >= reduced.cluster_blocks


def test_cluster_slice_matches_the_kernel(lib):
    """The host's slice size (shared memory) is the kernel's: any smaller launch writes past the end of
    the emulator's guarded dynamic shared memory, and a grid of several clusters covers every row."""
    s, y, kw = _problem((3, 3001), "float32", {"label_smoothing": 0.1, "class_weights": True})
    kernel = emulated.EmulatedModule(lib).get_function("sce_cluster<float, long long>")
    loss_row, grad = _cluster_direct(SimpleNamespace(get_function=lambda name: kernel), s, y, kw["class_weights"],
                                     np.full_like(s, np.nan), clusters=2)
    _assert_close_with_nan_rows(loss_row, grad, *_reference(s, y, reduction="none", ignore_index=-100, **kw))
    short = lambda grid, block, args, shared_mem: kernel(grid, block, args, shared_mem=shared_mem - 16)  # noqa: E731
    with pytest.raises(RuntimeError, match="wrote past the end"):
        _cluster_direct(SimpleNamespace(get_function=lambda name: short), s, y, kw["class_weights"],
                        np.full_like(s, np.nan))
