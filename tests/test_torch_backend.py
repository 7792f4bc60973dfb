"""The torch backend's overrides (deepcore/backend/torch_backend.py) against the array-API reference on
the same tensors, in-place updates keeping each tensor's identity, and backends found by plain name."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend import Backend, BackendUnavailableError

torch = pytest.importorskip("torch")
compat = pytest.importorskip("array_api_compat.torch")

from deepcore.backend.torch_backend import TorchBackend  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def tb() -> TorchBackend:
    return dc.get_backend("torch")


@pytest.fixture(scope="module")
def ref() -> Backend:
    return Backend(compat, name="torch-reference")


def t(a, dtype=torch.float32):
    return torch.tensor(np.asarray(a), dtype=dtype)


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=tol, atol=tol)


rng = np.random.default_rng(0)
X = rng.normal(size=(9, 6)).astype(np.float32)
W = rng.normal(size=(4, 6)).astype(np.float32)
B = rng.normal(size=(4,)).astype(np.float32)
DY = rng.normal(size=(9, 4)).astype(np.float32)


def test_torch_tensors_get_the_torch_backend(tb):
    assert isinstance(tb, TorchBackend)
    assert dc.get_backend(torch.zeros(2)) is tb
    assert dc.get_backend(torch) is tb
    with dc.use_backend("torch") as b:
        assert b is tb and isinstance(dc.nn.Linear(2, 3).weight.value, torch.Tensor)


def test_single_device_only_without_an_accelerator(tb):
    assert tb.single_device is (not torch.cuda.is_available() and not torch.backends.mps.is_available())


# ------------------------------------------------------------------ dense algebra
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_backward(tb, ref, bias):
    x, w, b = t(X), t(W), t(B) if bias else None
    close(tb.linear(x, w, b), ref.linear(x, w, b))
    for need_dx in (True, False):
        got = tb.linear_backward(t(DY), x, w, need_dx=need_dx, need_bias=bias)
        want = ref.linear_backward(t(DY), x, w, need_dx=need_dx, need_bias=bias)
        for g, r in zip(got, want, strict=True):
            assert (g is None) == (r is None)
            if g is not None:
                close(g, r, 1e-5)


def test_linear_mixed_dtypes_take_the_reference(tb, ref):
    x = t(X, torch.float64)
    y = tb.linear(x, t(W), t(B))
    assert y.dtype == torch.float64
    close(y, ref.linear(x, t(W), t(B)))


@pytest.mark.parametrize("ta, tb_", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul(tb, ref, ta, tb_):
    a = t(rng.normal(size=(5, 3) if ta else (3, 5)))
    b = t(rng.normal(size=(7, 5) if tb_ else (5, 7)), torch.float64)
    got = tb.matmul(a, b, transpose_a=ta, transpose_b=tb_)
    assert got.dtype == torch.float64
    close(got, ref.matmul(a, b, transpose_a=ta, transpose_b=tb_))


# ------------------------------------------------------------------ activations
X_ACT = np.array([[-2.0, -0.5, 0.0, 0.3, 4.0, -30.0, 30.0]], dtype=np.float32)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_activations(tb, ref, name):
    close(getattr(tb, name)(t(X_ACT)), getattr(ref, name)(t(X_ACT)))


def test_activation_gradients(tb, ref):
    x, dy = t(X_ACT), t(rng.normal(size=X_ACT.shape))
    close(tb.relu_backward(dy, x), ref.relu_backward(dy, x))
    close(tb.leaky_relu(x, 0.1), ref.leaky_relu(x, 0.1))
    close(tb.leaky_relu_backward(dy, x, 0.1), ref.leaky_relu_backward(dy, x, 0.1))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_family(tb, ref, axis):
    x = t(rng.normal(size=(5, 7)) * 3)
    dy = t(rng.normal(size=(5, 7)))
    close(tb.softmax(x, axis), ref.softmax(x, axis))
    close(tb.log_softmax(x, axis), ref.log_softmax(x, axis), 1e-5)
    y = tb.softmax(x, axis)
    close(tb.softmax_backward(dy, y, axis), ref.softmax_backward(dy, y, axis))


# ------------------------------------------------------------------ loss core
LOGITS = (rng.normal(size=(12, 5)) * 4).astype(np.float32)
LABELS = rng.integers(0, 5, 12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_softmax_cross_entropy_fused(tb, ref, reduction, label_dtype):
    s, y = t(LOGITS), t(LABELS, label_dtype)
    loss, grad = tb.softmax_cross_entropy(s, y, reduction=reduction)
    want_loss, want_grad = ref.softmax_cross_entropy(s, y, reduction=reduction)
    close(loss, want_loss, 1e-5)
    close(grad, want_grad)
    assert loss.dtype == grad.dtype == torch.float32


def test_softmax_cross_entropy_float64_and_half(tb, ref):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float16, 1e-3)):
        s, y = t(LOGITS, dtype), t(LABELS, torch.int64)
        loss, grad = tb.softmax_cross_entropy(s, y)
        want_loss, want_grad = ref.softmax_cross_entropy(s, y)
        assert loss.dtype == grad.dtype == dtype
        close(loss.double(), want_loss.double(), tol)
        close(grad.double(), want_grad.double(), tol)


@pytest.mark.parametrize("kwargs", [
    {"label_smoothing": 0.1},
    {"ignore_index": 2},
    {"class_weights": "weights"},
    {"class_weights": "weights", "label_smoothing": 0.2, "ignore_index": 1, "reduction": "sum"},
])
def test_softmax_cross_entropy_other_cases(tb, ref, kwargs):
    kwargs = dict(kwargs)
    if kwargs.get("class_weights") == "weights":
        kwargs["class_weights"] = t([0.5, 1.0, 2.0, 1.5, 0.1])
    s, y = t(LOGITS), t(LABELS, torch.int64)
    for g, r in zip(tb.softmax_cross_entropy(s, y, **kwargs), ref.softmax_cross_entropy(s, y, **kwargs),
                    strict=True):
        close(g, r, 1e-5)


def test_softmax_cross_entropy_bad_labels_give_nan_rows(tb, ref):
    s, y = t(LOGITS[:4]), t([0, 7, -1, 2], torch.int64)
    loss, grad = tb.softmax_cross_entropy(s, y, reduction="none")
    want_loss, want_grad = ref.softmax_cross_entropy(s, y, reduction="none")
    np.testing.assert_array_equal(np.isnan(loss.numpy()), [False, True, True, False])
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=TOL, equal_nan=True)
    np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=TOL, atol=TOL, equal_nan=True)


def test_labels_in_range(tb):
    assert tb.labels_in_range(t([0, 4, 2], torch.int64), 5)
    assert not tb.labels_in_range(t([0, 5], torch.int64), 5)
    assert not tb.labels_in_range(t([-1, 2], torch.int32), 5)
    assert tb.labels_in_range(t([], torch.int64), 5)


def test_losses_module_runs_the_fused_core(tb, ref):
    from deepcore import losses

    s, y = t(LOGITS), t(LABELS, torch.int64)
    loss, grad = losses.softmax_cross_entropy(s, y)
    want_loss, want_grad = ref.softmax_cross_entropy(s, y)
    close(loss, want_loss, 1e-5)
    close(grad, want_grad)
    with pytest.raises(ValueError, match=r"labels\[1\] = 9"):
        losses.softmax_cross_entropy(s[:2], t([1, 9], torch.int64))


# ------------------------------------------------------------------ optimizer updates
P0 = rng.normal(size=(3, 4)).astype(np.float32)
GRADS = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("kw", [
    {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.1},
    {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.9, "dampening": 0.3, "nesterov": False, "weight_decay": 0.05},
    {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.0},
    {"momentum": 0.8, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01},
], ids=["plain", "wd", "momentum", "dampening-wd", "nesterov", "nesterov-wd"])
def test_sgd_update_in_place_matches_reference(tb, ref, kw):
    value, buf = t(P0), None
    want, want_buf = t(P0), None
    identity, pointer = id(value), value.data_ptr()
    for k, g in enumerate(GRADS):
        grad = t(g)
        grad_before = grad.clone()
        value, new_buf = tb.sgd_update(value, grad, buf, lr=0.1, first_step=k == 0, **kw)
        want, want_buf = ref.sgd_update(want, t(g), want_buf, lr=0.1, first_step=k == 0, **kw)
        assert id(value) == identity and value.data_ptr() == pointer  # in place
        assert torch.equal(grad, grad_before)  # the caller's gradient is never written
        if kw["momentum"]:
            assert new_buf is not grad and (buf is None or new_buf is buf)
        buf = new_buf
        close(value, want)
        if want_buf is not None:
            close(buf, want_buf)


@pytest.mark.parametrize("decoupled, wd", [(False, 0.0), (False, 0.1), (True, 0.01), (True, 0.0)])
def test_adam_update_in_place_matches_reference(tb, ref, decoupled, wd):
    value, m, v = t(P0), torch.zeros(3, 4), torch.zeros(3, 4)
    want, wm, wv = t(P0), torch.zeros(3, 4), torch.zeros(3, 4)
    ids = [id(value), id(m), id(v)]
    for step, g in enumerate(GRADS, 1):
        grad = t(g)
        value, m, v = tb.adam_update(value, grad, m, v, step=step, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                                     weight_decay=wd, decoupled=decoupled)
        want, wm, wv = ref.adam_update(want, t(g), wm, wv, step=step, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                                       weight_decay=wd, decoupled=decoupled)
        assert [id(value), id(m), id(v)] == ids
        assert torch.equal(grad, t(g))
        close(value, want)
        close(m, wm)
        close(v, wv)


def test_tensors_that_require_grad_are_updated_out_of_place(tb):
    value = t(P0).requires_grad_()
    new, _ = tb.sgd_update(value, t(GRADS[0]), None, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                           weight_decay=0.0, first_step=True)
    assert new is not value
    np.testing.assert_allclose(new.detach().numpy(), P0 - 0.1 * GRADS[0], rtol=TOL)


def test_optimizers_against_torch_optim(tb):
    """deepcore's SGD (nesterov, weight decay) and AdamW on the torch backend step as torch.optim does."""
    from deepcore import optim
    from deepcore.nn import Param

    for make_dc, make_torch in (
        (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.05), lambda p: torch.optim.AdamW(p, lr=0.01,
                                                                                            weight_decay=0.05)),
    ):
        p = Param(t(P0), "w")
        ours = make_dc([p])
        theirs_p = torch.nn.Parameter(t(P0))
        theirs = make_torch([theirs_p])
        for g in GRADS:
            p.grad = t(g)
            ours.step()
            theirs_p.grad = t(g)
            theirs.step()
        close(p.value, theirs_p.detach())


