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
def test_need_input_grad_false_gives_the_same_parameter_gradients(backend, first):
    rng = np.random.default_rng(2)
    x = arr(backend, rng.standard_normal((5, 12)), "float32")
    dy = arr(backend, rng.standard_normal((5, 3)), "float32")
    full, lean = _mlp(first=first), _mlp(first=first)
    y1, back1 = full.forward(x, train=True)
    y2, back2 = lean.forward(x, train=True)
    dx = back1(dy)
    assert tuple(dx.shape) == (5, 12)
    assert back2(dy, need_input_grad=False) is None
    for a, b in zip(_grads(full), _grads(lean), strict=True):
        np.testing.assert_array_equal(a, b)


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

    def spy(name):
        method = getattr(nb, name)

        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            for a in (*args, *kwargs.values(), *(out if isinstance(out, tuple) else (out,))):
                if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                    seen.append((name, a.dtype))
            return out

        monkeypatch.setattr(nb, name, wrapped)

    for name in ("linear", "linear_backward", "relu", "relu_backward", "softmax_cross_entropy", "sgd_update",
                 "add_into", "dropout_mask"):
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
    assert {name for name, _ in seen} >= {"linear", "linear_backward", "relu", "softmax_cross_entropy", "sgd_update"}
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
