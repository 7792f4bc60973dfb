"""``deepcore info``: version, platform, BLAS, the backends (and why any is unavailable), devices."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import numpy as np

from .. import __version__
from ..backend import available_backends, cpu_jit, malloc_tuning
from ..sysinfo import describe_blas, optional_integrations


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="version, backends (and why any is unavailable), devices, BLAS")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=run_command)
    return p


def collect_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "deepcore": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "blas": describe_blas(),
        "backends": available_backends(),
        "malloc_tuning": malloc_tuning.tune(),
        "integrations": optional_integrations(),
    }
    info["cpu_jit"] = cpu_jit_line(info["integrations"].get("numba"))
    if info["backends"].get("cupy") is True:
        info["cuda"] = cuda_info(__import__("cupy"))
    for lib in ("cupy", "torch", "array_api_strict", "array_api_compat"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:
            continue
    return info


def run_command(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"deepcore {info['deepcore']} on Python {info['python']} ({info['platform']})")
    print(f"numpy {info['numpy']}, BLAS: {info['blas']}, allocator tuning: {info['malloc_tuning']}")
    for lib in ("array_api_compat", "array_api_strict"):  # torch and CuPy: on the "optional" line
        if lib in info:
            print(f"{lib} {info[lib]}")
    print("optional: " + ", ".join(f"{lib} {v}" if v else f"{lib} (not installed)"
                                   for lib, v in info["integrations"].items()))
    print(f"cpu jit: {info['cpu_jit']}")
    print("backends:")
    for name, status in info["backends"].items():
        print(f"  {name:18s} {'available' if status is True else 'unavailable: ' + str(status)}")
    print_cuda_info(info.get("cuda"))
    return 0


def cpu_jit_line(numba_version: str | None) -> str:
    """Whether the NumPy backend's fused loops (backend/cpu_jit.py) run here, and from when: with
    numba installed, found by loading the first loop (about a second)."""
    from ..backend.numpy_backend import _CE_FUSED_MAX_SIZE, _FUSED_MIN

    if numba_version is None and not cpu_jit.status()["reason"]:
        return "off: numba not installed (pip install 'deepcore[jit]' fuses the optimizers' steps)"
    if cpu_jit.sgd_momentum() is None:
        return f"off: {cpu_jit.status()['reason']}"
    steps = (f"numba {numba_version}: SGD's, Adam's, RMSprop's and Adagrad's steps fused for parameters of "
             f">= {_FUSED_MIN} weights")
    if cpu_jit.eager():
        loss = (f" and softmax cross-entropy of <= {_CE_FUSED_MAX_SIZE} logits"
                if cpu_jit.softmax_cross_entropy() is not None else "")  # (its compile may have failed alone)
        return f"{steps}{loss}, from the first step (DEEPCORE_JIT=1)"
    return (f"{steps}, once NumPy has spent {cpu_jit.LOAD_AFTER_S:g} s on those updates "
            "(DEEPCORE_JIT=1: from the first step, softmax cross-entropy too)")


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"  # CUDA's 12080 is 12.8


def cuda_info(cupy: Any) -> dict[str, Any]:
    """The CUDA driver, runtime and NVRTC versions and every device, from a working CuPy; a part that
    cannot be read is the error's one line instead."""
    rt = cupy.cuda.runtime
    out: dict[str, Any] = {}
    for key, read in (("driver", lambda: _cuda_version(rt.driverGetVersion())),
                      ("runtime", lambda: _cuda_version(rt.runtimeGetVersion())),
                      ("nvrtc", lambda: ".".join(str(v) for v in cupy.cuda.nvrtc.getVersion()))):
        try:
            out[key] = read()
        except Exception as exc:
            out[key] = f"unknown ({type(exc).__name__}: {exc})"
    out["devices"] = []
    for i in range(rt.getDeviceCount()):
        props = rt.getDeviceProperties(i)
        name = props["name"]
        out["devices"].append({
            "id": i, "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "multiprocessors": props.get("multiProcessorCount"),
        })
    return out


def print_cuda_info(cuda: dict[str, Any] | None) -> None:
    if not cuda:
        return
    print(f"CUDA: driver {cuda['driver']}, runtime {cuda['runtime']}, NVRTC {cuda['nvrtc']}")
    for dev in cuda["devices"]:
        print(f"  cuda:{dev['id']} {dev['name']} (compute capability {dev['compute_capability']}, "
              f"{dev['memory_gib']} GiB, {dev['multiprocessors']} SMs)")