def test_add_into_and_from_numpy(tb):
    acc = t([1.0, 2.0])
    out = tb.add_into(acc, t([0.5, 0.25], torch.float64))
    assert out is acc and out.dtype == torch.float32
    np.testing.assert_allclose(acc.numpy(), [1.5, 2.25])
    a = np.arange(3.0)
    moved = tb.from_numpy(a)
    moved += 1  # the optimizers write in place: a parameter built from an array must not alias it
    np.testing.assert_array_equal(a, [0.0, 1.0, 2.0])


def test_training_step_matches_reference(tb, ref):
    """A whole MLP step (forward, fused loss, backward, SGD with momentum) on TorchBackend and on the
    reference, from the same weights."""
    from deepcore import losses, nn, optim

    def run(backend):
        with dc.use_backend(backend):
            model = nn.Sequential(nn.Linear(6, 8, seed=1), nn.ReLU(), nn.Linear(8, 5, seed=2))
        assert dc.get_backend(model.parameters()[0].value) is backend
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = t(X), t(LABELS[:9], torch.int64)
        for _ in range(3):
            logits, back = model.forward(x, train=True)
            _, g = losses.softmax_cross_entropy(logits, y)
            back(g)
            opt.step()
            opt.zero_grad()
        return [p.value for p in model.parameters()]

    # For the second run the registry's torch entry is the reference, so the layers, the loss and the
    # optimizer find it from the tensors.
    from deepcore.backend import registry

    ours = run(tb)
    saved = registry._registry["torch"].instance
    registry._registry["torch"].instance = ref
    registry._by_type.clear()
    try:
        theirs = run(ref)
    finally:
        registry._registry["torch"].instance = saved
        registry._by_type.clear()
    for a, b in zip(ours, theirs, strict=True):
        close(a, b, 1e-5)


