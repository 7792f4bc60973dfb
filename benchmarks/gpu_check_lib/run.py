"""The real run: every stage in order, each guarded, partial JSON after every case, the report last."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .common import FULL_CASES, PYTEST_TIMEOUT_S, QUICK_CASES, T0, TIME_BUDGET_S, Recorder, err, log, now_utc
from .environment import ensure_deepcore, env_info
from .gpu import Gpu
from .measure import measure_copy_bandwidth, probe_bf16, run_case
from .pytest_stage import run_pytest
from .report import finish, write_json


def run_gpu(args: argparse.Namespace, cupy: Any, out_dir: Path) -> int:
    mode = "quick" if args.quick else "full"
    results: dict[str, Any] = {"fake": False, "mode": mode, "started": now_utc(), "argv": sys.argv[1:], "cases": []}
    try:
        _run_gpu_stages(args, cupy, out_dir, results)
    except Exception as exc:  # a bug outside the guarded stages must not lose the report
        results.setdefault("stage_errors", []).append(
            {"stage": "gpu_check itself", "error": err(exc), "traceback": traceback.format_exc()[-6000:]})
        log(f"[FAIL] gpu_check itself: {err(exc)}")
        traceback.print_exc()
    return finish(results, out_dir)


def _run_gpu_stages(args: argparse.Namespace, cupy: Any, out_dir: Path, results: dict[str, Any]) -> None:
    mode = results["mode"]
    rec = Recorder(results)
    deadline = T0 + TIME_BUDGET_S[mode]
    log(f"gpu_check: mode {mode}, results to {out_dir}")

    deepcore = rec.guard("a. deps (array-api-compat wheel, deepcore import)", ensure_deepcore, results)
    try:
        import torch
    except Exception as exc:
        torch = None
        log(f"torch not importable: {err(exc)}")
    env = rec.guard("b. environment", env_info, cupy, torch)
    results["env"] = env or {"device": "?"}
    if env:
        for k, v in env.items():
            log(f"  {k:<22} {v}")
    g = rec.guard("deepcore CuPy backend", Gpu, cupy, torch, deepcore, mode) if deepcore is not None else None
    if g is None:
        g = Gpu(cupy, torch, None, mode)  # torch columns and copy bandwidth can still be measured
    if g.torch is None:
        log("torch has no CUDA here: torch columns will be n/a")

    results["copy_bandwidth"] = rec.guard("c. copy bandwidth", measure_copy_bandwidth, g, args.quick) or {
        "error": "stage failed"}
    results["bf16"] = rec.guard("d. bf16 probe", probe_bf16, g) or {"reachable": False, "reason": "probe failed"}
    g.bf16_reachable = bool(results["bf16"].get("reachable"))
    if g.bf16_reachable:
        log(f"bf16: reachable through CuPy ({results['bf16']['reason']})")
    else:
        log(f"bf16: not reachable through CuPy ({results['bf16']['reason']})")
    g.free()

    for shape, dtype in (QUICK_CASES if args.quick else FULL_CASES):
        label = f"{shape[0]}x{shape[1]} {dtype}"
        if time.perf_counter() > deadline - 60:
            log(f"== {label}: SKIPPED, time budget spent")
            results["cases"].append({"shape": list(shape), "dtype": dtype, "timings": {}, "memory": {},
                                     "correctness": {}, "errors": ["skipped: time budget spent"]})
            continue
        log(f"== {label}")
        case = rec.guard(f"e. case {label}", run_case, g, rec, shape, dtype)
        if case is None:
            case = {"shape": list(shape), "dtype": dtype, "timings": {}, "memory": {}, "correctness": {},
                    "errors": ["case failed (see stage_errors)"]}
            try:
                g.free()
            except Exception:
                pass
        results["cases"].append(case)
        write_json_quietly(results, out_dir)

    if args.no_tests:
        results["pytest"] = {"skipped": "not run (--no-tests)"}
    else:
        lo, hi = PYTEST_TIMEOUT_S[mode]
        left = TIME_BUDGET_S[mode] + 20 - (time.perf_counter() - T0)
        results["pytest"] = rec.guard("f. pytest GPU tests", run_pytest, results, out_dir,
                                      min(hi, max(lo, left)), args.quick) or {"summary": "stage failed", "rc": None}


def write_json_quietly(results: dict[str, Any], out_dir: Path) -> None:
    """Partial results on disk after every case, in case the run is killed."""
    try:
        write_json(results, out_dir)
    except Exception as exc:
        log(f"(could not write partial JSON: {exc})")
