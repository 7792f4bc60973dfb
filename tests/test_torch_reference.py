"""deepcore against PyTorch CPU autograd, the outside reference.

Every test runs deepcore on each backend (the ``backend`` fixture) and the same
computation in PyTorch (float64 unless the test says float32), from the same
random inputs, and compares values and gradients. Where deepcore's definition
differs from PyTorch's on purpose (losses summed per sample, hinge times the
class count, ...), the conversion is the one its docstring documents.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import deepcore as dc  # noqa: E402
from deepcore import losses  # noqa: E402
from tests.helpers import arr, dtype_name, to_np  # noqa: E402

REDUCTIONS = ["mean", "sum", "none"]
TOL = {"float64": {"rtol": 1e-10, "atol": 1e-10}, "float32": {"rtol": 1e-5, "atol": 1e-5}}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}
DTYPES = [pytest.param("float64", id="f64"), pytest.param("float32", id="f32")]


# ------------------------------------------------------------------ helpers
def tt(x, requires_grad: bool = False):
    """A deepcore array (any backend) as a CPU torch tensor, optionally a leaf that records gradients."""
    t = torch.from_numpy(to_np(x))
    return t.requires_grad_(True) if requires_grad else t


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    return to_np(x)


def close(actual, expected, dtype: str = "float64", what: str = "", *, equal_nan: bool = False) -> None:
    a, e = _np(actual), _np(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference {e.shape}"
    np.testing.assert_allclose(a, e, err_msg=what, equal_nan=equal_nan, **TOL[dtype])


def check_loss(loss, grad, pred, ref_loss, ref_grad, dtype: str, reduction: str) -> None:
    """The (loss, grad) contract, then the values against the reference."""
    n = pred.shape[0]
    assert tuple(loss.shape) == (() if reduction != "none" else (n,)), f"loss shape {tuple(loss.shape)}"
    assert tuple(grad.shape) == tuple(pred.shape)
    assert dtype_name(loss) == dtype and dtype_name(grad) == dtype
    close(loss, ref_loss, dtype, "loss")
    close(grad, ref_grad, dtype, "gradient")


def reduce_ref(per_sample, reduction: str):
    """deepcore's reductions written in torch: mean over samples, sum, or the per-sample vector."""
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total / per_sample.shape[0] if reduction == "mean" else total


def backward_ref(loss, leaf):
    """d(loss)/d(leaf); for a per-sample vector, the gradient of its sum (deepcore's "none")."""
    (g,) = torch.autograd.grad(loss.sum() if loss.ndim else loss, leaf)
    return g


def per_sample_sum(t):
    """Sum over every axis but the first (a 1-D tensor is already per sample)."""
    return t if t.ndim == 1 else t.sum(dim=tuple(range(1, t.ndim)))


def copy_params_to_torch(module: dc.nn.Module, tmodule) -> None:
    ours = dict(module.named_parameters())
    theirs = dict(tmodule.named_parameters())
    assert sorted(ours) == sorted(theirs), f"parameter names {sorted(ours)} vs torch {sorted(theirs)}"
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(tt(ours[name].value))


def randomize_params(module: dc.nn.Module, backend, rng, dtype: str, scale: float = 0.5) -> None:
    for _, p in module.named_parameters():
        p.value = arr(backend, rng.normal(0.0, scale, p.shape), dtype)


def check_param_grads(module: dc.nn.Module, tmodule, dtype: str) -> None:
    theirs = dict(tmodule.named_parameters())
    ours = dict(module.named_parameters())
    assert sorted(ours) == sorted(theirs)
    for name, p in ours.items():
        assert p.grad is not None, f"{name} has no gradient after backward"
        assert tuple(p.grad.shape) == tuple(p.value.shape)
        assert dtype_name(p.grad) == dtype_name(p.value), f"{name}.grad dtype"
        close(p.grad, theirs[name].grad, dtype, f"gradient of {name}")


def zero_torch_grads(tmodule) -> None:
    for p in tmodule.parameters():
        p.grad = None


