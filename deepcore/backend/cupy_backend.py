"""CuPy on an NVIDIA GPU: cuBLAS matrix products and deepcore's fused CUDA kernels.

This module imports CuPy at import time on purpose: the registry imports it
only when the "cupy" backend is first asked for, and stores the reason when
that fails (CuPy missing, no driver, no device), so ``import deepcore`` never
depends on CUDA. Matrix products go through cuBLAS in full float32: CuPy uses
TF32 only when the user sets ``CUPY_TF32=1``.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.cupy as cp_compat
import cupy
import numpy as np

from .base import Array, Backend

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
