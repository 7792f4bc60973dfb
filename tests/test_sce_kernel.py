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
    """The kernel on the CPU emulator, the host wrapper on NumPy."""

    def __init__(self, module, guard: int = 64, poison: float = np.nan) -> None:
        self.module = module
        self.xp = PoisonedNumpy(guard, poison)

    def asarray(self, a):
        return np.array(a, copy=True)

    def fused(self, logits, labels, **kw):
        loss, grad = ck.launch_softmax_cross_entropy(self.xp, self.module.get_function, logits, labels, **kw)
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
    return Emulated(emulated.EmulatedModule(request.getfixturevalue("emulator_lib")), guard=guard)


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
# Warp kernel: C <= 1024 (one row, a partial block, several blocks). Block kernel: C just
# past the switch, odd C (scalar tail), a vocabulary-sized row.
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
@pytest.mark.parametrize("c", [10, 1025, 4099])
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


def _threads(kernel):
    return ck.WARP_KERNEL_THREADS if kernel == "sce_warp_per_row" else ck.BLOCK_KERNEL_THREADS


def _direct(module, kernel, s, y, grid, *, smoothing=0.0, weights=None, grad=None, threads=None, xp=np):
    """Launch one instance directly with a chosen grid (the grid-stride loops the wrapper rarely
    takes), block size, and ``grad`` buffer (``grad=s``: the aliased launch the wrapper never makes).
    ``module`` is an EmulatedModule with NumPy arrays, or the NVRTC module with ``xp=cupy``."""
    n, c = s.shape
    grad = xp.full_like(s, np.nan) if grad is None else grad
    loss_row = xp.full(n, np.nan, xp.float32)
    module.get_function(f"{kernel}<{_CTYPES[s.dtype.name]}, {_CTYPES[y.dtype.name]}>")(
        (grid,), (threads or _threads(kernel),),
        (s, y, np.uint64(0) if weights is None else weights, xp.ones(1, xp.float32), grad, loss_row,
         np.int64(n), np.int32(c), np.int64(-100), np.float32(smoothing)))
    return loss_row, grad


@pytest.mark.parametrize(("kernel", "c"), [("sce_warp_per_row", 10), ("sce_warp_per_row", 1000),
                                           ("sce_block_per_row", 1025), ("sce_block_per_row", 3001)])
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


@pytest.mark.parametrize(("shape", "options"), [((37, 700), {"label_smoothing": 0.1, "class_weights": True}),
                                                ((6, 5003), {"label_smoothing": 0.1, "class_weights": True}),
                                                ((6, 5003), {})])
def test_result_does_not_depend_on_thread_order(lib, shape, options):
    """Running each block's threads forward, backward and shuffled between barriers gives identical bits."""
    s, y, kw = _problem(shape, "float32", options)
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2)):
        runner = Emulated(emulated.EmulatedModule(lib, order=order, seed=seed))
        results.append(_run(runner, s, y, kw, reduction="none"))
    for loss, grad in results[1:]:
        np.testing.assert_array_equal(loss, results[0][0])
        np.testing.assert_array_equal(grad, results[0][1])


def _aliasing_problem(kernel):
    shape = (37, 300) if kernel == "sce_warp_per_row" else (5, 1501)  # 16 resp. 2 rows per grid stride
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


@pytest.mark.parametrize("kernel", ["sce_warp_per_row", "sce_block_per_row"])
@pytest.mark.parametrize("shuffles", ["meet", "unordered"])
@pytest.mark.parametrize(("order", "seed"), ORDERS)
def test_grad_may_be_the_logits_buffer(lib, kernel, shuffles, order, seed):
    """The kernels stay alias-safe (a caller whose logits are dead after the loss may pass one buffer as
    both): every element is read before the row's barrier and rewritten only by the thread that reads it
    after. Shown in every thread order, with shuffles ordering memory and, as on a GPU, not."""
    s, y, kw = _aliasing_problem(kernel)
    module = emulated.EmulatedModule(lib, order=order, seed=seed, shuffles=shuffles)
    out, aliased = _out_of_place_and_aliased(module, kernel, s, y, kw)
    assert _same(aliased, out)
    _assert_close_with_nan_rows(*out, *_reference(s, y, reduction="none", **kw))


@pytest.mark.parametrize("kernel", ["sce_warp_per_row", "sce_block_per_row"])
@pytest.mark.gpu
@pytest.mark.skipif(_cupy is None, reason="no usable CUDA device")
def test_grad_may_be_the_logits_buffer_on_gpu(kernel):
    s, y, kw = _aliasing_problem(kernel)
    out, aliased = _out_of_place_and_aliased(SimpleNamespace(get_function=ck._sce_function), kernel, s, y, kw,
                                             xp=_cupy)
    assert _same(aliased, out)
    _assert_close_with_nan_rows(*out, *_reference(s, y, reduction="none", **kw))


