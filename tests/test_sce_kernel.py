"""The fused softmax cross-entropy kernel (kernels/softmax_cross_entropy.cu) through its host
wrapper, against the NumPy backend in float64.

Every test runs on the CPU emulator (tools/cuda_emulator: the .cu compiled by the host C++
compiler, each CUDA thread a fiber), so the kernel's indexing, reductions, barriers and
writes are checked on every machine; the same tests run on a real GPU through CuPy where
one is usable (``-m gpu``). The emulator's NumPy hands out poisoned buffers with guard zones
on both sides, so an element the kernel never writes, or one it writes out of bounds, fails.
"""

from __future__ import annotations

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
def test_inplace_overwrites_every_logit(runner, c):
    rng = np.random.default_rng(c)
    s = (rng.standard_normal((33, c)) * 5 + 50).astype(np.float32)  # far from any gradient value
    y = rng.integers(0, c, 33)
    ref_loss, ref_grad = _reference(s, y)
    buf = runner.asarray(s)
    loss, grad = runner.fused(buf, runner.asarray(y), inplace=True)
    assert grad is buf
    np.testing.assert_allclose(runner.to_numpy(grad), ref_grad, atol=1e-6)
    assert float(runner.to_numpy(loss)) == pytest.approx(float(ref_loss), rel=1e-5)


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
    with pytest.raises(ValueError, match="C-contiguous"):
        runner.fused(runner.asarray(np.zeros((3, 2), np.float32)).T, y, inplace=True)


# ------------------------------------------------------- emulator-only checks
@pytest.fixture
def lib(emulator_lib):
    return emulator_lib


def _direct(module, kernel, s, y, grid, *, smoothing=0.0, weights=None):
    """Launch one instance directly with a chosen grid: the grid-stride loops the wrapper rarely takes."""
    n, c = s.shape
    grad = np.full_like(s, np.nan)
    loss_row = np.full(n, np.nan, np.float32)
    weight_row = np.full(n, np.nan, np.float32)
    threads = ck.WARP_KERNEL_THREADS if kernel == "sce_warp_per_row" else ck.BLOCK_KERNEL_THREADS
    module.get_function(f"{kernel}<float, long long>")(
        (grid,), (threads,),
        (s, y, np.uint64(0) if weights is None else weights, np.ones(1, np.float32), grad, loss_row, weight_row,
         np.int64(n), np.int32(c), np.int64(-100), np.float32(smoothing)))
    return loss_row, weight_row, grad


@pytest.mark.parametrize(("kernel", "c"), [("sce_warp_per_row", 10), ("sce_warp_per_row", 1000),
                                           ("sce_block_per_row", 1025), ("sce_block_per_row", 3001)])
@pytest.mark.parametrize("grid", [1, 2, 3])
def test_grid_stride_loops_cover_every_row(lib, kernel, c, grid):
    rng = np.random.default_rng(c + grid)
    n = 19
    s = rng.standard_normal((n, c)).astype(np.float32)
    y = rng.integers(0, c, n)
    y[4] = -100
    loss_row, weight_row, grad = _direct(emulated.EmulatedModule(lib), kernel, s, y, grid, smoothing=0.1)
    ref_loss, ref_grad = _reference(s, y, reduction="none", ignore_index=-100, label_smoothing=0.1)
    np.testing.assert_allclose(loss_row, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
    np.testing.assert_array_equal(weight_row, (y != -100).astype(np.float32))


@pytest.mark.parametrize(("shape", "options"), [((37, 700), {"label_smoothing": 0.1, "class_weights": True}),
                                                ((6, 5003), {"label_smoothing": 0.1, "class_weights": True}),
                                                ((6, 5003), {})])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_result_does_not_depend_on_thread_order(lib, shape, options, inplace):
    """Running each block's threads forward, backward and shuffled between barriers gives identical bits."""
    s, y, kw = _problem(shape, "float32", options)
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2)):
        runner = Emulated(emulated.EmulatedModule(lib, order=order, seed=seed))
        results.append(_run(runner, s, y, kw, inplace=inplace, reduction="none"))
    for loss, grad in results[1:]:
        np.testing.assert_array_equal(loss, results[0][0])
        np.testing.assert_array_equal(grad, results[0][1])


def test_emulator_builds_every_instance_the_wrapper_launches(lib):
    assert set(emulated.EmulatedModule(lib).name_expressions) == set(ck.SCE_NAME_EXPRESSIONS)


