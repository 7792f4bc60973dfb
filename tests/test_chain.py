"""A Sequential of Linear layers and activations as one chain (deepcore/nn/chain.py): the same bits
as the layer-by-layer path, float64 finite differences, and the layer-by-layer path (with its
errors) for everything the chain does not take."""

from __future__ import annotations

import numpy as np
import pytest

from deepcore import nn
from deepcore.gradcheck import check_layer
from deepcore.nn import chain, containers


def _mlp(seed: int = 0, dtype: str = "float32") -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7, seed=seed, dtype=dtype), nn.Tanh(),
                         nn.Linear(7, 6, seed=seed + 1, dtype=dtype), nn.LeakyReLU(0.1),
                         nn.Linear(6, 4, seed=seed + 2, dtype=dtype), nn.Sigmoid(),
                         nn.Linear(4, 3, seed=seed + 3, dtype=dtype), nn.ReLU())


def _run(model, x, dy, *, input_grad):
    y, back = model.forward(x, train=True, input_grad=input_grad)
    dx = back(dy)
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    return y, dx, grads


@pytest.fixture
def counted_chain(monkeypatch):
    """run_chain, counting the chains it ran and the layer-by-layer fallbacks it declined to."""
    counts = {"chained": 0, "declined": 0}
    real = chain.run_chain

    def counting(layers, backend, x):
        out = real(layers, backend, x)
        counts["chained" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(containers, "run_chain", counting)
    return counts


@pytest.mark.parametrize("input_grad", [True, False])
def test_the_chain_gives_the_bits_of_the_layer_by_layer_path(monkeypatch, counted_chain, input_grad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    dy = rng.standard_normal((9, 3)).astype(np.float32)
    y, dx, grads = _run(_mlp(), x, dy, input_grad=input_grad)
    assert counted_chain == {"chained": 1, "declined": 0}
    monkeypatch.setattr(containers, "run_chain", lambda layers, backend, x: None)
    y_ref, dx_ref, grads_ref = _run(_mlp(), x, dy, input_grad=input_grad)
    np.testing.assert_array_equal(y, y_ref)
    if input_grad:
        np.testing.assert_array_equal(dx, dx_ref)
    else:
        assert dx is None and dx_ref is None
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_array_equal(g, g_ref)


def test_the_chain_matches_float64_finite_differences(counted_chain):
    x = np.random.default_rng(1).standard_normal((4, 5))
    result = check_layer(_mlp(dtype="float64"), x)
    assert result.ok, result.failures
    assert counted_chain["chained"] > 0 and counted_chain["declined"] == 0


def test_without_input_gradient_the_activations_before_the_first_linear_are_not_run(monkeypatch):
    calls = []
    real = nn.Tanh._chain_backward

    def spy(self, *args):
        calls.append(type(self).__name__)
        return real(self, *args)

    monkeypatch.setattr(nn.Tanh, "_chain_backward", spy)
    model = nn.Sequential(nn.Tanh(), nn.Linear(3, 2), nn.Tanh())
    x = np.ones((2, 3), np.float32)
    y, back = model.forward(x, train=True)  # data: no input gradient
    assert back(np.ones_like(y)) is None
    assert calls == ["Tanh"]  # the last one only
    assert model[1].weight.grad is not None
    activations_only = nn.Sequential(nn.ReLU(), nn.Tanh())
    y, back = activations_only.forward(x, train=True, input_grad=False)
    assert back(np.ones_like(y)) is None


def test_layers_the_chain_does_not_take_run_their_own_forward(counted_chain):
    class Doubled(nn.Linear):
        def forward(self, x, train=False):
            y, back = super().forward(x, train)
            return 2 * y, lambda dy: back(2 * dy)

    x = np.ones((2, 3), np.float32)
    model = nn.Sequential(Doubled(3, 3, seed=0), nn.ReLU())
    plain = nn.Sequential(nn.Linear(3, 3, seed=0), nn.ReLU())
    np.testing.assert_allclose(model(x), np.maximum(2 * (x @ plain[0].weight.value.T + plain[0].bias.value), 0))
    patched = nn.Sequential(nn.Linear(3, 3, seed=0), nn.ReLU())
    patched[1].forward = lambda x, train=False: (x + 1, lambda dy: dy)
    np.testing.assert_allclose(patched(x), x @ plain[0].weight.value.T + plain[0].bias.value + 1)
    with_dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    with_dropout(x)
    assert counted_chain == {"chained": 0, "declined": 3}


def test_inputs_a_layer_declines_take_the_layer_by_layer_path_and_its_errors(counted_chain):
    model = nn.Sequential(nn.Linear(3, 4, seed=0), nn.ReLU(), nn.Linear(4, 2, seed=1))
    x3 = np.random.default_rng(2).standard_normal((2, 5, 3)).astype(np.float32)
    y, back = model.forward(x3, train=True, input_grad=True)  # N-D input: Linear's own reshapes
    assert y.shape == (2, 5, 2) and back(np.ones_like(y)).shape == x3.shape
    flat = model(x3.reshape(10, 3)).reshape(2, 5, 2)
    np.testing.assert_allclose(y, flat, rtol=1e-6)
    with pytest.raises(ValueError, match=r"Linear\(3, 4\): input x must have shape \(\.\.\., 3\), got \(2, 5\)"):
        model(np.ones((2, 5), np.float32))
    y, back = model.forward(np.ones((2, 3), np.float32), train=True)
    with pytest.raises(ValueError, match=r"Linear backward: dy must have the output's shape \(2, 2\), got \(2, 3\)"):
        back(np.ones((2, 3), np.float32))
    assert counted_chain["chained"] == 2 and counted_chain["declined"] == 2


def test_what_is_not_an_array_meets_the_layers_as_before():
    assert nn.Sequential()(None) is None
    with pytest.raises(AttributeError):
        nn.Sequential(nn.Linear(3, 2))(None)


def test_backward_adds_to_the_parameters_the_forward_used():
    """Parameters replaced between forward and backward: the gradient still goes to those the
    forward used, in the chain and in Linear's own closure."""
    x = np.ones((2, 3), np.float32)
    for model in (nn.Sequential(nn.Linear(3, 2, seed=0), nn.ReLU()), nn.Linear(3, 2, seed=0)):
        lin = model[0] if isinstance(model, nn.Sequential) else model
        used = lin.weight
        y, back = model.forward(x, train=True)
        lin.weight = nn.Param(np.zeros((2, 3), np.float32), "weight")
        back(np.ones_like(y))
        assert used.grad is not None and lin.weight.grad is None


def _relu_calls(monkeypatch, backend):
    """Count the backend's ReLU forwards, in place and not."""
    calls = {"relu": 0, "relu_inplace": 0}
    for name in calls:
        real = getattr(type(backend), name)

        def spy(self, x, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, x)

        monkeypatch.setattr(type(backend), name, spy)
    return calls


def test_relu_writes_over_a_linear_output_and_never_over_the_input_or_an_output_still_needed(monkeypatch):
    # ReLU after Linear writes over the Linear's output (the chain's own); ReLU first would write over
    # the caller's x, and ReLU after Tanh over the output Tanh's backward reads (1 - y^2).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    x_before = x.copy()
    dy = rng.standard_normal((6, 2)).astype(np.float32)

    def build():
        return nn.Sequential(nn.ReLU(), nn.Linear(3, 5, seed=0), nn.ReLU(), nn.Linear(5, 4, seed=1), nn.Tanh(),
                             nn.ReLU(), nn.Linear(4, 2, seed=2))

    calls = _relu_calls(monkeypatch, dc_numpy())
    y, dx, grads = _run(build(), x, dy, input_grad=True)
    assert calls == {"relu": 2, "relu_inplace": 1}
    np.testing.assert_array_equal(x, x_before)
    monkeypatch.setattr(containers, "run_chain", lambda layers, backend, x: None)
    y_ref, dx_ref, grads_ref = _run(build(), x, dy, input_grad=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_array_equal(g, g_ref)
    # and against the formula worked in float64: dL/dW1 of relu(relu(x) W1^T + b1) ... by hand
    m = build()
    w1, b1 = (p.value.astype(np.float64) for p in (m[1].weight, m[1].bias))
    w2, b2 = (p.value.astype(np.float64) for p in (m[3].weight, m[3].bias))
    w3 = m[6].weight.value.astype(np.float64)
    x0 = np.maximum(x.astype(np.float64), 0)
    h1 = x0 @ w1.T + b1
    r1 = np.maximum(h1, 0)
    t = np.tanh(r1 @ w2.T + b2)
    d_t = (dy.astype(np.float64) @ w3) * (t > 0)
    d_r1 = (d_t * (1 - t**2)) @ w2
    np.testing.assert_allclose(grads[0], (d_r1 * (h1 > 0)).T @ x0, rtol=1e-4, atol=1e-5)


def test_a_relu_subclass_with_its_own_math_keeps_it_in_the_chain():
    class ReLU6(nn.ReLU):
        def _f(self, backend, x):
            return np.minimum(np.maximum(x, 0), 6)

        def _df(self, backend, dy, x, y):
            return dy * ((x > 0) & (x < 6))

    lin = nn.Linear(2, 3, seed=0)
    x = np.array([[10.0, -10.0], [3.0, 1.0]], np.float32)
    y, back = nn.Sequential(lin, ReLU6()).forward(x, train=True, input_grad=True)
    h = x @ lin.weight.value.T + lin.bias.value
    np.testing.assert_allclose(y, np.clip(h, 0, 6), rtol=1e-6)
    dx = back(np.ones_like(y))
    np.testing.assert_allclose(dx, ((h > 0) & (h < 6)) @ lin.weight.value, rtol=1e-6)


def test_a_later_layer_declining_leaves_the_caller_with_the_layer_path_and_its_error():
    # The chain runs Linear and ReLU (in place, on its own array), then the second Linear declines
    # the width: the layer-by-layer path starts again from x and raises Linear's own message.
    x = np.ones((2, 3), np.float32)
    model = nn.Sequential(nn.Linear(3, 4, seed=0), nn.ReLU(), nn.Linear(5, 2, seed=1))
    with pytest.raises(ValueError, match=r"Linear\(5, 2\): input x must have shape \(\.\.\., 5\), got \(2, 4\)"):
        model(x)
    np.testing.assert_array_equal(x, 1.0)


def dc_numpy():
    import deepcore as dc

    return dc.get_backend("numpy")
