"""Losses: the course's worked examples, finite-difference gradients, stability and bad input.

Comparisons with PyTorch live in test_torch_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import deepcore as dc
from deepcore import losses as L
from deepcore.gradcheck import check_loss
from tests.helpers import arr, dtype_name, to_np

RNG = np.random.default_rng(1234)


# ------------------------------------------------------- worked examples
def test_multiclass_hinge_course_example(backend):
    """Three images, classes (cat, car, frog): losses 2.9, 0 and 12.9, mean 5.27."""
    scores = arr(backend, [[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]], "float64")
    labels = arr(backend, [0, 1, 2], "int64")
    per_sample, _ = L.multiclass_hinge(scores, labels, reduction="none")
    np.testing.assert_allclose(to_np(per_sample), [2.9, 0.0, 12.9], atol=1e-12)
    loss, grad = L.multiclass_hinge(scores, labels)
    assert float(loss) == pytest.approx(15.8 / 3)
    # Image 1: only j = car is active, so dL/ds = (-1, +1, 0) / 3; image 3: both others active.
    np.testing.assert_allclose(to_np(grad), np.array([[-1, 1, 0], [0, 0, 0], [1, 1, -2]]) / 3, atol=1e-12)


def test_binary_hinge_by_hand(backend):
    s = arr(backend, [2.0, 0.5, -0.3, -2.0], "float64")
    y = arr(backend, [1, 1, -1, 1], "int64")
    loss, grad = L.binary_hinge(s, y, reduction="none")
    np.testing.assert_allclose(to_np(loss), [0.0, 0.5, 0.7, 3.0])
    np.testing.assert_allclose(to_np(grad), [0.0, -1.0, 1.0, -1.0])
    scores, targets = arr(backend, [[0.5], [2.0]], "float64"), arr(backend, [1.0, -1.0], "float64")
    loss, grad = L.binary_hinge(scores, targets, margin=2.0)
    assert float(loss) == pytest.approx((1.5 + 4.0) / 2)
    assert tuple(grad.shape) == (2, 1)
    np.testing.assert_allclose(to_np(grad), [[-0.5], [0.5]])


def test_log_likelihood_by_hand(backend):
    p = arr(backend, [[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]], "float64")
    y = arr(backend, [1, 2], "int64")
    loss, grad = L.log_likelihood(p, y)
    assert float(loss) == pytest.approx((-np.log(0.7) - np.log(0.25)) / 2)
    np.testing.assert_allclose(to_np(grad), [[0, -1 / 0.7 / 2, 0], [0, 0, -1 / 0.25 / 2]])


def test_binary_cross_entropy_course_definition(backend):
    """One binary term per class: L = -sum_j [z_j log p_j + (1 - z_j) log(1 - p_j)]."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    z = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = -(z * np.log(p) + (1 - z) * np.log(1 - p)).sum(axis=1)
    loss, grad = L.binary_cross_entropy(arr(backend, p, "float64"), arr(backend, z, "float64"), reduction="none")
    np.testing.assert_allclose(to_np(loss), expected, rtol=1e-12)
    np.testing.assert_allclose(to_np(grad), (p - z) / (p * (1 - p)), rtol=1e-12)
    # Integer labels are one-hot encoded over the columns: the same numbers.
    loss2, grad2 = L.binary_cross_entropy(arr(backend, p, "float64"), arr(backend, [0, 2], "int64"), reduction="none")
    np.testing.assert_allclose(to_np(loss2), expected, rtol=1e-12)
    np.testing.assert_allclose(to_np(grad2), to_np(grad), rtol=1e-12)


def test_softmax_classifier_gradient_is_p_minus_z(backend):
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = np.array([2, 0])
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    z = np.eye(3)[y]
    loss, grad = L.softmax_cross_entropy(arr(backend, s, "float64"), arr(backend, y, "int64"), reduction="sum")
    assert float(loss) == pytest.approx(-np.log(p[[0, 1], y]).sum())
    np.testing.assert_allclose(to_np(grad), p - z, rtol=1e-12, atol=1e-15)


