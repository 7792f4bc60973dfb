"""The workloads: one contender's callable for one case (a matrix product, a softmax, the fused
loss), set up on that contender's library and device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .contenders import NotApplicable, import_torch, library_of


@dataclass
class Workload:
    """One contender's callable for one case: ``fn()`` does one unit of work; ``sync()`` waits
    for the device (a no-op on the CPU). ``info`` goes into the result's ``extra_info``."""

    fn: Callable[[], Any]
    sync: Callable[[], None]
    info: dict[str, Any]

    def call(self) -> None:
        self.fn()
        self.sync()


def no_sync() -> None:
    return None


def dc_backend(contender: str) -> Any:
    import deepcore
    from deepcore.backend import backend_status

    name = library_of(contender)
    status = backend_status(name)  # builds this backend only, not every registered one
    if status is not True:
        raise NotApplicable(f"backend {name} unavailable: {status}")
    return deepcore.get_backend(name)


def sync_for(contender: str) -> Callable[[], None]:
    if contender in ("cupy", "cupy-unfused"):
        import cupy

        return cupy.cuda.get_current_stream().synchronize
    if contender == "torch-cuda":
        return import_torch().cuda.synchronize
    return no_sync


def torch_device(contender: str) -> Any:
    torch = import_torch()
    if contender == "torch-cuda":
        if not torch.cuda.is_available():
            raise NotApplicable("PyTorch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def host_data(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    """Random float32 data (never zeros: they can run faster than real data)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def on_contender(contender: str, a: np.ndarray) -> Any:
    """``a`` on the contender's library and device."""
    if library_of(contender) == "torch":
        torch = import_torch()
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch_device(contender))
    import deepcore

    return deepcore.to_backend(a, dc_backend(contender))


def matmul(contender: str, m: int, k: int, n: int, transpose_b: bool = False) -> Workload:
    a = host_data((m, k), 1)
    b = host_data((n, k) if transpose_b else (k, n), 2)
    da, db = on_contender(contender, a), on_contender(contender, b)
    if library_of(contender) == "torch":
        fn = (lambda: da @ db.T) if transpose_b else (lambda: da @ db)
    else:
        backend = dc_backend(contender)
        fn = lambda: backend.matmul(da, db, transpose_b=transpose_b)  # noqa: E731
    flops = 2.0 * m * n * k
    return Workload(fn, sync_for(contender), {"shape": [m, k, n], "transpose_b": transpose_b, "flops": flops})


def softmax(contender: str, n: int, c: int, log: bool) -> Workload:
    x = on_contender(contender, host_data((n, c), 3, 3.0))
    if library_of(contender) == "torch":
        torch = import_torch()
        f = torch.log_softmax if log else torch.softmax
        fn = lambda: f(x, dim=-1)  # noqa: E731
    else:
        backend = dc_backend(contender)
        f = backend.log_softmax if log else backend.softmax
        fn = lambda: f(x, axis=-1)  # noqa: E731
    return Workload(fn, sync_for(contender), {"shape": [n, c]})


def softmax_ce(contender: str, n: int, c: int) -> Workload:
    logits_h = host_data((n, c), 4, 3.0)
    labels_h = np.random.default_rng(5).integers(0, c, n)
    if library_of(contender) == "torch":
        torch = import_torch()
        F = torch.nn.functional
        x = on_contender(contender, logits_h).requires_grad_(True)
        y = on_contender(contender, labels_h)

        def fn() -> Any:
            x.grad = None
            loss = F.cross_entropy(x, y)
            loss.backward()
            return loss, x.grad
    else:
        from .. import losses
        from ..backend.base import Backend

        backend = dc_backend(contender)
        x, y = on_contender(contender, logits_h), on_contender(contender, labels_h)
        if contender.endswith("-unfused"):
            def fn() -> Any:
                with backend.silent_fp():
                    return Backend.softmax_cross_entropy(backend, x, y)
        else:
            fn = lambda: losses.softmax_cross_entropy(x, y)  # noqa: E731
    return Workload(fn, sync_for(contender), {"shape": [n, c], "reduction": "mean"})


