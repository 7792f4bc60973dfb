"""Benchmarks of deepcore's backends against each other and against PyTorch.

One module holds the workloads, so that ``deepcore bench`` (a quick, interleaved
subset) and the pytest-benchmark suite in ``benchmarks/`` time the same code:

========================  ============================================================
case                      what one call does
========================  ============================================================
``matmul``                ``a @ b`` (square, and the 784-256-10 MLP's products)
``softmax``               row softmax of an (N, C) array
``log_softmax``           row log-softmax of an (N, C) array
``softmax_ce``            softmax cross-entropy, loss and d(loss)/d(logits), mean reduction
``mlp_step``              one training step of the 784-256-10 MLP: forward, loss, backward,
                          SGD momentum update
``epoch``                 one epoch (60,000 x 784 synthetic MNIST-shaped data, batch 128,
                          shuffled) of that step
========================  ============================================================

Contenders (each row of a table):

- ``numpy``: deepcore on its NumPy backend (the fused paths); ``cupy``: deepcore on CuPy;
- ``numpy-unfused`` / ``cupy-unfused`` (softmax_ce only): the same call through the base
  class's array-API reference, ``deepcore.backend.base.Backend.softmax_cross_entropy``;
- ``numpy-dx`` (mlp_step): deepcore's step with ``backward(grad)``, which also forms the
  gradient of the input batch; ``numpy`` calls ``backward(grad, need_input_grad=False)`` as
  PyTorch does for data that does not require a gradient (and as ``deepcore.train.fit`` does);
- ``numpy-fit`` (epoch): the whole ``deepcore.train.fit(epochs=1)`` loop (batching, the
  per-step loss check, metrics) on the same data;
- ``numpy-plain`` (mlp_step, epoch): the same step hand-written in plain NumPy, the
  framework-overhead baseline;
- ``torch`` / ``torch-cuda``: PyTorch eager, the outside reference.

On the GPU, ``cupy`` and ``torch-cuda`` keep the epoch's data on the device and gather
each batch there; on the CPU every contender gathers from the same host array.

Every result carries the backend, device, dtype, shape, library versions, BLAS and the
thread count. Ratios are to the reference on the same device: PyTorch when it is
installed, else deepcore's NumPy (CPU) or CuPy (GPU) backend.

Timing: every contender of a case is set up first; then ``rounds`` rounds each time
every contender once, in turn (interleaved), for enough calls that a sample lasts at
least ``min_time``, after a short pause (see :func:`default_cooldown`); the median of the
per-call times is what is reported, and the ratio is the median over rounds of the ratio of
the two samples taken in the same round. GPU samples end with a device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_int
from .initializers import pytorch_default

__all__ = [
    "CASES",
    "Result",
    "Spec",
    "Workload",
    "add_parser",
    "available_contenders",
    "compare",
    "environment",
    "load_results",
    "make_workload",
    "restore_threads",
    "run",
    "save_results",
    "set_threads",
    "suite",
]

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
    "epoch": ("numpy", "numpy-fit", "numpy-plain", "torch", "cupy", "torch-cuda"),
}

MLP = (784, 256, 10)
LR, MOMENTUM = 0.01, 0.9


class NotApplicable(Exception):
    """This contender cannot run this case here (library missing, no GPU, not defined)."""


# --------------------------------------------------------------- environment
_first_limiter: Any = None
_torch_threads_before: int | None = None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        torch = _torch_if_imported()
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
    torch = _torch_if_imported()
    if torch is not None and _torch_threads_before is not None:
        torch.set_num_threads(_torch_threads_before)
    _torch_threads_before = None


def thread_info() -> dict[str, Any]:
    """The thread counts in force: BLAS/OpenMP pools (threadpoolctl) or the environment, and torch's."""
    info: dict[str, Any] = {"cores": _cpu_count()}
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
    torch = _torch_if_imported()
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def _torch_if_imported() -> Any:
    return sys.modules.get("torch")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise NotApplicable(f"PyTorch is not installed ({exc})") from None
    return torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> dict[str, Any]:
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


