"""The convolution and pooling kernels (kernels/conv2d.cu) through their host wrappers
(deepcore/backend/conv_kernels.py), against torch.nn.functional and its autograd.

Everything runs on the CPU emulator (tools/cuda_emulator/raw_module.py: the .cu compiled by the
host C++ compiler, each CUDA thread a fiber) with NumPy as ``xp``, so the kernels' indexing and
every element they write are checked without a GPU. The wrappers' buffers come from a NumPy whose
``empty`` hands out NaN-poisoned views between guard zones, and the inputs sit between NaN guards
too: an element never written, one written out of bounds, or one read out of bounds shows.
The same comparisons run on a real GPU through the CuPy backend (``-m gpu``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend import conv_kernels as cv
from deepcore.backend import cuda_kernels as ck
from tests.helpers import ROOT, load_tool

torch = pytest.importorskip("torch")
F = torch.nn.functional

try:
    import ml_dtypes
except ImportError:  # bfloat16 cases skip
    ml_dtypes = None

raw_module = load_tool("tools/cuda_emulator/raw_module.py")
_cupy = None
if dc.available_backends()["cupy"] is True:
    import cupy as _cupy


# ------------------------------------------------------------------ runners
class GuardedNumpy:
    """NumPy whose ``empty`` returns poisoned views with ``guard`` poisoned elements on each side."""

    def __init__(self, guard: int = 37) -> None:
        self.guard = guard
        self.allocations: list[tuple[np.ndarray, int, int]] = []

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=np.float64):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = int(np.prod(shape))
        buf = np.full(size + 2 * self.guard, _poison(dtype), dtype=dtype)
        self.allocations.append((buf, self.guard, self.guard + size))
        return buf[self.guard:self.guard + size].reshape(shape)

    def empty_like(self, a):
        return self.empty(a.shape, a.dtype)

    def check_guards(self) -> None:
        for buf, lo, hi in self.allocations:
            guards = np.concatenate([buf[:lo], buf[hi:]])
            assert _same_bits(guards, np.full_like(guards, _poison(buf.dtype))), \
                f"a kernel wrote outside a {buf.dtype} buffer of {hi - lo} elements"


def _poison(dtype):
    return -(2**31) + 7 if np.dtype(dtype).kind in "iu" else np.nan


def _same_bits(a, b):
    return a.tobytes() == b.tobytes()


def guarded(a: np.ndarray, guard: int = 29) -> np.ndarray:
    """``a`` copied into the middle of a NaN-filled buffer: a read past either end gives NaN."""
    buf = np.full(a.size + 2 * guard, np.nan, dtype=a.dtype)
    view = buf[guard:guard + a.size].reshape(a.shape)
    view[...] = a
    return view


class Emulated:
    """The wrappers with ``xp`` = guarded NumPy and the emulator's kernels."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, fn, *args, **kwargs):
        xp = GuardedNumpy()
        args = [guarded(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args]
        out = fn(xp, self.module.get_function, *args, **kwargs)
        xp.check_guards()
        return out


@pytest.fixture(scope="session")
def conv_lib(tmp_path_factory):
    if raw_module._emulated().find_compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    return raw_module.build(tmp_path_factory.mktemp("conv_emulator"), ROOT / "kernels" / ck.CONV_SOURCE,
                            {name: "conv::kThreads" for name in ck.CONV_NAME_EXPRESSIONS})


@pytest.fixture
def module(conv_lib):
    return raw_module.EmulatedRawModule(conv_lib)


@pytest.fixture
def run(module):
    return Emulated(module)


# --------------------------------------------------------------- references
def _t(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def _torch_conv(x, w, b, dy, stride, padding, dilation, groups):
    """y, dx, dw, db in float64; F.pad takes (left, right, top, bottom)."""
    top, bottom, left, right = padding
    xt, wt = _t(x), _t(w)
    bt = None if b is None else _t(b)
    y = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, bt, stride=stride, dilation=dilation, groups=groups)
    y.backward(torch.tensor(np.asarray(dy, dtype=np.float64)))
    return (y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), None if bt is None else bt.grad.numpy())


def _tol(dtype):
    return {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-5),
            "float16": dict(rtol=2e-2, atol=2e-2), "bfloat16": dict(rtol=5e-2, atol=8e-2)}[dtype]


