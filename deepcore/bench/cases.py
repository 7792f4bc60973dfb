"""``make_workload(case, contender, **params)``: the one entry from a case's name to its workload."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backend import cpu_jit
from . import cnn, mlp, workloads
from .contenders import CASES, NotApplicable, contender_status, device_of, library_of
from .workloads import Workload

#: The cases whose workload takes optimizer steps.
_OPTIMIZER_CASES = ("mlp_step", "cnn_step", "cnn_epoch", "epoch")


def steps_numpy_optimizer(case: str, contender: str) -> bool:
    """Whether ``contender``'s workload for ``case`` takes deepcore's optimizer steps on the NumPy
    backend (whose large updates run as numba's loops where installed)."""
    return case in _OPTIMIZER_CASES and library_of(contender) == "numpy" and contender != "numpy-plain"


def preload_jit(pairs: Iterable[tuple[str, str]]) -> None:
    """Load numba's loops now (``cpu_jit.preload``) if any ``(case, contender)`` steps deepcore's
    optimizer on NumPy: a benchmark times the steady state of a long run, from its first timed
    step, rather than NumPy's forms until the updates would have repaid the load. Call it before
    pinning the thread pools: numba's compile loads SciPy's OpenBLAS, another pool to pin."""
    if any(steps_numpy_optimizer(case, contender) for case, contender in pairs):
        cpu_jit.preload()


def make_workload(case: str, contender: str, **params: Any) -> Workload:
    """Set up ``contender`` for ``case`` with ``params``; raises :class:`NotApplicable` when it
    cannot run here. ``info`` records backend, device, dtype and shape."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    if contender not in CASES[case]:
        raise NotApplicable(f"{contender} does not run {case}")
    status = contender_status(contender)
    if status is not True:
        raise NotApplicable(str(status))
    preload_jit([(case, contender)])  # (at once where the caller has preloaded)
    if case == "matmul":
        wl = workloads.matmul(contender, **params)
    elif case in ("softmax", "log_softmax"):
        wl = workloads.softmax(contender, log=case == "log_softmax", **params)
    elif case == "softmax_ce":
        wl = workloads.softmax_ce(contender, **params)
    elif case == "mlp_step":
        wl = mlp.mlp_step(contender, **params)
    elif case == "mlp_gemms":
        wl = mlp.mlp_gemms(contender, **params)
    elif case in ("cnn_step", "conv", "conv_gemms", "cnn_epoch"):
        wl = getattr(cnn, case)(contender, **params)
    else:
        wl = mlp.epoch(contender, **params)
    wl.info = {"case": case, "contender": contender, "backend": library_of(contender),
               "device": device_of(contender), "dtype": "float32", **wl.info}
    return wl


