"""The speed work on the NumPy path keeps semantics: the plain softmax-CE path gives the general
path's bits, cheap label checks still name the bad label, ``need_input_grad=False`` changes no
parameter gradient, the optimizer's fast checks still refuse what the full checks refuse, and a
float32 training step never makes a float64 array."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import losses, nn, optim
from deepcore.backend.base import Backend
from tests.helpers import arr, to_np


# ------------------------------------------------------------ softmax CE fast path
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (128, 10), (64, 40), (5, 1000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_that_mask_nothing_leave_softmax_ce_bitwise_unchanged(dtype, shape, reduction):
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(0)
    n, c = shape
    logits = (rng.standard_normal(shape) * 4).astype(dtype)
    labels = rng.integers(0, c, n)
    fast = nb.softmax_cross_entropy(logits, labels, reduction=reduction)
    # an ignore_index that matches no label builds the row masks; they must change no bit
    general = nb.softmax_cross_entropy(logits, labels, reduction=reduction, ignore_index=-100)
    for a, b in zip(fast, general, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    ref = Backend.softmax_cross_entropy(nb, logits, labels, reduction=reduction)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(fast, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_softmax_ce_handles_non_contiguous_inputs_and_extreme_logits():
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(1)
    big = rng.standard_normal((10, 256)).astype(np.float32)
    logits = big.T[:, :10]  # (256, 10), not C-contiguous
    logits[0, 3] = 80.0
    logits[1, :] = -1e4
    labels = rng.integers(0, 10, 512)[::2].astype(np.int32)
    loss, grad = losses.softmax_cross_entropy(logits, labels)
    ref_loss, ref_grad = Backend.softmax_cross_entropy(nb, np.ascontiguousarray(logits), labels.astype(np.int64))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)
    assert grad.flags.c_contiguous and np.isfinite(grad).all()


@pytest.mark.parametrize("labels, bad", [([0, 9, -1, 3], 2), ([0, 10, 3, 4], 1), ([11, 0, 1, 2], 0)])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint8, np.uint64])
def test_label_check_still_names_the_first_bad_label(labels, bad, dtype):
    if np.dtype(dtype).kind == "u" and min(labels) < 0:
        pytest.skip("unsigned labels cannot be negative")
    y = np.array(labels).astype(dtype)
    logits = np.zeros((4, 10), np.float32) + np.arange(10, dtype=np.float32)
    with pytest.raises(ValueError, match=rf"labels\[{bad}\] = {int(y[bad])}"):
        losses.softmax_cross_entropy(logits, y)
    # unchecked, the bad row is NaN and the others are exact
    loss, grad = losses.softmax_cross_entropy(logits, y, reduction="none", validate=False)
    assert np.isnan(loss[bad]) and np.isnan(grad[bad]).all()
    good = [i for i in range(4) if i != bad]
    assert np.isfinite(loss[good]).all() and np.isfinite(grad[good]).all()


def test_labels_in_range():
    nb = dc.get_backend("numpy")
    assert nb.labels_in_range(np.array([0, 9]), 10)
    assert not nb.labels_in_range(np.array([0, 10]), 10)
    assert not nb.labels_in_range(np.array([0, -1]), 10)
    assert not nb.labels_in_range(np.array([-(2**63)], np.int64), 10)
    assert nb.labels_in_range(np.array([], np.int64), 1)
    assert nb.labels_in_range(np.arange(20)[::2].astype(np.int16), 19)
    assert not nb.labels_in_range(np.array([255], np.uint8), 255)


@pytest.mark.parametrize("shape", [(3, 70000), (300, 1000), (2000, 40), (5, 7)])
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_blocked_log_softmax_is_bitwise_the_plain_formula(shape, axis):
    nb = dc.get_backend("numpy")
    x = (np.random.default_rng(5).standard_normal(shape) * 5).astype(np.float32)
    x[0, 0] = -np.inf
    with nb.silent_fp():
        got = nb.log_softmax(x, axis=axis)
        shifted = x - x.max(axis=axis, keepdims=True)
        want = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------- need_input_grad
def _mlp(seed=0, first=()):
    return nn.Sequential(*first, nn.Linear(12, 8, seed=seed), nn.ReLU(), nn.Dropout(0.25, seed=seed),
                         nn.Linear(8, 3, seed=seed + 1))


def _grads(model):
    return [to_np(p.grad) for p in model.parameters()]


@pytest.mark.parametrize("first", [(), (nn.Flatten(),), (nn.Tanh(),)])
def test_data_gets_no_input_gradient_and_the_same_parameter_gradients(backend, first):
    rng = np.random.default_rng(2)
    x = arr(backend, rng.standard_normal((5, 12)), "float32")
    dy = arr(backend, rng.standard_normal((5, 3)), "float32")
    full, lean, flagged = _mlp(first=first), _mlp(first=first), _mlp(first=first)
    y1, back1 = full.forward(x, train=True, input_grad=True)
    y2, back2 = lean.forward(x, train=True)
    y3, back3 = flagged.forward(x, train=True)
    dx = back1(dy)
    assert tuple(dx.shape) == (5, 12)
    assert back2(dy) is None  # x is data: as a tensor without requires_grad
    assert back3(dy, need_input_grad=False) is None
    for a, b, c in zip(_grads(full), _grads(lean), _grads(flagged), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_the_first_linear_skips_its_input_gradient_product(monkeypatch):
    from deepcore.backend.numpy_backend import NumpyBackend

    asked = []
    real = NumpyBackend.linear_backward

    def spy(self, dy, x, weight, *, need_dx=True, need_bias=True):
        asked.append(need_dx)
        return real(self, dy, x, weight, need_dx=need_dx, need_bias=need_bias)

    monkeypatch.setattr(NumpyBackend, "linear_backward", spy)
    model = _mlp()
    x = np.ones((4, 12), np.float32)
    y, back = model.forward(x, train=True)
    back(np.ones_like(y))
    assert asked == [True, False]  # the last layer's dx feeds ReLU; the first layer's is not formed
    asked.clear()
    model.forward(x, train=True, input_grad=True)[1](np.ones_like(y))
    assert asked == [True, True]


def test_layers_chained_by_hand_still_get_their_input_gradient():
    """The course's manual backprop: a layer's input that came out of another layer's forward is
    an activation, so its backward returns dL/dx; only the data at the start gets none."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4))
    lin1, relu, lin2 = nn.Linear(4, 5, seed=0, dtype="float64"), nn.ReLU(), nn.Linear(5, 2, seed=1, dtype="float64")
    h, b1 = lin1.forward(x, train=True)
    a, b2 = relu.forward(h, train=True)
    s, b3 = lin2.forward(a, train=True)
    ds = rng.standard_normal(s.shape)
    da = b3(ds)
    dh = b2(da)
    assert b1(dh) is None
    np.testing.assert_allclose(da, ds @ lin2.weight.value)
    np.testing.assert_allclose(dh, da * (h > 0))
    np.testing.assert_allclose(lin1.weight.grad, dh.T @ x)