def test_unordered_shuffles_expose_a_missing_syncwarp(lib, tmp_path):
    """On a GPU a shuffle orders no memory: the warp kernel's __syncwarp() between lane 0's read of s_y
    and the other lanes' writes to an aliasing grad is what does. Without it, an aliased launch goes wrong
    once shuffles order nothing and a lane runs to its writes before lane 0 reads s_y; with shuffles that
    meet (the emulator's default), the bug does not show."""
    source = ck.kernel_source(ck.SCE_SOURCE)
    assert source.count("__syncwarp();") == 1  # the warp kernel's, the one removed below
    mutant = _mutant(tmp_path, r"\n\s*__syncwarp\(\);", "")
    s, y, kw = _aliasing_problem("sce_warp_per_row")
    for module in (mutant, emulated.EmulatedModule(lib)):
        module.shuffles = "meet"
        for module.order, module.seed in (p.values for p in ORDERS):
            assert _same(*_out_of_place_and_aliased(module, "sce_warp_per_row", s, y, kw))
    mutant.shuffles = "unordered"
    caught = []
    for mutant.order, mutant.seed in (p.values for p in ORDERS):
        caught.append(not _same(*_out_of_place_and_aliased(mutant, "sce_warp_per_row", s, y, kw)))
    assert caught == [False, True, True, True]  # forward order runs lane 0 first: s_y is read in time


def test_emulator_builds_every_instance_the_wrapper_launches(lib):
    assert set(emulated.EmulatedModule(lib).name_expressions) == set(ck.SCE_NAME_EXPRESSIONS)


def test_emulator_is_stricter_than_cupy_about_arguments(lib):
    kernel = emulated.EmulatedModule(lib).get_function("sce_warp_per_row<float, long long>")
    s, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    out = (np.ones(1, np.float32), np.empty_like(s), np.empty(2, np.float32))
    with pytest.raises(TypeError, match="labels must be int64"):
        kernel((1,), (256,), (s, y.astype(np.int32), np.uint64(0), *out, np.int64(2), np.int32(3), np.int64(-1),
                              np.float32(0)))
    with pytest.raises(TypeError, match="n_classes must be a int32 scalar"):
        kernel((1,), (256,), (s, y, np.uint64(0), *out, np.int64(2), 3, np.int64(-1), np.float32(0)))
    with pytest.raises(TypeError, match="takes 10 arguments"):
        kernel((1,), (256,), (s, y, np.uint64(0), *out, np.empty(2, np.float32), np.int64(2), np.int32(3),
                              np.int64(-1), np.float32(0)))
    with pytest.raises(RuntimeError, match="block size"):
        kernel((1,), (100,), (s, y, np.uint64(0), *out, np.int64(2), np.int32(3), np.int64(-1), np.float32(0)))
    with pytest.raises(ValueError, match="reach past the grid"):
        emulated.EmulatedModule(lib, blocks=(0, 2)).get_function(kernel.name)(
            (1,), (256,), (s, y, np.uint64(0), *out, np.int64(2), np.int32(3), np.int64(-1), np.float32(0)))


# The emulator must be able to fail: plant bugs in a copy of the kernel and watch it notice.
def _mutant_lib(tmp_path, pattern, replacement, count=1):
    source = ck.kernel_source(ck.SCE_SOURCE)
    mutated, n = re.subn(pattern, replacement, source, count=count)
    assert n == count, f"mutation {pattern!r} did not apply"
    path = tmp_path / "mutant.cu"
    path.write_text(mutated)
    return emulated.build(tmp_path, source=path)


def _mutant(tmp_path, pattern, replacement, count=1):
    return emulated.EmulatedModule(_mutant_lib(tmp_path, pattern, replacement, count))


def test_emulator_catches_a_missing_barrier(tmp_path):
    # Drop the barrier after warp 0 publishes the row's statistics: other warps read stale ones.
    module = _mutant(tmp_path, r"(row_stats\[2\] = t\.ws;\s*\}\s*\})\s*__syncthreads\(\);", r"\1")
    s, y, kw = _problem((4, 3000), "float32", {})
    loss, grad = _run(Emulated(module), s, y, kw, reduction="none")
    ref_loss, ref_grad = _reference(s, y, reduction="none")
    assert not np.allclose(grad, ref_grad, atol=1e-6)


def test_emulator_catches_a_skipped_element(tmp_path):
    # The tail loop stops one short: the poisoned buffer shows the unwritten element.
    module = _mutant(tmp_path, r"for \(int k = tail \+ tid; k < n_classes; k \+= nthreads\) \{\n(\s*)const float wk",
                     r"for (int k = tail + tid; k < n_classes - 1; k += nthreads) {\n\1const float wk")
    s, y, kw = _problem((3, 3001), "float32", {})
    _, grad = _run(Emulated(module), s, y, kw)
    assert np.isnan(grad[:, -1]).all() and not np.isnan(grad[:, :-1]).any()