# ======================================================== softmax cross-entropy
def _sce_case(backend, n: int, c: int, reduction: str, eps: float, ignore, weighted: bool, dtype: str,
              seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, (n, c))
    y = rng.integers(0, c, n)
    ig = None
    if ignore == "class":  # ignore a class that appears in the labels, keep one row counted
        ig = int(y[0])
        if n > 1:
            y[-1] = (ig + 1) % c
    elif ignore == -100:  # PyTorch's default ignore value on some rows
        ig = -100
        rows = rng.random(n) < 0.4
        rows[0] = True
        if n > 1:
            rows[-1] = False
        y[rows] = -100
    w = rng.uniform(0.2, 3.0, c) if weighted else None

    logits = arr(backend, x, dtype)
    labels = arr(backend, y, "int64")
    weights = None if w is None else arr(backend, w, dtype)
    loss, grad = losses.softmax_cross_entropy(logits, labels, reduction=reduction, label_smoothing=eps,
                                              ignore_index=ig, class_weights=weights)

    xt = tt(logits, requires_grad=True)
    ref = F.cross_entropy(xt, tt(labels), weight=None if weights is None else tt(weights), reduction=reduction,
                          label_smoothing=eps, ignore_index=-100 if ig is None else ig)
    check_loss(loss, grad, logits, ref, backward_ref(ref, xt), dtype, reduction)


IGNORES = [pytest.param(None, id="no_ignore"), pytest.param("class", id="ignore_class"),
           pytest.param(-100, id="ignore_m100")]
WEIGHTED = [pytest.param(False, id="unweighted"), pytest.param(True, id="weighted")]
SMOOTHING = [pytest.param(0.0, id="eps0"), pytest.param(0.1, id="eps0.1"), pytest.param(0.9, id="eps0.9")]


@pytest.mark.parametrize("weighted", WEIGHTED)
@pytest.mark.parametrize("ignore", IGNORES)
@pytest.mark.parametrize("eps", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_matches_torch(backend, reduction, eps, ignore, weighted):
    _sce_case(backend, 7, 11, reduction, eps, ignore, weighted, "float64", seed=11)


@pytest.mark.parametrize(("eps", "ignore", "weighted"), [
    pytest.param(0.0, None, False, id="plain"),
    pytest.param(0.1, -100, False, id="eps0.1-ignore_m100"),
    pytest.param(0.1, "class", True, id="eps0.1-ignore_class-weighted"),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_float32_matches_torch(backend, reduction, eps, ignore, weighted):
    _sce_case(backend, 7, 11, reduction, eps, ignore, weighted, "float32", seed=12)


@pytest.mark.parametrize(("n", "c"), [(1, 3), (1, 11), (7, 3), (64, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_awkward_shapes(backend, n, c, reduction):
    _sce_case(backend, n, c, reduction, 0.1, None, True, "float64", seed=13 + n + c)
    _sce_case(backend, n, c, reduction, 0.0, None, False, "float64", seed=14 + n + c)


@pytest.mark.parametrize("label_dtype", ["int32", "int16", "uint8"])
def test_softmax_cross_entropy_narrow_label_dtypes(backend, label_dtype):
    """Labels of any integer dtype give PyTorch's result with int64 labels."""
    rng = np.random.default_rng(15)
    x, y = rng.normal(size=(7, 11)), rng.integers(0, 11, 7)
    logits, labels = arr(backend, x, "float64"), arr(backend, y, label_dtype)
    w = arr(backend, rng.uniform(0.2, 3.0, 11), "float64")
    loss, grad = losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1, class_weights=w)
    xt = tt(logits, requires_grad=True)
    ref = F.cross_entropy(xt, torch.from_numpy(y), weight=tt(w), label_smoothing=0.1)
    check_loss(loss, grad, logits, ref, backward_ref(ref, xt), "float64", "mean")


def test_softmax_cross_entropy_extreme_logits(backend):
    """Logits of ±1e3 (exp overflows without the max shift): still exactly PyTorch's."""
    x = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0], [5.0, 5.0, 5.0]])
    y = np.array([1, 2, 0])
    logits, labels = arr(backend, x, "float64"), arr(backend, y, "int64")
    for eps in (0.0, 0.1):
        loss, grad = losses.softmax_cross_entropy(logits, labels, label_smoothing=eps)
        xt = tt(logits, requires_grad=True)
        ref = F.cross_entropy(xt, tt(labels), label_smoothing=eps)
        check_loss(loss, grad, logits, ref, backward_ref(ref, xt), "float64", "mean")


def _all_ignored(backend, reduction, eps, weighted):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3))
    logits = arr(backend, x, "float64")
    labels = arr(backend, np.full(4, -100), "int64")
    w = arr(backend, rng.uniform(0.5, 2.0, 3), "float64") if weighted else None
    loss, grad = losses.softmax_cross_entropy(logits, labels, reduction=reduction, label_smoothing=eps,
                                              ignore_index=-100, class_weights=w)
    xt = tt(logits, requires_grad=True)
    ref = F.cross_entropy(xt, tt(labels), weight=None if w is None else tt(w), reduction=reduction,
                          label_smoothing=eps, ignore_index=-100)
    return loss, grad, ref, backward_ref(ref, xt)


