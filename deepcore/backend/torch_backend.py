"""PyTorch tensors (CPU or CUDA): the base backend with its hot paths as direct torch calls.

The reference (:mod:`deepcore.backend.base`) runs torch tensors through array-api-compat's
wrappers and updates parameters out of place; here the step's hot paths call torch itself:
``torch.addmm`` for Linear, ``torch.relu``, a softmax-cross-entropy that turns its exponentials
into the gradient in the same buffer, and optimizer updates in place with ``add_`` / ``mul_`` /
``addcmul_`` / ``addcdiv_`` (PyTorch's single-tensor rules, so the parameter and its state keep
their identity). Convolution and pooling: :mod:`deepcore.backend.torch_conv`. Nothing here uses autograd
or ``torch.nn.functional``; tensors that require grad take the reference's out-of-place updates.
Imported only by the registry's factory.
"""

from __future__ import annotations

import contextlib
from typing import Any

import array_api_compat.torch as torch_compat
import numpy as np
import torch

from . import torch_conv
from .base import Array, Backend, _adam_scalars

# torch.uint16 and wider exist from torch 2.3 on.
_INTEGER = frozenset(getattr(torch, name) for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                                                        "uint64") if hasattr(torch, name))
_FULL = frozenset({torch.float32, torch.float64})