def test_emulator_is_stricter_than_cupy_about_arguments(lib):
    kernel = emulated.EmulatedModule(lib).get_function("sce_warp_per_row<float, long long>")
    s, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    out = (np.ones(1, np.float32), np.empty_like(s), np.empty(2, np.float32), np.empty(2, np.float32))
    with pytest.raises(TypeError, match="labels must be int64"):
        kernel((1,), (256,), (s, y.astype(np.int32), np.uint64(0), *out, np.int64(2), np.int32(3), np.int64(-1),
                              np.float32(0)))
    with pytest.raises(TypeError, match="n_classes must be a int32 scalar"):
        kernel((1,), (256,), (s, y, np.uint64(0), *out, np.int64(2), 3, np.int64(-1), np.float32(0)))
    with pytest.raises(RuntimeError, match="block size"):
        kernel((1,), (100,), (s, y, np.uint64(0), *out, np.int64(2), np.int32(3), np.int64(-1), np.float32(0)))


# The emulator must be able to fail: plant bugs in a copy of the kernel and watch it notice.
def _mutant(tmp_path, pattern, replacement, count=1):
    source = ck.kernel_source(ck.SCE_SOURCE)
    mutated, n = re.subn(pattern, replacement, source, count=count)
    assert n == count, f"mutation {pattern!r} did not apply"
    path = tmp_path / "mutant.cu"
    path.write_text(mutated)
    return emulated.EmulatedModule(emulated.build(tmp_path, source=path))


def test_emulator_catches_a_missing_barrier(tmp_path):
    # Drop the barrier after warp 0 publishes the row's statistics: other warps read stale ones.
    module = _mutant(tmp_path, r"(fin\[2\] = t\.ws;\s*\}\s*\})\s*__syncthreads\(\);", r"\1")
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
    module = _mutant(tmp_path, r"(part\[3\]\[warp\] = st\.ws;\s*\}\s*//[^\n]*)\s*__syncthreads\(\);", r"\1")
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


def test_emulator_refuses_blocks_beyond_the_launch_bounds(lib):
    """A GPU refuses a block larger than __launch_bounds__; so does the emulator."""
    s, y = np.zeros((2, 2000), np.float32), np.zeros(2, np.int64)
    out = (np.ones(1, np.float32), np.empty_like(s), np.empty(2, np.float32), np.empty(2, np.float32))
    kernel = emulated.EmulatedModule(lib).get_function("sce_block_per_row<float, long long>")
    with pytest.raises(RuntimeError, match="exceeds its __launch_bounds__ of 512"):
        kernel((1,), (1024,), (s, y, np.uint64(0), *out, np.int64(2), np.int32(2000), np.int64(-1), np.float32(0)))


def test_host_launch_shapes_match_the_kernels_launch_bounds():
    source = ck.kernel_source(ck.SCE_SOURCE)
    assert f"constexpr int kWarpKernelThreads = {ck.WARP_KERNEL_THREADS};" in source
    assert f"constexpr int kBlockKernelThreads = {ck.BLOCK_KERNEL_THREADS};" in source


def test_warp_kernel_keeps_its_barrier_before_in_place_writes():
    """On a GPU a shuffle orders no memory: the __syncwarp() between lane 0's read of s_y and
    the lanes' in-place writes is what does. The emulator cannot see it missing (its shuffles
    are switch points), so the source is checked instead."""
    source = ck.kernel_source(ck.SCE_SOURCE)
    warp_kernel = source[source.index("sce_warp_per_row("):source.index("sce_block_per_row(")]
    reads_sy = warp_kernel.index("to_float(x[y])")
    assert reads_sy < warp_kernel.index("__syncwarp();") < warp_kernel.index("g[k] = from_float<T>(grad_at(")


def test_rows_above_two_to_the_31_elements_use_64_bit_offsets():
    """Row offsets are ``row * C`` in 64 bits: checked on the source, since no test can allocate 8 GiB here."""
    source = ck.kernel_source(ck.SCE_SOURCE)
    assert source.count("const long long base = row * static_cast<long long>(n_classes);") == 2
    assert "long long n_rows" in source


def test_cupy_path_uses_the_same_wrapper(monkeypatch):
    """fused_softmax_cross_entropy is launch_softmax_cross_entropy with cupy and the NVRTC module."""
    calls = []
    fake_cupy = SimpleNamespace()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(ck, "launch_softmax_cross_entropy", lambda *a, **k: calls.append((a, k)) or (1, 2))
    assert ck.fused_softmax_cross_entropy("s", "y", label_smoothing=0.1) == (1, 2)
    (args, kwargs), = calls
    assert args[:2] == (fake_cupy, ck._sce_function) and kwargs["label_smoothing"] == 0.1
