"""Layers: finite-difference gradients on every backend, semantics, state, moves and bad input.

Forward/backward parity with PyTorch modules lives in test_torch_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.gradcheck import check_gradients, check_layer
from tests.helpers import arr, dtype_name, to_np

LAYERS = {
    "linear": lambda: nn.Linear(5, 3, seed=0),
    "linear_nobias_he": lambda: nn.Linear(5, 3, bias=False, init="he", seed=1),
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softmax": nn.Softmax,
    "softmax_axis0": lambda: nn.Softmax(axis=0),
    "batchnorm": lambda: nn.BatchNorm1d(5),
    "batchnorm_no_affine": lambda: nn.BatchNorm1d(5, affine=False),
    "flatten": nn.Flatten,
    "mlp": lambda: nn.Sequential(nn.Linear(5, 8, seed=2), nn.Tanh(), nn.BatchNorm1d(8), nn.LeakyReLU(),
                                 nn.Linear(8, 4, seed=3), nn.Softmax()),
}


def _input(backend, shape=(6, 5), seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU's kink away from the finite-difference step
    return arr(backend, x, "float32")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_gradients_match_finite_differences(backend, name, train):
    layer = LAYERS[name]()
    if "batchnorm" in name and not train:
        # Eval mode uses running statistics: give them non-trivial values first.
        layer.forward(_input(backend, seed=9) * 3 + 1, train=True)
    result = check_layer(layer, _input(backend), train=train)
    assert result.ok
    assert {label for label, _, _ in result.checks} >= {"x"} | {n for n, _ in layer.named_parameters()}


def test_gradcheck_restores_the_layer(backend):
    layer = nn.Sequential(nn.Linear(5, 4, seed=0), nn.BatchNorm1d(4))
    before = {k: to_np(v) for k, v in layer.state_dict().items()}
    check_layer(layer, _input(backend), train=True)
    for k, v in layer.state_dict().items():
        assert dtype_name(v) == before[k].dtype.name
        np.testing.assert_array_equal(to_np(v), before[k])
    assert all(p.grad is None for p in layer.parameters())


def test_flatten_3d_input(backend):
    x = arr(backend, np.random.default_rng(0).standard_normal((2, 3, 4)), "float32")
    assert check_layer(nn.Flatten(), x).ok
    y, back = nn.Flatten().forward(x, input_grad=True)
    assert tuple(y.shape) == (2, 12)
    assert tuple(back(y).shape) == (2, 3, 4)
    assert tuple(nn.Flatten(0, 1)(x).shape) == (6, 4)


def test_linear_on_3d_input(backend):
    layer = nn.Linear(4, 2, seed=0)
    x = arr(backend, np.random.default_rng(0).standard_normal((3, 5, 4)), "float32")
    y = layer(x)
    assert tuple(y.shape) == (3, 5, 2)
    assert check_layer(layer, x).ok


def test_dropout_gradient_with_a_fixed_mask(backend):
    """With the same seed every evaluation draws the same mask, so dropout is differentiable."""
    x = _input(backend)
    y, back = nn.Dropout(0.3, seed=5).forward(backend.astype(x, backend.xp.float64), train=True, input_grad=True)
    g = arr(backend, np.random.default_rng(1).standard_normal(tuple(x.shape)), "float64")

    def f(values):
        return backend.xp.sum(nn.Dropout(0.3, seed=5).forward(values["x"], train=True, input_grad=True)[0] * g)

    assert check_gradients(f, {"x": backend.astype(x, backend.xp.float64)}, {"x": back(g)}).ok


def test_dropout_semantics(backend):
    x = arr(backend, np.full((400, 50), 2.0), "float32")
    layer = nn.Dropout(0.2, seed=0)
    y, back = layer.forward(x, train=True, input_grad=True)
    y_np = to_np(y)
    assert set(np.unique(y_np)) <= {0.0, np.float32(2.0 / 0.8)}
    kept = (y_np > 0).mean()
    assert abs(kept - 0.8) < 4 * np.sqrt(0.16 / y_np.size)
    np.testing.assert_array_equal(to_np(back(x)), y_np)  # dx = dy * mask / (1 - p)
    assert layer(x) is x  # inference is the identity
    assert not np.array_equal(to_np(layer.forward(x, train=True, input_grad=True)[0]), y_np)  # a new mask per call
    np.testing.assert_array_equal(to_np(nn.Dropout(0.2, seed=0).forward(x, train=True, input_grad=True)[0]), y_np)
    np.testing.assert_array_equal(to_np(nn.Dropout(1.0).forward(x, train=True, input_grad=True)[0]), 0.0)


def test_batchnorm_running_statistics_by_hand(backend):
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    bn = nn.BatchNorm1d(2, momentum=0.1)
    y = to_np(bn.forward(arr(backend, x, "float32"), train=True)[0])
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(to_np(bn.running_mean), 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(to_np(bn.running_var), 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    y_eval = to_np(bn(arr(backend, x, "float32")))
    np.testing.assert_allclose(y_eval, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * x.var(0, ddof=1) + 1e-5), rtol=1e-5)
    cumulative = nn.BatchNorm1d(2, momentum=None)
    cumulative.forward(arr(backend, x, "float32"), train=True)
    cumulative.forward(arr(backend, x * 2, "float32"), train=True)
    np.testing.assert_allclose(to_np(cumulative.running_mean), (mean + 2 * mean) / 2, rtol=1e-6)


def test_batchnorm_rejects_single_value_per_channel(backend):
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.BatchNorm1d(3).forward(arr(backend, np.ones((1, 3)), "float32"), train=True)
    nn.BatchNorm1d(3)(arr(backend, np.ones((1, 3)), "float32"))  # inference is fine


def test_linear_initialisers():
    rng_in = 400
    for init, check in [
        ("pytorch", lambda w: np.abs(w).max() <= 1 / np.sqrt(rng_in) and np.abs(w).max() > 0.9 / np.sqrt(rng_in)),
        ("he", lambda w: abs(w.std() - np.sqrt(2 / rng_in)) < 0.05 * np.sqrt(2 / rng_in)),
        ("xavier", lambda w: np.abs(w).max() <= np.sqrt(6 / (rng_in + 300))),
        ("zeros", lambda w: not w.any()),
    ]:
        layer = nn.Linear(rng_in, 300, init=init, seed=0)
        assert check(layer.weight.value), init
        if init != "pytorch":
            assert not layer.bias.value.any()
    with pytest.raises(ValueError, match="init must be one of"):
        nn.Linear(2, 2, init="kaiming")


def test_same_seed_same_weights_on_every_backend(backend):
    with dc.use_backend("numpy"):
        ref = nn.Linear(7, 3, seed=42)
    layer = nn.Linear(7, 3, seed=42)
    assert dc.get_backend(layer.weight.value) is backend
    np.testing.assert_array_equal(to_np(layer.weight.value), ref.weight.value)
    np.testing.assert_array_equal(to_np(layer.bias.value), ref.bias.value)


def test_manual_seed_makes_models_reproducible():
    dc.manual_seed(3)
    a = nn.Linear(4, 4)
    dc.manual_seed(3)
    b = nn.Linear(4, 4)
    c = nn.Linear(4, 4)
    np.testing.assert_array_equal(a.weight.value, b.weight.value)
    assert not np.array_equal(b.weight.value, c.weight.value)


def test_float64_input_computes_in_float64_with_float32_grads(backend):
    layer = nn.Sequential(nn.Linear(3, 4, seed=0), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, seed=1))
    x = backend.astype(_input(backend, (5, 3)), backend.xp.float64)
    y, back = layer.forward(x, train=True, input_grad=True)
    assert dtype_name(y) == "float64"
    dx = back(backend.xp.ones_like(y))
    assert dtype_name(dx) == "float64"
    for p in layer.parameters():
        assert dtype_name(p.grad) == dtype_name(p.value) == "float32"


def test_gradients_accumulate_until_zero_grad(backend):
    layer = nn.Linear(3, 2, seed=0)
    x = _input(backend, (4, 3))
    for _ in range(2):
        y, back = layer.forward(x, train=True, input_grad=True)
        back(backend.xp.ones_like(y))
    np.testing.assert_allclose(to_np(layer.bias.grad), [8.0, 8.0])
    layer.zero_grad()
    assert layer.bias.grad is None and layer.weight.grad is None


def test_state_dict_round_trip_and_atomic_load(backend):
    model = nn.Sequential(nn.Linear(3, 4, seed=0), nn.BatchNorm1d(4), nn.Linear(4, 2, seed=1))
    model.forward(_input(backend, (5, 3)), train=True)
    state = {k: to_np(v) for k, v in model.state_dict().items()}
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "1.num_batches_tracked", "2.weight", "2.bias"}
    fresh = nn.Sequential(nn.Linear(3, 4, seed=5), nn.BatchNorm1d(4), nn.Linear(4, 2, seed=6))
    fresh.load_state_dict(state)  # NumPy arrays load into any backend
    for k, v in fresh.state_dict().items():
        assert dc.get_backend(v) is backend
        np.testing.assert_array_equal(to_np(v), state[k])
    before = {k: to_np(v) for k, v in fresh.state_dict().items()}
    bad = dict(state)
    bad["2.weight"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(3, 3\) in the state but \(2, 4\) in the model"):
        fresh.load_state_dict(bad)
    with pytest.raises(KeyError, match="missing keys.*'2.bias'"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "2.bias"})
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])


def test_to_moves_between_backends(other_backend):
    model = nn.Sequential(nn.Linear(3, 4, seed=0), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, seed=1))
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    y, back = model.forward(x, train=True, input_grad=True)
    back(np.ones_like(y))
    expected = model(x)
    assert model.to(other_backend) is model
    for v in model.state_dict().values():
        assert dc.get_backend(v) is other_backend
    assert all(dc.get_backend(p.grad) is other_backend for p in model.parameters())
    np.testing.assert_allclose(to_np(model(dc.to_backend(x, other_backend))), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(dc.BackendMismatchError, match=r"model\.to\("):
        model(x)
    model.to("numpy", dtype="float64")
    assert model[0].weight.value.dtype == np.float64
    assert model[1].num_batches_tracked.dtype == np.int64  # integers are never cast


@pytest.mark.parametrize("layer", [nn.Linear(3, 2, seed=0), nn.ReLU(), nn.BatchNorm1d(3), nn.Softmax(), nn.Dropout()],
                         ids=lambda layer: type(layer).__name__)
def test_integer_input_is_an_error(backend, layer):
    layer.to(backend)
    with pytest.raises(TypeError, match=f"{type(layer).__name__}: input x must be a floating-point array, got dtype"):
        layer(arr(backend, np.ones((2, 3)), "int64"))


def test_shape_errors_name_the_layer(backend):
    with pytest.raises(ValueError, match=r"Linear\(3, 2\): input x must have shape \(\.\.\., 3\), got \(4, 5\)"):
        nn.Linear(3, 2)(_input(backend, (4, 5)))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): input x must have shape \(N, 3\)"):
        nn.BatchNorm1d(3)(_input(backend, (4, 5)))
    _, back = nn.Linear(5, 2).forward(_input(backend, (4, 5)))
    with pytest.raises(ValueError, match=r"Linear backward: dy must have the output's shape \(4, 2\), got \(4, 3\)"):
        back(_input(backend, (4, 3)))


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Linear(0, 3), "in_features must be a positive integer, got 0"),
    (lambda: nn.Linear(3, 2.5), "out_features must be a positive integer, got float 2.5"),
    (lambda: nn.Dropout(1.5), r"p must be a probability in \[0, 1\], got 1.5"),
    (lambda: nn.BatchNorm1d(4, momentum=2), r"momentum must be in \[0, 1\] or None, got 2"),
    (lambda: nn.Sequential(nn.ReLU(), "relu"), "layer 1 must be a deepcore.nn.Module, got str"),
    (lambda: nn.Linear(3, 2, seed=-1), "seed must be a non-negative integer"),
])
def test_constructor_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_repr_and_containers():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert "Linear(in_features=2, out_features=3, bias=True)" in repr(model)
    assert len(model) == 2 and isinstance(model[1], nn.ReLU)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]


def test_dropout_masks_resume_from_extra_state(backend):
    x = arr(backend, np.ones((8, 16)), "float32")
    model = nn.Sequential(nn.Linear(16, 16, seed=0), nn.Dropout(0.5, seed=3))
    model.forward(x, train=True, input_grad=True)
    state = model.extra_states()
    assert state == {"1": {"seed": 3, "calls": 1}}
    expected = to_np(model.forward(x, train=True, input_grad=True)[0])
    other = nn.Sequential(nn.Linear(16, 16, seed=0), nn.Dropout(0.5, seed=99))
    other.load_extra_states(state)
    np.testing.assert_array_equal(to_np(other.forward(x, train=True, input_grad=True)[0]), expected)
    with pytest.raises(KeyError, match="no submodule"):
        other.load_extra_states({"7": {}})


def test_layers_and_losses_never_import_an_array_library():
    """The proof that they are written against the standard: only xp = the input's namespace."""
    import ast
    from pathlib import Path

    root = Path(dc.__file__).parent
    for path in [*sorted((root / "nn").glob("*.py")), root / "losses.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in {"numpy", "cupy", "torch"}, f"{path.name} imports {name}"