def test_regression_losses_on_four_points(backend):
    """x = 2, 4, 6, 8 and y = 3, 4, 5, 6; predictions of w = 1, b = 0 are s = x."""
    x = np.array([[2.0], [4.0], [6.0], [8.0]])
    y = np.array([[3.0], [4.0], [5.0], [6.0]])
    s, t = arr(backend, x, "float64"), arr(backend, y, "float64")
    l2, g2 = L.l2_loss(s, t)
    assert float(l2) == pytest.approx((1 + 0 + 1 + 4) / 4)
    np.testing.assert_allclose(to_np(g2), -2 * (y - x) / 4)
    l1, g1 = L.l1_loss(s, t, reduction="sum")
    assert float(l1) == pytest.approx(1 + 0 + 1 + 2)
    np.testing.assert_allclose(to_np(g1), np.sign(x - y))
    # The optimum w = 0.5, b = 2.0 fits exactly.
    l2_opt, _ = L.l2_loss(arr(backend, 0.5 * x + 2.0, "float64"), t)
    assert float(l2_opt) == 0.0


def test_per_sample_sums_over_components(backend):
    pred = arr(backend, np.ones((2, 3)), "float64")
    target = arr(backend, np.zeros((2, 3)), "float64")
    loss, _ = L.l2_loss(pred, target, reduction="none")
    np.testing.assert_allclose(to_np(loss), [3.0, 3.0])


# ------------------------------------------------------ finite differences
LOSS_CASES = {
    "softmax_ce": (L.softmax_cross_entropy, "labels", {}),
    "softmax_ce_smooth_weights_ignore": (
        L.softmax_cross_entropy, "labels_ignore",
        {"label_smoothing": 0.15, "ignore_index": -1, "class_weights": [0.5, 1.0, 2.0, 1.5]},
    ),
    "log_likelihood": (L.log_likelihood, "labels", {}),
    "bce": (L.binary_cross_entropy, "probs_targets", {}),
    "bce_int_labels": (L.binary_cross_entropy, "labels", {}),
    "bce_logits": (L.binary_cross_entropy_with_logits, "probs_targets", {}),
    "multiclass_hinge": (L.multiclass_hinge, "labels", {"margin": 0.7}),
    "binary_hinge": (L.binary_hinge, "signs", {}),
    "l1": (L.l1_loss, "real", {}),
    "l2": (L.l2_loss, "real", {}),
}


def _case_inputs(backend, kind, fn):
    n, c = 5, 4
    rng = np.random.default_rng(7)
    if fn in (L.log_likelihood, L.binary_cross_entropy):
        pred = rng.uniform(0.1, 0.9, (n, c))
    elif fn is L.binary_hinge:
        pred = rng.standard_normal(n) * 2
    else:
        pred = rng.standard_normal((n, c)) * 2
    if kind == "labels":
        target = arr(backend, rng.integers(0, c, n), "int64")
    elif kind == "labels_ignore":
        target = arr(backend, [0, -1, 3, 2, -1], "int64")
    elif kind == "probs_targets":
        target = arr(backend, rng.uniform(0, 1, (n, c)), "float64")
    elif kind == "signs":
        target = arr(backend, rng.choice([-1.0, 1.0], n), "float64")
    else:
        target = arr(backend, rng.standard_normal(pred.shape), "float64")
    return arr(backend, pred, "float64"), target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_gradients_match_finite_differences(backend, case, reduction):
    fn, kind, kwargs = LOSS_CASES[case]
    pred, target = _case_inputs(backend, kind, fn)
    kwargs = dict(kwargs)
    if "class_weights" in kwargs:
        kwargs["class_weights"] = arr(backend, kwargs["class_weights"], "float64")
    result = check_loss(fn, pred, target, reduction=reduction, **kwargs)
    assert result.ok and len(result.checks) >= 2


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_output_types(backend, case):
    """A 0-d loss of pred's namespace and dtype; grad with pred's shape and dtype."""
    fn, kind, kwargs = LOSS_CASES[case]
    pred, target = _case_inputs(backend, kind, fn)
    pred32 = backend.astype(pred, backend.dtype_from_name("float32"))
    kwargs = dict(kwargs)
    if "class_weights" in kwargs:
        kwargs["class_weights"] = arr(backend, kwargs["class_weights"], "float32")
    loss, grad = fn(pred32, target, **kwargs)
    assert dc.get_backend(loss) is backend
    assert tuple(loss.shape) == () and dtype_name(loss) == "float32"
    assert tuple(grad.shape) == tuple(pred.shape) and dtype_name(grad) == "float32"
    per_sample, _ = fn(pred32, target, reduction="none", **kwargs)
    assert tuple(per_sample.shape) == (pred.shape[0],)


