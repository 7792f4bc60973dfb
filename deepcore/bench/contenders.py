"""Who competes: the contenders (deepcore on each backend, plain NumPy, PyTorch), which case each
runs, and whether each can run on this machine."""

from __future__ import annotations

import sys
from typing import Any

CPU_CONTENDERS = ("numpy", "numpy-unfused", "numpy-dx", "numpy-fit", "numpy-plain", "torch")
GPU_CONTENDERS = ("cupy", "cupy-unfused", "torch-cuda")
ALL_CONTENDERS = CPU_CONTENDERS + GPU_CONTENDERS

#: Which contenders run which case.
CASES: dict[str, tuple[str, ...]] = {
    "matmul": ("numpy", "torch", "cupy", "torch-cuda"),
    "softmax": ("numpy", "torch", "cupy", "torch-cuda"),
    "log_softmax": ("numpy", "torch", "cupy", "torch-cuda"),
    "softmax_ce": ("numpy", "numpy-unfused", "torch", "cupy", "cupy-unfused", "torch-cuda"),
    "mlp_step": ("numpy", "numpy-dx", "numpy-plain", "torch", "cupy", "torch-cuda"),
    "mlp_gemms": ("numpy", "torch"),
    "epoch": ("numpy", "numpy-fit", "numpy-plain", "torch", "cupy", "torch-cuda"),
    "cnn_step": ("numpy", "torch", "cupy", "torch-cuda"),
    "conv": ("numpy", "torch", "cupy", "torch-cuda"),
    "conv_gemms": ("numpy", "torch"),
    "cnn_epoch": ("numpy", "numpy-fit", "torch"),
}


class NotApplicable(Exception):
    """This contender cannot run this case here (library missing, no GPU, not defined)."""


def device_of(contender: str) -> str:
    return "cuda" if contender in GPU_CONTENDERS else "cpu"


def library_of(contender: str) -> str:
    return contender.split("-")[0]


def torch_if_imported() -> Any:
    """PyTorch when something already imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise NotApplicable(f"PyTorch is not installed ({exc})") from None
    return torch


def contender_status(name: str) -> bool | str:
    """True when ``name`` can run here, else the reason. Builds or imports only what that contender
    needs (CuPy's backend for ``cupy*``, torch for ``torch*``), so a benchmark process of one contender
    loads no other library: ``deepcore.available_backends()`` would build every registered backend
    (torch, JAX, Dask and the SciPy BLAS Dask brings in)."""
    if name not in ALL_CONTENDERS:
        return f"unknown contender {name!r}"
    if name.startswith("numpy"):
        return True
    if name.startswith("cupy"):
        from ..backend import backend_status

        status = backend_status("cupy")
        return True if status is True else f"cupy unavailable: {status}"
    try:
        import torch
    except ImportError as exc:
        return f"PyTorch is not installed ({exc})"
    if name == "torch":
        return True
    return True if torch.cuda.is_available() else "PyTorch sees no CUDA device"


def available_contenders() -> dict[str, bool | str]:
    """``{contender: True}`` where it can run here, else the reason it cannot."""
    return {name: contender_status(name) for name in ALL_CONTENDERS}
