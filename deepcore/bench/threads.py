"""Thread pools of the contenders: pin NumPy's BLAS/OpenMP (threadpoolctl) and PyTorch to ``n``
threads for a benchmark, report what is in force, and give back what was there before."""

from __future__ import annotations

import os
from typing import Any

from .._checks import check_int
from ..sysinfo import cpu_count
from .contenders import torch_if_imported

_first_limiter: Any = None
_torch_threads_before: int | None = None


def set_threads(n: int | None) -> dict[str, Any]:
    """Pin NumPy's BLAS (and OpenMP) to ``n`` threads with threadpoolctl, and PyTorch with
    ``torch.set_num_threads``; ``None`` keeps what is there. Returns what is now in force.

    Without threadpoolctl the BLAS thread count can only be chosen before NumPy is
    imported (``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``); then
    ``method`` says ``"env"`` and ``blas_threads`` is what those variables say.
    :func:`restore_threads` undoes this.
    """
    global _first_limiter, _torch_threads_before
    method = "none"
    if n is not None:
        check_int(n, "threads", "set_threads", 1)
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=n)
            if _first_limiter is None:
                _first_limiter = limiter  # its "original" limits are the process's own
            method = "threadpoolctl"
        except ImportError:
            method = "env"
        torch = torch_if_imported()
        if torch is not None:
            if _torch_threads_before is None:
                _torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(n)
    return {"requested": n, "method": method, **thread_info()}


def restore_threads() -> None:
    """Give BLAS/OpenMP and PyTorch back the thread counts they had before :func:`set_threads`."""
    global _first_limiter, _torch_threads_before
    if _first_limiter is not None:
        _first_limiter.restore_original_limits()
        _first_limiter = None
    torch = torch_if_imported()
    if torch is not None and _torch_threads_before is not None:
        torch.set_num_threads(_torch_threads_before)
    _torch_threads_before = None


def thread_info() -> dict[str, Any]:
    """The thread counts in force: BLAS/OpenMP pools (threadpoolctl) or the environment, and torch's."""
    info: dict[str, Any] = {"cores": cpu_count()}
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
        info["pools"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                                  "threading_layer", "prefix")} for p in pools]
        blas = [p for p in pools if p.get("user_api") == "blas"]
        info["blas_threads"] = blas[0]["num_threads"] if blas else None
    except ImportError:
        env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
        info["env"] = env
        first = next(iter(env.values()), None)
        info["blas_threads"] = int(first) if first and first.isdigit() else None
    torch = torch_if_imported()
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info