# ------------------------------------------------------------- stability
def test_softmax_ce_extreme_logits(backend):
    s = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]])
    y = np.array([1, 0, 2])
    for dtype in ("float32", "float64"):
        for eps in (0.0, 0.1):
            loss, grad = L.softmax_cross_entropy(arr(backend, s, dtype), arr(backend, y, "int64"), reduction="none",
                                                 label_smoothing=eps)
            loss, grad = to_np(loss), to_np(grad)
            assert np.isfinite(loss).all() and np.isfinite(grad).all()
            np.testing.assert_allclose(loss[:1], [(1 - eps) * 2e4 + eps / 3 * (0 + 2e4 + 1e4)], rtol=1e-6)
            np.testing.assert_allclose(loss[1], np.log(3), rtol=1e-6)


def test_softmax_ce_minus_inf_logits(backend):
    """-inf marks an impossible class: finite loss without smoothing, +inf with it (as PyTorch)."""
    s = arr(backend, [[0.0, -np.inf, 1.0]], "float64")
    y = arr(backend, [2], "int64")
    loss, grad = L.softmax_cross_entropy(s, y)
    assert float(loss) == pytest.approx(np.log(1 + np.exp(-1.0)))
    g = to_np(grad)
    assert np.isfinite(g).all() and g[0, 1] == 0.0
    loss, _ = L.softmax_cross_entropy(s, y, label_smoothing=0.1)
    assert float(loss) == np.inf


def test_bce_with_logits_extreme_scores(backend):
    s = arr(backend, [[1e4, -1e4], [-1e4, 1e4]], "float32")
    z = arr(backend, [[1.0, 0.0], [1.0, 0.0]], "float32")
    loss, grad = L.binary_cross_entropy_with_logits(s, z, reduction="none")
    np.testing.assert_allclose(to_np(loss), [0.0, 2e4], rtol=1e-6)
    np.testing.assert_allclose(to_np(grad), [[0, 0], [-1, 1]])


def test_bce_clamps_log_at_saturated_probabilities(backend):
    loss, grad = L.binary_cross_entropy(arr(backend, [[0.0, 1.0]], "float64"), arr(backend, [[1.0, 1.0]], "float64"))
    assert float(loss) == pytest.approx(100.0)
    assert np.isfinite(to_np(grad)).all()


def test_half_precision_accumulates_in_float32():
    s = RNG.standard_normal((64, 1000)).astype(np.float16) * 4
    y = RNG.integers(0, 1000, 64)
    loss, grad = L.softmax_cross_entropy(s, y)
    ref, ref_grad = L.softmax_cross_entropy(s.astype(np.float64), y)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    assert abs(float(loss) - float(ref)) < 1e-2
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, atol=1e-5)


def test_unchecked_bad_label_gives_nan_row_not_garbage():
    s = RNG.standard_normal((3, 4))
    loss, grad = L.softmax_cross_entropy(s, np.array([1, 7, -2]), reduction="none", validate=False)
    assert np.isfinite(loss[0]) and np.isnan(loss[1:]).all()
    assert np.isfinite(grad[0]).all() and np.isnan(grad[1:]).all()


# ------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(
    logits=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
                      elements=st.floats(-50, 50)),
    eps=st.sampled_from([0.0, 0.1, 0.5]),
    shift=st.floats(-100, 100),
    data=st.data(),
)
def test_softmax_ce_properties(logits, eps, shift, data):
    n, c = logits.shape
    y = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    loss, grad = L.softmax_cross_entropy(logits, y, reduction="none", label_smoothing=eps)
    assert (loss >= -1e-9).all()
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-9)  # softmax rows and targets both sum to one
    shifted, _ = L.softmax_cross_entropy(logits + shift, y, reduction="none", label_smoothing=eps)
    np.testing.assert_allclose(shifted, loss, rtol=1e-9, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(scores=hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 6)), elements=st.floats(-10, 10)),
       data=st.data())
def test_multiclass_hinge_properties(scores, data):
    n, c = scores.shape
    y = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    loss, grad = L.multiclass_hinge(scores, y, reduction="none")
    brute = [sum(max(0.0, scores[i, j] - scores[i, y[i]] + 1) for j in range(c) if j != y[i]) for i in range(n)]
    np.testing.assert_allclose(loss, brute, atol=1e-12)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-12)


# -------------------------------------------------------------- bad input
def test_labels_out_of_range_name_the_value(backend):
    s = arr(backend, np.zeros((4, 3)), "float32")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got labels\[2\] = 3"):
        L.softmax_cross_entropy(s, arr(backend, [0, 1, 3, 0], "int64"))
    with pytest.raises(ValueError, match=r"or ignore_index=-100, got labels\[0\] = -5"):
        L.softmax_cross_entropy(s, arr(backend, [-5, -100, 1, 0], "int64"), ignore_index=-100)
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        L.multiclass_hinge(s, arr(backend, [0, -1, 0, 0], "int64"))


