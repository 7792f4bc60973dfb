"""Helpers shared by the tests."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc


def arr(backend: dc.Backend, a, dtype: str | None = None):
    """A NumPy value as an array of ``backend`` (dtype by name: "float32", "int64", ...)."""
    a = np.asarray(a)
    dt = backend.dtype_from_name(dtype) if dtype else None
    return backend.from_numpy(a, dtype=dt)


def to_np(x) -> np.ndarray:
    return dc.get_backend(x).to_numpy(x)


def dtype_name(x) -> str:
    return dc.get_backend(x).dtype_name(x.dtype)


try:  # PyTorch is an optional outside reference
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed (pip install torch)")
