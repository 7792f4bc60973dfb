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


def available_contenders() -> dict[str, bool | str]:
    """``{contender: True}`` where it can run here, else the reason it cannot."""
    import deepcore

    out: dict[str, bool | str] = {}
    cupy_status = deepcore.available_backends().get("cupy", "not registered")
    try:
        import torch

        torch_status: bool | str = True
        cuda_status: bool | str = True if torch.cuda.is_available() else "PyTorch sees no CUDA device"
    except ImportError as exc:
        torch_status = cuda_status = f"PyTorch is not installed ({exc})"
    for name in ALL_CONTENDERS:
        if name.startswith("numpy"):
            out[name] = True
        elif name.startswith("cupy"):
            out[name] = True if cupy_status is True else f"cupy unavailable: {cupy_status}"
        elif name == "torch":
            out[name] = torch_status
        else:
            out[name] = cuda_status
    return out
