"""Regularizers: penalties worked by hand, gradients against finite differences, the parameter
selection, the max-norm constraint and bad arguments, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.gradcheck import check_gradients
from deepcore.regularizers import L1, L2, ElasticNet, MaxNorm, Regularizer, weights_only
from tests.helpers import arr, dtype_name, needs_torch, to_np

W = np.array([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])
B = np.array([10.0, -10.0])
# sum W² = 15.25, sum |W| = 7.5 (the bias never counts by default)


def _linear(backend, w=W, b=B, dtype="float32") -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], seed=0, dtype=dtype)
    layer.weight.value = arr(backend, w, dtype)
    layer.bias.value = arr(backend, b, dtype)
    return layer


@pytest.mark.parametrize(
    "reg, value, grad",
    [
        (L2(0.1), 0.1 * 15.25, 0.1 * 2 * W),
        (L1(0.1), 0.1 * 7.5, 0.1 * np.sign(W)),
        (ElasticNet(0.1, beta=0.5), 0.1 * (0.5 * 15.25 + 7.5), 0.1 * (2 * 0.5 * W + np.sign(W))),
        (ElasticNet(0.2, beta=0.0), 0.2 * 7.5, 0.2 * np.sign(W)),
    ],
    ids=["l2", "l1", "elastic", "elastic_beta0"],
)
def test_penalty_and_gradient_by_hand(backend, reg, value, grad):
    layer = _linear(backend)
    penalty = reg.penalty(layer.parameters())
    assert dc.get_backend(penalty) is backend and tuple(penalty.shape) == () and dtype_name(penalty) == "float32"
    assert float(penalty) == pytest.approx(value, rel=1e-6)

    out = reg(layer)  # a Module stands for its parameters; __call__ = penalty + add_gradient
    assert float(out) == pytest.approx(value, rel=1e-6)
    np.testing.assert_allclose(to_np(layer.weight.grad), grad, rtol=1e-6)
    assert dtype_name(layer.weight.grad) == "float32"
    assert layer.bias.grad is None  # biases are not regularised by default


def test_add_gradient_accumulates_into_existing_grad(backend):
    layer = _linear(backend)
    layer.weight.grad = arr(backend, np.ones_like(W), "float32")
    L2(0.25).add_gradient(layer.parameters())
    np.testing.assert_allclose(to_np(layer.weight.grad), 1.0 + 0.5 * W, rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: L2(0.3), lambda: L1(0.3), lambda: ElasticNet(0.3, 0.7)],
                         ids=["l2", "l1", "elastic"])
def test_gradients_match_finite_differences(backend, make):
    reg = make()
    rng = np.random.default_rng(0)
    # |w| >= 0.2 keeps L1's kink at 0 away from the finite-difference step.
    w = rng.uniform(0.2, 1.0, (4, 3)) * rng.choice([-1.0, 1.0], (4, 3))
    layer = _linear(backend, w=w, b=np.zeros(4), dtype="float64")
    reg.add_gradient(layer.parameters())

    def f(values):
        return reg.penalty([nn.Param(values["weight"], "weight"), nn.Param(values["bias"], "bias")])

    inputs = {"weight": layer.weight.value, "bias": layer.bias.value}
    grads = {"weight": layer.weight.grad, "bias": backend.xp.zeros_like(layer.bias.value)}
    assert check_gradients(f, inputs, grads).ok


def test_default_selection_skips_biases_and_batchnorm(backend):
    model = nn.Sequential(nn.Linear(3, 4, seed=0), nn.BatchNorm1d(4), nn.Linear(4, 2, seed=1))
    assert [weights_only(p) for p in model.parameters()] == [True, False, False, False, True, False]
    L1(1.0).add_gradient(model)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (p.value.ndim == 2), name
    expected = sum(float(np.sum(np.abs(to_np(p.value)))) for p in model.parameters() if p.value.ndim == 2)
    assert float(L1(1.0).penalty(model)) == pytest.approx(expected, rel=1e-6)


def test_applies_to_override(backend):
    layer = _linear(backend)
    everything = L2(0.5, applies_to=lambda p: True)
    assert float(everything.penalty(layer)) == pytest.approx(0.5 * (15.25 + 200.0), rel=1e-6)
    everything.add_gradient(layer)
    np.testing.assert_allclose(to_np(layer.bias.grad), B, rtol=1e-6)

    only_bias = L1(1.0, applies_to=lambda p: p.name == "bias")
    layer.zero_grad()
    assert float(only_bias(layer)) == pytest.approx(20.0)
    assert layer.weight.grad is None
    np.testing.assert_allclose(to_np(layer.bias.grad), np.sign(B))


def test_nothing_selected_gives_zero_of_the_params_namespace(backend):
    layer = _linear(backend)
    reg = L2(1.0, applies_to=lambda p: False)
    z = reg(layer)
    assert dc.get_backend(z) is backend and tuple(z.shape) == () and float(z) == 0.0
    assert layer.weight.grad is None and layer.bias.grad is None
    assert float(L2(1.0).penalty([])) == 0.0


def test_float64_params_keep_float64(backend):
    layer = _linear(backend, dtype="float64")
    assert dtype_name(L2(0.1)(layer)) == "float64"
    assert dtype_name(layer.weight.grad) == "float64"


@needs_torch
def test_l2_half_weight_decay_matches_pytorch_sgd():
    import torch

    wd, lr = 0.2, 0.1
    layer = _linear(dc.get_backend("numpy"), dtype="float64")
    layer.weight.grad = np.zeros_like(W)
    L2(wd / 2).add_gradient(layer)
    ours = W - lr * layer.weight.grad

    t = torch.nn.Parameter(torch.tensor(W))
    t.grad = torch.zeros_like(t)
    torch.optim.SGD([t], lr=lr, weight_decay=wd).step()
    np.testing.assert_allclose(ours, t.detach().numpy(), rtol=1e-12)


def test_max_norm_by_hand(backend):
    # Row 0 has norm 5 (3-4-0); row 1 norm 1; row 2 norm exactly c.
    w = np.array([[3.0, 4.0, 0.0], [0.6, 0.0, 0.8], [0.0, 2.0, 0.0]])
    layer = _linear(backend, w=w, b=np.array([7.0, -7.0, 9.0]))
    before_bias = to_np(layer.bias.value)
    MaxNorm(2.0).project(layer.parameters())
    out = to_np(layer.weight.value)
    assert dtype_name(layer.weight.value) == "float32"
    np.testing.assert_allclose(np.linalg.norm(out[0]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(out[0], w[0] * (2.0 / 5.0), rtol=1e-6)  # same direction
    np.testing.assert_array_equal(out[1:], w[1:].astype(np.float32))  # within c: bit-for-bit unchanged
    np.testing.assert_array_equal(to_np(layer.bias.value), before_bias)


def test_max_norm_axis_and_zero_rows(backend):
    w = np.array([[3.0, 0.0], [4.0, 0.0]])  # column 0 has norm 5, column 1 is zero
    layer = _linear(backend, w=w, b=np.zeros(2), dtype="float64")
    MaxNorm(1.0, axis=0)(layer)
    np.testing.assert_allclose(to_np(layer.weight.value), [[0.6, 0.0], [0.8, 0.0]], rtol=1e-12)
    assert np.all(np.isfinite(to_np(layer.weight.value)))


def test_max_norm_applies_to_and_bad_axis_changes_nothing(backend):
    layer = _linear(backend)
    MaxNorm(1.0, axis=0, applies_to=lambda p: True).project(layer)  # bias is 1-D: axis 0 is its norm
    np.testing.assert_allclose(np.linalg.norm(to_np(layer.bias.value)), 1.0, rtol=1e-6)

    layer = _linear(backend)
    before = {k: to_np(v) for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"axis 1 is out of range for parameter 'bias'"):
        MaxNorm(1.0, applies_to=lambda p: True).project(layer)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: L2(-0.1), ValueError, r"L2: lam must be a finite number >= 0, got -0.1"),
        (lambda: L1(float("nan")), ValueError, r"L1: lam must be a finite number >= 0"),
        (lambda: L2("0.1"), TypeError, r"L2: lam must be a real number, got '0.1'"),
        (lambda: L2(True), TypeError, r"lam must be a real number"),
        (lambda: ElasticNet(0.1, -1.0), ValueError, r"ElasticNet: beta must be a finite number >= 0, got -1.0"),
        (lambda: L2(0.1, applies_to="weights"), TypeError, r"applies_to must be a callable"),
        (lambda: MaxNorm(0.0), ValueError, r"MaxNorm: c must be a finite number > 0, got 0.0"),
        (lambda: MaxNorm(-1), ValueError, r"c must be a finite number > 0"),
        (lambda: MaxNorm(None), TypeError, r"MaxNorm: c must be a real number"),
        (lambda: MaxNorm(1.0, axis=1.5), TypeError, r"axis must be an int or a non-empty tuple"),
        (lambda: MaxNorm(1.0, axis=()), TypeError, r"axis must be an int or a non-empty tuple"),
    ],
)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_params_must_be_params():
    with pytest.raises(TypeError, match=r"L2: params must be Param objects .* item 0 is ndarray"):
        L2(0.1).penalty([np.ones((2, 2))])


def test_regularizer_is_the_common_base_and_reprs():
    assert all(issubclass(c, Regularizer) for c in (L1, L2, ElasticNet))
    assert repr(ElasticNet(0.1, 0.5)) == "ElasticNet(lam=0.1, beta=0.5)"
    assert repr(MaxNorm(3)) == "MaxNorm(c=3.0, axis=1)"
