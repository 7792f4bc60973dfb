"""The gradient checker itself: it must pass right gradients and catch wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from deepcore import nn
from deepcore.gradcheck import GradcheckError, check_gradients, check_layer, check_loss
from deepcore.nn.module import Param, check_grad_shape, input_backend
from tests.helpers import arr


class Square(nn.Module):
    """y = x^2 (elementwise), with a switchable wrong derivative."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, x, train=False):
        def backward(dy):
            check_grad_shape(self, dy, tuple(x.shape))
            return dy * x * (3.0 if self.wrong else 2.0)

        return x * x, backward


class Scale(nn.Module):
    """y = a * x with a learnable scalar-per-feature a, optionally forgetting the 1/2 in its gradient."""

    def __init__(self, n: int, wrong: bool = False) -> None:
        super().__init__()
        self.a = Param(np.linspace(0.5, 1.5, n), "a")
        self.wrong = wrong

    def forward(self, x, train=False):
        backend = input_backend(self, x, self.a)
        a = self.a

        def backward(dy):
            g = backend.xp.sum(dy * x, axis=0)
            a.accumulate_grad(g * 0.5 if self.wrong else g, backend)
            return dy * a.value

        return x * a.value, backward


def test_right_gradient_passes(backend):
    x = arr(backend, np.random.default_rng(0).standard_normal((3, 4)), "float32")
    result = check_layer(Square(), x)
    assert result.ok and result.max_abs_error < 1e-6


def test_wrong_input_gradient_is_caught(backend):
    x = arr(backend, np.random.default_rng(0).standard_normal((3, 4)), "float32")
    with pytest.raises(GradcheckError, match="gradient of 'x' disagrees with finite differences"):
        check_layer(Square(wrong=True), x)


def test_wrong_parameter_gradient_is_named():
    x = np.random.default_rng(0).standard_normal((3, 4))
    assert check_layer(Scale(4), x).ok
    result = check_layer(Scale(4, wrong=True), x, raise_on_failure=False)
    assert not result.ok
    assert any("'a'" in f for f in result.failures)
    assert not any("'x'" in f for f in result.failures)


def test_wrong_loss_gradient_is_caught():
    def bad_l2(pred, target, reduction="mean"):
        d = pred - target
        return (d * d).sum(), d  # forgot the factor 2

    with pytest.raises(GradcheckError, match="'pred'"):
        check_loss(bad_l2, np.ones((2, 2)), np.zeros((2, 2)))


def test_check_gradients_requires_every_gradient():
    with pytest.raises(ValueError, match=r"no entry for inputs \['b'\]"):
        check_gradients(lambda v: 0.0, {"a": np.ones(2), "b": np.ones(2)}, {"a": np.ones(2)})


def test_dropout_in_training_mode_keeps_its_mask_and_its_stream_position():
    """Each finite difference replays the mask of the analytic gradient; the stream is untouched after."""
    layer = nn.Dropout(0.5, seed=3)
    layer.forward(np.ones((2, 2)), train=True)  # not at the start of its stream
    before = layer.extra_states()
    x = np.random.default_rng(0).standard_normal((4, 5))
    result = check_layer(layer, x, train=True)
    assert result.ok and result.max_abs_error < 1e-6
    assert layer.extra_states() == before
    # A Sequential holding it: the extra state is found by path and held just the same.
    model = nn.Sequential(Scale(5), nn.Dropout(0.3, seed=1))
    before = model.extra_states()
    assert check_layer(model, x, train=True).ok
    assert model.extra_states() == before