def test_a_users_composite_and_a_users_layer():
    class Scale(nn.Module):  # a user's layer: its closure knows nothing of the flag
        def forward(self, x, train=False):
            return 2.0 * x, lambda dy: 2.0 * dy

    class Block(nn.Module):  # a user's composite chaining children's gradients
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(3, 3, seed=0, dtype="float64"), Scale()

        def forward(self, x, train=False):
            h, b1 = self.lin.forward(x, train)
            y, b2 = self.scale.forward(h, train)
            return y, lambda dy: b1(b2(dy))

    x = np.random.default_rng(5).standard_normal((2, 3))
    block = Block()
    y, back = block.forward(x, train=True, input_grad=True)
    dx = back(np.ones_like(y))
    np.testing.assert_allclose(dx, 2.0 * np.ones_like(y) @ block.lin.weight.value)
    y, back = block.forward(x, train=True)
    assert back(np.ones_like(y)) is None
    y, back = Scale().forward(x, train=True)
    assert back(np.ones_like(y)) is None and back(np.ones_like(y), need_input_grad=True) is not None


def test_need_input_grad_on_single_layers_and_batchnorm(backend):
    rng = np.random.default_rng(3)
    x = arr(backend, rng.standard_normal((6, 4)), "float32")
    for layer in (nn.Linear(4, 4, seed=0), nn.BatchNorm1d(4), nn.ReLU(), nn.Sigmoid(), nn.Softmax(),
                  nn.Dropout(0.5, seed=0), nn.Flatten(), nn.Sequential()):
        y, back = layer.forward(x, train=True)
        assert back(y, need_input_grad=False) is None, layer
    lin_a, lin_b = nn.Linear(4, 4, seed=0), nn.Linear(4, 4, seed=0)
    ya, back_a = lin_a.forward(x, train=True)
    yb, back_b = lin_b.forward(x, train=True)
    back_a(ya)
    back_b(yb, need_input_grad=False)
    for a, b in zip(_grads(lin_a), _grads(lin_b), strict=True):
        np.testing.assert_array_equal(a, b)


