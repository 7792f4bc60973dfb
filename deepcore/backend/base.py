"""The reference backend: every core op written once against the array API standard.

`Backend` is what any array-API library without a dedicated backend gets
(array_api_strict, PyTorch tensors, ...). `NumpyBackend` and `CupyBackend`
subclass it and override only the hot paths; everything else falls back here.

Ops take and return arrays of the backend's namespace. Loss cores return
``(loss, grad)`` already reduced, so that a fused implementation can fold the
mean's normaliser into the gradient write instead of making another pass.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import dropout_hash
from .conv_reference import ConvReference

Array = Any
Namespace = Any

REDUCTIONS = ("mean", "sum", "none")


class Backend(ConvReference):
    """Array-API implementation of deepcore's core ops for one namespace ``xp``."""

    #: True where every array lives on one device, so device checks can be skipped.
    single_device: bool = False
    #: True where work is queued and the host runs ahead (CuPy): reading a value back waits for the
    #: device, so fit reads nothing inside a step there (deepcore/fit_window.py).
    asynchronous: bool = False

    def __init__(self, xp: Namespace, name: str | None = None) -> None:
        self.xp = xp
        self.name = name or getattr(xp, "__name__", type(xp).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ------------------------------------------------------------------ arrays
    def asarray(self, obj: Any, *, dtype: Any = None, device: Any = None) -> Array:
        return self.xp.asarray(obj, dtype=dtype, device=device)

    def device(self, x: Array) -> Any:
        return x.device

    def default_float(self) -> Any:
        return self.xp.float32

    def dtype_name(self, dtype: Any) -> str:
        """A library-independent spelling such as ``"float32"``."""
        return str(dtype).rsplit(".", 1)[-1]

    def dtype_from_name(self, name: str) -> Any:
        return getattr(self.xp, name)

    def is_floating(self, x: Array) -> bool:
        return self.xp.isdtype(x.dtype, "real floating")

    def is_integer(self, x: Array) -> bool:
        return self.xp.isdtype(x.dtype, "integral")

    def to_numpy(self, x: Array) -> np.ndarray:
        """A NumPy copy of ``x`` on the host (through DLPack where the library has it)."""
        try:
            return np.from_dlpack(x, device="cpu", copy=True)
        except (TypeError, BufferError, RuntimeError, ValueError, AttributeError, NotImplementedError):
            return np.array(x, copy=True)

    def from_numpy(self, a: np.ndarray, *, dtype: Any = None, device: Any = None) -> Array:
        return self.xp.asarray(np.require(a, requirements="C"), dtype=dtype, device=device)

    def copy(self, x: Array) -> Array:
        return self.xp.asarray(x, copy=True)

    def astype(self, x: Array, dtype: Any) -> Array:
        return x if x.dtype == dtype else self.xp.astype(x, dtype)

    def add_into(self, acc: Array, value: Array) -> Array:
        """``acc + value`` in place where the library allows it; ``value`` cast to ``acc``'s dtype."""
        acc += self.astype(value, acc.dtype)
        return acc

    def silent_fp(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which inf/NaN from the math (log 0, exp overflow) are returned without
        warnings, as GPU libraries do; NumPy, and libraries built on it, would otherwise warn."""
        return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")

    def compute_dtype(self, dtype: Any) -> Any:
        """Half-precision inputs accumulate in float32; float32/float64 keep theirs."""
        xp = self.xp
        return dtype if dtype in (xp.float32, xp.float64) else xp.float32

    # ----------------------------------------------------------------- random
    # Masks come from the stateless counter-based hash of dropout_hash.py: a Stream is two ints,
    # nothing is built per call, and every backend draws the same mask for the same stream.
    def make_rng(self, seed: int | None) -> Any:
        """The counter-based stream of ``seed`` (call 0), as :meth:`dropout_mask` takes it: two 64-bit
        ints, no generator state (``Dropout`` uses ``dropout_hash.stream(seed, call)``)."""
        return dropout_hash.stream(secrets.randbits(63) if seed is None else int(seed), 0)

    def dropout_mask(self, rng: Any, shape: tuple[int, ...], p: float, *, dtype: Any, device: Any = None) -> Array:
        """Inverted-dropout mask of the stream ``rng`` (a ``dropout_hash.Stream``): ``1/(1-p)`` rounded to
        ``dtype`` where kept (probability ``1-p``), 0 where dropped; the same bits on every backend.

        The reference hashes on the host with NumPy and moves the keep bits (one byte per element):
        the standard leaves integer overflow undefined, and PyTorch's uint64 has no shifts, additions
        or comparisons on the CPU. The scaling happens on the device, exactly (the value is one the
        dtype holds, times 1 or 0)."""
        if p >= 1.0:
            return self.xp.zeros(shape, dtype=dtype, device=device)
        keep = dropout_hash.keep_mask(rng, dropout_hash.threshold(p), math.prod(shape)).reshape(shape)
        mask = self.xp.astype(self.from_numpy(keep, device=device), dtype)
        return mask * dropout_hash.mask_value(p, _float_name(self, dtype))

    # ---------------------------------------------------------- dense algebra
    def _promote(self, *arrays: Array) -> list[Array]:
        # Some libraries (PyTorch) refuse mixed float dtypes in matmul; the array
        # API says float32 with float64 is float64, so promote explicitly.
        dtype = self.xp.result_type(*arrays)
        return [self.astype(a, dtype) for a in arrays]

    def matmul(self, a: Array, b: Array, *, transpose_a: bool = False, transpose_b: bool = False) -> Array:
        """``op(a) @ op(b)`` with ``op`` the transpose where asked (2-D operands)."""
        a, b = self._promote(a, b)
        if transpose_a:
            a = self.xp.matrix_transpose(a)
        if transpose_b:
            b = self.xp.matrix_transpose(b)
        return self.xp.matmul(a, b)

    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        """``y = x W^T + b`` for ``x`` (N, in), ``W`` (out, in), ``b`` (out,)."""
        y = self.matmul(x, weight, transpose_b=True)
        if bias is not None:
            y = y + self.astype(bias, y.dtype)
        return y

    def linear_backward(self, dy: Array, x: Array, weight: Array, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[Array | None, Array, Array | None]:
        """``dx = dy W``, ``dW = dy^T x``, ``db = sum_n dy``."""
        dx = self.matmul(dy, weight) if need_dx else None
        dw = self.matmul(dy, x, transpose_a=True)
        db = self.xp.sum(dy, axis=0) if need_bias else None
        return dx, dw, db

    # ------------------------------------------------------------ activations
    def relu(self, x: Array) -> Array:
        return self.xp.maximum(x, self.xp.zeros_like(x))

    def relu_inplace(self, x: Array) -> Array:
        """``relu(x)``, written over ``x`` where the library can (the caller gives ``x`` up and uses
        the result): NumPy and torch write in place; here, a new array from :meth:`relu`."""
        return self.relu(x)

    def relu_backward(self, dy: Array, x: Array) -> Array:
        """``dy [x > 0]``; ``x`` may be the ReLU's output instead of its input (the same mask)."""
        return self.xp.where(x > 0, dy, self.xp.zeros_like(dy))

    def leaky_relu(self, x: Array, slope: float) -> Array:
        return self.xp.where(x > 0, x, x * slope)

    def leaky_relu_backward(self, dy: Array, x: Array, slope: float) -> Array:
        return self.xp.where(x > 0, dy, dy * slope)

    def sigmoid(self, x: Array) -> Array:
        """``σ(x) = 1/(1+e^{-x})``, evaluated without overflow for large ``|x|``."""
        xp = self.xp
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def sigmoid_backward(self, dy: Array, y: Array) -> Array:
        """``dx = dy σ (1 - σ)`` from the output ``y = σ(x)``."""
        return dy * y * (1.0 - y)

    def tanh(self, x: Array) -> Array:
        return self.xp.tanh(x)

    def tanh_backward(self, dy: Array, y: Array) -> Array:
        """``dx = dy (1 - y^2)`` from the output ``y = tanh(x)``."""
        return dy * (1.0 - y * y)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        """``log p_k = s_k - max s - log sum_j e^{s_j - max s}``."""
        xp = self.xp
        shifted = x - xp.max(x, axis=axis, keepdims=True)
        return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))

    def softmax(self, x: Array, axis: int = -1) -> Array:
        """``p_k = e^{s_k} / sum_j e^{s_j}``, shifted by the maximum for stability."""
        xp = self.xp
        e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
        return e / xp.sum(e, axis=axis, keepdims=True)

    def softmax_backward(self, dy: Array, y: Array, axis: int = -1) -> Array:
        """Applies the Jacobian ``D_ab = p_a (δ_ab - p_b)``: ``dx = p * (dy - sum(dy * p))``."""
        return y * (dy - self.xp.sum(dy * y, axis=axis, keepdims=True))

    # ------------------------------------------------------------ loss cores
    # Each returns (loss, grad) already reduced; the public functions in
    # deepcore.losses validate arguments before calling these.

    def reduce(self, per_sample: Array, grad: Array, reduction: str, denominator: Any = None) -> tuple[Array, Array]:
        """Apply ``reduction`` to the per-sample losses and scale the gradient to match.

        "mean" divides by ``denominator`` (the sample count unless given; it may be
        a 0-d device array so no host synchronisation is needed).
        """
        if reduction == "none":
            return per_sample, grad
        total = self.xp.sum(per_sample)
        if reduction == "sum":
            return total, grad
        if denominator is None:
            denominator = per_sample.shape[0]
            return total / denominator, grad / denominator
        # A weighted denominator of 0 (every row ignored) makes the loss NaN, as in PyTorch,
        # while the gradient, zero on every row, stays zero rather than 0/0.
        xp = self.xp
        safe = xp.where(denominator == 0, xp.ones_like(denominator), denominator)
        return total / denominator, grad / safe

    def _finish(self, per_sample: Array, grad: Array, reduction: str, out_dtype: Any,
                denominator: Any = None) -> tuple[Array, Array]:
        loss, grad = self.reduce(per_sample, grad, reduction, denominator)
        return self.astype(loss, out_dtype), self.astype(grad, out_dtype)

    def one_hot(self, labels: Array, num_classes: int, dtype: Any) -> Array:
        """``z_ij = 1`` if ``labels_i == j`` else 0; out-of-range labels give an all-zero row."""
        xp = self.xp
        classes = xp.arange(num_classes, dtype=labels.dtype, device=self.device(labels))
        return xp.astype(labels[:, None] == classes[None, :], dtype)

    def softmax_cross_entropy_fused(self, logits: Array, labels: Array, reduction: str) -> tuple[Array, Array] | None:
        """The training step's call (no weights, smoothing or ignored rows; (N, C) floating-point
        logits, N >= 1, and (N,) integer labels of this backend) in one fused pass that checks the
        labels too, or None where the backend has no such pass or it declines this call (a label
        outside [0, C), an input it does not take): the caller then checks the labels and runs
        :meth:`softmax_cross_entropy`. The base class has none."""
        return None

    def softmax_cross_entropy(self, logits: Array, labels: Array, *, reduction: str = "mean",
                              label_smoothing: float = 0.0, ignore_index: int | None = None,
                              class_weights: Array | None = None,
                              labels_in_range: bool = False) -> tuple[Array, Array]:
        """PyTorch's ``cross_entropy`` on (N, C) logits and (N,) labels, loss and gradient together.

        ``labels_in_range=True`` says the caller has checked every label is in [0, C), so a backend
        may skip its own check (the reference masks bad rows either way).

        Per row, with ``ε`` = label_smoothing and weights ``w`` (ones if None):
        ``L = (1-ε) w_y (lse - s_y) + (ε/C) sum_k w_k (lse - s_k)``;
        ``dL/ds_k = p_k ((1-ε) w_y + (ε/C) sum_j w_j) - (1-ε) w_y δ_yk - (ε/C) w_k``.
        "mean" divides by ``sum w_y`` over non-ignored rows. Ignored rows give 0.
        """
        xp = self.xp
        out_dtype = logits.dtype
        dt = self.compute_dtype(logits.dtype)
        s = self.astype(logits, dt)
        n, c = s.shape
        eps = float(label_smoothing)

        valid = xp.ones((n,), dtype=xp.bool, device=self.device(s)) if ignore_index is None else labels != ignore_index
        onehot = self.one_hot(labels, c, xp.bool)

        m = xp.max(s, axis=1, keepdims=True)
        shifted = s - m
        e = xp.exp(shifted)
        sum_e = xp.sum(e, axis=1, keepdims=True)
        log_z = xp.log(sum_e)
        p = e / sum_e
        zero = xp.zeros_like(s)
        # Selecting with `where`, not multiplying by a mask, keeps -inf logits from turning into NaN.
        target_shifted = xp.sum(xp.where(onehot, shifted, zero), axis=1)
        nll = log_z[:, 0] - target_shifted

        if class_weights is None:
            w_y = xp.astype(valid, dt)
            w = None
            w_sum = float(c)
        else:
            w = self.astype(class_weights, dt)
            w_y = xp.sum(xp.where(onehot, w[None, :], zero), axis=1)
            w_y = xp.where(valid, w_y, xp.zeros_like(w_y))
            w_sum = xp.sum(w)

        per_sample = (1.0 - eps) * w_y * nll
        grad_scale = (1.0 - eps) * w_y
        if eps > 0.0:
            # -sum_k w_k log p_k = (sum_k w_k) log Z - sum_k w_k (s_k - m)
            ws = shifted if w is None else w[None, :] * shifted
            smooth = w_sum * log_z[:, 0] - xp.sum(ws, axis=1)
            per_sample = per_sample + (eps / c) * xp.where(valid, smooth, xp.zeros_like(smooth))
            grad_scale = grad_scale + (eps / c) * w_sum * xp.astype(valid, dt)

        grad = p * grad_scale[:, None] - xp.where(onehot, ((1.0 - eps) * w_y)[:, None], zero)
        if eps > 0.0:
            w_row = 1.0 if w is None else w[None, :]
            grad = grad - (eps / c) * w_row * xp.astype(valid, dt)[:, None]
        per_sample = xp.where(valid, per_sample, xp.zeros_like(per_sample))
        grad = xp.where(valid[:, None], grad, zero)
        # An unchecked out-of-range label poisons its row with NaN instead of passing silently.
        bad = valid & ((labels < 0) | (labels >= c))
        per_sample = xp.where(bad, xp.full_like(per_sample, xp.nan), per_sample)
        grad = xp.where(bad[:, None], xp.full_like(grad, xp.nan), grad)

        denominator = None
        if ignore_index is not None or class_weights is not None:
            denominator = xp.sum(w_y)
        return self._finish(per_sample, grad, reduction, out_dtype, denominator)

    def log_likelihood(self, probs: Array, labels: Array, *, reduction: str = "mean") -> tuple[Array, Array]:
        """``L = -log p_y``; ``dL/dp_k = -δ_yk / p_y``."""
        xp = self.xp
        out_dtype = probs.dtype
        p = self.astype(probs, self.compute_dtype(probs.dtype))
        onehot = self.one_hot(labels, p.shape[1], xp.bool)
        one = xp.ones_like(p)
        p_y = xp.sum(xp.where(onehot, p, xp.zeros_like(p)), axis=1)
        per_sample = -xp.log(p_y)
        grad = xp.where(onehot, -one / xp.where(onehot, p, one), xp.zeros_like(p))
        return self._finish(per_sample, grad, reduction, out_dtype)

    def binary_cross_entropy(self, probs: Array, targets: Array, *, reduction: str = "mean") -> tuple[Array, Array]:
        """``L = -sum_j [z_j log p_j + (1-z_j) log(1-p_j)]``; ``dL/dp = (p - z) / (p (1-p))``.

        As in PyTorch the logs are clamped at -100 and the gradient's denominator
        at 1e-12, so p = 0 or 1 give finite values.
        """
        xp = self.xp
        out_dtype = probs.dtype
        dt = self.compute_dtype(probs.dtype)
        p = self.astype(probs, dt)
        z = self.astype(targets, dt)
        log_p = xp.clip(xp.log(p), -100.0, None)
        log_1mp = xp.clip(xp.log(1.0 - p), -100.0, None)
        per_elem = -(z * log_p + (1.0 - z) * log_1mp)
        grad = (p - z) / xp.clip(p * (1.0 - p), 1e-12, None)
        return self._finish(self._sum_rows(per_elem), grad, reduction, out_dtype)

    def binary_cross_entropy_with_logits(self, scores: Array, targets: Array, *,
                                         reduction: str = "mean") -> tuple[Array, Array]:
        """Binary cross-entropy on ``σ(s)`` from the scores: ``max(s,0) - s z + log(1 + e^{-|s|})``;
        grad ``σ(s) - z``."""
        xp = self.xp
        out_dtype = scores.dtype
        dt = self.compute_dtype(scores.dtype)
        s = self.astype(scores, dt)
        z = self.astype(targets, dt)
        per_elem = xp.maximum(s, 0.0) - s * z + xp.log1p(xp.exp(-xp.abs(s)))
        grad = self.sigmoid(s) - z
        return self._finish(self._sum_rows(per_elem), grad, reduction, out_dtype)

    def multiclass_hinge(self, scores: Array, labels: Array, *, margin: float = 1.0,
                         reduction: str = "mean") -> tuple[Array, Array]:
        """``L = sum_{j != y} max(0, s_j - s_y + margin)``; ``dL/ds_j = [m_j > 0]``, ``dL/ds_y = -sum_j [m_j > 0]``."""
        xp = self.xp
        out_dtype = scores.dtype
        s = self.astype(scores, self.compute_dtype(scores.dtype))
        onehot = self.one_hot(labels, s.shape[1], xp.bool)
        zero = xp.zeros_like(s)
        s_y = xp.sum(xp.where(onehot, s, zero), axis=1, keepdims=True)
        margins = s - s_y + margin
        active = (margins > 0) & ~onehot
        per_sample = xp.sum(xp.where(active, margins, zero), axis=1)
        ind = xp.astype(active, s.dtype)
        grad = ind - xp.where(onehot, xp.sum(ind, axis=1, keepdims=True) * xp.ones_like(s), zero)
        return self._finish(per_sample, grad, reduction, out_dtype)

    def binary_hinge(self, scores: Array, targets: Array, *, margin: float = 1.0,
                     reduction: str = "mean") -> tuple[Array, Array]:
        """``L = max(0, margin - y s)``, ``y = ±1``; ``dL/ds = -y`` where ``margin - y s > 0``."""
        xp = self.xp
        out_dtype = scores.dtype
        s = self.astype(scores, self.compute_dtype(scores.dtype))
        y = self.astype(targets, s.dtype)
        m = margin - y * s
        active = m > 0
        per_elem = xp.where(active, m, xp.zeros_like(m))
        grad = xp.where(active, -y, xp.zeros_like(y))
        return self._finish(self._sum_rows(per_elem), grad, reduction, out_dtype)

    def l1_loss(self, pred: Array, target: Array, *, reduction: str = "mean") -> tuple[Array, Array]:
        """``L = sum |y - s|``; ``dL/ds = sign(s - y)`` (0 where equal, as in PyTorch)."""
        out_dtype = pred.dtype
        d = self.astype(pred, self.compute_dtype(pred.dtype)) - self.astype(target, self.compute_dtype(pred.dtype))
        return self._finish(self._sum_rows(self.xp.abs(d)), self.xp.sign(d), reduction, out_dtype)

    def l2_loss(self, pred: Array, target: Array, *, reduction: str = "mean") -> tuple[Array, Array]:
        """``L = sum (y - s)^2``; ``dL/ds = -2 (y - s)``."""
        out_dtype = pred.dtype
        d = self.astype(pred, self.compute_dtype(pred.dtype)) - self.astype(target, self.compute_dtype(pred.dtype))
        return self._finish(self._sum_rows(d * d), 2.0 * d, reduction, out_dtype)

    def _sum_rows(self, per_elem: Array) -> Array:
        """Per-sample sum over every axis but the first (a 1-D input is its own per-sample loss)."""
        if per_elem.ndim == 1:
            return per_elem
        return self.xp.sum(per_elem, axis=tuple(range(1, per_elem.ndim)))

    # ------------------------------------------------------ optimizer updates
    # PyTorch's single-tensor update rules (torch.optim.SGD / Adam / AdamW with
    # foreach and fused off). The reference returns new arrays; NumPy and CuPy
    # override these to update in place. Callers store what is returned.

    def sgd_update(self, value: Array, grad: Array, buf: Array | None, *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> tuple[Array, Array | None]:
        """``d = g + wd p``; ``buf = d`` (first step) else ``momentum buf + (1-dampening) d``;
        ``p -= lr (d + momentum buf if nesterov else buf)``; without momentum ``p -= lr d``."""
        d = grad if weight_decay == 0.0 else grad + weight_decay * value
        if momentum != 0.0:
            if first_step or buf is None:
                # A copy: the caller's gradient may be accumulated into later.
                buf = self.copy(d)
            else:
                buf = buf * momentum + (1.0 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        return value - lr * d, buf

    def sgd_update_many(self, values: Sequence[Array], grads: Sequence[Array], bufs: Sequence[Array | None], *,
                        lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                        step: int) -> tuple[list[Array], list[Array | None]]:
        """:meth:`sgd_update` for a parameter group in one call (PyTorch's ``foreach``), a parameter's
        first step where its buffer is None; ``step`` is the optimizer's step count (from 1), which a
        backend may use to pace its upkeep of the buffers. Returns the new values and buffers."""
        out_values, out_bufs = [], []
        for value, grad, buf in zip(values, grads, bufs, strict=True):
            value, buf = self.sgd_update(value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                         nesterov=nesterov, weight_decay=weight_decay, first_step=buf is None)
            out_values.append(value)
            out_bufs.append(buf)
        return out_values, out_bufs

    def adam_update(self, value: Array, grad: Array, m: Array, v: Array, *, step: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float,
                    decoupled: bool) -> tuple[Array, Array, Array]:
        """``m += (1-β1)(g - m)``, ``v = β2 v + (1-β2) g²``,
        ``p -= lr/(1-β1^t) m / (sqrt(v)/sqrt(1-β2^t) + eps)``; weight decay as L2 (``g += wd p``)
        or, ``decoupled`` (AdamW), ``p *= 1 - lr wd`` first."""
        if weight_decay != 0.0:
            if decoupled:
                value = value * (1.0 - lr * weight_decay)
            else:
                grad = grad + weight_decay * value
        m = m + (1.0 - beta1) * (grad - m)
        v = v * beta2 + (1.0 - beta2) * grad * grad
        step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
        denom = self.xp.sqrt(v) / bc2_sqrt + eps
        return value - step_size * m / denom, m, v

    def rmsprop_update(self, value: Array, grad: Array, square_avg: Array, grad_avg: Array | None,
                       buf: Array | None, *, lr: float, alpha: float, eps: float, weight_decay: float,
                       momentum: float, centered: bool) -> tuple[Array, Array, Array | None, Array | None]:
        """``torch.optim.RMSprop``: ``g += wd p``; ``s = α s + (1-α) g²``; centered: ``ḡ = lerp(ḡ, g, 1-α)``,
        ``avg = sqrt(s - ḡ²) + eps``, else ``avg = sqrt(s) + eps``; ``b = μ b + g / avg``, ``p -= lr b``
        (``p -= lr g / avg`` without momentum). ``grad_avg`` / ``buf`` are used (and returned) only when
        ``centered`` / ``momentum > 0``; returns ``(value, square_avg, grad_avg, buf)``."""
        if weight_decay != 0.0:
            grad = grad + weight_decay * value
        square_avg = square_avg * alpha + (1.0 - alpha) * grad * grad
        if centered:
            grad_avg = _lerp(grad_avg, grad, 1.0 - alpha)
            avg = self.xp.sqrt(square_avg - grad_avg * grad_avg) + eps
        else:
            avg = self.xp.sqrt(square_avg) + eps
        if momentum > 0.0:
            buf = buf * momentum + grad / avg
            return value - lr * buf, square_avg, grad_avg, buf
        return value - lr * grad / avg, square_avg, grad_avg, buf

    def adagrad_update(self, value: Array, grad: Array, state_sum: Array, *, step: int, lr: float, lr_decay: float,
                       eps: float, weight_decay: float) -> tuple[Array, Array]:
        """``torch.optim.Adagrad``: ``g += wd p``; ``clr = lr / (1 + (t-1) lr_decay)``; ``sum += g²``;
        ``p -= clr g / (sqrt(sum) + eps)``; returns ``(value, state_sum)``."""
        if weight_decay != 0.0:
            grad = grad + weight_decay * value
        clr = lr / (1 + (step - 1) * lr_decay)
        state_sum = state_sum + grad * grad
        return value - clr * grad / (self.xp.sqrt(state_sum) + eps), state_sum


def _lerp(start: Array, end: Array, weight: float) -> Array:
    """``torch.lerp`` with a scalar weight, spelled as its CPU kernel spells it for either half of [0, 1]."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _adam_scalars(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Adam's bias corrections as Python floats (so float32 arrays stay float32):
    ``(lr / (1 - β1^t), sqrt(1 - β2^t))``, spelled as PyTorch spells them."""
    return lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5

def _float_name(backend: Backend, dtype: Any) -> str:
    """``"float32"`` for NumPy/CuPy dtypes and scalar types (``np.float32`` itself) alike, else the
    backend's spelling (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return backend.dtype_name(dtype)
