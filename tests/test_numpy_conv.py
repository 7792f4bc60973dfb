"""NumPy backend's convolution and pooling (deepcore/backend/numpy_conv.py) against torch.nn.functional:
forward values and autograd gradients on awkward geometries, in float32 and float64; need_dx=False;
pooled buffers that never corrupt a pending backward; PyTorch's tie and NaN rules for max pooling."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend import numpy_conv

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.fixture(scope="module")
def nb():
    return dc.get_backend("numpy")


def assert_close(got, want, dtype) -> None:
    """Elementwise within ``rtol`` of the reference, with an absolute floor of ``rtol * max|reference|``
    (sums of mixed signs may cancel to near zero, where only the scale of the terms says what is close)."""
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == dtype
    tol = TOL[dtype]
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(scale, 1e-30))


def torch_conv(x, w, b, stride, padding, dilation, groups, dy):
    """torch's y, dx, dW, db; asymmetric padding (top, bottom, left, right) through F.pad."""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    top, bottom, left, right = padding
    y = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, bt, stride=stride, dilation=dilation, groups=groups)
    if dy is None:
        return y
    y.backward(torch.tensor(dy))
    return y, xt.grad, wt.grad, None if bt is None else bt.grad


# (N, C, H, W), (O, KH, KW), stride, padding (top, bottom, left, right), dilation, groups, bias
CONV_CASES = {
    "3x3-pad1": ((2, 3, 8, 8), (4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    "stride2": ((2, 3, 9, 8), (5, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, True),
    "dilation2": ((2, 2, 9, 10), (3, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, True),
    "stride2-dilation2-asym": ((2, 3, 11, 9), (4, 3, 3), (2, 1), (0, 1, 1, 0), (2, 2), 1, True),
    "asym-pad": ((3, 2, 6, 7), (3, 2, 2), (1, 1), (0, 1, 1, 0), (1, 1), 1, True),
    "groups2": ((2, 4, 7, 7), (6, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, True),
    "depthwise": ((2, 5, 7, 6), (5, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 5, True),
    "depthwise-x2-stride2": ((2, 3, 8, 8), (6, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 3, False),
    "1x1": ((3, 6, 5, 4), (4, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, True),
    "1x1-stride2": ((2, 3, 5, 5), (2, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, True),
    "non-square": ((2, 3, 9, 6), (4, 3, 2), (1, 2), (1, 1, 0, 1), (1, 1), 1, True),
    "N1": ((1, 2, 5, 5), (3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    "out-1x1": ((2, 3, 4, 5), (2, 4, 5), (1, 1), (0, 0, 0, 0), (1, 1), 1, True),
    "out-1x1-padded": ((2, 2, 2, 2), (3, 3, 3), (2, 2), (1, 0, 0, 1), (1, 1), 1, True),
    "kernel-larger-than-input": ((1, 2, 2, 3), (2, 5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, True),
    "no-bias": ((2, 3, 6, 6), (4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, False),
    "same-even": ((2, 2, 6, 6), (3, 4, 4), (1, 1), (1, 2, 1, 2), (1, 1), 1, True),
}


def make_conv(case, dtype, seed=0):
    xshape, (o, kh, kw), stride, padding, dilation, groups, bias = CONV_CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xshape).astype(dtype)
    w = rng.standard_normal((o, xshape[1] // groups, kh, kw)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    geom = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = torch_conv(x, w, b, stride, padding, dilation, groups, None)
    dy = rng.standard_normal(tuple(y.shape)).astype(dtype)
    return x, w, b, geom, dy


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_torch(nb, case, dtype):
    x, w, b, geom, dy = make_conv(case, dtype)
    y, saved = nb.conv2d(x, w, b, **geom)
    ref = torch_conv(x, w, b, geom["stride"], geom["padding"], geom["dilation"], geom["groups"], dy)
    assert_close(y, ref[0], dtype)
    assert y.flags.c_contiguous
    dx, dw, db = nb.conv2d_backward(dy, saved)
    assert_close(dx, ref[1], dtype)
    assert_close(dw, ref[2], dtype)
    if b is None:
        assert db is None
    else:
        assert_close(db, ref[3], dtype)


def test_need_dx_false_skips_dx_and_gives_the_same_dw(nb, monkeypatch):
    x, w, b, geom, dy = make_conv("stride2-dilation2-asym", np.float64)
    y, saved = nb.conv2d(x, w, b, **geom)
    dx_full, dw_full, db_full = nb.conv2d_backward(dy, saved)
    # No col2im and no dcols product without dx: make both fail if reached.
    monkeypatch.setattr(numpy_conv, "_col2im", lambda *a: pytest.fail("col2im ran with need_dx=False"))
    dx, dw, db = nb.conv2d_backward(dy, saved, need_dx=False)
    assert dx is None
    np.testing.assert_array_equal(dw, dw_full)
    np.testing.assert_array_equal(db, db_full)
    dx, dw, db = nb.conv2d_backward(dy, saved, need_dx=False, need_bias=False)
    assert dx is None and db is None
    np.testing.assert_array_equal(dw, dw_full)


@pytest.mark.parametrize("order", ["reversed", "in-order"])
def test_two_forwards_before_two_backwards(nb, order):
    """The buffer-reuse trap: a second forward (same shapes) must not overwrite the first's saved buffer."""
    x1, w, b, geom, dy1 = make_conv("3x3-pad1", np.float64, seed=1)
    x2, _, _, _, dy2 = make_conv("3x3-pad1", np.float64, seed=2)
    _, s1 = nb.conv2d(x1, w, b, **geom)
    _, s2 = nb.conv2d(x2, w, b, **geom)
    _, s_eval = nb.conv2d(x2 * 3.0, w, b, **geom)  # an evaluation forward whose saved is dropped at once
    del s_eval
    gc.collect()
    _, s3 = nb.conv2d(x2 * -2.0, w, b, **geom)  # may take the buffer s_eval gave back
    backs = [(s2, x2, dy2), (s1, x1, dy1)] if order == "reversed" else [(s1, x1, dy1), (s2, x2, dy2)]
    for saved, x, dy in backs:
        ref = torch_conv(x, w, b, geom["stride"], geom["padding"], geom["dilation"], geom["groups"], dy)
        for _ in range(2):  # a backward run twice is still right: dcols never lands in the saved buffer
            dx, dw, db = nb.conv2d_backward(dy, saved)
            assert_close(dx, ref[1], np.float64)
            assert_close(dw, ref[2], np.float64)
            assert_close(db, ref[3], np.float64)
    del s3


def test_dirty_pooled_buffers_do_not_leak_into_padding(nb):
    """A pooled buffer holds whatever its last user left; the stripes that read padding are zeroed."""
    x, w, b, geom, dy = make_conv("stride2-dilation2-asym", np.float64)
    y0, s0 = nb.conv2d(x, w, b, **geom)
    cols_shape = s0.cols.shape
    del s0
    numpy_conv.buffer_pool.clear()
    for _ in range(3):
        numpy_conv.buffer_pool.give(np.full(cols_shape, np.nan))
    y, saved = nb.conv2d(x, w, b, **geom)
    ref = torch_conv(x, w, b, geom["stride"], geom["padding"], geom["dilation"], geom["groups"], dy)
    assert_close(y, ref[0], np.float64)
    dx, dw, db = nb.conv2d_backward(dy, saved)  # dcols comes from the NaN-filled pool too
    assert_close(dx, ref[1], np.float64)
    assert_close(dw, ref[2], np.float64)
    numpy_conv.buffer_pool.clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_conv2d_takes_non_contiguous_x_and_dy(nb, dtype):
    x, w, b, geom, dy = make_conv("groups2", dtype)
    ref = torch_conv(x, w, b, geom["stride"], geom["padding"], geom["dilation"], geom["groups"], dy)
    x_view = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # x's values, columns outermost
    assert not x_view.flags.c_contiguous
    y, saved = nb.conv2d(x_view, w, b, **geom)
    assert_close(y, ref[0], dtype)
    # dy as a view with reversed memory order (the rows transposed twice) and as a strided slice
    transposed = np.ascontiguousarray(dy.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    padded = np.zeros(dy.shape[:3] + (2 * dy.shape[3],), dtype=dtype)
    padded[..., ::2] = dy
    for view in (transposed, padded[..., ::2]):
        assert not view.flags.c_contiguous
        dx, dw, db = nb.conv2d_backward(view, saved)
        assert_close(dx, ref[1], dtype)
        assert_close(dw, ref[2], dtype)
        assert_close(db, ref[3], dtype)


def test_conv2d_float16_accumulates_in_float32(nb):
    x, w, b, geom, dy = make_conv("groups2", np.float32)
    x16, w16, b16, dy16 = (a.astype(np.float16) for a in (x, w, b, dy))
    y, saved = nb.conv2d(x16, w16, b16, **geom)
    dx, dw, db = nb.conv2d_backward(dy16, saved)
    assert saved.cols.dtype == np.float32
    y32, s32 = nb.conv2d(*(a.astype(np.float32) for a in (x16, w16, b16)), **geom)
    ref = (y32, *nb.conv2d_backward(dy16.astype(np.float32), s32))
    for got, want in zip((y, dx, dw, db), ref, strict=True):
        assert got.dtype == np.float16
        # float32 sums rounded once to float16: within half a float16 ulp of the float32 result
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2 ** -10, atol=1e-3 * np.abs(want).max())


def test_buffer_pool_keeps_at_most_its_limit():
    pool = numpy_conv.BufferPool(limit_bytes=3 * 800)
    bufs = [np.empty(100) for _ in range(4)]  # 800 bytes each
    for buf in bufs:
        pool.give(buf)
    assert pool.idle_bytes == 3 * 800
    assert pool.take((100,), np.float64) is bufs[3]  # the most recently given of the shape
    assert pool.take((100, 1), np.float64) is not None  # another shape: a fresh buffer
    pool.give(np.empty(1000))  # larger than the limit: not kept
    assert pool.idle_bytes == 2 * 800


# ------------------------------------------------------------------------------------------------ pooling

def torch_pool(kind, x, dy, kernel, stride, padding, count_include_pad=True):
    xt = torch.tensor(x, requires_grad=True)
    if kind == "max":
        y = F.max_pool2d(xt, kernel, stride, padding)
    else:
        y = F.avg_pool2d(xt, kernel, stride, padding, count_include_pad=count_include_pad)
    if dy is None:
        return y
    y.backward(torch.tensor(dy))
    return y, xt.grad


# (N, C, H, W), kernel, stride, padding
POOL_CASES = {
    "2x2-s2": ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0)),
    "2x2-s2-odd": ((2, 3, 7, 9), (2, 2), (2, 2), (0, 0)),
    "3x3-s2-pad1": ((2, 2, 9, 8), (3, 3), (2, 2), (1, 1)),
    "3x3-s1-pad1": ((1, 2, 5, 6), (3, 3), (1, 1), (1, 1)),
    "3x2-s(1,2)-pad(1,1)": ((2, 2, 7, 7), (3, 2), (1, 2), (1, 1)),
    "stride>kernel": ((2, 2, 9, 9), (2, 2), (3, 3), (0, 0)),
    "out-1x1": ((2, 3, 4, 5), (4, 5), (1, 1), (0, 0)),
    "pad(0,1)": ((2, 2, 5, 6), (2, 3), (2, 2), (0, 1)),
}


def make_pool(case, dtype, kind, count_include_pad=True, x=None, seed=0):
    shape, kernel, stride, padding = POOL_CASES[case]
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.standard_normal(shape).astype(dtype)
    y = torch_pool(kind, x, None, kernel, stride, padding, count_include_pad)
    dy = rng.standard_normal(tuple(y.shape)).astype(dtype)
    return x, dy, dict(kernel_size=kernel, stride=stride, padding=padding)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_max_pool2d_matches_torch(nb, case, dtype):
    x, dy, geom = make_pool(case, dtype, "max")
    y, saved = nb.max_pool2d(x, **geom)
    ref = torch_pool("max", x, dy, geom["kernel_size"], geom["stride"], geom["padding"])
    assert_close(y, ref[0], dtype)
    assert_close(nb.max_pool2d_backward(dy, saved), ref[1], dtype)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_avg_pool2d_matches_torch(nb, case, dtype, count_include_pad):
    x, dy, geom = make_pool(case, dtype, "avg", count_include_pad)
    y, saved = nb.avg_pool2d(x, **geom, count_include_pad=count_include_pad)
    ref = torch_pool("avg", x, dy, geom["kernel_size"], geom["stride"], geom["padding"], count_include_pad)
    assert_close(y, ref[0], dtype)
    assert_close(nb.avg_pool2d_backward(dy, saved), ref[1], dtype)


@pytest.mark.parametrize("case", ["2x2-s2", "3x3-s2-pad1", "3x3-s1-pad1", "3x2-s(1,2)-pad(1,1)"])
@pytest.mark.parametrize("values", ["all-equal", "few-levels", "all-minus-inf", "nan"])
def test_max_pool2d_ties_and_nan_follow_torch(nb, case, values):
    """Ties send the gradient to the first maximum in row-major window order; padding never wins,
    even over -inf; a NaN wins its window (torch: the last NaN of the window) and the value is NaN."""
    shape = POOL_CASES[case][0]
    rng = np.random.default_rng(3)
    if values == "all-equal":
        x = np.ones(shape)
    elif values == "few-levels":
        x = rng.integers(0, 3, shape).astype(np.float64)
    elif values == "all-minus-inf":
        x = np.full(shape, -np.inf)
    else:
        x = rng.standard_normal(shape)
        x.reshape(-1)[rng.choice(x.size, size=max(2, x.size // 8), replace=False)] = np.nan
    x, dy, geom = make_pool(case, np.float64, "max", x=x)
    y, saved = nb.max_pool2d(x, **geom)
    ref = torch_pool("max", x, dy, geom["kernel_size"], geom["stride"], geom["padding"])
    np.testing.assert_array_equal(y, ref[0].detach().numpy())  # NaN == NaN for assert_array_equal
    dx, want = nb.max_pool2d_backward(dy, saved), ref[1].numpy()
    np.testing.assert_array_equal(dx != 0, want != 0)  # the same cells get gradient
    np.testing.assert_allclose(dx, want, rtol=1e-15, atol=0)  # overlapping windows add in another order


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_keeps_float16_and_takes_non_contiguous_dy(nb, kind):
    x, dy, geom = make_pool("3x3-s2-pad1", np.float32, kind)
    x16 = x.astype(np.float16)
    dy16 = np.asfortranarray(dy.astype(np.float16))
    if kind == "max":
        y, saved = nb.max_pool2d(x16, **geom)
        dx = nb.max_pool2d_backward(dy16, saved)
    else:
        y, saved = nb.avg_pool2d(x16, **geom, count_include_pad=False)
        dx = nb.avg_pool2d_backward(dy16, saved)
    ref = torch_pool(kind, x16.astype(np.float32), dy16.astype(np.float32), geom["kernel_size"], geom["stride"],
                     geom["padding"], False)
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), ref[0].detach().numpy(), rtol=2 ** -10, atol=1e-3)
    np.testing.assert_allclose(dx.astype(np.float32), ref[1].numpy(), rtol=2 ** -10, atol=1e-3)