ALL_IGNORED = [pytest.param(eps, weighted, id=f"eps{eps}-{'weighted' if weighted else 'unweighted'}")
               for eps in (0.0, 0.1) for weighted in (False, True)]


@pytest.mark.parametrize(("eps", "weighted"), ALL_IGNORED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_every_row_ignored_loss(backend, reduction, eps, weighted):
    """Every row ignored: "mean" is 0/0, NaN in PyTorch and in deepcore; "sum" and "none" are zeros."""
    loss, _, ref, _ = _all_ignored(backend, reduction, eps, weighted)
    if reduction == "mean":
        assert math.isnan(float(_np(ref)))
        assert math.isnan(float(to_np(loss))), f"loss is {float(to_np(loss))}, PyTorch gives nan"
    else:
        close(loss, ref, "float64", "loss")


@pytest.mark.parametrize(("eps", "weighted"), ALL_IGNORED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_every_row_ignored_gradient(backend, reduction, eps, weighted):
    """PyTorch's gradient is all zeros when every row is ignored, "mean" included (ignored rows never
    receive gradient, so the 0/0 normaliser does not reach it)."""
    _, grad, _, ref_grad = _all_ignored(backend, reduction, eps, weighted)
    assert not np.any(np.isnan(_np(ref_grad)))
    close(grad, ref_grad, "float64", "gradient")


# ============================================================== log-likelihood
@pytest.mark.parametrize(("n", "c"), [(1, 3), (7, 11)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_log_likelihood_matches_nll_of_log(backend, reduction, dtype, n, c):
    rng = np.random.default_rng(21 + n)
    e = np.exp(rng.normal(0.0, 2.0, (n, c)))
    p = e / e.sum(axis=1, keepdims=True)
    probs, labels = arr(backend, p, dtype), arr(backend, rng.integers(0, c, n), "int64")
    loss, grad = losses.log_likelihood(probs, labels, reduction=reduction)

    pt = tt(probs, requires_grad=True)
    ref = F.nll_loss(torch.log(pt), tt(labels), reduction=reduction)
    check_loss(loss, grad, probs, ref, backward_ref(ref, pt), dtype, reduction)


def test_log_likelihood_zero_probability_is_inf_like_torch(backend):
    p = np.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    y = np.array([0, 2])
    probs, labels = arr(backend, p, "float64"), arr(backend, y, "int64")
    for reduction in REDUCTIONS:
        loss, grad = losses.log_likelihood(probs, labels, reduction=reduction)
        pt = tt(probs, requires_grad=True)
        ref = F.nll_loss(torch.log(pt), tt(labels), reduction=reduction)
        check_loss(loss, grad, probs, ref, backward_ref(ref, pt), "float64", reduction)


# ======================================================== binary cross-entropy
def _bce_inputs(rng, kind: str, n: int, c: int):
    """(pred-shaped probabilities in (0,1) or scores, targets, targets as floats for torch)."""
    if kind == "float":
        return (n, c), rng.uniform(0.0, 1.0, (n, c)), "float"
    if kind == "labels":
        return (n, c), rng.integers(0, c, n), "int64"
    if kind == "1d":
        return (n,), rng.uniform(0.0, 1.0, n), "float"
    raise AssertionError(kind)


def _torch_targets(targets, pred_t, kind: str):
    if kind == "labels":
        return F.one_hot(tt(targets), pred_t.shape[1]).to(pred_t.dtype)
    return tt(targets)


BCE_KINDS = [pytest.param("float", id="float_targets"), pytest.param("labels", id="int_labels"),
             pytest.param("1d", id="1d")]


@pytest.mark.parametrize(("n", "c"), [(1, 3), (7, 11)], ids=lambda v: str(v))
@pytest.mark.parametrize("kind", BCE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_matches_torch(backend, reduction, dtype, kind, n, c):
    rng = np.random.default_rng(31 + n)
    shape, z, zdtype = _bce_inputs(rng, kind, n, c)
    probs = arr(backend, rng.uniform(0.02, 0.98, shape), dtype)
    targets = arr(backend, z, dtype if zdtype == "float" else zdtype)
    loss, grad = losses.binary_cross_entropy(probs, targets, reduction=reduction)

    pt = tt(probs, requires_grad=True)
    zt = _torch_targets(targets, pt, kind)
    if reduction == "none":
        ref = per_sample_sum(F.binary_cross_entropy(pt, zt, reduction="none"))
    else:
        ref = F.binary_cross_entropy(pt, zt, reduction="sum")
        if reduction == "mean":
            ref = ref / n
    check_loss(loss, grad, probs, ref, backward_ref(ref, pt), dtype, reduction)
    if reduction == "mean":  # the docstring's conversion: PyTorch's default mean = ours / columns
        cols = 1 if len(shape) == 1 else c
        close(to_np(loss) / cols, F.binary_cross_entropy(pt, zt), dtype, "PyTorch default mean")


def test_binary_cross_entropy_saturated_probabilities(backend):
    """p exactly 0 or 1: logs clamped at -100 and the gradient's denominator at 1e-12, as in PyTorch."""
    p = np.array([[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.25, 1.0]])
    z = np.array([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    probs, targets = arr(backend, p, "float64"), arr(backend, z, "float64")
    for reduction in REDUCTIONS:
        loss, grad = losses.binary_cross_entropy(probs, targets, reduction=reduction)
        pt = tt(probs, requires_grad=True)
        per = per_sample_sum(F.binary_cross_entropy(pt, tt(targets), reduction="none"))
        ref = reduce_ref(per, reduction)
        close(loss, ref, "float64", "loss")
        # PyTorch's clamp is the float literal 1e-12f (9.99999996e-13 as a double), 4e-9 relative
        # away from deepcore's 1e-12: the +-1e12 gradients agree to 1e-8, not 1e-10.
        np.testing.assert_allclose(to_np(grad), _np(backward_ref(ref, pt)), rtol=1e-8, atol=1e-10)
        assert np.all(np.isfinite(to_np(loss)))


@pytest.mark.parametrize("kind", BCE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_logits_matches_torch(backend, reduction, dtype, kind):
    n, c = 7, 11
    rng = np.random.default_rng(41)
    shape, z, zdtype = _bce_inputs(rng, kind, n, c)
    s = rng.normal(0.0, 4.0, shape)
    s.flat[0], s.flat[1], s.flat[-1] = 50.0, -50.0, -50.0  # exp(50) is far past float32's range
    scores = arr(backend, s, dtype)
    targets = arr(backend, z, dtype if zdtype == "float" else zdtype)
    loss, grad = losses.binary_cross_entropy_with_logits(scores, targets, reduction=reduction)

    st = tt(scores, requires_grad=True)
    zt = _torch_targets(targets, st, kind)
    per = per_sample_sum(F.binary_cross_entropy_with_logits(st, zt, reduction="none"))
    ref = reduce_ref(per, reduction)
    check_loss(loss, grad, scores, ref, backward_ref(ref, st), dtype, reduction)
    assert np.all(np.isfinite(to_np(loss))) and np.all(np.isfinite(to_np(grad)))
    if reduction == "mean":
        cols = 1 if len(shape) == 1 else c
        close(to_np(loss) / cols, F.binary_cross_entropy_with_logits(st, zt), dtype, "PyTorch default mean")


# ======================================================================= hinge
@pytest.mark.parametrize(("n", "c"), [(1, 3), (7, 11)], ids=lambda v: str(v))
@pytest.mark.parametrize("margin", [1.0, 0.5], ids=lambda m: f"margin{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multiclass_hinge_is_multi_margin_times_classes(backend, reduction, dtype, margin, n, c):
    rng = np.random.default_rng(51 + n)
    scores = arr(backend, rng.normal(0.0, 1.0, (n, c)), dtype)
    labels = arr(backend, rng.integers(0, c, n), "int64")
    loss, grad = losses.multiclass_hinge(scores, labels, margin=margin, reduction=reduction)

    st = tt(scores, requires_grad=True)
    per = F.multi_margin_loss(st, tt(labels), margin=margin, reduction="none") * c
    ref = reduce_ref(per, reduction)
    check_loss(loss, grad, scores, ref, backward_ref(ref, st), dtype, reduction)


def test_multiclass_hinge_course_example(backend):
    """The course's three images: losses 2.9, 0 and 12.9, mean 5.27 (and PyTorch agrees)."""
    s = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    y = np.array([0, 1, 2])
    scores, labels = arr(backend, s, "float64"), arr(backend, y, "int64")
    per, _ = losses.multiclass_hinge(scores, labels, reduction="none")
    np.testing.assert_allclose(to_np(per), [2.9, 0.0, 12.9], rtol=1e-12)
    loss, _ = losses.multiclass_hinge(scores, labels)
    close(loss, (F.multi_margin_loss(tt(scores), tt(labels), reduction="none") * 3).mean(), "float64")
    assert abs(float(to_np(loss)) - 5.27) < 5e-3


@pytest.mark.parametrize("target_kind", ["int", "float"])
@pytest.mark.parametrize("scores_shape", ["N", "N1"])
@pytest.mark.parametrize("margin", [1.0, 0.5], ids=lambda m: f"margin{m}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_hinge_matches_torch_clamp(backend, reduction, margin, scores_shape, target_kind):
    n = 7
    rng = np.random.default_rng(61)
    s = rng.normal(0.0, 1.5, n)
    y = rng.choice([-1, 1], n)
    if scores_shape == "N1":
        s = s[:, None]
    scores = arr(backend, s, "float64")
    targets = arr(backend, y, "int64" if target_kind == "int" else "float64")
    loss, grad = losses.binary_hinge(scores, targets, margin=margin, reduction=reduction)

    st = tt(scores, requires_grad=True)
    yt = tt(targets).to(torch.float64).reshape(st.shape)
    per = per_sample_sum(torch.clamp(margin - yt * st, min=0.0))
    ref = reduce_ref(per, reduction)
    check_loss(loss, grad, scores, ref, backward_ref(ref, st), "float64", reduction)


# ================================================================== regression
@pytest.mark.parametrize("shape", [(7,), (1,), (7, 3), (1, 11), (4, 3, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["l1", "l2"])
def test_regression_losses_match_torch(backend, which, reduction, dtype, shape):
    rng = np.random.default_rng(71 + len(shape))
    s = rng.normal(0.0, 2.0, shape)
    y = rng.normal(0.0, 2.0, shape)
    y.flat[0] = s.flat[0]  # an exact tie: L1's gradient is sign(0) = 0 in both
    pred, target = arr(backend, s, dtype), arr(backend, y, dtype)
    ours = losses.l1_loss if which == "l1" else losses.l2_loss
    theirs = F.l1_loss if which == "l1" else F.mse_loss
    loss, grad = ours(pred, target, reduction=reduction)

    pt = tt(pred, requires_grad=True)
    if reduction == "none":
        ref = per_sample_sum(theirs(pt, tt(target), reduction="none"))
    else:
        ref = theirs(pt, tt(target), reduction="sum")
        if reduction == "mean":
            ref = ref / shape[0]
    check_loss(loss, grad, pred, ref, backward_ref(ref, pt), dtype, reduction)
    if reduction == "mean":  # docstring: PyTorch's default mean is ours / components per sample
        per_row = math.prod(shape[1:])
        close(to_np(loss) / per_row, theirs(pt, tt(target)), dtype, "PyTorch default mean")


# ====================================================================== Linear
@pytest.mark.parametrize("x_shape", [(7, 5), (1, 5), (3, 4, 5)], ids=["N7", "N1", "BxTx5"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_forward_backward_match_torch(backend, dtype, bias, x_shape):
    rng = np.random.default_rng(81)
    layer = dc.nn.Linear(5, 11, bias=bias, seed=3, dtype=dtype)
    randomize_params(layer, backend, rng, dtype)
    ref_layer = torch.nn.Linear(5, 11, bias=bias, dtype=TORCH_DTYPE[dtype])
    copy_params_to_torch(layer, ref_layer)

    x = arr(backend, rng.normal(size=x_shape), dtype)
    y, back = layer.forward(x, train=True, input_grad=True)
    xt = tt(x, requires_grad=True)
    yt = ref_layer(xt)
    close(y, yt, dtype, "output")

    dy = arr(backend, rng.normal(size=tuple(yt.shape)), dtype)
    dx = back(dy)
    yt.backward(tt(dy))
    close(dx, xt.grad, dtype, "dx")
    check_param_grads(layer, ref_layer, dtype)

    # A second backward accumulates into .grad, as PyTorch's does.
    back(dy)
    yt2 = ref_layer(xt)
    yt2.backward(tt(dy))
    check_param_grads(layer, ref_layer, dtype)


def test_linear_pytorch_init_is_uniform_within_bound(backend):
    fan_in, fan_out = 50, 400
    layer = dc.nn.Linear(fan_in, fan_out, seed=1234, init="pytorch", dtype="float64")
    bound = 1.0 / math.sqrt(fan_in)
    w, b = to_np(layer.weight.value), to_np(layer.bias.value)
    assert w.shape == (fan_out, fan_in) and b.shape == (fan_out,)
    assert np.all(np.abs(w) <= bound) and np.all(np.abs(b) <= bound)
    m = w.size
    # U(-a, a): mean 0 (sd a/sqrt(3m)), variance a^2/3; ten equal bins each near m/10.
    assert abs(w.mean()) < 5 * bound / math.sqrt(3 * m)
    assert abs(w.var() / (bound ** 2 / 3) - 1.0) < 0.05
    counts, _ = np.histogram(w, bins=10, range=(-bound, bound))
    expected = m / 10
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected * 0.9)), counts
    assert w.min() < -0.95 * bound and w.max() > 0.95 * bound
    # The same seed gives the same weights on every backend (drawn on the host).
    with dc.use_backend("numpy"):
        again = dc.nn.Linear(fan_in, fan_out, seed=1234, init="pytorch", dtype="float64")
    np.testing.assert_array_equal(to_np(again.weight.value), w)


# ================================================================= activations
ACTIVATIONS = {
    "relu": (lambda: dc.nn.ReLU(), torch.relu),
    "leaky_relu0.2": (lambda: dc.nn.LeakyReLU(0.2), lambda t: F.leaky_relu(t, 0.2)),
    "sigmoid": (lambda: dc.nn.Sigmoid(), torch.sigmoid),
    "tanh": (lambda: dc.nn.Tanh(), torch.tanh),
    "softmax_axis-1": (lambda: dc.nn.Softmax(axis=-1), lambda t: torch.softmax(t, dim=-1)),
    "softmax_axis0": (lambda: dc.nn.Softmax(axis=0), lambda t: torch.softmax(t, dim=0)),
}


@pytest.mark.parametrize("shape", [(7, 11), (1, 3)], ids=["7x11", "1x3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_forward_backward_match_torch(backend, name, dtype, shape):
    make, ref_fn = ACTIVATIONS[name]
    rng = np.random.default_rng(91)
    x_np = rng.normal(0.0, 3.0, shape)
    flat = x_np.reshape(-1)
    flat[:3] = [40.0, -40.0, 0.0][: flat.size]  # saturated sigmoid/tanh, and the kink of (leaky) ReLU at 0
    x = arr(backend, x_np, dtype)
    y, back = make().forward(x, train=True, input_grad=True)
    xt = tt(x, requires_grad=True)
    yt = ref_fn(xt)
    close(y, yt, dtype, "output")
    assert dtype_name(y) == dtype

    dy = arr(backend, rng.normal(size=shape), dtype)
    dx = back(dy)
    yt.backward(tt(dy))
    close(dx, xt.grad, dtype, "dx")
    assert dtype_name(dx) == dtype


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_softmax_on_3d_input_matches_torch(backend, axis):
    rng = np.random.default_rng(92)
    x = arr(backend, rng.normal(0.0, 3.0, (2, 3, 4)), "float64")
    y, back = dc.nn.Softmax(axis=axis).forward(x, train=True, input_grad=True)
    xt = tt(x, requires_grad=True)
    yt = torch.softmax(xt, dim=axis)
    close(y, yt, "float64", "output")
    dy = arr(backend, rng.normal(size=(2, 3, 4)), "float64")
    yt.backward(tt(dy))
    close(back(dy), xt.grad, "float64", "dx")


def test_sigmoid_extremes_are_exact(backend):
    x = arr(backend, np.array([-40.0, 40.0, -745.0, 745.0]), "float64")
    y, back = dc.nn.Sigmoid().forward(x, train=True, input_grad=True)
    xt = tt(x, requires_grad=True)
    yt = torch.sigmoid(xt)
    close(y, yt, "float64", "output")
    assert np.all(np.isfinite(to_np(y)))
    np.testing.assert_allclose(to_np(y)[0], math.exp(-40.0) / (1 + math.exp(-40.0)), rtol=1e-12)
    dx = back(arr(backend, np.ones(4), "float64"))
    yt.backward(torch.ones(4, dtype=torch.float64))
    close(dx, xt.grad, "float64", "dx")


# ================================================================= BatchNorm1d
BN_SHAPES = [pytest.param((7, 3), id="N7xC3"), pytest.param((1, 3, 5), id="N1xC3xL5"),
             pytest.param((4, 11, 6), id="N4xC11xL6")]


def _bn_batch(rng, shape):
    c = shape[1]
    loc = rng.normal(0.0, 3.0, c)
    scale = rng.uniform(0.5, 4.0, c)
    bshape = (1, c) if len(shape) == 2 else (1, c, 1)
    return rng.normal(size=shape) * scale.reshape(bshape) + loc.reshape(bshape)


def _bn_compare_state(bn, ref, dtype):
    close(bn.running_mean, ref.running_mean, dtype, "running_mean")
    close(bn.running_var, ref.running_var, dtype, "running_var")
    assert int(to_np(bn.num_batches_tracked)) == int(ref.num_batches_tracked)


def _bn_step(backend, bn, ref, rng, shape, dtype, train):
    x = arr(backend, _bn_batch(rng, shape), dtype)
    bn.zero_grad()
    zero_torch_grads(ref)
    y, back = bn.forward(x, train=train, input_grad=True)
    xt = tt(x, requires_grad=True)
    ref.train(train)
    yt = ref(xt)
    close(y, yt, dtype, f"output (train={train})")
    dy = arr(backend, rng.normal(size=shape), dtype)
    dx = back(dy)
    yt.backward(tt(dy))
    close(dx, xt.grad, dtype, f"dx (train={train})")
    check_param_grads(bn, ref, dtype)
    _bn_compare_state(bn, ref, dtype)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_None"])
def test_batchnorm1d_training_then_eval_matches_torch(backend, momentum, shape, affine):
    dtype = "float64"
    rng = np.random.default_rng(101)
    c = shape[1]
    bn = dc.nn.BatchNorm1d(c, momentum=momentum, affine=affine, dtype=dtype)
    ref = torch.nn.BatchNorm1d(c, momentum=momentum, affine=affine, dtype=torch.float64)
    if affine:
        bn.weight.value = arr(backend, rng.uniform(0.5, 2.0, c), dtype)
        bn.bias.value = arr(backend, rng.normal(size=c), dtype)
        copy_params_to_torch(bn, ref)
    else:
        assert bn.parameters() == []
    _bn_compare_state(bn, ref, dtype)
    _bn_step(backend, bn, ref, rng, shape, dtype, train=False)  # eval before any training: mean 0, var 1
    for _ in range(3):
        _bn_step(backend, bn, ref, rng, shape, dtype, train=True)
    for _ in range(2):  # eval: running statistics, which must not move
        _bn_step(backend, bn, ref, rng, shape, dtype, train=False)
    assert int(to_np(bn.num_batches_tracked)) == 3


def test_batchnorm1d_float32_matches_torch(backend):
    rng = np.random.default_rng(102)
    shape, c = (7, 11, 2), 11
    bn = dc.nn.BatchNorm1d(c, dtype="float32")
    ref = torch.nn.BatchNorm1d(c, dtype=torch.float32)
    bn.weight.value = arr(backend, rng.uniform(0.5, 2.0, c), "float32")
    bn.bias.value = arr(backend, rng.normal(size=c), "float32")
    copy_params_to_torch(bn, ref)
    for train in (True, True, False):
        _bn_step(backend, bn, ref, rng, shape, "float32", train=train)


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5)], ids=["N7xC3", "N4xC3xL5"])
def test_batchnorm1d_without_running_stats_uses_batch_stats_in_eval(backend, shape):
    rng = np.random.default_rng(103)
    bn = dc.nn.BatchNorm1d(3, track_running_stats=False, dtype="float64")
    ref = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64)
    bn.weight.value = arr(backend, rng.uniform(0.5, 2.0, 3), "float64")
    bn.bias.value = arr(backend, rng.normal(size=3), "float64")
    copy_params_to_torch(bn, ref)
    for train in (True, False):
        x = arr(backend, _bn_batch(rng, shape), "float64")
        bn.zero_grad()
        zero_torch_grads(ref)
        y, back = bn.forward(x, train=train, input_grad=True)
        ref.train(train)
        xt = tt(x, requires_grad=True)
        yt = ref(xt)
        close(y, yt, "float64", f"output (train={train})")
        dy = arr(backend, rng.normal(size=shape), "float64")
        yt.backward(tt(dy))
        close(back(dy), xt.grad, "float64", f"dx (train={train})")
        check_param_grads(bn, ref, "float64")


def test_batchnorm1d_one_value_per_channel_is_refused_like_torch(backend):
    bn = dc.nn.BatchNorm1d(3, dtype="float64")
    x = arr(backend, np.ones((1, 3)), "float64")
    with pytest.raises(ValueError):
        torch.nn.BatchNorm1d(3, dtype=torch.float64)(tt(x))
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.forward(x, train=True, input_grad=True)
    assert int(to_np(bn.num_batches_tracked)) == 0


# ===================================================================== Dropout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9], ids=lambda p: f"p{p}")
def test_dropout_train_is_inverted_dropout(backend, p, dtype):
    rng = np.random.default_rng(111)
    x_np = rng.uniform(0.5, 2.0, (7, 11)) * rng.choice([-1.0, 1.0], (7, 11))
    x = arr(backend, x_np, dtype)
    y, back = dc.nn.Dropout(p, seed=7).forward(x, train=True, input_grad=True)
    y_np = to_np(y)
    assert y_np.shape == x_np.shape and dtype_name(y) == dtype
    xs = to_np(x)
    scaled = xs / (1.0 - p)
    kept = y_np != 0
    np.testing.assert_allclose(y_np[kept], scaled[kept], **TOL[dtype])
    assert np.all(y_np[~kept] == 0)
    # PyTorch's Dropout has the same two values (its RNG differs, so its mask does).
    yt = torch.nn.Dropout(p).train()(tt(x))
    t_kept = yt.numpy() != 0
    np.testing.assert_allclose(yt.numpy()[t_kept], scaled[t_kept], **TOL[dtype])
    # Backward: dy times the same mask/(1-p), i.e. dy * y / x.
    dy_np = rng.normal(size=x_np.shape)
    dx = to_np(back(arr(backend, dy_np, dtype)))
    np.testing.assert_allclose(dx, to_np(arr(backend, dy_np, dtype)) * y_np / xs, **TOL[dtype])
    assert np.all(dx[~kept] == 0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.7], ids=lambda p: f"p{p}")
def test_dropout_keeps_about_one_minus_p(backend, p):
    x = arr(backend, np.ones((400, 500)), "float64")
    y = to_np(dc.nn.Dropout(p, seed=99).forward(x, train=True, input_grad=True)[0])
    n = y.size
    kept = np.count_nonzero(y)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sd, (kept, n * (1 - p), sd)
    np.testing.assert_allclose(np.unique(y[y != 0]), [1.0 / (1.0 - p)], rtol=1e-12)
    ref = torch.nn.Dropout(p).train()(torch.ones(400, 500, dtype=torch.float64))
    assert abs(int(torch.count_nonzero(ref)) - n * (1 - p)) < 5 * sd
    assert abs(y.mean() - 1.0) < 5 * sd / n / (1 - p)  # inverted dropout keeps the expectation


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0], ids=lambda p: f"p{p}")
def test_dropout_eval_is_identity_and_edge_probabilities(backend, p):
    rng = np.random.default_rng(121)
    x = arr(backend, rng.normal(size=(7, 3)), "float64")
    drop = dc.nn.Dropout(p, seed=1)
    y, back = drop.forward(x, train=False, input_grad=True)
    np.testing.assert_array_equal(to_np(y), to_np(x))
    dy = arr(backend, rng.normal(size=(7, 3)), "float64")
    np.testing.assert_array_equal(to_np(back(dy)), to_np(dy))
    np.testing.assert_array_equal(to_np(drop(x)), torch.nn.Dropout(p).eval()(tt(x)).numpy())
    if p in (0.0, 1.0):  # train mode at the edges is deterministic: compare with PyTorch directly
        y, back = drop.forward(x, train=True, input_grad=True)
        ref = torch.nn.Dropout(p).train()(tt(x))
        np.testing.assert_array_equal(to_np(y), ref.numpy())
        assert np.all(np.isfinite(to_np(back(dy))))


# ========================================================================= MLP
@pytest.mark.parametrize("n", [1, 7], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_logits_loss_and_gradients_match_torch(backend, reduction, dtype, n):
    rng = np.random.default_rng(131 + n)
    model = dc.nn.Sequential(
        dc.nn.Linear(5, 16, dtype=dtype), dc.nn.ReLU(),
        dc.nn.Linear(16, 11, dtype=dtype), dc.nn.Tanh(),
        dc.nn.Linear(11, 3, dtype=dtype),
    )
    tdt = TORCH_DTYPE[dtype]
    ref = torch.nn.Sequential(
        torch.nn.Linear(5, 16, dtype=tdt), torch.nn.ReLU(),
        torch.nn.Linear(16, 11, dtype=tdt), torch.nn.Tanh(),
        torch.nn.Linear(11, 3, dtype=tdt),
    )
    randomize_params(model, backend, rng, dtype, scale=0.6)
    copy_params_to_torch(model, ref)
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in ref.named_parameters()]

    x = arr(backend, rng.normal(size=(n, 5)), dtype)
    labels = arr(backend, rng.integers(0, 3, n), "int64")
    logits, back = model.forward(x, train=True, input_grad=True)
    xt = tt(x, requires_grad=True)
    logits_t = ref(xt)
    close(logits, logits_t, dtype, "logits")
    close(model(x), logits_t, dtype, "inference logits")

    loss, dlogits = losses.softmax_cross_entropy(logits, labels, reduction=reduction)
    loss_t = F.cross_entropy(logits_t, tt(labels), reduction=reduction)
    close(loss, loss_t, dtype, "loss")
    dx = back(dlogits)
    loss_t.backward()
    close(dx, xt.grad, dtype, "dx")
    check_param_grads(model, ref, dtype)