def _dtype(name):
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _close(got, want, dtype, what):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, err_msg=what, **_tol(dtype))


# (N, C, H, W), (O, KH, KW), stride, padding (top, bottom, left, right), dilation, groups, bias
CONV_CASES = {
    "3x3-pad1": ((2, 3, 7, 9), (4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    "stride2-dil2-asym-groups2": ((2, 4, 9, 8), (6, 3, 2), (2, 1), (1, 0, 2, 1), (2, 1), 2, True),
    "1x1-stride2-n1-nobias": ((1, 3, 5, 6), (5, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, False),
    "even-same": ((3, 2, 6, 5), (2, 2, 2), (1, 1), (0, 1, 0, 1), (1, 1), 1, True),
    "depthwise-stride3-dil2": ((2, 4, 11, 7), (4, 3, 3), (3, 2), (2, 1, 0, 2), (1, 2), 4, True),
    "stride-past-kernel": ((1, 2, 8, 7), (3, 2, 2), (3, 3), (0, 0, 1, 0), (1, 1), 1, True),
}


def _conv_problem(case, dtype="float64", seed=0):
    (n, c, h, w), (o, kh, kw), stride, padding, dilation, groups, has_bias = CONV_CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((o, c // groups, kh, kw)) / np.sqrt(c // groups * kh * kw)
    bias = rng.standard_normal(o) if has_bias else None
    top, bottom, left, right = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    dy = rng.standard_normal((n, o, oh, ow))
    dt = _dtype(dtype)
    cast = (lambda a: None if a is None else a.astype(dt))
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return cast(x), cast(weight), cast(bias), cast(dy), geometry


# ------------------------------------------------------------ im2col, col2im
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_im2col_and_col2im_match_unfold_and_fold(run, case, dtype):
    x, weight, _, _, geo = _conv_problem(case, dtype)
    kernel = weight.shape[2:]
    top, bottom, left, right = geo["padding"]
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"])
    cols = run(cv.im2col, x, kernel, **kw)
    xpad = F.pad(torch.tensor(x), (left, right, top, bottom))
    unfolded = F.unfold(xpad, kernel, dilation=geo["dilation"], stride=geo["stride"])  # (N, C*KH*KW, L)
    want = unfolded.permute(1, 0, 2).reshape(cols.shape).numpy()
    np.testing.assert_array_equal(cols, want)  # a copy: bit for bit

    dcols = np.random.default_rng(1).standard_normal(cols.shape).astype(dtype)
    dx = run(cv.col2im, dcols, x.shape, kernel, **kw)
    n, c, h, w = x.shape
    per_sample = torch.tensor(dcols).reshape(cols.shape[0], n, -1).permute(1, 0, 2)
    folded = F.fold(per_sample, (h + top + bottom, w + left + right), kernel, dilation=geo["dilation"],
                    stride=geo["stride"])[:, :, top:top + h, left:left + w]
    _close(dx, folded.numpy(), dtype, "col2im")


# -------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv2d_forward_and_backward_match_torch(run, case, dtype):
    x, weight, bias, dy, geo = _conv_problem(case, dtype)
    y, saved = run(cv.conv2d_forward, x, weight, bias, **geo)
    dx, dw, db = run(cv.conv2d_backward, dy, saved)
    ref = _torch_conv(x, weight, bias, dy, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    assert y.dtype == dx.dtype == dw.dtype == x.dtype and y.flags.c_contiguous
    for got, want, what in zip((y, dx, dw, db), ref, ("y", "dx", "dw", "db"), strict=True):
        if want is None:
            assert got is None, what
        else:
            assert got.shape == want.shape, what
            _close(got, want, dtype, what)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_conv2d_half_types_accumulate_in_float32(run, dtype):
    x, weight, bias, dy, geo = _conv_problem("stride2-dil2-asym-groups2", dtype)
    y, saved = run(cv.conv2d_forward, x, weight, bias, **geo)
    dx, dw, db = run(cv.conv2d_backward, dy, saved)
    ref = _torch_conv(x, weight, bias, dy, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    for got, want, what in zip((y, dx, dw, db), ref, ("y", "dx", "dw", "db"), strict=True):
        assert got.dtype == x.dtype, what
        _close(got, want, dtype, what)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_batch_chunks_give_the_unchunked_result(run, module, dtype):
    """A cols budget below one sample sends the batch through one sample at a time: same y, dx,
    db; dw summed over the chunks (in float32 for the half types)."""
    x, weight, bias, dy, geo = _conv_problem("stride2-dil2-asym-groups2", dtype)
    whole = run(cv.conv2d_forward, x, weight, bias, **geo)
    module.launches.clear()
    chunked = run(cv.conv2d_forward, x, weight, bias, **geo, max_cols_bytes=1)
    assert [name.split("<")[0] for name, _, _ in module.launches] == ["im2col"] * 2
    module.launches.clear()
    grads = run(cv.conv2d_backward, dy, whole[1])
    grads_chunked = run(cv.conv2d_backward, dy, chunked[1], max_cols_bytes=1)
    assert [name.split("<")[0] for name, _, _ in module.launches] == ["im2col", "col2im"] * 3
    # BLAS may block a product of fewer columns differently: equal up to rounding.
    for got, want, what in zip((chunked[0], *grads_chunked), (whole[0], *grads), ("y", "dx", "dw", "db"), strict=True):
        assert got.dtype == want.dtype, what
        _close(got, np.asarray(want, np.float64), dtype, what)


def test_need_dx_false_skips_col2im_and_need_bias_false_skips_db(run, module):
    x, weight, bias, dy, geo = _conv_problem("3x3-pad1")
    _, saved = run(cv.conv2d_forward, x, weight, bias, **geo)
    module.launches.clear()
    dx, dw, db = run(cv.conv2d_backward, dy, saved, need_dx=False, need_bias=False)
    assert dx is None and db is None
    assert [name for name, _, _ in module.launches] == ["im2col<double>"]
    _close(dw, _torch_conv(x, weight, bias, dy, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])[2],
           "float64", "dw")


def test_non_contiguous_dy(run):
    x, weight, bias, dy, geo = _conv_problem("even-same")
    _, saved = run(cv.conv2d_forward, x, weight, bias, **geo)
    dy_t = np.ascontiguousarray(dy.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # same values, other strides
    assert not dy_t.flags.c_contiguous
    got = cv.conv2d_backward(np, run.module.get_function, dy_t, saved)
    want = cv.conv2d_backward(np, run.module.get_function, dy, saved)
    for a, b, what in zip(got, want, ("dx", "dw", "db"), strict=True):
        _close(a, b, "float64", what)  # db's sum may pair the terms differently


def test_results_do_not_depend_on_thread_order(conv_lib):
    """Gathers: each thread writes its own elements and reads nothing another thread writes."""
    x, weight, bias, dy, geo = _conv_problem("depthwise-stride3-dil2", "float32")
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 3)):
        run = Emulated(raw_module.EmulatedRawModule(conv_lib, order=order, seed=seed))
        y, saved = run(cv.conv2d_forward, x, weight, bias, **geo)
        ym, pooled = run(cv.max_pool2d_forward, x, kernel_size=(3, 2), stride=(2, 1), padding=(1, 1))
        results.append((y, *run(cv.conv2d_backward, dy, saved), ym, run(cv.max_pool2d_backward, ym, pooled)))
    for other in results[1:]:
        for a, b in zip(other, results[0], strict=True):
            assert _same_bits(a, b)


# ------------------------------------------------------------------- pooling
# (N, C, H, W), kernel, stride, padding
POOL_CASES = {
    "3x2-s21-p11": ((2, 3, 7, 8), (3, 2), (2, 1), (1, 1)),
    "2x2-s2": ((1, 2, 6, 7), (2, 2), (2, 2), (0, 0)),
    "3x3-s1-p1": ((2, 2, 5, 5), (3, 3), (1, 1), (1, 1)),
    "1x1-s2": ((1, 3, 5, 4), (1, 1), (2, 2), (0, 0)),
    "4x3-s3x2-p21": ((1, 2, 9, 6), (4, 3), (3, 2), (2, 1)),
}


def _pool_problem(case, dtype, ties=False, seed=0):
    shape, kernel, stride, padding = POOL_CASES[case]
    rng = np.random.default_rng(seed)
    # Three values only: most windows hold ties, which the first maximum must win.
    x = rng.integers(0, 3, shape).astype(dtype) if ties else rng.standard_normal(shape).astype(dtype)
    return x, dict(kernel_size=kernel, stride=stride, padding=padding)


def _torch_max_pool(x, dy, geo):
    xt = _t(x)
    y, idx = F.max_pool2d(xt, geo["kernel_size"], geo["stride"], geo["padding"], return_indices=True)
    y.backward(torch.tensor(np.asarray(dy, np.float64)))
    return y.detach().numpy(), idx.numpy(), xt.grad.numpy()


@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_matches_torch(run, case, dtype, ties):
    x, geo = _pool_problem(case, dtype, ties)
    y, saved = run(cv.max_pool2d_forward, x, **geo)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    dx = run(cv.max_pool2d_backward, dy, saved)
    want_y, want_idx, want_dx = _torch_max_pool(x, dy, geo)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(saved.argmax, want_idx)
    _close(dx, want_dx, dtype, "dx")


def test_max_pool_nan_and_all_minus_inf_windows_follow_torch(run):
    """A NaN always wins (the last one, as PyTorch's ``val > max || isnan(val)``), and a window of
    -inf picks its first real cell: never the padding."""
    x = np.random.default_rng(2).standard_normal((1, 2, 6, 6)).astype(np.float32)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = x[0, 0, 4, 4] = np.nan
    x[0, 1, :3, :3] = -np.inf
    geo = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    y, saved = run(cv.max_pool2d_forward, x, **geo)
    dy = np.ones(y.shape, np.float32)
    want_y, want_idx, want_dx = _torch_max_pool(x, dy, geo)
    np.testing.assert_array_equal(y, want_y.astype(np.float32))
    np.testing.assert_array_equal(saved.argmax, want_idx)
    np.testing.assert_array_equal(run(cv.max_pool2d_backward, dy, saved), want_dx)


@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_matches_torch(run, case, dtype, count_include_pad):
    x, geo = _pool_problem(case, dtype)
    y, saved = run(cv.avg_pool2d_forward, x, **geo, count_include_pad=count_include_pad)
    dy = np.random.default_rng(6).standard_normal(y.shape).astype(dtype)
    dx = run(cv.avg_pool2d_backward, dy, saved)
    xt = _t(x)
    yt = F.avg_pool2d(xt, geo["kernel_size"], geo["stride"], geo["padding"], count_include_pad=count_include_pad)
    yt.backward(torch.tensor(dy.astype(np.float64)))
    _close(y, yt.detach().numpy(), dtype, "y")
    _close(dx, xt.grad.numpy(), dtype, "dx")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pools_in_half_types(run, dtype):
    x, geo = _pool_problem("3x2-s21-p11", _dtype(dtype))
    dy = np.random.default_rng(7).standard_normal((2, 3, 4, 9)).astype(x.dtype)
    y, saved = run(cv.max_pool2d_forward, x, **geo)
    want_y, want_idx, want_dx = _torch_max_pool(x.astype(np.float64), dy, geo)
    np.testing.assert_array_equal(y.astype(np.float64), want_y)
    np.testing.assert_array_equal(saved.argmax, want_idx)
    _close(run(cv.max_pool2d_backward, dy, saved), want_dx, dtype, "max dx")
    y, saved = run(cv.avg_pool2d_forward, x, **geo, count_include_pad=False)
    xt = _t(x.astype(np.float64))
    yt = F.avg_pool2d(xt, geo["kernel_size"], geo["stride"], geo["padding"], count_include_pad=False)
    yt.backward(torch.tensor(dy.astype(np.float64)))
    _close(y, yt.detach().numpy(), dtype, "avg y")
    _close(run(cv.avg_pool2d_backward, dy, saved), xt.grad.numpy(), dtype, "avg dx")


# ------------------------------------------------------- launches and limits
def test_emulator_has_every_instance_and_the_kernels_launch_bounds_are_the_hosts(module):
    assert set(module.name_expressions) == set(ck.CONV_NAME_EXPRESSIONS)
    assert {module.max_threads(name) for name in ck.CONV_NAME_EXPRESSIONS} == {cv.THREADS}


def test_a_block_past_the_launch_bounds_is_refused(module):
    x = np.zeros((1, 1, 4, 4), np.float32)
    args = (x, np.empty(16, np.float32), *(np.int32(v) for v in (1, 1, 4, 4, 1, 1, 4, 4, 1, 1, 0, 0, 1, 1)))
    module.get_function("im2col<float>")((1,), (cv.THREADS,), args)
    with pytest.raises(RuntimeError, match=rf"block of {cv.THREADS + 32} threads exceeds its __launch_bounds__"):
        module.get_function("im2col<float>")((1,), (cv.THREADS + 32,), args)


def test_emulator_is_stricter_than_cupy_about_arguments(module):
    kernel = module.get_function("im2col<float>")
    x = np.zeros((1, 1, 4, 4), np.float32)
    ints = tuple(np.int32(v) for v in (1, 1, 4, 4, 1, 1, 4, 4, 1, 1, 0, 0, 1, 1))
    with pytest.raises(TypeError, match=r"argument 1 \(float\*\) must be float32, got float64"):
        kernel((1,), (256,), (x, np.empty(16), *ints))
    with pytest.raises(TypeError, match=r"argument 2 \(int\) must be a int32 scalar"):
        kernel((1,), (256,), (x, np.empty(16, np.float32), 1, *ints[1:]))
    with pytest.raises(TypeError, match="takes 16 arguments"):
        kernel((1,), (256,), (x, *ints))
    with pytest.raises(ValueError, match="overlaps argument 0"):
        kernel((1,), (256,), (x, x.reshape(-1), *ints))


def test_wrappers_refuse_what_the_kernels_cannot_index(run):
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(TypeError, match="support"):
        run(cv.max_pool2d_forward, x.astype(np.int32), kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))
    with pytest.raises(ValueError, match=r"padding must be in \[0, kernel_size // 2\]"):
        run(cv.max_pool2d_forward, x, kernel_size=(2, 2), stride=(2, 2), padding=(2, 0))
    with pytest.raises(TypeError, match="weight must have the input's dtype"):
        run(cv.conv2d_forward, x, np.zeros((1, 1, 1, 1)), None, stride=(1, 1), padding=(0, 0, 0, 0),
            dilation=(1, 1), groups=1)
    with pytest.raises(ValueError, match=r"OH\*OW = .* exceeds 2\*\*31 - 1"):
        run(cv.im2col, x, (1, 1), padding=(0, 1 << 16, 0, 1 << 15))


class _SparseNumpy:
    """NumPy whose ``empty`` is a given (sparse, memory-mapped) buffer."""

    def __init__(self, buf):
        self.buf = buf

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=np.float64):
        assert int(np.prod(shape)) == self.buf.size and np.dtype(dtype) == self.buf.dtype
        return self.buf.reshape(shape)


def test_column_matrix_past_two_to_the_32_elements_uses_64_bit_indices(conv_lib, tmp_path):
    """Four 1x1 channels padded to a 2**15 x 2**15 output through a 1x1 kernel: cols has
    4 * 2**30 = 2**32 float16 elements (a sparse memory-mapped file of 8 GiB: pages take space only
    once touched), and im2col as many threads. Only the grid's last block runs; its grid-stride steps
    write the last 256 elements, the very last of which is channel 3's pixel at output
    (2**15 - 1, 2**15 - 1). Thread indices or offsets in 32 bits would wrap long before."""
    if sys.maxsize < 2**40:
        pytest.skip("needs a 64-bit address space")
    side = 1 << 15
    total = 4 * side * side
    path = tmp_path / "cols.f16"
    cols = out = None
    try:
        cols = np.memmap(path, np.float16, "w+", shape=(total,))
        if os.stat(path).st_blocks * 512 > 1 << 26:
            pytest.skip(f"{tmp_path} has no sparse files")
        cols[-1024:] = np.float16(np.nan)
        blocks = min(-(-total // cv.THREADS), cv._MAX_GRID)
        module = raw_module.EmulatedRawModule(conv_lib, blocks=(blocks - 1, blocks))
        x = np.arange(1, 5, dtype=np.float16).reshape(1, 4, 1, 1)
        out = cv.im2col(_SparseNumpy(cols), module.get_function, x, (1, 1), padding=(side - 1, 0, side - 1, 0))
        assert out.shape == (4, side * side) and module.launches == [("im2col<__half>", (blocks,), (cv.THREADS,))]
        tail = np.asarray(cols[-1024:], np.float64)
        assert tail[-1] == 4 and not tail[-256:-1].any() and np.isnan(tail[:-256]).all()
    finally:
        cols = out = None
        path.unlink(missing_ok=True)


def test_kernels_compile_one_instance_per_module_and_device(monkeypatch):
    """cupy_function (and the loss's _sce_function) hand NVRTC the whole source with one name
    expression, and keep the result per device: a loaded module belongs to its device."""
    from types import SimpleNamespace

    made = []
    current = SimpleNamespace(id=0)

    class FakeModule:
        def __init__(self, code, options, name_expressions):
            made.append((code, options, tuple(name_expressions), current.id))

        def get_function(self, name):
            return ("kernel", name, current.id)

    fake = SimpleNamespace(RawModule=FakeModule, cuda=SimpleNamespace(Device=lambda: current))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(ck, "_COMPILED", {})
    assert cv.cupy_function("col2im<float>") == ("kernel", "col2im<float>", 0)
    assert cv.cupy_function("col2im<float>") == ("kernel", "col2im<float>", 0)
    (code, options, names, _), = made
    assert code == ck.kernel_source(ck.CONV_SOURCE) and options == ("-std=c++17",) and names == ("col2im<float>",)
    current.id = 1
    assert cv.cupy_function("col2im<float>") == ("kernel", "col2im<float>", 1) and len(made) == 2
    sce = ck.SCE_NAME_EXPRESSIONS[0]
    assert ck._sce_function(sce) == ("kernel", sce, 1)
    assert made[-1][2] == (sce,) and made[-1][0] == ck.kernel_source(ck.SCE_SOURCE)
    with pytest.raises(KeyError, match="is not a kernel of conv2d.cu"):
        cv.cupy_function("col2im<int>")


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not installed")
def test_conv_kernels_compile_for_sm80_and_sm90_without_spills(capsys):
    check = load_tool("tools/check_kernels.py")
    assert check.main(["--source", ck.CONV_SOURCE]) == 0
    out = capsys.readouterr().out
    assert "check_kernels: ok: 1 source(s) x 2 arch(s) (nvcc), no spills" in out
    for arch in ("sm_80", "sm_90"):
        for name in ck.CONV_NAME_EXPRESSIONS:
            assert f"{arch:6} {name} " in out


# ----------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(_cupy is None, reason="no usable CUDA device")
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_backend_conv_and_pools_match_torch(case, dtype):
    backend = dc.get_backend("cupy")
    x, weight, bias, dy, geo = _conv_problem(case, dtype)
    g = lambda a: None if a is None else _cupy.asarray(a)  # noqa: E731
    y, saved = backend.conv2d(g(x), g(weight), g(bias), **geo)
    dx, dw, db = backend.conv2d_backward(g(dy), saved)
    ref = _torch_conv(x, weight, bias, dy, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    for got, want, what in zip((y, dx, dw, db), ref, ("y", "dx", "dw", "db"), strict=True):
        if want is not None:
            _close(_cupy.asnumpy(got), want, dtype, what)
    pool = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1))
    ym, msaved = backend.max_pool2d(g(x), **pool)
    want_y, want_idx, want_dx = _torch_max_pool(x, np.ones(ym.shape), pool)
    np.testing.assert_array_equal(_cupy.asnumpy(ym), want_y.astype(dtype))
    _close(_cupy.asnumpy(backend.max_pool2d_backward(_cupy.ones_like(ym), msaved)), want_dx, dtype, "max dx")
    ya, asaved = backend.avg_pool2d(g(x), **pool, count_include_pad=False)
    xt = _t(x)
    yt = F.avg_pool2d(xt, (3, 2), (2, 1), (1, 1), count_include_pad=False)
    yt.backward(torch.ones_like(yt))
    _close(_cupy.asnumpy(ya), yt.detach().numpy(), dtype, "avg y")
    _close(_cupy.asnumpy(backend.avg_pool2d_backward(_cupy.ones_like(ya), asaved)), xt.grad.numpy(), dtype, "avg dx")
