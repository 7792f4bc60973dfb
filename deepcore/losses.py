"""Losses as functions ``fn(pred, target, *, reduction="mean", ...) -> (loss, grad)``.

``loss`` is a 0-d array of pred's namespace ("mean": over samples, "sum"),
or the per-sample vector ("none"); ``grad`` is d(loss)/d(pred) with pred's
shape and dtype ("none": the gradient of the sum). Per-sample losses follow
the course's definitions; each docstring says how to get PyTorch's where it
differs. Arguments are checked here; the arithmetic lives in the backend,
where CuPy and NumPy run fused implementations.
"""

from __future__ import annotations

from typing import Any

from ._checks import (
    check_floating,
    check_labels,
    check_number,
    check_range,
    check_reduction,
    check_values_in,
)
from .backend import Backend, backend_of
from .backend.base import REDUCTIONS, Array
from .backend.registry import _by_type as _BACKEND_BY_TYPE

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_hinge",
    "l1_loss",
    "l2_loss",
    "log_likelihood",
    "multiclass_hinge",
    "softmax_cross_entropy",
]


def softmax_cross_entropy(logits: Array, labels: Array, *, reduction: str = "mean", label_smoothing: float = 0.0,
                          ignore_index: int | None = None, class_weights: Any = None,
                          validate: bool = True) -> tuple[Array, Array]:
    """Softmax followed by the negative log-likelihood, loss and gradient in one fused pass.

    ``L_i = -log p_{y_i}``, ``p = softmax(s_i)``; ``dL_i/ds_i = p - z_i`` (``z`` one-hot).
    With label smoothing ``ε`` the target is ``(1-ε) z + ε/C``; with class
    weights, row ``i`` counts ``w_{y_i}``; rows whose label is ``ignore_index``
    count zero. "mean" divides by the summed target weight of the counted
    rows, exactly as PyTorch's ``F.cross_entropy`` (for the smoothing term too).
    Logits (N, C), labels (N,) integers. ``validate=False`` skips the label
    range check (a host synchronisation on a GPU); a bad label then yields NaN,
    never an out-of-bounds access.
    """
    # The training step's call (no weights, smoothing or ignored rows, arrays of one single-device
    # library, right shapes and dtypes) checked in a handful of identity tests; anything else, and
    # every error message, comes from the full checks below.
    array_type = type(logits)
    backend = _BACKEND_BY_TYPE.get(array_type)
    if (backend is not None and class_weights is None and ignore_index is None and type(labels) is array_type
            and backend.single_device and type(reduction) is str and reduction in REDUCTIONS
            and (label_smoothing == 0.0 if type(label_smoothing) in (float, int) else False)
            and logits.ndim == 2 and labels.ndim == 1 and labels.shape[0] == logits.shape[0]
            and backend.is_floating(logits) and backend.is_integer(labels)):
        n, c = logits.shape
        if n:  # a backend's fused pass checks the labels itself (NumPy's under DEEPCORE_JIT=1)
            fused = backend.softmax_cross_entropy_fused(logits, labels, reduction)
            if fused is not None:
                return fused
        if n == 0:
            in_range = True
        elif not validate:
            in_range = False
        else:
            in_range = getattr(backend, "labels_in_range", None)
            in_range = (in_range is not None and in_range(labels, c)) or check_labels(
                backend, labels, n, c, "softmax_cross_entropy", validate=True)
        with backend.silent_fp():
            return backend.softmax_cross_entropy(logits, labels, reduction=reduction, label_smoothing=0.0,
                                                 ignore_index=None, class_weights=None, labels_in_range=in_range)
    fn = "softmax_cross_entropy"
    backend = _backend(fn, (logits, "logits"), (labels, "labels"), (class_weights, "class_weights"))
    check_reduction(reduction, fn)
    check_floating(backend, logits, "logits", fn, (2,))
    n, c = logits.shape
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"{fn}: ignore_index must be an int or None, got {ignore_index!r}")
    in_range = check_labels(backend, labels, n, c, fn, validate=validate, ignore_index=ignore_index)
    eps = check_number(label_smoothing, "label_smoothing", fn, 0.0, 1.0)
    weights = None
    if class_weights is not None:
        weights = class_weights
        if not hasattr(weights, "shape"):
            weights = backend.asarray(weights, dtype=logits.dtype, device=backend.device(logits))
        check_floating(backend, weights, "class_weights", fn, (1,))
        if weights.shape[0] != c:
            raise ValueError(f"{fn}: class_weights must have shape ({c},) for {c} classes, got {tuple(weights.shape)}")
    if n and eps == 0.0 and weights is None and ignore_index is None:
        # The same call as above's: a process's first call comes here (the type table above is
        # filled by its backend look-up), and must run in the form every later call runs in.
        fused = backend.softmax_cross_entropy_fused(logits, labels, reduction)
        if fused is not None:
            return fused
    with backend.silent_fp():
        return backend.softmax_cross_entropy(logits, labels, reduction=reduction, label_smoothing=eps,
                                             ignore_index=ignore_index, class_weights=weights,
                                             labels_in_range=in_range)


