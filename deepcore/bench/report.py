"""Results out and back in: the table printed by ``deepcore bench``, pytest-benchmark's JSON
layout (so ``pytest-benchmark compare`` reads our files), and the comparison of two saved runs."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .environment import environment
from .runner import Result, format_time


def format_table(results: Sequence[Result]) -> str:
    """case, shape, contender, device, median per call, IQR, GFLOP/s (where the workload counts its
    FLOPs), and the ratio to the reference (the median of the per-round ratios; see :attr:`Result.ratio`)."""
    header = ("case", "params", "contender", "device", "median", "iqr", "GFLOP/s", "ratio", "vs")
    rows = [header]
    for r in results:
        q = _quartiles(r.samples)
        rows.append((r.spec.case, r.spec.param_id, r.contender, r.info.get("device", "?"), format_time(r.median),
                     format_time(q[2] - q[0]), "-" if r.gflops is None else f"{r.gflops:.1f}",
                     "-" if r.ratio is None else f"{r.ratio:.2f}x", r.reference or "-"))
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
                 "ratio_of_medians": r.ratio_of_medians, "gflops": r.gflops, **r.extra}
        benchmarks.append({
            "group": f"{r.spec.case}[{r.spec.param_id}]",
            "name": r.name,
            "fullname": f"deepcore/bench::{r.name}",
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
    from .._io import write_bytes_atomic

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
        rows.append((k, format_time(ma), format_time(mb), f"{mb / ma:.2f}x" if ma else "-"))
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

