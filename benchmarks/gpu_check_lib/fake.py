"""FAKE results with the real schema for --dry-run: they exercise every reporting path without a GPU."""

from __future__ import annotations

import platform
import random
import sys
from typing import Any

from .common import COPY_BYTES, FULL_CASES, QUICK_CASES, TOLERANCE, VARIANTS, case_bytes, median_of, now_utc, summarize


def fake_results(quick: bool) -> dict[str, Any]:
    """Made-up numbers with the real schema, to exercise every reporting path without a GPU."""
    rnd = random.Random(0)
    mode = "quick" if quick else "full"
    res: dict[str, Any] = {
        "fake": True, "mode": mode, "started": now_utc(), "argv": sys.argv[1:],
        "env": {"device": "FAKE (dry run, no GPU)", "python": platform.python_version()},
        "deps": {"array_api_compat": "FAKE"},
        "stage_errors": [{"stage": "FAKE stage error (dry run)", "error": "RuntimeError: FAKE", "traceback": ""}],
    }

    def samples(median: float, n: int) -> list[float]:
        return [median * (1 + rnd.uniform(-0.02, 0.05)) for _ in range(n)]

    res["copy_bandwidth"] = {"memcpy": summarize(samples(1.5, 20)), "kernel_copy": summarize(samples(1.6, 20)),
                             "bytes_per_copy": 2 * COPY_BYTES}
    res["copy_bandwidth"]["memcpy_gbps"] = 2 * COPY_BYTES / res["copy_bandwidth"]["memcpy"]["median_ms"] / 1e6
    res["copy_bandwidth"]["kernel_gbps"] = 2 * COPY_BYTES / res["copy_bandwidth"]["kernel_copy"]["median_ms"] / 1e6
    res["copy_bandwidth"]["gbps"] = max(res["copy_bandwidth"]["memcpy_gbps"], res["copy_bandwidth"]["kernel_gbps"])
    res["bf16"] = {"reachable": False, "reason": "FAKE: CuPy has no bfloat16 dtype"}
    res["cases"] = []
    for shape, dtype in (QUICK_CASES if quick else FULL_CASES):
        n, c = shape
        b = case_bytes(shape, dtype)
        fused_ms = b["fused_min"] / 2.7e9  # a made-up 2.7 TB/s
        case: dict[str, Any] = {"shape": list(shape), "dtype": dtype, "n_sets": 3, "timings": {}, "memory": {},
                                "correctness": {}, "errors": []}
        fused_here = dtype == "float32"
        if fused_here:
            case["timings"]["fused"] = summarize(samples(fused_ms, 30))
            if shape == (1000, 128256):
                case["timings"]["unfused"] = {"error": "FAKE: CUDARuntimeError (to exercise the ERR cell)"}
            else:
                case["timings"]["unfused"] = summarize(samples(fused_ms * 9.0, 10))
            case["memory"] = {"grad_bytes": b["grad"], "fused_peak_extra_bytes": b["grad"] + 24 * n}
        case["timings"]["torch"] = summarize(samples(fused_ms * 2.4, 20))
        for v in VARIANTS:
            if median_of(case["timings"].get(v)) is not None:
                case["correctness"][v] = {"grad_rel_err": 3e-7, "loss_rel_err": 1e-7, "finite": True,
                                          "tol": TOLERANCE[dtype], "ok": True}
        res["cases"].append(case)
    res["pytest"] = {"summary": "FAKE (dry run): no tests were run", "rc": 0, "timed_out": False, "skipped": None}
    return res