# ------------------------------------------------------------------ plain names
def test_plain_library_names():
    assert dc.get_backend("numpy").name == "numpy"
    assert dc.get_backend("torch").name == "torch"
    assert dc.get_backend("array_api_compat.torch") is dc.get_backend("torch")
    with dc.use_backend("numpy") as b:
        assert b.name == "numpy"


def test_jax_by_plain_name():
    if importlib.util.find_spec("jax") is None:
        for name in ("jax", "jax.numpy"):
            with pytest.raises(BackendUnavailableError, match="jax is not installed.*pip install jax"):
                dc.get_backend(name)
        assert "pip install jax" in dc.available_backends()["jax"]
        return
    import jax.numpy as jnp

    b = dc.get_backend("jax")
    assert b.xp is jnp and dc.get_backend("jax.numpy") is b and dc.get_backend(jnp.zeros(2)) is b
    with dc.use_backend("jax"):
        layer = dc.nn.Linear(3, 2)
    assert dc.get_backend(layer.weight.value) is b


# ------------------------------------------------------------------ convolution and pooling
CONV_CASES = [
    # (C, O, kernel, stride, padding (top, bottom, left, right), dilation, groups, bias)
    (3, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    (3, 4, (3, 2), (2, 1), (0, 1, 2, 0), (1, 1), 1, False),  # asymmetric ("same" with an even kernel)
    (4, 6, (2, 3), (1, 2), (1, 1, 0, 0), (2, 2), 2, True),
    (4, 4, (3, 3), (2, 2), (2, 2, 2, 2), (1, 1), 4, True),  # depthwise
    (1, 2, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["f32", "f64"])
def test_conv2d_matches_reference(tb, ref, case, dtype, tol):
    c, o, k, stride, padding, dilation, groups, bias = case
    g = np.random.default_rng(3)
    x = t(g.normal(size=(2, c, 7, 8)), dtype)
    w = t(g.normal(size=(o, c // groups, *k)), dtype)
    b = t(g.normal(size=(o,)), dtype) if bias else None
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    y, saved = tb.conv2d(x, w, b, **kw)
    y_ref, saved_ref = ref.conv2d(x, w, b, **kw)
    assert y.dtype == dtype and y.is_contiguous()
    close(y, y_ref, tol)
    dy = t(g.normal(size=tuple(y.shape)), dtype)
    for need_dx in (True, False):
        got = tb.conv2d_backward(dy, saved, need_dx=need_dx, need_bias=bias)
        want = ref.conv2d_backward(dy, saved_ref, need_dx=need_dx, need_bias=bias)
        for a, r in zip(got, want, strict=True):
            assert (a is None) == (r is None)
            if a is not None:
                assert a.shape == r.shape and a.dtype == r.dtype
                close(a, r, tol * 10)


def test_conv2d_half_precision_accumulates_in_float32(tb, ref):
    g = np.random.default_rng(4)
    x, w = t(g.normal(size=(2, 3, 6, 6)), torch.float16), t(g.normal(size=(4, 3, 3, 3)), torch.float16)
    y, _ = tb.conv2d(x, w, None, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    y_ref, _ = ref.conv2d(x, w, None, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    assert y.dtype == torch.float16
    close(y.float(), y_ref.float(), 1e-2)


POOL_CASES = [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((3, 2), (1, 2), (1, 0)), ((2, 3), (1, 1), (1, 1))]


@pytest.mark.parametrize("kernel, stride, padding", POOL_CASES)
def test_max_pool_matches_reference(tb, ref, kernel, stride, padding):
    g = np.random.default_rng(5)
    # Rounded values: ties inside windows, where the first maximum must win.
    x = t(np.round(g.normal(size=(2, 3, 7, 6)) * 2) / 2)
    y, saved = tb.max_pool2d(x, kernel_size=kernel, stride=stride, padding=padding)
    y_ref, saved_ref = ref.max_pool2d(x, kernel_size=kernel, stride=stride, padding=padding)
    close(y, y_ref)
    dy = t(g.normal(size=tuple(y.shape)))
    close(tb.max_pool2d_backward(dy, saved), ref.max_pool2d_backward(dy, saved_ref))


@pytest.mark.parametrize("kernel, stride, padding", POOL_CASES)
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_matches_reference(tb, ref, kernel, stride, padding, count_include_pad):
    g = np.random.default_rng(6)
    x = t(g.normal(size=(2, 3, 7, 6)))
    kw = {"kernel_size": kernel, "stride": stride, "padding": padding, "count_include_pad": count_include_pad}
    y, saved = tb.avg_pool2d(x, **kw)
    y_ref, saved_ref = ref.avg_pool2d(x, **kw)
    close(y, y_ref)
    dy = t(g.normal(size=tuple(y.shape)))
    close(tb.avg_pool2d_backward(dy, saved), ref.avg_pool2d_backward(dy, saved_ref))
