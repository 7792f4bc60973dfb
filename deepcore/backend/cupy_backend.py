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

from . import conv_kernels as conv
from . import dropout_hash
from . import elementwise_kernels as ek
from .base import Array, Backend
from .elementwise_kernels import ElementwiseSpec

_FUSED_DTYPES = ("float32", "float16", "bfloat16")
# The elementwise kernels compute in T: for half types the reference path, which
# the array-API namespace evaluates with its own precision rules, stays in charge.
_ELEMENTWISE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _require_device() -> None:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, others on broken installs
        raise RuntimeError(f"CuPy {cupy.__version__} is installed but CUDA is not usable: {exc}") from exc
    if count == 0:
        raise RuntimeError(f"CuPy {cupy.__version__} is installed but no CUDA device is visible")


class CupyBackend(Backend):
    # Work is queued on a stream and the host runs ahead: reading a value back (float(loss)) waits for the
    # device, so the fit loop reads nothing inside a step (deepcore/fit_window.py).
    asynchronous = True

    def __init__(self) -> None:
        _require_device()
        super().__init__(cp_compat, name="cupy")

    # ------------------------------------------------------------------ arrays
    def asarray(self, obj: Any, *, dtype: Any = None, device: Any = None) -> Array:
        with _using_device(device):
            return cupy.asarray(obj, dtype=dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        return cupy.asnumpy(x)

    def from_numpy(self, a: np.ndarray, *, dtype: Any = None, device: Any = None) -> Array:
        with _using_device(device):
            return cupy.array(a, dtype=dtype, copy=True, order="C")

    def free_memory(self) -> int:
        """Bytes the current device can still give: the driver's free memory plus what CuPy's pool holds unused."""
        free, _total = cupy.cuda.runtime.memGetInfo()
        return int(free) + int(cupy.get_default_memory_pool().free_bytes())

    def add_into(self, acc: Array, value: Array) -> Array:
        cupy.add(acc, value, out=acc, casting="same_kind")
        return acc

    # array_api_compat's isdtype raises for ml_dtypes' bfloat16 (a NumPy "V" kind); CuPy dtypes
    # are NumPy dtypes, so their kind and name say what they are, as on the NumPy backend.
    def is_floating(self, x: Array) -> bool:
        return x.dtype.kind == "f" or x.dtype.name == "bfloat16"

    # ----------------------------------------------------------------- random
    def dropout_mask(self, rng: Any, shape: tuple[int, ...], p: float, *, dtype: Any, device: Any = None) -> Array:
        """The counter-based mask of the stream ``rng`` (``dropout_hash.Stream``) in one elementwise launch,
        bit for bit the NumPy backend's: no cuRAND generator (and its states) built per call."""
        with _using_device(device):
            if p >= 1.0:
                return cupy.zeros(shape, dtype=dtype)
            return ek.dropout_mask(cupy, _kernel, rng.key, rng.gamma, dropout_hash.threshold(p),
                                   dropout_hash.mask_value(p, np.dtype(dtype).name), shape, dtype)

    # ---------------------------------------------------------- dense algebra
    def matmul(self, a: Array, b: Array, *, transpose_a: bool = False, transpose_b: bool = False) -> Array:
        return cupy.matmul(a.T if transpose_a else a, b.T if transpose_b else b)

    def linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        y = cupy.matmul(x, weight.T)
        if bias is not None:
            y += bias
        return y

    # ------------------------------------------------------------ activations
    # One kernel launch per activation and per backward, instead of the reference's
    # chains of temporaries (sigmoid: abs, negate, exp, add, divide, where).

    def relu(self, x: Array) -> Array:
        return _launch(ek.RELU, x) if _fusable(x) else super().relu(x)

    def relu_backward(self, dy: Array, x: Array) -> Array:
        return _launch(ek.RELU_BACKWARD, dy, x) if _fusable(dy, x) else super().relu_backward(dy, x)

    def leaky_relu(self, x: Array, slope: float) -> Array:
        return _launch(ek.LEAKY_RELU, x, slope) if _fusable(x) else super().leaky_relu(x, slope)

    def leaky_relu_backward(self, dy: Array, x: Array, slope: float) -> Array:
        if not _fusable(dy, x):
            return super().leaky_relu_backward(dy, x, slope)
        return _launch(ek.LEAKY_RELU_BACKWARD, dy, x, slope)

    def sigmoid(self, x: Array) -> Array:
        return _launch(ek.SIGMOID, x) if _fusable(x) else super().sigmoid(x)

    def sigmoid_backward(self, dy: Array, y: Array) -> Array:
        return _launch(ek.SIGMOID_BACKWARD, dy, y) if _fusable(dy, y) else super().sigmoid_backward(dy, y)

    def tanh_backward(self, dy: Array, y: Array) -> Array:
        return _launch(ek.TANH_BACKWARD, dy, y) if _fusable(dy, y) else super().tanh_backward(dy, y)

    # ------------------------------------------------------------ loss cores
    def softmax_cross_entropy(self, logits: Array, labels: Array, *, reduction: str = "mean",
                              label_smoothing: float = 0.0, ignore_index: int | None = None,
                              class_weights: Array | None = None,
                              labels_in_range: bool = False) -> tuple[Array, Array]:
        """The fused kernel in kernels/softmax_cross_entropy.cu (bad labels give NaN rows there, so
        ``labels_in_range`` saves nothing); float64 takes the reference path."""
        if self.dtype_name(logits.dtype) not in _FUSED_DTYPES or logits.ndim != 2:
            return super().softmax_cross_entropy(
                logits, labels, reduction=reduction, label_smoothing=label_smoothing,
                ignore_index=ignore_index, class_weights=class_weights,
            )
        from .cuda_kernels import fused_softmax_cross_entropy

        with logits.device:  # the kernel, and its module, are the logits' device's
            return fused_softmax_cross_entropy(
                logits, labels, class_weights=class_weights, ignore_index=ignore_index,
                label_smoothing=label_smoothing, reduction=reduction,
            )

    # ------------------------------------------------- convolution and pooling
    # The gather kernels of kernels/conv2d.cu (compiled per instance on first use) around
    # 2-D cuBLAS GEMMs; conv_kernels.py holds the column layout and why. `saved` is that
    # module's ConvSaved / MaxPoolSaved / AvgPoolSaved. Kernels launch on the current
    # device, so each call makes the input's device current first.

    def conv2d(self, x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, int],
               padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int) -> tuple[Array, Any]:
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            # Mixed dtypes: the reference promotes; the kernels and GEMMs take one type.
            return super().conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
        with x.device:
            return conv.conv2d_forward(cupy, conv.cupy_function, x, weight, bias, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups)

    def conv2d_backward(self, dy: Array, saved: Any, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[Array | None, Array, Array | None]:
        if not isinstance(saved, conv.ConvSaved):  # the forward took the reference path
            return super().conv2d_backward(dy, saved, need_dx=need_dx, need_bias=need_bias)
        with dy.device:
            return conv.conv2d_backward(cupy, conv.cupy_function, dy, saved, need_dx=need_dx, need_bias=need_bias)

    def max_pool2d(self, x: Array, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int]) -> tuple[Array, Any]:
        with x.device:
            return conv.max_pool2d_forward(cupy, conv.cupy_function, x, kernel_size=kernel_size, stride=stride,
                                           padding=padding)

    def max_pool2d_backward(self, dy: Array, saved: Any) -> Array:
        with dy.device:
            return conv.max_pool2d_backward(cupy, conv.cupy_function, dy, saved)

    def avg_pool2d(self, x: Array, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], count_include_pad: bool) -> tuple[Array, Any]:
        with x.device:
            return conv.avg_pool2d_forward(cupy, conv.cupy_function, x, kernel_size=kernel_size, stride=stride,
                                           padding=padding, count_include_pad=count_include_pad)

    def avg_pool2d_backward(self, dy: Array, saved: Any) -> Array:
        with dy.device:
            return conv.avg_pool2d_backward(cupy, conv.cupy_function, dy, saved)

    # ------------------------------------------------------ optimizer updates
    # One fused elementwise kernel per update: each element of the parameter and
    # its state is read and written once, in place. The rules and the order of
    # the floating-point operations are PyTorch's (see Backend.sgd_update and
    # Backend.adam_update). float16/bfloat16 take the reference path: the kernels
    # compute in T, which for half types would lose the scalars' precision.

    def sgd_update(self, value: Array, grad: Array, buf: Array | None, *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> tuple[Array, Array | None]:
        if not _fusable(value, grad):
            return super().sgd_update(value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay, first_step=first_step)
        # Kernels launch on the current device, which must be the parameter's.
        with value.device:
            return ek.sgd_update(cupy, _kernel, value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                 nesterov=nesterov, weight_decay=weight_decay, first_step=first_step)

    def adam_update(self, value: Array, grad: Array, m: Array, v: Array, *, step: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, decoupled: bool) -> tuple[Array, Array, Array]:
        if not _fusable(value, grad, m, v):
            return super().adam_update(value, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, decoupled=decoupled)
        with value.device:
            return ek.adam_update(_kernel, value, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, decoupled=decoupled)


@functools.cache
def _kernel(spec: ElementwiseSpec) -> Any:
    return cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.body, spec.name)


def _launch(spec: ElementwiseSpec, *args: Any) -> Array:
    # An ElementwiseKernel runs on the current device, which must be the arrays'.
    with args[0].device:
        return _kernel(spec)(*args)


def _fusable(*arrays: Array) -> bool:
    """Same float32/float64 dtype and shape everywhere: what the kernels' single ``T`` and no broadcasting assume."""
    first = arrays[0]
    return first.dtype in _ELEMENTWISE_DTYPES and all(a.dtype == first.dtype and a.shape == first.shape
                                                      for a in arrays[1:])


class _using_device:
    """``with _using_device(device)``: make ``device`` current for allocations (a no-op for None)."""

    def __init__(self, device: Any) -> None:
        self._ctx = None if device is None else cupy.cuda.Device(getattr(device, "id", device))

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
