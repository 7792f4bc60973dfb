"""Timing: every contender of a spec set up first, then interleaved rounds of samples, each after
a pause that lets idle thread pools fall asleep; medians and same-round ratios to a reference."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cases import make_workload
from .contenders import ALL_CONTENDERS, CASES, NotApplicable, available_contenders, device_of
from .suites import Spec
from .threads import thread_info
from .workloads import Workload


def format_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


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
    def gflops(self) -> float | None:
        """``info["flops"]`` (a workload that counts them) per median call, in GFLOP/s."""
        flops = self.info.get("flops")
        med = self.median
        return flops / med / 1e9 if flops and med > 0 else None

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
    if device_of(contender) == "cuda":
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
    report = log or (lambda _m: None)
    pause = default_cooldown() if cooldown is None else cooldown
    wanted = list(contenders) if contenders else list(ALL_CONTENDERS)
    present = available_contenders()
    absent = {c: present.get(c, "unknown") for c in wanted if present.get(c) is not True}
    if absent:
        report("  skipped here: " + "; ".join(f"{c} ({why})" for c, why in absent.items()))
    results: list[Result] = []
    for spec in specs:
        workloads: dict[str, Workload] = {}
        for c in wanted:
            if c not in CASES[spec.case] or c in absent:
                continue
            try:
                workloads[c] = make_workload(spec.case, c, **spec.kwargs)
            except NotApplicable as exc:
                report(f"  {spec.case}[{spec.param_id}] {c}: skipped ({exc})")
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
        report(f"  {spec.case}[{spec.param_id}]: " + ", ".join(f"{r.contender} {format_time(r.median)}"
                                                               for r in spec_results))
        workloads.clear()
    return results