class TorchBackend(Backend):
    """The reference plus torch's own kernels for the training step; ``xp`` is array-api-compat's torch."""

    def __init__(self) -> None:
        super().__init__(torch_compat, name="torch")
        # Without an accelerator every tensor is on the CPU, and the registry's, layers' and optimizers'
        # device checks can be skipped as for NumPy; with one, they run.
        self.single_device = not _accelerator_available()

    # ------------------------------------------------------------------ arrays
    def is_floating(self, x: Array) -> bool:
        return x.dtype.is_floating_point

    def is_integer(self, x: Array) -> bool:
        return x.dtype in _INTEGER

    def from_numpy(self, a: np.ndarray, *, dtype: Any = None, device: Any = None) -> Array:
        """A new tensor (a copy, as NumPy's and CuPy's backends make): the updates here write in place, and
        must not reach the caller's array. :func:`deepcore.to_backend` is the move that shares memory."""
        return torch.tensor(np.require(a, requirements="C"), dtype=dtype, device=device)

    def astype(self, x: Array, dtype: Any) -> Array:
        return x if x.dtype == dtype else x.to(dtype)

    def compute_dtype(self, dtype: Any) -> Any:
        return dtype if dtype in _FULL else torch.float32

    def labels_in_range(self, labels: Array, num_classes: int) -> bool:
        """True when every label is in [0, num_classes), from one ``aminmax`` pass (the losses' check asks
        this first and builds its mask of bad labels only when it says no)."""
        if labels.numel() == 0:
            return True
        try:
            low, high = torch.aminmax(labels)
        except (RuntimeError, NotImplementedError):  # dtypes aminmax lacks (uint16 and wider)
            return False
        return low.item() >= 0 and high.item() < num_classes

    def add_into(self, acc: Array, value: Array) -> Array:
        if acc.requires_grad:  # autograd refuses in-place writes to it
            return acc + self.astype(value, acc.dtype)
        return acc.add_(value)  # add_ casts value to acc's dtype

    def silent_fp(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # torch never warns about inf/NaN

    # ---------------------------------------------------------- dense algebra
    def matmul(self, a: Array, b: Array, *, transpose_a: bool = False, transpose_b: bool = False) -> Array:
        if a.dtype != b.dtype:
            a, b = self._promote(a, b)
        return torch.matmul(a.mT if transpose_a else a, b.mT if transpose_b else b)

    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        """``y = x W^T + b`` as one ``addmm`` (the bias is the added matrix, broadcast over rows)."""
        if x.ndim != 2 or x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
            return super().linear(x, weight, bias)
        if bias is None:
            return torch.mm(x, weight.t())
        return torch.addmm(bias, x, weight.t())

    def linear_backward(self, dy: Array, x: Array, weight: Array, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[Array | None, Array, Array | None]:
        if dy.ndim != 2 or x.ndim != 2 or not dy.dtype == x.dtype == weight.dtype:
            return super().linear_backward(dy, x, weight, need_dx=need_dx, need_bias=need_bias)
        dx = torch.mm(dy, weight) if need_dx else None
        dw = torch.mm(dy.t(), x)
        db = dy.sum(0) if need_bias else None
        return dx, dw, db

    # ---------------------------------------------------- convolution, pooling
    # im2col through unfold views, one GEMM per group: deepcore/backend/torch_conv.py.
    def conv2d(self, x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, int],
               padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int) -> tuple[Array, Any]:
        return torch_conv.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    def conv2d_backward(self, dy: Array, saved: Any, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[Array | None, Array, Array | None]:
        return torch_conv.conv2d_backward(dy, saved, need_dx=need_dx, need_bias=need_bias)

    def max_pool2d(self, x: Array, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int]) -> tuple[Array, Any]:
        return torch_conv.max_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding)

    def max_pool2d_backward(self, dy: Array, saved: Any) -> Array:
        return torch_conv.max_pool2d_backward(dy, saved)

    def avg_pool2d(self, x: Array, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], count_include_pad: bool) -> tuple[Array, Any]:
        return torch_conv.avg_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding,
                                     count_include_pad=count_include_pad)

    def avg_pool2d_backward(self, dy: Array, saved: Any) -> Array:
        return torch_conv.avg_pool2d_backward(dy, saved)

    # ------------------------------------------------------------ activations
    def relu(self, x: Array) -> Array:
        return torch.relu(x)

    def relu_inplace(self, x: Array) -> Array:
        if type(self).relu is not TorchBackend.relu or "relu" in self.__dict__:
            return self.relu(x)  # a subclass's (or a patched) relu is honoured
        return torch.relu_(x)

    def relu_backward(self, dy: Array, x: Array) -> Array:
        """``dx = dy [x > 0]`` in one pass, torch's own ReLU gradient (``threshold_backward``): 11 us at
        128 x 256 where forming the mask and multiplying took 130 us. A NaN in ``x`` passes ``dy`` on, as in
        PyTorch, where the reference gives 0: the forward output there is NaN either way."""
        if dy.dtype != x.dtype or dy.shape != x.shape:
            return super().relu_backward(dy, x)
        return torch.ops.aten.threshold_backward(dy, x, 0)

    def leaky_relu(self, x: Array, slope: float) -> Array:
        return torch.where(x > 0, x, x * slope)

    def leaky_relu_backward(self, dy: Array, x: Array, slope: float) -> Array:
        return torch.where(x > 0, dy, dy * slope)

    def sigmoid(self, x: Array) -> Array:
        return torch.sigmoid(x)

    def tanh(self, x: Array) -> Array:
        return torch.tanh(x)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        return torch.softmax(x, dim=axis)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return torch.log_softmax(x, dim=axis)

    def softmax_backward(self, dy: Array, y: Array, axis: int = -1) -> Array:
        return y * (dy - (dy * y).sum(dim=axis, keepdim=True))

    # ------------------------------------------------------------ loss cores
    def softmax_cross_entropy(self, logits: Array, labels: Array, *, reduction: str = "mean",
                              label_smoothing: float = 0.0, ignore_index: int | None = None,
                              class_weights: Array | None = None,
                              labels_in_range: bool = False) -> tuple[Array, Array]:
        """The reference's formula in one (N, C) buffer for the common case (no weights, smoothing or
        ignored rows): ``g = s - max s`` holds the target's shifted logit, then ``e^g``, whose row sums give
        ``L = log sum e^g - g_y``; then ``g *= scale / sum e^g`` and ``g_y -= scale`` make ``dL/ds``
        (``scale``: ``1/N`` for the mean, else 1). Other cases, and out-of-range labels (NaN rows in
        the reference), take the reference."""
        n, c = logits.shape
        if (label_smoothing != 0.0 or ignore_index is not None or class_weights is not None or logits.requires_grad
                or not self.is_integer(labels)):
            return super().softmax_cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing,
                                                 ignore_index=ignore_index, class_weights=class_weights,
                                                 labels_in_range=labels_in_range)
        if n == 0 or (not labels_in_range and bool(((labels < 0) | (labels >= c)).any())):
            return super().softmax_cross_entropy(logits, labels, reduction=reduction,
                                                 labels_in_range=labels_in_range)
        out_dtype = logits.dtype
        dt = self.compute_dtype(out_dtype)
        index = (labels if labels.dtype == torch.int64 else labels.to(torch.int64)).unsqueeze(1)
        s = logits if logits.dtype == dt else logits.to(dt)
        grad = s - s.amax(dim=1, keepdim=True)
        target = grad.gather(1, index).squeeze(1)
        grad.exp_()
        sum_e = grad.sum(dim=1)
        per_sample = sum_e.log().sub_(target)
        scale = 1.0 / n if reduction == "mean" else 1.0
        grad.mul_(sum_e.reciprocal().mul_(scale).unsqueeze(1))
        grad.scatter_add_(1, index, torch.full_like(target, -scale).unsqueeze(1))
        if reduction == "none":
            loss = per_sample
        else:
            loss = per_sample.sum()
            if reduction == "mean":
                loss = loss.mul_(scale)
        return self.astype(loss, out_dtype), self.astype(grad, out_dtype)

    # ------------------------------------------------------ optimizer updates
    # PyTorch's single-tensor SGD and Adam (torch.optim with foreach and fused off), in place.
    # A tensor that requires grad (autograd would refuse in-place writes to it) takes the reference.

    def sgd_update(self, value: Array, grad: Array, buf: Array | None, *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> tuple[Array, Array | None]:
        if value.requires_grad or grad.requires_grad:
            return super().sgd_update(value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay, first_step=first_step)
        d = grad if weight_decay == 0.0 else grad.add(value, alpha=weight_decay)
        if momentum != 0.0:
            if first_step or buf is None:
                # A copy of the caller's gradient, which may be accumulated into later; our own d is adopted.
                buf = d.clone() if d is grad else d
            else:
                buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        value.add_(d, alpha=-lr)
        return value, buf

    def adam_update(self, value: Array, grad: Array, m: Array, v: Array, *, step: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float,
                    decoupled: bool) -> tuple[Array, Array, Array]:
        if value.requires_grad or grad.requires_grad or m.requires_grad or v.requires_grad:
            return super().adam_update(value, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, decoupled=decoupled)
        if weight_decay != 0.0:
            if decoupled:
                value.mul_(1.0 - lr * weight_decay)
            else:
                grad = grad.add(value, alpha=weight_decay)
        m.lerp_(grad, 1.0 - beta1)  # m += (1-β1)(g - m)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)
        value.addcdiv_(m, denom, value=-step_size)
        return value, m, v


def _accelerator_available() -> bool:
    """Whether torch sees a device other than the CPU (CUDA, ROCm, MPS, XPU, ...)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())
