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


def force_momentum_form(monkeypatch, form: str, *, rounds: int = 5):
    """Run the NumPy SGD steady momentum step of large parameters in ``form``: ``"fused"``
    (cpu_jit's numba loop; the test skips where numba is missing), ``"blocked"`` or ``"one-pass"``
    (that NumPy form, the fused loop off), ``"as-timed"`` (the NumPy forms, timed by a fresh
    chooser of ``rounds`` rounds). Returns the NumPy forms' chooser."""
    from deepcore.backend import cpu_jit, numpy_backend
    from deepcore.backend.faster_form import FormChooser

    if form == "fused":
        if cpu_jit.sgd_momentum() is None:
            pytest.skip(f"the fused momentum loop is unavailable: {cpu_jit.status()['reason']}")
        chooser = FormChooser(rounds=rounds)
    else:
        monkeypatch.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
        fixed = {"blocked": True, "one-pass": False, "as-timed": None}[form]
        chooser = FormChooser(rounds=rounds, fixed=fixed)
    monkeypatch.setattr(numpy_backend, "_MOMENTUM_FORMS", chooser)
    return chooser


def count_fused_calls(monkeypatch, name: str = "sgd_momentum") -> list[int]:
    """The sizes of the parameters cpu_jit's fused loop ``name`` is called on from now on (the real
    loop still runs); the test skips where the loops are unavailable."""
    from deepcore.backend import cpu_jit

    if cpu_jit.sgd_momentum() is None:
        pytest.skip(f"the fused loops are unavailable: {cpu_jit.status()['reason']}")
    from deepcore.backend import cpu_jit_kernels

    real = cpu_jit_kernels.loop(name)
    calls: list[int] = []

    def counted(value, *args):
        calls.append(value.size)
        return real(value, *args)

    monkeypatch.setitem(cpu_jit_kernels._COMPILED, name, counted)
    return calls