def log_likelihood(probs: Array, labels: Array, *, reduction: str = "mean",
                   validate: bool = True) -> tuple[Array, Array]:
    """Negative log-likelihood of given probabilities: ``L_i = -log p_{i,y_i}``; ``dL/dp_{i,y_i} = -1/p_{i,y_i}``.

    PyTorch's ``nll_loss`` takes log-probabilities instead: ``nll_loss(log(p), y)``.
    """
    fn = "log_likelihood"
    backend = _backend(fn, (probs, "probs"), (labels, "labels"))
    check_reduction(reduction, fn)
    check_floating(backend, probs, "probs", fn, (2,))
    check_labels(backend, labels, probs.shape[0], probs.shape[1], fn, validate=validate)
    if validate:
        check_range(backend, probs, "probs", fn, 0.0, 1.0)
    with backend.silent_fp():
        return backend.log_likelihood(probs, labels, reduction=reduction)


def binary_cross_entropy(probs: Array, targets: Array, *, reduction: str = "mean",
                         validate: bool = True) -> tuple[Array, Array]:
    """The course's cross-entropy, one binary term per class:
    ``L_i = -sum_j [z_ij log p_ij + (1 - z_ij) log(1 - p_ij)]``; ``dL/dp = (p - z) / (p (1 - p))``.

    ``targets`` are floats in [0, 1] of probs' shape, or (for 2-D probs) integer
    labels of shape (N,), one-hot encoded over the columns. Logs are clamped at
    -100 as in PyTorch; PyTorch's ``F.binary_cross_entropy`` (mean over every
    element) equals this "mean" divided by the number of columns.
    """
    fn = "binary_cross_entropy"
    backend = _backend(fn, (probs, "probs"), (targets, "targets"))
    check_reduction(reduction, fn)
    check_floating(backend, probs, "probs", fn, (1, 2))
    z = _binary_targets(backend, probs, targets, fn, validate)
    if validate:
        check_range(backend, probs, "probs", fn, 0.0, 1.0)
    with backend.silent_fp():
        return backend.binary_cross_entropy(probs, z, reduction=reduction)


def binary_cross_entropy_with_logits(scores: Array, targets: Array, *, reduction: str = "mean",
                                     validate: bool = True) -> tuple[Array, Array]:
    """:func:`binary_cross_entropy` on ``p = σ(s)``, computed from the scores without overflow:
    ``L_i = sum_j [max(s_ij, 0) - s_ij z_ij + log(1 + e^{-|s_ij|})]``; ``dL/ds = σ(s) - z``.

    PyTorch's ``F.binary_cross_entropy_with_logits`` (mean over every element) is
    this "mean" divided by the number of columns.
    """
    fn = "binary_cross_entropy_with_logits"
    backend = _backend(fn, (scores, "scores"), (targets, "targets"))
    check_reduction(reduction, fn)
    check_floating(backend, scores, "scores", fn, (1, 2))
    z = _binary_targets(backend, scores, targets, fn, validate)
    with backend.silent_fp():
        return backend.binary_cross_entropy_with_logits(scores, z, reduction=reduction)


def multiclass_hinge(scores: Array, labels: Array, *, margin: float = 1.0, reduction: str = "mean",
                     validate: bool = True) -> tuple[Array, Array]:
    """Multiclass SVM loss ``L_i = sum_{j != y_i} max(0, s_ij - s_{i,y_i} + margin)``.

    ``dL/ds_j = [s_j - s_y + margin > 0]`` for ``j != y``, ``dL/ds_y = -(number of such j)``.
    PyTorch's ``F.multi_margin_loss`` is this divided by the number of classes.
    """
    fn = "multiclass_hinge"
    backend = _backend(fn, (scores, "scores"), (labels, "labels"))
    check_reduction(reduction, fn)
    check_floating(backend, scores, "scores", fn, (2,))
    check_labels(backend, labels, scores.shape[0], scores.shape[1], fn, validate=validate)
    m = check_number(margin, "margin", fn)
    with backend.silent_fp():
        return backend.multiclass_hinge(scores, labels, margin=m, reduction=reduction)


