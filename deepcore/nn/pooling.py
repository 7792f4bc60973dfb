"""Pooling over NCHW images: max, average and global average, PyTorch's semantics."""

from __future__ import annotations

from typing import Any

from .._checks import check_pair
from ..backend.base import Array
from .module import (
    Backward,
    Module,
    check_grad_shape,
    input_backend,
    input_grad_optional,
)


class _Pool2d(Module):
    """Window arguments shared by the pools: an int or a pair each; ``stride`` defaults to the kernel."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        super().__init__()
        fn = type(self).__name__
        self.kernel_size = check_pair(kernel_size, "kernel_size", fn, 1)
        self.stride = self.kernel_size if stride is None else check_pair(stride, "stride", fn, 1)
        self.padding = check_pair(padding, "padding", fn, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(f"{fn}: padding {self.padding} must be at most half of kernel_size {self.kernel_size}")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _check_input(self, x: Array) -> tuple[int, int]:
        fn = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{fn}: input x must have shape (N, C, H, W), got {tuple(x.shape)}")
        out = tuple((int(size) + 2 * p - k) // s + 1
                    for size, p, k, s in zip(x.shape[2:], self.padding, self.kernel_size, self.stride, strict=True))
        if min(out) < 1:
            raise ValueError(f"{fn}: input x of spatial size {tuple(x.shape[2:])} is smaller than kernel_size "
                             f"{self.kernel_size} with padding {self.padding}")
        return out  # type: ignore[return-value]


class MaxPool2d(_Pool2d):
    """``y = max`` over each ``kernel_size`` window (padding counts as -inf); the gradient goes to the
    window's maximum, the first one in row-major order on ties, as PyTorch."""

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = input_backend(self, x)
        self._check_input(x)
        y, saved = backend.max_pool2d(x, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)
        out_shape = tuple(y.shape)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, out_shape)
            return backend.max_pool2d_backward(dy, saved) if need_input_grad else None

        return y, backward


class AvgPool2d(_Pool2d):
    """``y = sum(window) / d`` with zero padding: ``d = kh kw`` when ``count_include_pad`` (PyTorch's
    default), else the number of the window's cells inside the image; ``dx`` spreads ``dy / d`` over each
    window."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding)
        if not isinstance(count_include_pad, bool):
            raise TypeError(f"AvgPool2d: count_include_pad must be True or False, got {count_include_pad!r}")
        self.count_include_pad = count_include_pad

    def extra_repr(self) -> str:
        return super().extra_repr() + f", count_include_pad={self.count_include_pad}"

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = input_backend(self, x)
        self._check_input(x)
        y, saved = backend.avg_pool2d(x, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                      count_include_pad=self.count_include_pad)
        out_shape = tuple(y.shape)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, out_shape)
            return backend.avg_pool2d_backward(dy, saved) if need_input_grad else None

        return y, backward


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): ``y[n,c] = mean_{i,j} x[n,c,i,j]``; ``dx = dy / (H W)`` at every pixel."""

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = input_backend(self, x)
        if x.ndim != 4:
            raise ValueError(f"GlobalAvgPool2d: input x must have shape (N, C, H, W), got {tuple(x.shape)}")
        xp = backend.xp
        shape = tuple(x.shape)
        dt = backend.compute_dtype(x.dtype)
        y = backend.astype(xp.mean(backend.astype(x, dt), axis=(2, 3)), x.dtype)
        scale = 1.0 / (shape[2] * shape[3])
        out_shape = tuple(y.shape)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, out_shape)
            if not need_input_grad:
                return None
            # The product makes a new array: a broadcast view would be read-only for NumPy.
            return xp.broadcast_to(xp.reshape(dy, (*out_shape, 1, 1)), shape) * scale

        return y, backward
