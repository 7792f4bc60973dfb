"""Facts about the machine that ``deepcore info`` and the benchmarks report: CPU, cores, BLAS, and which
optional libraries are installed.

Nothing here is on the training path; it imports only NumPy, and threadpoolctl when present.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS: ``name``, ``version``, ``architecture`` (the kernel set in use) and ``threads``.

    threadpoolctl reads what is loaded and running; without it, NumPy's build configuration
    gives name and version only.
    """
    try:
        from threadpoolctl import threadpool_info

        for p in threadpool_info():
            if p.get("user_api") == "blas":
                return {"name": p.get("internal_api"), "version": p.get("version"),
                        "architecture": p.get("architecture"), "threads": p.get("num_threads")}
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return {"name": blas.get("name"), "version": blas.get("version"), "architecture": None, "threads": None}
    except Exception:
        return {"name": "unknown", "version": None, "architecture": None, "threads": None}


def describe_blas(info: dict[str, Any] | None = None) -> str:
    """``blas_info()`` as one line: ``openblas 0.3.31 SkylakeX, 2 threads``."""
    b = blas_info() if info is None else info
    text = " ".join(str(v) for v in (b.get("name"), b.get("version"), b.get("architecture")) if v)
    if b.get("threads"):
        text += f", {b['threads']} threads"
    return text or "unknown"


#: The optional libraries deepcore works with, by import name, and the distributions that install each.
OPTIONAL_INTEGRATIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "torch": ("torch",),
    "jax": ("jax",),
    "cupy": ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy-rocm-6-0", "cupy-rocm-5-0"),
    "mpi4py": ("mpi4py",),
    "dask": ("dask",),
    "numba": ("numba",),
}


def optional_integrations() -> dict[str, str | None]:
    """``{import name: installed version or None}`` for :data:`OPTIONAL_INTEGRATIONS`, read from the
    packages' metadata without importing them (torch, CuPy and JAX take seconds to import); a module
    importable without metadata (a source checkout) shows as ``"unknown version"``."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for module, dists in OPTIONAL_INTEGRATIONS.items():
        found[module] = None
        for dist in dists:
            try:
                found[module] = version(dist)
                break
            except PackageNotFoundError:
                continue
        if found[module] is None and importlib.util.find_spec(module) is not None:
            found[module] = "unknown version"
    return found
