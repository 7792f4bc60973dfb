"""JAX arrays: the array-API reference, with the training step's hot cores compiled by ``jax.jit``.

JAX dispatches every eager ``jax.numpy`` call on its own (tens of microseconds each), which is what
makes the reference slow there. Here the cores a step spends its calls on are each one compiled
function: Linear's forward and backward, ReLU's, the softmax-cross-entropy's loss and gradient (the
common case: no weights, smoothing or ignored rows), and the SGD and Adam updates. JAX arrays are
immutable, so updates are functional, as the reference's: each returns new arrays, which the
optimizers store. Hyperparameters are traced arguments (a schedule changing ``lr`` does not
recompile); only the structural switches (momentum or not, nesterov, ...) are static. Compiled once
per shape and dtype. Imported only by the registry's factory.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .base import Array, Backend, _adam_scalars


@jax.jit
def _linear(x: Array, w: Array, b: Array) -> Array:
    return x @ w.T + b


@jax.jit
def _linear_nobias(x: Array, w: Array) -> Array:
    return x @ w.T


@partial(jax.jit, static_argnames=("need_dx", "need_bias"))
def _linear_backward(dy: Array, x: Array, w: Array, need_dx: bool, need_bias: bool) -> tuple[Any, Any, Any]:
    return (dy @ w if need_dx else None), dy.T @ x, (dy.sum(axis=0) if need_bias else None)


@jax.jit
def _relu(x: Array) -> Array:
    return jnp.maximum(x, jnp.zeros((), x.dtype))


@jax.jit
def _relu_backward(dy: Array, x: Array) -> Array:
    return jnp.where(x > 0, dy, jnp.zeros((), dy.dtype))


@partial(jax.jit, static_argnames=("reduction", "compute_dtype"))
def _softmax_cross_entropy(logits: Array, labels: Array, reduction: str, compute_dtype: Any) -> tuple[Array, Array]:
    """``L = log sum e^{s - max} - (s_y - max)``; ``dL/ds = softmax(s) - onehot(y)``, over N for the mean."""
    s = logits.astype(compute_dtype)
    n, c = s.shape
    shifted = s - s.max(axis=1, keepdims=True)
    e = jnp.exp(shifted)
    sum_e = e.sum(axis=1)
    onehot = labels[:, None] == jnp.arange(c, dtype=labels.dtype)[None, :]
    per_sample = jnp.log(sum_e) - jnp.where(onehot, shifted, 0.0).sum(axis=1)
    grad = e / sum_e[:, None] - onehot.astype(compute_dtype)
    if reduction == "mean":
        loss, grad = per_sample.sum() / n, grad / n
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample
    return loss.astype(logits.dtype), grad.astype(logits.dtype)


@partial(jax.jit, static_argnames=("has_momentum", "nesterov", "first_step", "has_decay"))
def _sgd(value: Array, grad: Array, buf: Array | None, lr: Any, momentum: Any, dampening: Any, weight_decay: Any, *,
         has_momentum: bool, nesterov: bool, first_step: bool, has_decay: bool) -> tuple[Array, Array | None]:
    d = grad + weight_decay * value if has_decay else grad
    if has_momentum:
        buf = d if first_step else buf * momentum + (1.0 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return value - lr * d, buf


@partial(jax.jit, static_argnames=("decoupled", "has_decay"))
def _adam(value: Array, grad: Array, m: Array, v: Array, lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any,
          step_size: Any, bc2_sqrt: Any, *, decoupled: bool, has_decay: bool) -> tuple[Array, Array, Array]:
    if has_decay:
        if decoupled:
            value = value * (1.0 - lr * weight_decay)
        else:
            grad = grad + weight_decay * value
    m = m + (1.0 - beta1) * (grad - m)
    v = v * beta2 + (1.0 - beta2) * grad * grad
    return value - step_size * m / (jnp.sqrt(v) / bc2_sqrt + eps), m, v


class JaxBackend(Backend):
    """The reference on ``jax.numpy`` plus the compiled cores above."""

    def __init__(self) -> None:
        super().__init__(jnp, name="jax")
        # One device (the CPU, or a single accelerator): the device checks can be skipped, as for NumPy.
        self.single_device = len(jax.devices()) == 1

    def is_floating(self, x: Array) -> bool:
        return x.dtype.kind == "f" or x.dtype == jnp.bfloat16

    def is_integer(self, x: Array) -> bool:
        return x.dtype.kind in "iu"

    def astype(self, x: Array, dtype: Any) -> Array:
        return x if x.dtype == dtype else x.astype(dtype)

    def labels_in_range(self, labels: Array, num_classes: int) -> bool:
        """Read on the host: the labels were just put there, so this waits for them alone, where a compiled
        min/max would queue behind the steps still running and stall the next step's dispatch."""
        if labels.size == 0:
            return True
        host = np.asarray(labels)
        return int(host.min()) >= 0 and int(host.max()) < num_classes

    def _same_dtype(self, *arrays: Array | None) -> bool:
        dtypes = {a.dtype for a in arrays if a is not None}
        return len(dtypes) == 1

    # ---------------------------------------------------------- dense algebra
    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        if x.ndim != 2 or not self._same_dtype(x, weight, bias):
            return super().linear(x, weight, bias)
        return _linear_nobias(x, weight) if bias is None else _linear(x, weight, bias)

    def linear_backward(self, dy: Array, x: Array, weight: Array, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[Array | None, Array, Array | None]:
        if dy.ndim != 2 or x.ndim != 2 or not self._same_dtype(dy, x, weight):
            return super().linear_backward(dy, x, weight, need_dx=need_dx, need_bias=need_bias)
        return _linear_backward(dy, x, weight, need_dx=need_dx, need_bias=need_bias)

    # ------------------------------------------------------------ activations
    def relu(self, x: Array) -> Array:
        return _relu(x)

    def relu_backward(self, dy: Array, x: Array) -> Array:
        return _relu_backward(dy, x) if dy.dtype == x.dtype else super().relu_backward(dy, x)

    # ------------------------------------------------------------ loss cores
    def softmax_cross_entropy(self, logits: Array, labels: Array, *, reduction: str = "mean",
                              label_smoothing: float = 0.0, ignore_index: int | None = None,
                              class_weights: Array | None = None,
                              labels_in_range: bool = False) -> tuple[Array, Array]:
        """The common case (no weights, smoothing or ignored rows, labels checked in range, N > 0) compiled;
        the rest, with its NaN rows for bad labels, is the reference."""
        if (label_smoothing != 0.0 or ignore_index is not None or class_weights is not None or not labels_in_range
                or logits.shape[0] == 0 or not self.is_integer(labels)):
            return super().softmax_cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing,
                                                 ignore_index=ignore_index, class_weights=class_weights,
                                                 labels_in_range=labels_in_range)
        return _softmax_cross_entropy(logits, labels, reduction, self.compute_dtype(logits.dtype))

    # ------------------------------------------------------ optimizer updates
    def sgd_update(self, value: Array, grad: Array, buf: Array | None, *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> tuple[Array, Array | None]:
        has_momentum = momentum != 0.0
        first = first_step or buf is None
        return _sgd(value, grad, None if first else buf, lr, momentum, dampening, weight_decay,
                    has_momentum=has_momentum, nesterov=nesterov and has_momentum, first_step=first,
                    has_decay=weight_decay != 0.0)

    def adam_update(self, value: Array, grad: Array, m: Array, v: Array, *, step: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float,
                    decoupled: bool) -> tuple[Array, Array, Array]:
        step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
        return _adam(value, grad, m, v, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
                     decoupled=decoupled, has_decay=weight_decay != 0.0)
