"""End to end: the same hand-written training loop learns on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from tests.helpers import arr, to_np


def _sgd_step(model: nn.Module, lr: float) -> None:
    for p in model.parameters():
        p.value = p.value - lr * p.grad
    model.zero_grad()


def _spirals(n_per_class: int = 60, classes: int = 3, seed: int = 0):
    """The classic toy set that no linear classifier separates."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = np.linspace(k * 4.0, (k + 1) * 4.0, n_per_class) + rng.normal(0, 0.15, n_per_class)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def test_two_layer_mlp_learns_spirals_on_each_backend(backend):
    x_np, y_np = _spirals()
    x, y = arr(backend, x_np, "float32"), arr(backend, y_np, "int64")
    model = nn.Sequential(nn.Linear(2, 64, init="he", seed=0), nn.ReLU(), nn.Linear(64, 3, seed=1))
    first = None
    for _ in range(400):
        logits, backward = model.forward(x, train=True)
        loss, dlogits = dc.losses.softmax_cross_entropy(logits, y)
        backward(dlogits)
        _sgd_step(model, lr=1.0)
        first = float(loss) if first is None else first
    accuracy = float(np.mean(to_np(model(x)).argmax(axis=1) == y_np))
    assert float(loss) < 0.3 * first
    assert accuracy > 0.9, accuracy


def test_linear_classifier_cannot_but_mlp_can():
    """Under-fitting made visible: a linear model stays far below the MLP on the spirals."""
    x, y = _spirals()
    lin = nn.Linear(2, 3, seed=0)
    for _ in range(300):
        logits, back = lin.forward(x, train=True)
        back(dc.losses.softmax_cross_entropy(logits, y)[1])
        _sgd_step(lin, lr=1.0)
    assert np.mean(lin(x).argmax(axis=1) == y) < 0.7


def test_gradient_descent_solves_four_point_regression(backend):
    """x = 2, 4, 6, 8 and y = 3, 4, 5, 6: gradient descent on L2 reaches w = 0.5, b = 2.0."""
    x = arr(backend, [[2.0], [4.0], [6.0], [8.0]], "float64")
    y = arr(backend, [[3.0], [4.0], [5.0], [6.0]], "float64")
    model = nn.Linear(1, 1, init="zeros", dtype="float64")
    for _ in range(5000):
        pred, back = model.forward(x, train=True)
        loss, dpred = dc.losses.l2_loss(pred, y)
        back(dpred)
        _sgd_step(model, lr=0.02)
    assert float(to_np(model.weight.value)[0, 0]) == pytest.approx(0.5, abs=1e-6)
    assert float(to_np(model.bias.value)[0]) == pytest.approx(2.0, abs=1e-5)
    assert float(loss) < 1e-10


def test_multiclass_svm_with_dropout_and_batchnorm_trains(backend):
    x_np, y_np = _spirals(seed=1)
    x, y = arr(backend, x_np, "float32"), arr(backend, y_np, "int64")
    model = nn.Sequential(nn.Linear(2, 64, seed=0), nn.BatchNorm1d(64), nn.Tanh(), nn.Dropout(0.1, seed=0),
                          nn.Linear(64, 3, seed=1))
    for _ in range(300):
        scores, backward = model.forward(x, train=True)
        _, dscores = dc.losses.multiclass_hinge(scores, y)
        backward(dscores)
        _sgd_step(model, lr=0.5)
    assert float(np.mean(to_np(model(x)).argmax(axis=1) == y_np)) > 0.85