class _Recorder(nn.Module):
    """A user layer without parameters whose backward has a side effect (and no flag)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, train=False):
        def backward(dy):
            self.calls += 1
            return dy

        return x, backward


def test_a_user_layer_without_the_flag_still_runs(backend):
    x = arr(backend, np.ones((2, 12)), "float32")
    rec = _Recorder()
    model = nn.Sequential(rec, nn.Linear(12, 3, seed=0))
    y, back = model.forward(x, train=True)
    assert back(y, need_input_grad=False) is None
    assert rec.calls == 1  # it came first and cannot skip: it ran, its result was dropped
    nested = nn.Sequential(nn.Sequential(nn.ReLU(), nn.Linear(12, 3, seed=0)), nn.Tanh())
    y, back = nested.forward(x, train=True)
    assert back(y, need_input_grad=False) is None
    assert nested[0][1].weight.grad is not None


# ------------------------------------------------------------------------ optimizer
def test_optimizer_fast_checks_still_refuse_bad_gradients():
    model = _mlp()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    p = model.parameters()[0]
    p.grad = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"SGD.step: the gradient of parameter 0 \('weight'\) must have the "
                                         r"parameter's shape \(8, 12\), got \(3, 3\)"):
        opt.step()
    p.grad = np.ones(p.shape, np.int32)
    with pytest.raises(TypeError, match="floating-point"):
        opt.step()
    p.grad = [[0.0]]
    with pytest.raises(TypeError, match="must be an array"):
        opt.step()


def test_optimizer_state_in_another_dtype_is_converted():
    model = _mlp()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    opt.state[0]["momentum_buffer"] = opt.state[0]["momentum_buffer"].astype(np.float64)
    for p in model.parameters():
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    assert opt.state[0]["momentum_buffer"].dtype == np.float32
    np.testing.assert_allclose(opt.state[0]["momentum_buffer"], 1.9)


# --------------------------------------------------------------------- float32 only
def test_a_float32_training_step_makes_no_float64_array(monkeypatch):
    nb = dc.get_backend("numpy")
    seen: list[tuple[str, np.dtype]] = []
    ran: set[str] = set()  # the methods that gave a result (the fused loss declines with None)

    def spy(name):
        method = getattr(nb, name)

        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            if out is not None:
                ran.add(name)
            for a in (*args, *kwargs.values(), *(out if isinstance(out, tuple) else (out,))):
                for b in (a if isinstance(a, list | tuple) else (a,)):  # sgd_update_many's lists
                    for c in (b if isinstance(b, list | tuple) else (b,)):
                        if isinstance(c, np.ndarray) and c.dtype.kind == "f":
                            seen.append((name, c.dtype))
            return out

        monkeypatch.setattr(nb, name, wrapped)

    for name in ("linear", "linear_backward", "relu", "relu_backward", "softmax_cross_entropy",
                 "softmax_cross_entropy_fused", "sgd_update", "sgd_update_many", "add_into", "dropout_mask"):
        spy(name)
    rng = np.random.default_rng(4)
    model = nn.Sequential(nn.Linear(20, 16, seed=0), nn.ReLU(), nn.Dropout(0.1, seed=0), nn.Linear(16, 4, seed=1))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = rng.standard_normal((8, 20)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    for need in (True, False, False):
        opt.zero_grad()
        pred, back = model.forward(x, train=True)
        loss, grad = losses.softmax_cross_entropy(pred, y)
        assert loss.dtype == np.float32 and grad.dtype == np.float32 and pred.dtype == np.float32
        back(grad, need_input_grad=need)
        opt.step()
    assert ran >= {"linear", "linear_backward", "relu", "sgd_update_many"}
    assert ran & {"softmax_cross_entropy", "softmax_cross_entropy_fused"}  # (the fused one under DEEPCORE_JIT=1)
    assert all(dt == np.float32 for _, dt in seen), sorted({(n, str(d)) for n, d in seen if d != np.float32})
    for p in model.parameters():
        assert p.value.dtype == np.float32 and p.grad.dtype == np.float32
    assert all(s["momentum_buffer"].dtype == np.float32 for s in opt.state)


def test_narrow_signed_labels_with_many_classes_are_still_checked():
    """int8 label -1 read as unsigned is 255, inside 300 classes: the check must still refuse it."""
    import deepcore as dc

    logits = np.zeros((2, 300), dtype=np.float32)
    for fn in (dc.losses.softmax_cross_entropy, dc.losses.multiclass_hinge):
        with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
            fn(logits, np.array([3, -1], dtype=np.int8))


def test_uint64_labels_take_the_fast_path():
    import deepcore as dc

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    y = np.array([0, 3, 1, 2, 3], dtype=np.uint64)
    loss, grad = dc.losses.softmax_cross_entropy(logits, y)
    ref, ref_grad = dc.losses.softmax_cross_entropy(logits, y.astype(np.int64))
    np.testing.assert_array_equal(grad, ref_grad)
    assert float(loss) == float(ref)


def test_ignored_rows_with_infinite_logits_and_weighted_bad_labels_match_the_reference():
    """Two cases the one-buffer NumPy path once got wrong: an ignored row whose class-0 logit is
    -inf (its loss is masked, not 0 * inf), and with class weights and validate=False a bad
    label that must weigh nothing in the mean's denominator."""
    nb = dc.get_backend("numpy")
    logits = np.array([[0.0, 1.0, 2.0], [-np.inf, 0.0, 0.0]])
    loss, grad = losses.softmax_cross_entropy(logits, np.array([1, -100]), ignore_index=-100)
    expected = np.log(np.exp([0.0, 1.0, 2.0]).sum()) - 1.0
    np.testing.assert_allclose(loss, expected)
    np.testing.assert_array_equal(grad[1], 0.0)
    x, y, w = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]]), np.array([1, 7]), np.array([5.0, 1.0, 1.0])
    _, grad = nb.softmax_cross_entropy(x, y, class_weights=w)
    _, ref = Backend.softmax_cross_entropy(nb, x, y, class_weights=w)
    np.testing.assert_allclose(grad[0], ref[0])  # row 0 divided by w[1] = 1 alone
    p = np.exp(x[0]) / np.exp(x[0]).sum()
    np.testing.assert_allclose(grad[0], p - np.eye(3)[1])
