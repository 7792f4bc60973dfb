"""CuPy on an NVIDIA GPU: cuBLAS matrix products and deepcore's fused CUDA kernels.

This module imports CuPy at import time on purpose: the registry imports it
only when the "cupy" backend is first asked for, and stores the reason when
that fails (CuPy missing, no driver, no device), so ``import deepcore`` never
depends on CUDA. Matrix products go through cuBLAS in full float32: CuPy uses
TF32 only when the user sets ``CUPY_TF32=1``.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.cupy as cp_compat
import cupy
import numpy as np

from .base import Array, Backend, _adam_scalars

_FUSED_DTYPES = ("float32", "float16", "bfloat16")


def _require_device() -> None:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, others on broken installs
        raise RuntimeError(f"CuPy {cupy.__version__} is installed but CUDA is not usable: {exc}") from exc
    if count == 0:
        raise RuntimeError(f"CuPy {cupy.__version__} is installed but no CUDA device is visible")


class CupyBackend(Backend):
    def __init__(self) -> None:
        _require_device()
        super().__init__(cp_compat, name="cupy")

    # ------------------------------------------------------------------ arrays
    def asarray(self, obj: Any, *, dtype: Any = None, device: Any = None) -> Array:
        with _on(device):
            return cupy.asarray(obj, dtype=dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        return cupy.asnumpy(x)

    def from_numpy(self, a: np.ndarray, *, dtype: Any = None, device: Any = None) -> Array:
        with _on(device):
            return cupy.array(a, dtype=dtype, copy=True, order="C")

    def accumulate(self, acc: Array, value: Array) -> Array:
        cupy.add(acc, value, out=acc, casting="same_kind")
        return acc

    # ----------------------------------------------------------------- random
    def make_rng(self, seed: int | None) -> Any:
        return cupy.random.default_rng(seed)

    def random_uniform(self, rng: Any, shape: tuple[int, ...], *, low: float = 0.0, high: float = 1.0,
                       dtype: Any = None, device: Any = None) -> Array:
        with _on(device):
            u = rng.random(shape, dtype=cupy.float32 if dtype in (None, cupy.float32) else cupy.float64)
            return (u * (high - low) + low).astype(dtype or cupy.float32, copy=False)

    def random_normal(self, rng: Any, shape: tuple[int, ...], *, mean: float = 0.0, std: float = 1.0,
                      dtype: Any = None, device: Any = None) -> Array:
        with _on(device):
            z = rng.standard_normal(shape, dtype=cupy.float32 if dtype in (None, cupy.float32) else cupy.float64)
            return (z * std + mean).astype(dtype or cupy.float32, copy=False)

    def dropout_mask(self, rng: Any, shape: tuple[int, ...], p: float, *, dtype: Any, device: Any = None) -> Array:
        with _on(device):
            if p >= 1.0:
                return cupy.zeros(shape, dtype=dtype)
            keep = rng.random(shape, dtype=cupy.float32) >= p
            return keep.astype(dtype) * (1.0 / (1.0 - p))

    # ---------------------------------------------------------- dense algebra
    def matmul(self, a: Array, b: Array, *, transpose_a: bool = False, transpose_b: bool = False) -> Array:
        return cupy.matmul(a.T if transpose_a else a, b.T if transpose_b else b)

    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        y = cupy.matmul(x, weight.T)
        if bias is not None:
            y += bias
        return y

    # ------------------------------------------------------------ loss cores
    def softmax_cross_entropy(self, logits: Array, labels: Array, *, reduction: str = "mean",
                              label_smoothing: float = 0.0, ignore_index: int | None = None,
                              class_weights: Array | None = None) -> tuple[Array, Array]:
        """The fused kernel in kernels/softmax_cross_entropy.cu; float64 takes the reference path."""
        if self.dtype_name(logits.dtype) not in _FUSED_DTYPES or logits.ndim != 2:
            return super().softmax_cross_entropy(
                logits, labels, reduction=reduction, label_smoothing=label_smoothing,
                ignore_index=ignore_index, class_weights=class_weights,
            )
        from .cuda_kernels import fused_softmax_cross_entropy

        return fused_softmax_cross_entropy(
            logits, labels, class_weights=class_weights, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction,
        )


    # ------------------------------------------------------ optimizer updates
    # One fused elementwise kernel per update: each element of the parameter and
    # its state is read and written once, in place. The rules and the order of
    # the floating-point operations are PyTorch's (see Backend.sgd_update and
    # Backend.adam_update). float16/bfloat16 take the reference path: the kernels
    # compute in T, which for half types would lose the scalars' precision.

    def sgd_update(self, value: Array, grad: Array, buf: Array | None, *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> tuple[Array, Array | None]:
        if value.dtype not in (cupy.float32, cupy.float64) or grad.dtype != value.dtype:
            return super().sgd_update(value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay, first_step=first_step)
        # Kernels launch on the current device, which must be the parameter's.
        with value.device:
            if momentum == 0.0:
                _sgd_kernel()(grad, lr, weight_decay, value)
                return value, buf
            first = first_step or buf is None
            if first:
                buf = cupy.empty_like(value)  # written, never read, on the first step
            _sgd_momentum_kernel()(grad, lr, weight_decay, momentum, 1.0 - dampening, int(nesterov), int(first),
                                   value, buf)
        return value, buf

    def adam_update(self, value: Array, grad: Array, m: Array, v: Array, *, step: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, decoupled: bool) -> tuple[Array, Array, Array]:
        if value.dtype not in (cupy.float32, cupy.float64) or not (grad.dtype == m.dtype == v.dtype == value.dtype):
            return super().adam_update(value, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, decoupled=decoupled)
        step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
        l2 = 0.0 if decoupled else weight_decay
        decay = 1.0 - lr * weight_decay if decoupled else 1.0
        with value.device:
            _adam_kernel()(grad, l2, decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, bc2_sqrt, value, m, v)
        return value, m, v


# Names n, i and a leading underscore are reserved inside ElementwiseKernel bodies.
# Python-float scalars typed T are cast to the arrays' dtype, as PyTorch casts its
# scalar arguments to the tensor's dtype.

@functools.cache
def _sgd_kernel() -> Any:
    """``p -= lr (g + wd p)`` (the ``wd != 0`` test keeps an inf parameter from making NaN through 0 * inf)."""
    return cupy.ElementwiseKernel(
        "T g, T lr, T weight_decay",
        "T p",
        """
        T d = g;
        if (weight_decay != 0) d = d + weight_decay * p;
        p = p - lr * d;
        """,
        "deepcore_sgd",
    )


@functools.cache
def _sgd_momentum_kernel() -> Any:
    """SGD with a momentum buffer: ``buf = d`` on the first step else ``momentum buf + (1-dampening) d``."""
    return cupy.ElementwiseKernel(
        "T g, T lr, T weight_decay, T momentum, T one_minus_dampening, int32 nesterov, int32 first",
        "T p, T buf",
        """
        T d = g;
        if (weight_decay != 0) d = d + weight_decay * p;
        T b = first ? d : buf * momentum + one_minus_dampening * d;
        buf = b;
        if (nesterov) d = d + momentum * b; else d = b;
        p = p - lr * d;
        """,
        "deepcore_sgd_momentum",
    )


@functools.cache
def _adam_kernel() -> Any:
    """Adam/AdamW: ``l2`` is Adam's weight decay (0 for AdamW), ``decay`` AdamW's ``1 - lr wd`` (1 for Adam)."""
    return cupy.ElementwiseKernel(
        "T g, T l2, T decay, T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T step_size, T bc2_sqrt",
        "T p, T m, T v",
        """
        T d = g;
        if (l2 != 0) d = d + l2 * p;
        p = p * decay;
        m = m + one_minus_beta1 * (d - m);
        v = v * beta2 + one_minus_beta2 * d * d;
        p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps);
        """,
        "deepcore_adam",
    )


class _on:
    """``with _on(device)``: make ``device`` current for allocations (a no-op for None)."""

    def __init__(self, device: Any) -> None:
        self._ctx = None if device is None else cupy.cuda.Device(getattr(device, "id", device))

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