def binary_hinge(scores: Array, targets: Array, *, margin: float = 1.0, reduction: str = "mean",
                 validate: bool = True) -> tuple[Array, Array]:
    """``L_i = max(0, margin - y_i s_i)`` with ``y_i`` in {-1, +1}; ``dL/ds = -y`` where ``margin - y s > 0``.

    ``scores`` has shape (N,) or (N, 1); ``targets`` (N,) or scores' shape, integer or float.
    """
    fn = "binary_hinge"
    backend = _backend(fn, (scores, "scores"), (targets, "targets"))
    check_reduction(reduction, fn)
    check_floating(backend, scores, "scores", fn, (1, 2))
    n = scores.shape[0]
    if scores.ndim == 2 and scores.shape[1] != 1:
        raise ValueError(f"{fn}: scores must have shape (N,) or (N, 1), got {tuple(scores.shape)}")
    if tuple(targets.shape) not in ((n,), tuple(scores.shape)):
        raise ValueError(f"{fn}: targets must have shape ({n},) or {tuple(scores.shape)}, got {tuple(targets.shape)}")
    y = backend.xp.reshape(backend.astype(targets, scores.dtype), tuple(scores.shape))
    if validate:
        check_values_in(backend, backend.xp.reshape(y, tuple(targets.shape)), "targets", fn, (-1.0, 1.0))
    with backend.silent_fp():
        return backend.binary_hinge(scores, y, margin=check_number(margin, "margin", fn), reduction=reduction)


def l1_loss(pred: Array, target: Array, *, reduction: str = "mean") -> tuple[Array, Array]:
    """``L_i = sum_j |y_ij - s_ij|``; ``dL/ds = sign(s - y)``.

    PyTorch's ``F.l1_loss`` (mean over every element) is this "mean" divided by the
    number of components per sample.
    """
    backend = _regression_args("l1_loss", pred, target, reduction)
    with backend.silent_fp():
        return backend.l1_loss(pred, target, reduction=reduction)


def l2_loss(pred: Array, target: Array, *, reduction: str = "mean") -> tuple[Array, Array]:
    """Squared L2: ``L_i = sum_j (y_ij - s_ij)^2``; ``dL/ds = -2 (y - s)``.

    PyTorch's ``F.mse_loss`` (mean over every element) is this "mean" divided by the
    number of components per sample.
    """
    backend = _regression_args("l2_loss", pred, target, reduction)
    with backend.silent_fp():
        return backend.l2_loss(pred, target, reduction=reduction)


# ---------------------------------------------------------------- helpers
def _backend(fn: str, *pairs: tuple[Any, str]) -> Backend:
    arrays = [a for a, _ in pairs if a is not None and hasattr(a, "shape")]
    names = tuple(name for a, name in pairs if a is not None and hasattr(a, "shape"))
    for a, name in pairs[:2]:
        if not hasattr(a, "shape"):
            raise TypeError(f"{fn}: {name} must be an array, got {type(a).__name__}")
    return backend_of(*arrays, names=names)


def _binary_targets(backend: Backend, pred: Array, targets: Array, fn: str, validate: bool) -> Array:
    """Float targets of pred's shape, one-hot encoding 1-D integer labels for 2-D predictions."""
    if backend.is_integer(targets) and pred.ndim == 2 and targets.ndim == 1:
        check_labels(backend, targets, pred.shape[0], pred.shape[1], fn, validate=validate, name="targets")
        return backend.one_hot(targets, pred.shape[1], pred.dtype)
    if tuple(targets.shape) != tuple(pred.shape):
        raise ValueError(
            f"{fn}: targets must be floats of the predictions' shape {tuple(pred.shape)} or integer labels of "
            f"shape ({pred.shape[0]},), got shape {tuple(targets.shape)} and dtype {targets.dtype}"
        )
    if validate:
        check_range(backend, targets, "targets", fn, 0.0, 1.0)
    return targets


def _regression_args(fn: str, pred: Array, target: Array, reduction: str) -> Backend:
    backend = _backend(fn, (pred, "pred"), (target, "target"))
    check_reduction(reduction, fn)
    check_floating(backend, pred, "pred", fn, tuple(range(1, 9)))
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{fn}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    return backend