def environment() -> dict[str, Any]:
    """Machine, library versions, BLAS and threads: what every saved result carries."""
    import deepcore

    env: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": _cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "deepcore": deepcore.__version__,
        "numpy": np.__version__,
        "blas": _blas(),
        "threads": thread_info(),
        "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ},
    }
    torch = _torch_if_imported()
    if torch is None:
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    if torch is not None:
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch_cuda_device"] = torch.cuda.get_device_name(0)
    if deepcore.available_backends().get("cupy") is True:
        import cupy

        env["cupy"] = cupy.__version__
        env["cuda_device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return env


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


# ----------------------------------------------------------------- workloads
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


def _no_sync() -> None:
    return None


def _device_of(contender: str) -> str:
    return "cuda" if contender in GPU_CONTENDERS else "cpu"


def _library_of(contender: str) -> str:
    return contender.split("-")[0]


def _dc_backend(contender: str) -> Any:
    import deepcore

    name = _library_of(contender)
    status = deepcore.available_backends().get(name)
    if status is not True:
        raise NotApplicable(f"backend {name} unavailable: {status}")
    return deepcore.get_backend(name)


def _sync_for(contender: str) -> Callable[[], None]:
    if contender in ("cupy", "cupy-unfused"):
        import cupy

        return cupy.cuda.get_current_stream().synchronize
    if contender == "torch-cuda":
        return _torch().cuda.synchronize
    return _no_sync


def _torch_device(contender: str) -> Any:
    torch = _torch()
    if contender == "torch-cuda":
        if not torch.cuda.is_available():
            raise NotApplicable("PyTorch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _host_data(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    """Random float32 data (never zeros: they can run faster than real data)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def _to(contender: str, a: np.ndarray) -> Any:
    """``a`` on the contender's library and device."""
    if _library_of(contender) == "torch":
        torch = _torch()
        return torch.from_numpy(np.ascontiguousarray(a)).to(_torch_device(contender))
    import deepcore

    return deepcore.to_backend(a, _dc_backend(contender))


def _matmul(contender: str, m: int, k: int, n: int, transpose_b: bool = False) -> Workload:
    a = _host_data((m, k), 1)
    b = _host_data((n, k) if transpose_b else (k, n), 2)
    da, db = _to(contender, a), _to(contender, b)
    if _library_of(contender) == "torch":
        fn = (lambda: da @ db.T) if transpose_b else (lambda: da @ db)
    else:
        backend = _dc_backend(contender)
        fn = lambda: backend.matmul(da, db, transpose_b=transpose_b)  # noqa: E731
    flops = 2.0 * m * n * k
    return Workload(fn, _sync_for(contender), {"shape": [m, k, n], "transpose_b": transpose_b, "flops": flops})


def _softmax(contender: str, n: int, c: int, log: bool) -> Workload:
    x = _to(contender, _host_data((n, c), 3, 3.0))
    if _library_of(contender) == "torch":
        torch = _torch()
        f = torch.log_softmax if log else torch.softmax
        fn = lambda: f(x, dim=-1)  # noqa: E731
    else:
        backend = _dc_backend(contender)
        f = backend.log_softmax if log else backend.softmax
        fn = lambda: f(x, axis=-1)  # noqa: E731
    return Workload(fn, _sync_for(contender), {"shape": [n, c]})


def _softmax_ce(contender: str, n: int, c: int) -> Workload:
    logits_h = _host_data((n, c), 4, 3.0)
    labels_h = np.random.default_rng(5).integers(0, c, n)
    if _library_of(contender) == "torch":
        torch = _torch()
        F = torch.nn.functional
        x = _to(contender, logits_h).requires_grad_(True)
        y = _to(contender, labels_h)

        def fn() -> Any:
            x.grad = None
            loss = F.cross_entropy(x, y)
            loss.backward()
            return loss, x.grad
    else:
        from . import losses
        from .backend.base import Backend

        backend = _dc_backend(contender)
        x, y = _to(contender, logits_h), _to(contender, labels_h)
        if contender.endswith("-unfused"):
            def fn() -> Any:
                with backend.silent_fp():
                    return Backend.softmax_cross_entropy(backend, x, y)
        else:
            fn = lambda: losses.softmax_cross_entropy(x, y)  # noqa: E731
    return Workload(fn, _sync_for(contender), {"shape": [n, c], "reduction": "mean"})


# ---- the MLP training step, four ways
def _init_weights(seed: int = 0) -> list[np.ndarray]:
    """PyTorch's default Linear initialisation, drawn once so every contender starts equal."""
    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in zip(MLP[:-1], MLP[1:], strict=True):
        out.append(pytorch_default(rng, (fan_out, fan_in), fan_in, fan_out).astype(np.float32))
        out.append(pytorch_default(rng, (fan_out,), fan_in, fan_out).astype(np.float32))
    return out


class _PlainNumpyMLP:
    """The 784-256-10 step written by hand in plain NumPy, as a careful person would: in-place
    bias and ReLU, the softmax cross-entropy gradient in the probability buffer, no input
    gradient, SGD momentum (PyTorch's rule) in place. The framework-overhead baseline."""

    def __init__(self, weights: Sequence[np.ndarray]) -> None:
        self.params = [w.copy() for w in weights]
        self.bufs: list[np.ndarray | None] = [None] * len(self.params)

    def step(self, x: np.ndarray, y: np.ndarray) -> np.floating:
        w1, b1, w2, b2 = self.params
        n = x.shape[0]
        h = x @ w1.T
        h += b1
        np.maximum(h, 0, out=h)
        s = h @ w2.T
        s += b2
        s -= s.max(axis=1, keepdims=True)
        rows = np.arange(n)
        target = s[rows, y]
        np.exp(s, out=s)
        sum_e = s.sum(axis=1)
        loss = (np.log(sum_e) - target).mean()
        s *= (1.0 / n / sum_e)[:, None]   # d loss / d logits = (p - onehot) / n
        s[rows, y] -= 1.0 / n
        g_w2 = s.T @ h
        g_b2 = s.sum(axis=0)
        dh = s @ w2
        dh *= h > 0
        g_w1 = dh.T @ x
        g_b1 = dh.sum(axis=0)
        for i, (p, g) in enumerate(zip(self.params, (g_w1, g_b1, g_w2, g_b2), strict=True)):
            buf = self.bufs[i]
            if buf is None:
                self.bufs[i] = buf = g
            else:
                buf *= MOMENTUM
                buf += g
            p -= LR * buf
        return loss


def _deepcore_mlp(contender: str, weights: Sequence[np.ndarray]) -> tuple[Any, Any, Any]:
    import deepcore

    from . import nn, optim

    backend = _dc_backend(contender)
    with deepcore.use_backend(backend):
        model = nn.Sequential(nn.Linear(MLP[0], MLP[1]), nn.ReLU(), nn.Linear(MLP[1], MLP[2]))
    for p, w in zip(model.parameters(), weights, strict=True):
        p.value = backend.from_numpy(w, device=backend.device(p.value))
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return model, opt, backend


def _deepcore_step(model: Any, opt: Any, need_input_grad: bool) -> Callable[[Any, Any], Any]:
    from . import losses

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad()
        pred, backward = model.forward(x, train=True)
        loss, grad = losses.softmax_cross_entropy(pred, y)
        if need_input_grad:
            backward(grad)
        else:
            backward(grad, need_input_grad=False)
        opt.step()
        return loss

    return step


def _torch_mlp(contender: str, weights: Sequence[np.ndarray]) -> Callable[[Any, Any], Any]:
    torch = _torch()
    dev = _torch_device(contender)
    model = torch.nn.Sequential(torch.nn.Linear(MLP[0], MLP[1]), torch.nn.ReLU(), torch.nn.Linear(MLP[1], MLP[2]))
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(torch.from_numpy(w))
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    F = torch.nn.functional

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _step_fn(contender: str, weights: Sequence[np.ndarray]) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(step(x, y), model_or_params)`` for a contender of mlp_step / epoch."""
    lib = _library_of(contender)
    if lib == "torch":
        return _torch_mlp(contender, weights), None
    if contender == "numpy-plain":
        plain = _PlainNumpyMLP(weights)
        return plain.step, plain
    model, opt, _ = _deepcore_mlp(contender, weights)
    return _deepcore_step(model, opt, need_input_grad=contender in ("numpy-dx", "numpy-fit")), model


def _mlp_step(contender: str, batch: int) -> Workload:
    if contender == "numpy-fit":
        raise NotApplicable("numpy-fit is an epoch contender; mlp_step has numpy-dx")
    weights = _init_weights()
    x_h = np.random.default_rng(6).random((batch, MLP[0]), dtype=np.float32)
    y_h = np.random.default_rng(7).integers(0, MLP[-1], batch)
    step, _ = _step_fn(contender, weights)
    x, y = _to(contender, x_h), _to(contender, y_h)
    return Workload(lambda: step(x, y), _sync_for(contender),
                    {"shape": [batch, *MLP], "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})"})


_EPOCH_DATA: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _epoch_data(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped synthetic data: n x d float32 in [0, 1), labels 0..9; built once and shared."""
    key = (n, d)
    if key not in _EPOCH_DATA:
        rng = np.random.default_rng(8)
        _EPOCH_DATA[key] = (rng.random((n, d), dtype=np.float32), rng.integers(0, MLP[-1], n))
    return _EPOCH_DATA[key]


def _epoch(contender: str, n: int, batch: int) -> Workload:
    if contender == "numpy-dx":
        raise NotApplicable("numpy-dx is an mlp_step contender; epoch has numpy-fit")
    x_h, y_h = _epoch_data(n, MLP[0])
    weights = _init_weights()
    counter = {"epoch": 0}
    lib = _library_of(contender)
    if contender == "numpy-fit":
        from .data import ArrayDataset
        from .train import fit

        model, opt, _ = _deepcore_mlp(contender, weights)
        ds = ArrayDataset(x_h, y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            return fit(model, "softmax-ce", opt, ds, epochs=1, batch_size=batch, seed=counter["epoch"],
                       verbose=False)
    elif lib == "torch":
        torch = _torch()
        step, _ = _step_fn(contender, weights)
        dev = _torch_device(contender)
        xt, yt = torch.from_numpy(x_h).to(dev), torch.from_numpy(y_h).to(dev)

        def fn() -> Any:
            counter["epoch"] += 1
            g = torch.Generator().manual_seed(counter["epoch"])
            order = torch.randperm(n, generator=g).to(dev)
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = step(xt.index_select(0, idx), yt.index_select(0, idx))
            return loss
    elif lib == "cupy":
        # Device-resident data, gathered on the device, as the torch-cuda contender does.
        step, _ = _step_fn(contender, weights)
        backend = _dc_backend(contender)
        xp = backend.xp
        xd, yd = backend.from_numpy(x_h), backend.from_numpy(y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            order = backend.from_numpy(np.random.default_rng(counter["epoch"]).permutation(n))
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = step(xp.take(xd, idx, axis=0), xp.take(yd, idx, axis=0))
            return loss
    elif contender == "numpy-plain":
        plain = _PlainNumpyMLP(weights)

        def fn() -> Any:
            counter["epoch"] += 1
            order = np.random.default_rng(counter["epoch"]).permutation(n)
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = plain.step(np.take(x_h, idx, axis=0), np.take(y_h, idx, axis=0))
            return loss
    else:
        from .data import ArrayDataset, batches

        step, _ = _step_fn(contender, weights)
        backend = _dc_backend(contender)
        ds = ArrayDataset(x_h, y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            loss = None
            for xb, yb in batches(ds, batch, seed=0, epoch=counter["epoch"], backend=backend):
                loss = step(xb, yb)
            return loss
    return Workload(fn, _sync_for(contender), {"shape": [n, MLP[0]], "batch": batch, "model": list(MLP),
                                               "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})"})


def make_workload(case: str, contender: str, **params: Any) -> Workload:
    """Set up ``contender`` for ``case`` with ``params``; raises :class:`NotApplicable` when it
    cannot run here. ``info`` records backend, device, dtype and shape."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    if contender not in CASES[case]:
        raise NotApplicable(f"{contender} does not run {case}")
    status = available_contenders().get(contender, f"unknown contender {contender!r}")
    if status is not True:
        raise NotApplicable(str(status))
    if case == "matmul":
        wl = _matmul(contender, **params)
    elif case in ("softmax", "log_softmax"):
        wl = _softmax(contender, log=case == "log_softmax", **params)
    elif case == "softmax_ce":
        wl = _softmax_ce(contender, **params)
    elif case == "mlp_step":
        wl = _mlp_step(contender, **params)
    else:
        wl = _epoch(contender, **params)
    wl.info = {"case": case, "contender": contender, "backend": _library_of(contender),
               "device": _device_of(contender), "dtype": "float32", **wl.info}
    return wl


# -------------------------------------------------------------------- suites
@dataclass(frozen=True)
class Spec:
    """One case at one parameter setting."""

    case: str
    params: tuple[tuple[str, Any], ...]
    slow: bool = False

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def param_id(self) -> str:
        p = self.kwargs
        if self.case == "matmul":
            tag = f"{p['m']}x{p['k']}x{p['n']}"
            return tag + ("-bT" if p.get("transpose_b") else "")
        if self.case in ("softmax", "log_softmax", "softmax_ce"):
            return f"{p['n']}x{p['c']}"
        if self.case == "mlp_step":
            return f"b{p['batch']}"
        return f"{p['n']}x{MLP[0]}-b{p['batch']}"


def _spec(case: str, slow: bool = False, **params: Any) -> Spec:
    return Spec(case, tuple(params.items()), slow)


#: (N, C) shapes of the softmax cases: C = 10, 1000, 32768 with N chosen so that a CPU call
#: stays in milliseconds.
SOFTMAX_SHAPES = ((8192, 10), (4096, 1000), (256, 32768))

#: The 784-256-10 MLP's matrix products at batch 128 (forward x W1^T, dW1 = dy^T x, dx = dy W1)
#: and the forward at batch 1024.
MLP_MATMULS = ((128, 784, 256, True), (256, 128, 784, False), (128, 256, 784, False), (1024, 784, 256, True))


def suite(name: str) -> list[Spec]:
    """``"tiny"`` (seconds; for tests), ``"quick"`` (``deepcore bench``'s default) or ``"full"``
    (what the pytest-benchmark suite sweeps; 4096^3 matmul marked slow)."""
    if name == "tiny":
        return [_spec("matmul", m=64, k=64, n=64), _spec("softmax", n=64, c=10),
                _spec("softmax_ce", n=64, c=10), _spec("mlp_step", batch=16),
                _spec("epoch", n=512, batch=128)]
    if name == "quick":
        return [_spec("matmul", m=512, k=512, n=512), _spec("matmul", m=128, k=784, n=256, transpose_b=True),
                _spec("softmax", n=4096, c=1000), _spec("softmax_ce", n=4096, c=1000),
                _spec("softmax_ce", n=128, c=10),
                _spec("mlp_step", batch=128), _spec("mlp_step", batch=1024),
                _spec("epoch", n=60000, batch=128)]
    if name == "full":
        specs = [_spec("matmul", m=s, k=s, n=s, slow=s >= 4096) for s in (512, 2048, 4096)]
        specs += [_spec("matmul", m=m, k=k, n=n, transpose_b=t) for m, k, n, t in MLP_MATMULS]
        for case in ("softmax", "log_softmax", "softmax_ce"):
            specs += [_spec(case, n=n, c=c) for n, c in SOFTMAX_SHAPES]
        specs += [_spec("mlp_step", batch=b) for b in (128, 1024)]
        specs.append(_spec("epoch", n=60000, batch=128))
        return specs
    raise ValueError(f"unknown suite {name!r}; suites: tiny, quick, full")


# -------------------------------------------------------------------- timing
@dataclass
class Result:
    """The timings of one contender on one spec (seconds per call)."""

    spec: Spec
    contender: str
    samples: list[float]
    iterations: int
    info: dict[str, Any]
    reference: str | None = None
    #: Median over rounds of (this sample / the reference's sample of the same round): the samples
    #: of one round are seconds apart, so a machine that speeds up or slows down between rounds
    #: (a shared VM does) moves both and leaves the ratio alone.
    ratio: float | None = None
    #: median / the reference's median, for comparison with runs that were not interleaved.
    ratio_of_medians: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def name(self) -> str:
        return f"{self.spec.case}[{self.spec.param_id}-{self.contender}]"


def _calibrate(wl: Workload, min_time: float) -> int:
    """Calls per sample so that a sample lasts at least ``min_time`` (after one warm-up call)."""
    wl.call()
    t0 = time.perf_counter()
    wl.call()
    one = max(time.perf_counter() - t0, 1e-7)
    if one >= min_time:
        return 1
    # A second, longer probe: the first warm call can be slow (caches, allocator).
    k = max(1, int(min_time / one / 4))
    t0 = time.perf_counter()
    for _ in range(k):
        wl.call()
    one = max((time.perf_counter() - t0) / k, 1e-7)
    return max(1, math.ceil(min_time / one))


def _sample(wl: Workload, iterations: int) -> float:
    fn, sync = wl.fn, wl.sync
    t0 = time.perf_counter()
    for _ in range(iterations):
        fn()
    sync()
    return (time.perf_counter() - t0) / iterations


def reference_for(contender: str, present: Iterable[str]) -> str:
    """PyTorch on the same device when it ran; else deepcore's NumPy (CPU) or CuPy (GPU)."""
    present = set(present)
    if _device_of(contender) == "cuda":
        return "torch-cuda" if "torch-cuda" in present else "cupy"
    return "torch" if "torch" in present else "numpy"


def default_cooldown() -> float:
    """Seconds to pause before each sample: 0.25 when a thread pool has more than one thread.

    OpenBLAS's and OpenMP's idle workers spin for a while after each call before they sleep;
    on a machine with few cores the spinning pool of the contender timed just before steals
    the cores of the one timed next (seen here: PyTorch's step 1.9 ms right after NumPy's,
    1.0 ms after a pause). The pause lets every pool fall asleep, so each sample starts
    from the same state; two untimed calls then wake the pool being timed.
    """
    t = thread_info()
    multi = (t.get("blas_threads") or 1) > 1 or (t.get("torch_threads") or 1) > 1
    return 0.25 if multi else 0.0


def run(specs: Sequence[Spec], contenders: Sequence[str] | None = None, *, rounds: int = 5,
        min_time: float = 0.05, cooldown: float | None = None,
        log: Callable[[str], None] | None = None) -> list[Result]:
    """Time every available contender of every spec, interleaved (round-robin) within a spec,
    pausing ``cooldown`` seconds (default :func:`default_cooldown`) before each sample."""
    say = log or (lambda _m: None)
    pause = default_cooldown() if cooldown is None else cooldown
    wanted = list(contenders) if contenders else list(ALL_CONTENDERS)
    present = available_contenders()
    absent = {c: present.get(c, "unknown") for c in wanted if present.get(c) is not True}
    if absent:
        say("  skipped here: " + "; ".join(f"{c} ({why})" for c, why in absent.items()))
    results: list[Result] = []
    for spec in specs:
        workloads: dict[str, Workload] = {}
        for c in wanted:
            if c not in CASES[spec.case] or c in absent:
                continue
            try:
                workloads[c] = make_workload(spec.case, c, **spec.kwargs)
            except NotApplicable as exc:
                say(f"  {spec.case}[{spec.param_id}] {c}: skipped ({exc})")
        if not workloads:
            continue
        iters = {c: _calibrate(wl, min_time) for c, wl in workloads.items()}
        # Calls that wake the pools after a pause: two, or one when a call is long (an epoch).
        wake = {c: 2 if iters[c] > 1 else 1 for c in workloads}
        samples: dict[str, list[float]] = {c: [] for c in workloads}
        for _ in range(rounds):
            for c, wl in workloads.items():
                if pause:
                    time.sleep(pause)
                    for _ in range(wake[c]):
                        wl.call()
                samples[c].append(_sample(wl, iters[c]))
        spec_results = [Result(spec, c, samples[c], iters[c], workloads[c].info) for c in workloads]
        by_name = {r.contender: r for r in spec_results}
        for r in spec_results:
            ref = reference_for(r.contender, by_name)
            if ref in by_name:
                r.reference = ref
                ref_samples = by_name[ref].samples
                r.ratio = statistics.median(a / b for a, b in zip(r.samples, ref_samples, strict=True))
                r.ratio_of_medians = r.median / by_name[ref].median
        results.extend(spec_results)
        say(f"  {spec.case}[{spec.param_id}]: " + ", ".join(f"{r.contender} {_fmt_time(r.median)}"
                                                            for r in spec_results))
        workloads.clear()
    return results


# ------------------------------------------------------------------- output
def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_table(results: Sequence[Result]) -> str:
    """case, shape, contender, device, median per call, IQR, and the ratio to the reference
    (the median of the per-round ratios; see :attr:`Result.ratio`)."""
    header = ("case", "params", "contender", "device", "median", "iqr", "ratio", "vs")
    rows = [header]
    for r in results:
        q = _quartiles(r.samples)
        rows.append((r.spec.case, r.spec.param_id, r.contender, r.info.get("device", "?"), _fmt_time(r.median),
                     _fmt_time(q[2] - q[0]), "-" if r.ratio is None else f"{r.ratio:.2f}x", r.reference or "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(str(v).ljust(w) if j < 4 else str(v).rjust(w)
                               for j, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if not samples:
        return (math.nan, math.nan, math.nan)
    if len(samples) == 1:
        return (samples[0], samples[0], samples[0])
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return (q[0], q[1], q[2])


def _stats(samples: Sequence[float], iterations: int) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` block for per-call times ``samples``."""
    q1, med, q3 = _quartiles(samples)
    iqr = q3 - q1
    mean = statistics.fmean(samples)
    sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
    lo, hi = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    ld15 = min((s for s in samples if s >= lo), default=min(samples))
    hd15 = max((s for s in samples if s <= hi), default=max(samples))
    iqr_out = sum(1 for s in samples if s < lo or s > hi)
    sd_out = sum(1 for s in samples if abs(s - mean) > sd)
    return {"min": min(samples), "max": max(samples), "mean": mean, "stddev": sd, "rounds": len(samples),
            "median": med, "iqr": iqr, "q1": q1, "q3": q3, "iqr_outliers": iqr_out, "stddev_outliers": sd_out,
            "outliers": f"{sd_out};{iqr_out}", "ld15iqr": ld15, "hd15iqr": hd15,
            "ops": 1.0 / mean if mean > 0 else 0.0, "total": sum(samples) * iterations,
            "data": list(samples), "iterations": iterations}


def _machine_info(env: dict[str, Any]) -> dict[str, Any]:
    uname = platform.uname()
    return {"node": uname.node, "processor": uname.processor, "machine": uname.machine,
            "python_compiler": platform.python_compiler(), "python_implementation": platform.python_implementation(),
            "python_implementation_version": platform.python_version(), "python_version": platform.python_version(),
            "python_build": list(platform.python_build()), "release": uname.release, "system": uname.system,
            "cpu": {"brand_raw": env.get("cpu"), "count": env.get("cores"), "arch": uname.machine},
            "deepcore_env": env}


def to_json(results: Sequence[Result], env: dict[str, Any] | None = None, *, rounds: int | None = None,
            min_time: float | None = None, cooldown: float | None = None) -> dict[str, Any]:
    """pytest-benchmark's JSON layout (``pytest-benchmark compare`` reads it): machine_info,
    commit_info, benchmarks (group, name, fullname, params, extra_info, options, stats), datetime,
    version. ``extra_info`` holds backend, device, dtype, shape, versions, BLAS, threads, ratio."""
    import datetime

    env = env or environment()
    versions = {k: env[k] for k in ("deepcore", "numpy", "torch", "cupy") if k in env}
    benchmarks = []
    for r in results:
        extra = {**r.info, "versions": versions, "blas": env.get("blas"),
                 "threads": env.get("threads", {}).get("blas_threads"),
                 "torch_threads": env.get("threads", {}).get("torch_threads"),
                 "reference": r.reference, "ratio_to_reference": r.ratio,
                 "ratio_of_medians": r.ratio_of_medians, **r.extra}
        benchmarks.append({
            "group": f"{r.spec.case}[{r.spec.param_id}]",
            "name": r.name,
            "fullname": f"deepcore/bench.py::{r.name}",
            "params": {"contender": r.contender, **{k: v for k, v in r.spec.params}},
            "param": f"{r.spec.param_id}-{r.contender}",
            "extra_info": extra,
            "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": rounds,
                        "max_time": None, "min_time": min_time, "warmup": True, "cooldown": cooldown,
                        "interleaved": True},
            "stats": _stats(r.samples, r.iterations),
        })
    return {"machine_info": _machine_info(env), "commit_info": {"project": "deepcore"},
            "benchmarks": benchmarks, "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": _pytest_benchmark_version()}


def _pytest_benchmark_version() -> str:
    try:
        from importlib.metadata import version

        return version("pytest-benchmark")
    except Exception:
        return "5.1.0"


def save_results(path: str | os.PathLike[str], results: Sequence[Result], env: dict[str, Any] | None = None,
                 **options: Any) -> Path:
    from ._io import write_bytes_atomic

    data = to_json(results, env, **options)
    return write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON file written by ``deepcore bench --save`` or ``pytest --benchmark-json``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{p}: not a benchmark file (no 'benchmarks' list); expected the JSON of "
                         f"'deepcore bench --save' or 'pytest --benchmark-json'")
    for b in data["benchmarks"]:
        if not isinstance(b, dict) or "stats" not in b or "median" not in b.get("stats", {}):
            raise ValueError(f"{p}: a benchmark entry lacks stats.median")
    return data


def _key(b: dict[str, Any]) -> str:
    return str(b.get("name") or b.get("fullname"))


def compare(a: dict[str, Any], b: dict[str, Any], *, a_label: str = "A", b_label: str = "B") -> str:
    """A table of the benchmarks present in both: median in A, median in B, and B / A."""
    bench_a = {_key(x): x for x in a["benchmarks"]}
    bench_b = {_key(x): x for x in b["benchmarks"]}
    common = [k for k in bench_a if k in bench_b]
    header = ("benchmark", f"{a_label} median", f"{b_label} median", "B / A")
    rows = [header]
    for k in common:
        ma, mb = bench_a[k]["stats"]["median"], bench_b[k]["stats"]["median"]
        rows.append((k, _fmt_time(ma), _fmt_time(mb), f"{mb / ma:.2f}x" if ma else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = ["  ".join(str(v).ljust(w) if j == 0 else str(v).rjust(w)
                       for j, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    only_a = sorted(set(bench_a) - set(bench_b))
    only_b = sorted(set(bench_b) - set(bench_a))
    if only_a:
        lines.append(f"only in {a_label}: {', '.join(only_a)}")
    if only_b:
        lines.append(f"only in {b_label}: {', '.join(only_b)}")
    if not common:
        lines.append("no benchmark is in both files")
    return "\n".join(lines)


def _describe_env(env: dict[str, Any]) -> str:
    t = env.get("threads", {})
    blas = env.get("blas") or {}
    parts = [f"{env.get('cpu')} ({env.get('cores')} cores)", f"numpy {env.get('numpy')}",
             f"BLAS {blas.get('name')} {blas.get('version') or ''} {blas.get('architecture') or ''}".rstrip(),
             f"BLAS threads {t.get('blas_threads')}"]
    if "torch" in env:
        parts.append(f"torch {env['torch']} ({t.get('torch_threads')} threads)")
    if "cupy" in env:
        parts.append(f"cupy {env['cupy']} on {env.get('cuda_device')}")
    if env.get("openblas_env"):
        parts.append("env " + " ".join(f"{k}={v}" for k, v in env["openblas_env"].items()))
    return "; ".join(parts)


# ----------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to ``deepcore``'s subcommands."""
    p = subparsers.add_parser("bench", help="time deepcore's backends against each other and PyTorch",
                              description="Time a quick subset of the benchmark suite, interleaved, and print "
                                          "each contender's median and its ratio to the reference (PyTorch "
                                          "on the same device when installed, else NumPy/CuPy).")
    p.add_argument("--suite", choices=("tiny", "quick", "full"), default="quick",
                   help="which specs: quick (default, about a minute), full (the pytest suite's sweep), "
                        "tiny (seconds, for tests)")
    p.add_argument("--quick", dest="suite", action="store_const", const="tiny",
                   help="same as --suite tiny: tiny sizes, a smoke test")
    p.add_argument("--cases", help=f"comma-separated cases to keep ({', '.join(CASES)})")
    p.add_argument("--backends", "--contenders", dest="contenders",
                   help=f"comma-separated contenders ({', '.join(ALL_CONTENDERS)}); default: all present")
    p.add_argument("--threads", type=int, help="BLAS/OpenMP and torch threads (default: leave as is)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per contender (default 5)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed sample (default 0.05; 0.002 for --quick)")
    p.add_argument("--cooldown", type=float, default=None,
                   help="seconds to pause before each sample so idle thread pools fall asleep "
                        "(default 0.25 with more than one thread, else 0)")
    p.add_argument("--include-slow", action="store_true", help="keep specs marked slow (4096^3 matmul)")
    p.add_argument("--save", type=Path, metavar="FILE.json", help="write the results as pytest-benchmark JSON")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="compare two saved runs (B / A) instead of running")
    p.set_defaults(run=_cmd_bench)
    return p


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .cli import UsageError

    if args.compare:
        a_path, b_path = args.compare
        for p in (a_path, b_path):
            if not p.is_file():
                raise UsageError(f"--compare: no file at {p}")
        a, b = load_results(a_path), load_results(b_path)
        for label, d, p in (("A", a, a_path), ("B", b, b_path)):
            env = d.get("machine_info", {}).get("deepcore_env")
            print(f"{label}: {p}" + (f"  [{_describe_env(env)}]" if env else ""))
        print(compare(a, b))
        return 0
    if args.rounds < 1:
        raise UsageError(f"--rounds must be a positive integer, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {args.threads}")
    specs = suite(args.suite)
    cases = _split(args.cases)
    if cases:
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            raise UsageError(f"--cases: unknown {unknown}; cases: {', '.join(CASES)}")
        specs = [s for s in specs if s.case in cases]
    if not args.include_slow:
        specs = [s for s in specs if not s.slow]
    contenders = _split(args.contenders)
    if contenders:
        unknown = sorted(set(contenders) - set(ALL_CONTENDERS))
        if unknown:
            raise UsageError(f"--backends: unknown {unknown}; contenders: {', '.join(ALL_CONTENDERS)}")
    min_time = args.min_time if args.min_time is not None else (0.002 if args.suite == "tiny" else 0.05)
    if any(c.startswith("torch") for c in (contenders or ALL_CONTENDERS)):
        try:
            import torch  # noqa: F401  (imported before pinning threads, so torch's pool is pinned too)
        except ImportError:
            pass
    if args.cooldown is not None and args.cooldown < 0:
        raise UsageError(f"--cooldown must be >= 0, got {args.cooldown}")
    # Arguments are checked: only now change the process's thread pools (restored at the end).
    threads = set_threads(args.threads)
    try:
        return _run_and_report(args, specs, contenders, min_time, threads)
    finally:
        restore_threads()


def _run_and_report(args: Any, specs: Any, contenders: Any, min_time: float, threads: dict[str, Any]) -> int:
    env = environment()
    print(f"deepcore bench: {_describe_env(env)}")
    if threads["requested"] is not None and threads["method"] == "env":
        print("  note: threadpoolctl is not installed, so --threads could not pin NumPy's BLAS; set "
              "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before starting, or pip install threadpoolctl")
    cooldown = default_cooldown() if args.cooldown is None else args.cooldown
    if args.suite == "tiny" and args.cooldown is None:
        cooldown = 0.0
    print(f"  {len(specs)} specs, {args.rounds} interleaved rounds, >= {min_time:g} s per sample, "
          f"{cooldown:g} s pause before each; medians per call")
    results = run(specs, contenders, rounds=args.rounds, min_time=min_time, cooldown=cooldown, log=print)
    print()
    print(format_table(results))
    if args.save:
        path = save_results(args.save, results, env, rounds=args.rounds, min_time=min_time, cooldown=cooldown)
        print(f"wrote {path}")
    return 0
