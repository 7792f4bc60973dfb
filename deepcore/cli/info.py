"""``deepcore info``: version, platform, BLAS, the backends (and why any is unavailable), devices."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import numpy as np

from .. import __version__
from ..backend import available_backends, malloc_tuning
from ..sysinfo import describe_blas


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
    }
    if info["backends"].get("cupy") is True:
        import cupy

        info["cuda_devices"] = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode()
                                for i in range(cupy.cuda.runtime.getDeviceCount())]
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
    for lib in ("array_api_compat", "array_api_strict", "torch", "cupy"):
        if lib in info:
            print(f"{lib} {info[lib]}")
    print("backends:")
    for name, status in info["backends"].items():
        print(f"  {name:18s} {'available' if status is True else 'unavailable: ' + str(status)}")
    for i, dev in enumerate(info.get("cuda_devices", [])):
        print(f"  cuda:{i} {dev}")
    return 0