def test_thread_order_exposes_a_read_before_the_barrier(tmp_path):
    # Without the first block barrier, warp 0 may read another warp's partial statistics
    # before that warp has stored them: forward and reverse order then disagree.
    module = _mutant(tmp_path, r"(warp_stats\[3\]\[warp\] = st\.ws;\s*\}\s*//[^\n]*)\s*__syncthreads\(\);", r"\1")
    s, y, kw = _problem((3, 3000), "float32", {})
    forward = _run(Emulated(module), s, y, kw, reduction="none")
    module.order = "reverse"
    reverse = _run(Emulated(module), s, y, kw, reduction="none")
    assert not np.array_equal(forward[1], reverse[1])


def test_emulator_reports_a_barrier_only_some_threads_reach(tmp_path):
    module = _mutant(tmp_path, r"if \(warp == 0\) \{", "if (warp == 0) {\n            __syncthreads();")
    s, y, kw = _problem((2, 3000), "float32", {})
    with pytest.raises(RuntimeError, match="deadlock"):
        _run(Emulated(module), s, y, kw)


@pytest.mark.parametrize(("kernel", "c"), [("sce_warp_per_row", 10), ("sce_block_per_row", 2000)])
def test_host_launch_shapes_match_the_kernels_launch_bounds(lib, kernel, c):
    """The wrapper's block size is the kernel's __launch_bounds__, which the emulator enforces as a GPU
    does: a block of exactly WARP_KERNEL_THREADS / BLOCK_KERNEL_THREADS runs, one warp more is refused."""
    threads = _threads(kernel)
    s, y, _ = _problem((3, c), "float32", {})
    module = emulated.EmulatedModule(lib)
    loss_row, grad = _direct(module, kernel, s, y, 1, threads=threads)
    _assert_close(loss_row, grad, *_reference(s, y, reduction="none"), "float32")
    with pytest.raises(RuntimeError, match=rf"block of {threads + 32} threads exceeds its __launch_bounds__ of "
                                           rf"{threads} \("):
        _direct(module, kernel, s, y, 1, threads=threads + 32)
    # And the wrapper launches exactly that size.
    Emulated(module).fused(s, y)
    assert module.launches[-1][2] == (threads,)


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
    per_block = ck.WARP_KERNEL_THREADS // 32 if kernel == "sce_warp_per_row" else 1
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
            loss, _ = ck.launch_softmax_cross_entropy(_SparseGradNumpy(grad), module.get_function, logits, labels,
                                                      class_weights=weights, label_smoothing=0.1, reduction="none")
            assert module.launches == [(f"{kernel}<__half, long long>", (n_blocks,), (_threads(kernel),))]
            ref_loss, ref_grad = _reference(logits[rows], labels[rows], class_weights=weights, label_smoothing=0.1,
                                            reduction="none")
            _assert_close(loss[rows], np.asarray(grad[rows]), ref_loss, ref_grad, "float16")
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


@pytest.mark.parametrize(("kernel", "c"), [("sce_warp_per_row", 1024), ("sce_block_per_row", 1 << 16)])
def test_rows_above_two_to_the_31_elements_use_64_bit_offsets(lib, tmp_path, kernel, c):
    _check_rows_past_two_to_the_31_elements(lib, tmp_path, kernel, c)


def test_rows_above_two_to_the_31_elements_catch_32_bit_offsets(tmp_path):
    # Row offsets wrapped to 32 bits (unsigned, so defined behaviour) in both kernels.
    lib = _mutant_lib(tmp_path, r"row \* static_cast<long long>\(n_classes\)",
                      "static_cast<long long>(static_cast<unsigned>(row) * static_cast<unsigned>(n_classes))", count=2)
    (tmp_path / "data").mkdir()
    with pytest.raises(AssertionError):
        _check_rows_past_two_to_the_31_elements(lib, tmp_path / "data", "sce_warp_per_row", 1024)


def test_cupy_path_uses_the_same_wrapper(monkeypatch):
    """fused_softmax_cross_entropy is launch_softmax_cross_entropy with cupy and the NVRTC module."""
    calls = []
    fake_cupy = SimpleNamespace()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(ck, "launch_softmax_cross_entropy", lambda *a, **k: calls.append((a, k)) or (1, 2))
    assert ck.fused_softmax_cross_entropy("s", "y", label_smoothing=0.1) == (1, 2)
    (args, kwargs), = calls
    assert args[:2] == (fake_cupy, ck._sce_function) and kwargs["label_smoothing"] == 0.1
