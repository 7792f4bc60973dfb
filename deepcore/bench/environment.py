"""What every saved result carries: machine, library versions, BLAS, threads, devices."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from ..backend import cpu_jit
from ..sysinfo import blas_info, cpu_count, cpu_model, optional_integrations
from .contenders import torch_if_imported
from .threads import thread_info


def environment() -> dict[str, Any]:
    """Machine, library versions, BLAS and threads (PyTorch's and CuPy's device where present)."""
    import deepcore

    env: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "deepcore": deepcore.__version__,
        "numpy": np.__version__,
        "blas": blas_info(),
        "threads": thread_info(),
        "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ},
        "cpu_jit": _cpu_jit(),
    }
    torch = torch_if_imported()
    if torch is None:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch_cuda_device"] = torch.cuda.get_device_name(0)
    if deepcore.backend.backend_status("cupy") is True:  # CuPy's backend only, not every registered one
        import cupy

        env["cupy"] = cupy.__version__
        env["cuda_device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return env


def _cpu_jit() -> str:
    """Whether the NumPy backend's large optimizer steps run as numba loops (backend/cpu_jit.py):
    numba's version, or why not; read without importing numba."""
    status = cpu_jit.status()
    if status["reason"] and not status["loaded"]:
        return f"off ({status['reason']})"
    version = optional_integrations()["numba"]
    if not version:
        return "off (numba not installed)"
    # (DEEPCORE_JIT=1 also fuses the softmax cross-entropy: the softmax_ce case's figures differ)
    return f"numba {version}" + (", loss fused (DEEPCORE_JIT=1)" if cpu_jit.eager() else "")


def describe_environment(env: dict[str, Any]) -> str:
    """:func:`environment` as one line, for the top of a table."""
    t = env.get("threads", {})
    blas = env.get("blas") or {}
    parts = [f"{env.get('cpu')} ({env.get('cores')} cores)", f"numpy {env.get('numpy')}",
             f"BLAS {blas.get('name')} {blas.get('version') or ''} {blas.get('architecture') or ''}".rstrip(),
             f"BLAS threads {t.get('blas_threads')}"]
    if "torch" in env:
        parts.append(f"torch {env['torch']} ({t.get('torch_threads')} threads)")
    if "cupy" in env:
        parts.append(f"cupy {env['cupy']} on {env.get('cuda_device')}")
    if env.get("cpu_jit"):
        parts.append(f"fused CPU loops: {env['cpu_jit']}")
    if env.get("openblas_env"):
        parts.append("env " + " ".join(f"{k}={v}" for k, v in env["openblas_env"].items()))
    return "; ".join(parts)
