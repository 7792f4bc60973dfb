"""Helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import deepcore as dc

ROOT = Path(__file__).resolve().parents[1]


def load_tool(relative_path: str) -> ModuleType:
    """A script under tools/ (not a package) as a module named after its file, loaded once."""
    name = Path(relative_path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


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
