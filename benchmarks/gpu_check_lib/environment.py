"""Stages a and b: is there a GPU, make deepcore importable without a package index, versions."""

from __future__ import annotations

import glob
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import REPO, WHEEL_GLOB, err, log


def detect_gpu() -> tuple[Any, str | None]:
    """(cupy, None) when CuPy sees a CUDA device, else (None, why not). Imports nothing else."""
    try:
        import cupy
    except Exception as exc:
        return None, f"CuPy is not importable ({err(exc)})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy {cupy.__version__} is installed but CUDA is not usable ({err(exc)})"
    if count < 1:
        return None, f"CuPy {cupy.__version__} sees no CUDA device"
    return cupy, None


def ensure_deepcore(results: dict[str, Any]) -> Any:
    """Stage a: array-api-compat from the shipped wheel when missing, the repo on sys.path, import deepcore."""
    deps: dict[str, Any] = {}
    results["deps"] = deps
    extra_path: list[str] = []
    try:
        import array_api_compat  # noqa: F401

        deps["array_api_compat"] = f"already installed ({array_api_compat.__version__})"
    except ImportError:
        # Vendored on purpose: the GPU machine has no package index, so deepcore's one missing dependency
        # travels with the repository as a pure-Python wheel and is installed with --no-index.
        wheels = sorted(glob.glob(WHEEL_GLOB))
        if not wheels:
            raise RuntimeError(f"array_api_compat is missing and no wheel matches {WHEEL_GLOB}") from None
        whl = wheels[-1]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", "-q", whl]
        log(f"installing {os.path.basename(whl)}: {' '.join(cmd[1:])}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            deps["pip"] = {"rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:]}
        except Exception as exc:
            deps["pip"] = {"error": err(exc)}
        importlib.invalidate_caches()
        try:
            import array_api_compat  # noqa: F401

            deps["array_api_compat"] = f"pip-installed from {whl} ({array_api_compat.__version__})"
        except ImportError:
            # A pure-Python wheel is a zip that zipimport can read directly.
            sys.path.insert(0, whl)
            extra_path.append(whl)
            importlib.invalidate_caches()
            import array_api_compat  # noqa: F401

            deps["array_api_compat"] = f"imported from the wheel file {whl} ({array_api_compat.__version__})"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    extra_path.append(str(REPO))
    # The pytest subprocess needs the same imports.
    os.environ["PYTHONPATH"] = os.pathsep.join(extra_path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import deepcore

    deps["deepcore"] = f"{deepcore.__version__} from {Path(deepcore.__file__).parent}"
    log(f"array_api_compat: {deps['array_api_compat']}")
    log(f"deepcore: {deps['deepcore']}")
    return deepcore


def env_info(cupy: Any, torch: Any) -> dict[str, Any]:
    import numpy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(cupy.cuda.Device().id)
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    free, total = rt.memGetInfo()
    env: dict[str, Any] = {
        "device": name,
        "compute_capability": f"{props.get('major')}.{props.get('minor')}",
        "sm_count": props.get("multiProcessorCount"),
        "l2_bytes": props.get("l2CacheSize"),
        "memory_total_bytes": total,
        "memory_free_bytes": free,
        "cuda_runtime_version": rt.runtimeGetVersion(),
        "cuda_driver_version": rt.driverGetVersion(),
        "cupy": cupy.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "torch_cuda_available": bool(torch is not None and torch.cuda.is_available()),
    }
    try:
        env["nvrtc_version"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as exc:
        env["nvrtc_version"] = err(exc)
    try:  # read-only query; never changes the card's settings
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,"
                            "power.draw,utilization.gpu", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except Exception as exc:
        env["nvidia_smi"] = err(exc)
    return env
