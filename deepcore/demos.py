"""The course's worked examples, computed with deepcore's own pieces (``deepcore demo NAME``).

Each demo prints its numbers and returns an exit status; the over-fitting demo
also writes a picture when matplotlib is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import losses, nn, optim
from .data import four_points, noisy_curve, polynomial_features

OVERFIT_ORDERS = (1, 2, 3, 4, 12)


def regression(out: Path | None = None, log: Callable[[str], None] = print, steps: int = 5000,
               lr: float = 0.02) -> int:
    """Gradient descent ``W <- W - α dL/dW`` on x = 2, 4, 6, 8 and y = 3, 4, 5, 6 reaches w = 0.5, b = 2.0."""
    data = four_points()
    model = nn.Linear(1, 1, init="zeros", dtype="float64")
    opt = optim.GD(model.parameters(), lr=lr)
    log(f"four points x = {data.x[:, 0].tolist()}, y = {data.y[:, 0].tolist()}; "
        f"L = mean (y - (w x + b))^2, gradient descent with step {lr}")
    log(f"{'step':>6} {'loss':>12} {'w':>10} {'b':>10}")
    for step in range(steps + 1):
        opt.zero_grad()
        pred, backward = model.forward(data.x, train=True)
        loss, dpred = losses.l2_loss(pred, data.y)
        if step in (0, 1, 10, 100, 1000) or step == steps:
            log(f"{step:>6} {float(loss):>12.6g} {model.weight.value[0, 0]:>10.6f} {model.bias.value[0]:>10.6f}")
        backward(dpred)
        opt.step()
    log("optimum: w = 0.5, b = 2.0 (the line through all four points)")
    return 0


def overfit(out: Path | None = None, log: Callable[[str], None] = print, seed: int = 0) -> int:
    """Polynomial features of order 1, 2, 3, 4, 12 on 10 noisy samples of sin(2πx): training error
    falls with the order while test error rises again once the model fits the noise."""
    from .plotting import overfitting

    splits = noisy_curve(10, seed=seed)
    train, test = splits.train, splits.test
    grid = np.linspace(0.0, 1.0, 200)[:, None]
    train_err, test_err, fits = [], [], []
    log(f"{'order':>5} {'parameters':>10} {'train MSE':>12} {'test MSE':>12}")
    for order in OVERFIT_ORDERS:
        features = polynomial_features(train.x, order)
        # Least squares in the transformed feature space: the linear classifier's fit, solved exactly
        # so that the picture shows the model's capacity, not an optimiser's patience.
        w, *_ = np.linalg.lstsq(features, train.y, rcond=None)
        tr = float(losses.l2_loss(features @ w, train.y)[0])
        te = float(losses.l2_loss(polynomial_features(test.x, order) @ w, test.y)[0])
        train_err.append(tr)
        test_err.append(te)
        fits.append((polynomial_features(grid, order) @ w)[:, 0])
        log(f"{order:>5} {features.shape[1]:>10} {tr:>12.4g} {te:>12.4g}")
    best = OVERFIT_ORDERS[int(np.argmin(test_err))]
    log(f"lowest test error at order {best}; order 1 under-fits, order 12 over-fits (train error ~0, test error up)")
    if out is not None:
        curve = {"x_train": train.x[:, 0], "y_train": train.y[:, 0], "x_test": test.x[:, 0], "y_test": test.y[:, 0],
                 "grid": grid[:, 0], "fits": fits}
        path = overfitting(OVERFIT_ORDERS, train_err, test_err, curve, Path(out) / "overfit.png", note=log)
        if path is not None:
            log(f"wrote {path}")
    return 0


def hinge(out: Path | None = None, log: Callable[[str], None] = print) -> int:
    """The multiclass SVM loss on three images (cat, car, frog): 2.9, 0 and 12.9, mean 5.27."""
    classes = ("cat", "car", "frog")
    scores = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    labels = np.array([0, 1, 2])
    per_image, _ = losses.multiclass_hinge(scores, labels, reduction="none")
    mean, grad = losses.multiclass_hinge(scores, labels)
    log("L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + 1)")
    for name, s, li in zip(classes, scores, per_image, strict=True):
        terms = " + ".join(f"max(0, {s[j]:.1f} - {s[classes.index(name)]:.1f} + 1)"
                           for j in range(3) if classes[j] != name)
        log(f"  {name:>4} image: {terms} = {li:.1f}")
    log(f"L = mean L_i = {float(mean):.2f}")
    log(f"dL/ds (rows: images) =\n{np.array2string(grad, precision=3)}")
    b_scores, b_targets = np.array([2.0, 0.5, -0.3]), np.array([1, 1, -1])
    b_loss, b_grad = losses.binary_hinge(b_scores, b_targets, reduction="none")
    log("binary hinge max(0, 1 - y s) for (s, y) = (2.0, +1), (0.5, +1), (-0.3, -1): "
        f"{b_loss.tolist()}, dL/ds = {b_grad.tolist()}")
    return 0