@pytest.mark.parametrize("bad, match", [
    ("float_labels", "labels must be an integer array"),
    ("label_shape", r"labels must have shape \(4,\)"),
    ("logits_1d", "logits must be 2-D"),
    ("int_logits", "logits must be a floating-point array"),
    ("reduction", "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    ("smoothing", r"label_smoothing must be in \[0.0, 1.0\], got 1.5"),
    ("weights_shape", r"class_weights must have shape \(3,\)"),
    ("ignore_type", "ignore_index must be an int"),
])
def test_softmax_ce_rejects_bad_arguments(backend, bad, match):
    s = arr(backend, np.zeros((4, 3)), "float32")
    y = arr(backend, [0, 1, 2, 0], "int64")
    kwargs = {}
    if bad == "float_labels":
        y = arr(backend, [0.0, 1.0, 2.0, 0.0], "float32")
    elif bad == "label_shape":
        y = arr(backend, [[0, 1, 2, 0]], "int64")
    elif bad == "logits_1d":
        s = arr(backend, np.zeros(3), "float32")
    elif bad == "int_logits":
        s = arr(backend, np.zeros((4, 3)), "int64")
    elif bad == "reduction":
        kwargs["reduction"] = "avg"
    elif bad == "smoothing":
        kwargs["label_smoothing"] = 1.5
    elif bad == "weights_shape":
        kwargs["class_weights"] = arr(backend, [1.0, 2.0], "float32")
    elif bad == "ignore_type":
        kwargs["ignore_index"] = 1.5
    with pytest.raises((ValueError, TypeError), match=match):
        L.softmax_cross_entropy(s, y, **kwargs)


def test_value_checks_of_other_losses(backend):
    p = arr(backend, [[0.2, 1.3]], "float64")
    with pytest.raises(ValueError, match=r"probs must be in \[0.0, 1.0\], got probs\[0, 1\] = 1.3"):
        L.binary_cross_entropy(p, arr(backend, [[0.0, 1.0]], "float64"))
    with pytest.raises(ValueError, match=r"targets must be in \[0.0, 1.0\], got targets\[0, 0\] = 2.0"):
        L.binary_cross_entropy_with_logits(p, arr(backend, [[2.0, 1.0]], "float64"))
    with pytest.raises(ValueError, match=r"targets must take values in \{-1.0, 1.0\}, got targets\[1\] = 0.0"):
        L.binary_hinge(arr(backend, [0.5, 0.5], "float64"), arr(backend, [1, 0], "int64"))
    with pytest.raises(ValueError, match=r"target must have pred's shape \(2, 3\), got \(3, 2\)"):
        L.l2_loss(arr(backend, np.zeros((2, 3)), "float64"), arr(backend, np.zeros((3, 2)), "float64"))
    with pytest.raises(ValueError, match=r"scores must have shape \(N,\) or \(N, 1\)"):
        L.binary_hinge(arr(backend, np.zeros((2, 3)), "float64"), arr(backend, [1, -1], "int64"))
    with pytest.raises(TypeError, match="pred must be an array, got list"):
        L.l1_loss([1.0], arr(backend, [1.0], "float64"))


def test_validate_false_skips_value_checks_and_computes_the_formula():
    """Out-of-range targets are refused by default; with validate=False the formula is applied
    as written (worked by hand below), which is what skipping the check means."""
    p, z = np.array([[0.5, 0.25]]), np.array([[2.0, 0.0]])
    with pytest.raises(ValueError, match="targets must be in"):
        L.binary_cross_entropy(p, z)
    loss, grad = L.binary_cross_entropy(p, z, validate=False)
    # -[2 log 0.5 + (1 - 2) log 0.5] - [0 + log 0.75] = -log 0.5 - log 0.75
    np.testing.assert_allclose(loss, -np.log(0.5) - np.log(0.75), rtol=1e-12)
    # d/dp of -[z log p + (1 - z) log(1 - p)] = -z/p + (1 - z)/(1 - p)
    np.testing.assert_allclose(grad, [[-2 / 0.5 - 1 / 0.5, 1 / 0.75]], rtol=1e-12)
    with pytest.raises(ValueError, match="targets must take values in"):
        L.binary_hinge(np.array([0.5]), np.array([0]))
    loss, grad = L.binary_hinge(np.array([0.5, 0.25]), np.array([0, 2]), validate=False)
    # max(0, 1 - y s) = 1 and 0.5, both active; the mean's dL/ds = -y / N
    np.testing.assert_allclose(loss, 0.75)
    np.testing.assert_allclose(grad, [0.0, -1.0])
