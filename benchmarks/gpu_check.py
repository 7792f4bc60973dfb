#!/usr/bin/env python3
"""One-shot GPU check of deepcore's fused softmax cross-entropy: tests, speed, memory, accuracy.

    python benchmarks/gpu_check.py [--out DIR] [--quick] [--no-tests] [--dry-run]

Written to be run ONCE, unattended, on a lent H100/H200 that has CUDA, CuPy,
NumPy, PyTorch and pytest but no package index: it finishes in a few minutes,
keeps going when one stage fails (the error is printed, recorded and marked
FAIL), writes everything to ``DIR/gpu_check.json`` (DIR: ``--out``, else
``$OUT``, else ``./gpu_check_out``) and prints a short table LAST, followed by
PASS/FAIL against the issue's targets.

Stages, in order:
  a. deepcore made importable with no index (array-api-compat from the wheel in
     benchmarks/wheels/, the repository root put on sys.path);
  b. device, driver, runtime and library versions;
  c. copy bandwidth: a 2 GiB device-to-device copy, bytes read + written, median
     of >= 20 event-timed runs (cudaMemcpy and a CuPy copy kernel; the faster is
     the ceiling);
  d. can bfloat16 reach the fused kernel through CuPy at all?
  e. per shape and dtype: deepcore's fused kernel (out of place and in place),
     deepcore's unfused reference path (``Backend.softmax_cross_entropy`` called
     on the CuPy backend) and PyTorch eager ``F.cross_entropy`` + ``backward()``,
     all on the same data; each result checked once against a float64 reference
     computed on the GPU; then timed with CUDA events (warm-up first, median and
     IQR, rotating among >= 3 input sets, more for small shapes so the whole
     rotation is >= 4x the L2 cache); then the peak extra memory of the fused
     call, measured in a fresh CuPy memory pool;
  f. the GPU tests (``pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu``) in a subprocess with a
     timeout. They run last so they cannot disturb the timings.

Without a usable GPU it prints why and exits 2 at once. ``--dry-run`` needs no
GPU: it runs the reporting code (table, targets, JSON) on FAKE numbers, each
output labelled FAKE. Exit status: 0 all targets pass, 1 something failed,
2 no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
WHEEL_GLOB = str(REPO / "benchmarks" / "wheels" / "array_api_compat-*.whl")

HEADLINE = (8192, 32768)
FULL_CASES: list[tuple[tuple[int, int], str]] = [
    ((8192, 32768), "float32"),
    ((8192, 32768), "bfloat16"),
    ((4096, 32000), "float32"),
    ((1000, 128256), "float32"),
    ((65536, 10), "float32"),
]
QUICK_CASES = FULL_CASES[:1]
ITEMSIZE = {"float32": 4, "bfloat16": 2}
LABEL_BYTES = 8  # int64 labels

# The issue's targets.
TARGET_PCT_COPY = 85.0
TARGET_SPEEDUP_TORCH = 3.0
# Relative error vs the float64 reference: ||out - ref|| / ||ref|| for the gradient, |.|/|.| for the loss.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
# "Peak extra" allowance for the O(N) per-row scratch of the fused call (loss_row,
# weight_row, label weights, the mean's denominator) and reduction temporaries.
ROW_SLACK_BYTES_PER_ROW = 32
ROW_SLACK_FIXED = 2 << 20

COPY_BYTES = 2 << 30  # 2 GiB buffer: 4 GiB moved per copy (read + write)
TIME_BUDGET_S = {"full": 270.0, "quick": 150.0}  # benchmarks + tests, whole script under 5 minutes
PYTEST_TIMEOUT_S = {"full": (60.0, 200.0), "quick": (45.0, 120.0)}  # (min, max)

VARIANTS = ("fused", "fused_inplace", "unfused", "torch")
_T0 = time.perf_counter()


def log(msg: str = "") -> None:
    print(msg, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Recorder:
    """Runs stages so that one failure never loses the rest: errors are printed and kept."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        results.setdefault("stage_errors", [])

    def guard(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every stage must be allowed to fail alone
            tb = traceback.format_exc()
            log(f"[FAIL] {stage}: {_err(exc)}")
            for line in tb.strip().splitlines()[-4:-1]:
                log(f"       {line}")
            self.results["stage_errors"].append({"stage": stage, "error": _err(exc), "traceback": tb[-6000:]})
            return None


# --------------------------------------------------------------------- statistics
def summarize(samples_ms: list[float]) -> dict[str, Any]:
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        raise ValueError("no samples")
    med = statistics.median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = med
    return {"n": len(xs), "median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": xs[0], "max_ms": xs[-1], "samples_ms": [round(x, 6) for x in samples_ms]}


def _median(entry: Any) -> float | None:
    if isinstance(entry, dict) and isinstance(entry.get("median_ms"), (int, float)) and entry["median_ms"] > 0:
        return float(entry["median_ms"])
    return None


def case_bytes(shape: list[int] | tuple[int, int], dtype: str) -> dict[str, int]:
    n, c = shape
    logits = n * c * ITEMSIZE[dtype]
    b = {"logits": logits, "grad": logits, "labels": n * LABEL_BYTES}
    b["fused_min"] = b["logits"] + b["grad"] + b["labels"]  # read logits once, write grad once, read labels
    return b


def row_slack(n_rows: int) -> int:
    return ROW_SLACK_BYTES_PER_ROW * n_rows + ROW_SLACK_FIXED


def derive(case: dict[str, Any], copy_gbps: float | None) -> None:
    """Bandwidth, %-of-copy and speed-ups from the medians (fills case['bytes'] and case['derived'])."""
    b = case_bytes(case["shape"], case["dtype"])
    case["bytes"] = b
    t = case.get("timings", {})
    d: dict[str, Any] = {}
    for key, name in (("fused", "fused"), ("fused_inplace", "inplace")):
        ms = _median(t.get(key))
        if ms is not None:
            d[f"{name}_gbps"] = b["fused_min"] / ms / 1e6  # bytes / (ms * 1e-3) / 1e9
            if copy_gbps:
                d[f"{name}_pct_copy"] = 100.0 * d[f"{name}_gbps"] / copy_gbps
    fused = _median(t.get("fused"))
    for other in ("unfused", "torch"):
        ms = _median(t.get(other))
        if fused is not None and ms is not None:
            d[f"speedup_vs_{other}"] = ms / fused
    case["derived"] = d


# --------------------------------------------------------------------- targets
def _target(name: str, status: str, detail: str) -> dict[str, str]:
    return {"target": name, "status": status, "detail": detail}


def evaluate(results: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    copy = results.get("copy_bandwidth") or {}
    copy_gbps = copy.get("gbps")
    cases = results.get("cases", [])
    bf16 = results.get("bf16") or {}
    hs = f"{HEADLINE[0]}x{HEADLINE[1]}"

    # Bandwidth and speed-up at the headline shape, float32 and (where reachable) bfloat16.
    for dtype in ("float32", "bfloat16"):
        case = next((c for c in cases if tuple(c["shape"]) == HEADLINE and c["dtype"] == dtype), None)
        bw_name = f"fused >= {TARGET_PCT_COPY:.0f}% of copy bandwidth @{hs} {dtype}"
        sp_name = f"fused >= {TARGET_SPEEDUP_TORCH:.0f}x faster than torch eager @{hs} {dtype}"
        if dtype == "bfloat16" and not bf16.get("reachable"):
            why = "bf16: not reachable through CuPy" if bf16 else "bf16 not probed"
            out.append(_target(bw_name, "N/A", why))
            out.append(_target(sp_name, "N/A", why))
            continue
        if case is None:
            status = "N/A" if results.get("mode") == "quick" and dtype == "bfloat16" else "FAIL"
            why = "not run in --quick" if status == "N/A" else "not measured"
            out.append(_target(bw_name, status, why))
            out.append(_target(sp_name, status, why))
            continue
        d = case.get("derived", {})
        pct = d.get("fused_pct_copy")
        if pct is None:
            why = "no copy bandwidth" if not copy_gbps else "fused kernel not timed"
            out.append(_target(bw_name, "FAIL", why))
        else:
            out.append(_target(bw_name, "PASS" if pct >= TARGET_PCT_COPY else "FAIL",
                               f"{pct:.1f}% ({d['fused_gbps']:.0f} of {copy_gbps:.0f} GB/s)"))
        sp = d.get("speedup_vs_torch")
        if sp is None:
            out.append(_target(sp_name, "FAIL", "fused or torch not timed"))
        else:
            out.append(_target(sp_name, "PASS" if sp >= TARGET_SPEEDUP_TORCH else "FAIL", f"{sp:.2f}x"))

    # Memory: every case where it was measured.
    for key, name, limit_of in (
        ("fused_peak_extra_bytes", "peak extra memory out-of-place <= one gradient buffer (+O(N) rows)",
         lambda c: c["bytes"]["grad"] + row_slack(c["shape"][0])),
        ("fused_inplace_peak_extra_bytes", "peak extra memory in-place ~0 (<= O(N) rows)",
         lambda c: row_slack(c["shape"][0])),
    ):
        measured = [(c, c.get("memory", {}).get(key)) for c in cases]
        measured = [(c, v) for c, v in measured if isinstance(v, (int, float))]
        if not measured:
            out.append(_target(name, "FAIL", "not measured"))
            continue
        bad = [f"{c['shape'][0]}x{c['shape'][1]} {c['dtype']}: {v / 2**20:.1f} > {limit_of(c) / 2**20:.1f} MiB"
               for c, v in measured if v > limit_of(c)]
        worst = max(v / max(1, limit_of(c)) for c, v in measured)
        detail = "; ".join(bad) if bad else f"{len(measured)} case(s), worst {100 * worst:.0f}% of allowance"
        out.append(_target(name, "FAIL" if bad else "PASS", detail))

    # Correctness of every timed result.
    missing, wrong, checked = [], [], 0
    for c in cases:
        label = f"{c['shape'][0]}x{c['shape'][1]} {c['dtype']}"
        for v in VARIANTS:
            if _median(c.get("timings", {}).get(v)) is None:
                continue
            chk = c.get("correctness", {}).get(v)
            if not isinstance(chk, dict) or "ok" not in chk:
                missing.append(f"{label} {v}")
            elif not chk["ok"]:
                wrong.append(f"{label} {v} (grad {chk.get('grad_rel_err')}, loss {chk.get('loss_rel_err')})")
            else:
                checked += 1
    name = "every timed result matches the float64 reference"
    if wrong or missing:
        out.append(_target(name, "FAIL", "; ".join(wrong + [f"{m}: unchecked" for m in missing])))
    else:
        out.append(_target(name, "PASS" if checked else "FAIL", f"{checked} result(s) checked"))

    # The GPU test suite.
    pt = results.get("pytest")
    name = "pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu"
    if not pt:
        out.append(_target(name, "FAIL", "not run"))
    elif pt.get("skipped"):
        out.append(_target(name, "N/A", pt["skipped"]))
    else:
        summary = pt.get("summary") or ""
        ok = pt.get("rc") == 0 and not pt.get("timed_out") and re.search(r"\d+ passed", summary) \
            and not re.search(r"\d+ (failed|errors?)\b", summary)
        out.append(_target(name, "PASS" if ok else "FAIL",
                           ("TIMED OUT; " if pt.get("timed_out") else "") + f"rc={pt.get('rc')}: {summary or '?'}"))

    errs = results.get("stage_errors", [])
    out.append(_target("no stage raised an error", "FAIL" if errs else "PASS",
                       "; ".join(e["stage"] for e in errs) if errs else "all stages ran"))
    return out


# --------------------------------------------------------------------- report
_COLS = (("shape", 13, "<"), ("dtype", 8, "<"), ("fused ms", 9, ">"), ("inpl ms", 8, ">"),
         ("unfused ms", 10, ">"), ("torch ms", 9, ">"), ("fused GB/s", 10, ">"), ("%copy", 6, ">"),
         ("x unfused", 9, ">"), ("x torch", 7, ">"), ("peak MiB oop/inpl", 17, ">"))


def _cell_ms(case: dict[str, Any], key: str) -> str:
    entry = case.get("timings", {}).get(key)
    ms = _median(entry)
    if ms is not None:
        return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"
    if isinstance(entry, dict) and entry.get("error"):
        return "ERR"
    return "n/a"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def format_table(results: dict[str, Any]) -> str:
    fake = results.get("fake")
    lines = []
    head = " ".join(f"{name:{align}{width}}" for name, width, align in _COLS)
    title = "FAKE NUMBERS (--dry-run, no GPU used)" if fake else f"device: {results.get('env', {}).get('device', '?')}"
    lines.append(f"== fused softmax-cross-entropy fwd+bwd, median of event-timed runs -- {title}")
    lines.append(head)
    lines.append("-" * len(head))
    for c in results.get("cases", []):
        d = c.get("derived", {})
        mem = c.get("memory", {})
        oop, inp = mem.get("fused_peak_extra_bytes"), mem.get("fused_inplace_peak_extra_bytes")
        peak = "/".join(_num(v / 2**20 if v is not None else None, ".1f") for v in (oop, inp))
        cells = [f"{c['shape'][0]}x{c['shape'][1]}", c["dtype"], _cell_ms(c, "fused"), _cell_ms(c, "fused_inplace"),
                 _cell_ms(c, "unfused"), _cell_ms(c, "torch"), _num(d.get("fused_gbps"), ".0f"),
                 _num(d.get("fused_pct_copy"), ".1f"), _num(d.get("speedup_vs_unfused"), ".2f"),
                 _num(d.get("speedup_vs_torch"), ".2f"), peak]
        lines.append(" ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLS)))
    return "\n".join(lines)


def format_report(results: dict[str, Any]) -> str:
    fake = results.get("fake")
    tag = "FAKE " if fake else ""
    lines = []
    if fake:
        lines.append("*** FAKE DATA (--dry-run): nothing ran on a GPU; every number below is made up ***")
    copy = results.get("copy_bandwidth") or {}
    if copy.get("gbps"):
        lines.append(f"{tag}copy bandwidth: {copy['gbps']:.0f} GB/s (cudaMemcpy D2D"
                     f" {_num(copy.get('memcpy_gbps'), '.0f')}, copy kernel {_num(copy.get('kernel_gbps'), '.0f')};"
                     " bytes read + written)")
    else:
        lines.append(f"{tag}copy bandwidth: not measured ({copy.get('error', 'stage failed')})")
    bf16 = results.get("bf16") or {}
    if bf16 and not bf16.get("reachable"):
        lines.append(f"bf16: not reachable through CuPy ({bf16.get('reason', '?')}); torch bf16 timed only")
    pt = results.get("pytest") or {}
    if pt:
        lines.append(f"{tag}pytest: {pt.get('skipped') or pt.get('summary') or '?'}")
    lines.append("GB/s = (logits read once + grad written once + int64 labels) / median time;"
                 " x = median speed-up of the fused kernel; peak = extra device memory of one fused call")
    lines.append(format_table(results))
    targets = results.get("targets", [])
    lines.append(f"== {tag}targets")
    for t in targets:
        lines.append(f"  {tag}{t['status']:<4}  {t['target']}: {t['detail']}")
    n_fail = sum(t["status"] == "FAIL" for t in targets)
    verdict = "FAIL" if n_fail else "PASS"
    lines.append(f"{tag}OVERALL: {verdict} ({n_fail} of {len(targets)} targets failed;"
                 f" mode {results.get('mode')}; {results.get('elapsed_s', 0):.0f} s)")
    if fake:
        lines.append("*** FAKE DATA (--dry-run): the table above tests the reporting code; it is no measurement ***")
    return "\n".join(lines)


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_check_FAKE.json" if results.get("fake") else "gpu_check.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str, allow_nan=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def finish(results: dict[str, Any], out_dir: Path) -> int:
    results["elapsed_s"] = time.perf_counter() - _T0
    for c in results.get("cases", []):
        try:
            derive(c, (results.get("copy_bandwidth") or {}).get("gbps"))
        except Exception as exc:  # noqa: BLE001
            c.setdefault("errors", []).append(f"derive: {_err(exc)}")
    results["targets"] = evaluate(results)
    try:
        path = write_json(results, out_dir)
        saved = f"JSON written to {path}"
    except Exception as exc:  # noqa: BLE001 - the table still has to be printed
        saved = f"[FAIL] could not write JSON to {out_dir}: {_err(exc)}"
    log("")
    log(saved)
    log(format_report(results))  # LAST: the reply's output tail carries it
    return 1 if any(t["status"] == "FAIL" for t in results["targets"]) else 0


# --------------------------------------------------------------------- dry run
def fake_results(quick: bool) -> dict[str, Any]:
    """Made-up numbers with the real schema, to exercise every reporting path without a GPU."""
    rnd = random.Random(0)
    mode = "quick" if quick else "full"
    res: dict[str, Any] = {
        "fake": True, "mode": mode, "started": _now(), "argv": sys.argv[1:],
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
            case["timings"]["fused_inplace"] = summarize(samples(fused_ms * 0.98, 30))
            if shape == (1000, 128256):
                case["timings"]["unfused"] = {"error": "FAKE: CUDARuntimeError (to exercise the ERR cell)"}
            else:
                case["timings"]["unfused"] = summarize(samples(fused_ms * 9.0, 10))
            case["memory"] = {"grad_bytes": b["grad"], "fused_peak_extra_bytes": b["grad"] + 24 * n,
                              "fused_inplace_peak_extra_bytes": 24 * n}
        case["timings"]["torch"] = summarize(samples(fused_ms * 2.4, 20))
        for v in VARIANTS:
            if _median(case["timings"].get(v)) is not None:
                case["correctness"][v] = {"grad_rel_err": 3e-7, "loss_rel_err": 1e-7, "finite": True,
                                          "tol": TOLERANCE[dtype], "ok": True}
        res["cases"].append(case)
    res["pytest"] = {"summary": "FAKE (dry run): no tests were run", "rc": 0, "timed_out": False, "skipped": None}
    return res


# --------------------------------------------------------------------- GPU detection and setup
def detect_gpu() -> tuple[Any, str | None]:
    """(cupy, None) when CuPy sees a CUDA device, else (None, why not). Imports nothing else."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        return None, f"CuPy is not importable ({_err(exc)})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return None, f"CuPy {cupy.__version__} is installed but CUDA is not usable ({_err(exc)})"
    if count < 1:
        return None, f"CuPy {cupy.__version__} sees no CUDA device"
    return cupy, None


def ensure_deepcore(results: dict[str, Any]) -> Any:
    """Stage a: array-api-compat from the shipped wheel when missing, the repo on sys.path, import deepcore."""
    deps: dict[str, Any] = {}
    results["deps"] = deps
    extra_path: list[str] = []
    try:
        import array_api_compat  # noqa: F401

        deps["array_api_compat"] = f"already installed ({array_api_compat.__version__})"
    except ImportError:
        wheels = sorted(glob.glob(WHEEL_GLOB))
        if not wheels:
            raise RuntimeError(f"array_api_compat is missing and no wheel matches {WHEEL_GLOB}") from None
        whl = wheels[-1]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", "-q", whl]
        log(f"installing {os.path.basename(whl)}: {' '.join(cmd[1:])}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            deps["pip"] = {"rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:]}
        except Exception as exc:  # noqa: BLE001
            deps["pip"] = {"error": _err(exc)}
        importlib.invalidate_caches()
        try:
            import array_api_compat  # noqa: F401

            deps["array_api_compat"] = f"pip-installed from {whl} ({array_api_compat.__version__})"
        except ImportError:
            # A pure-Python wheel is a zip that zipimport can read directly.
            sys.path.insert(0, whl)
            extra_path.append(whl)
            importlib.invalidate_caches()
            import array_api_compat  # noqa: F401

            deps["array_api_compat"] = f"imported from the wheel file {whl} ({array_api_compat.__version__})"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    extra_path.append(str(REPO))
    # The pytest subprocess needs the same imports.
    os.environ["PYTHONPATH"] = os.pathsep.join(extra_path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import deepcore

    deps["deepcore"] = f"{deepcore.__version__} from {Path(deepcore.__file__).parent}"
    log(f"array_api_compat: {deps['array_api_compat']}")
    log(f"deepcore: {deps['deepcore']}")
    return deepcore


def env_info(cupy: Any, torch: Any) -> dict[str, Any]:
    import numpy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(cupy.cuda.Device().id)
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    free, total = rt.memGetInfo()
    env: dict[str, Any] = {
        "device": name,
        "compute_capability": f"{props.get('major')}.{props.get('minor')}",
        "sm_count": props.get("multiProcessorCount"),
        "l2_bytes": props.get("l2CacheSize"),
        "memory_total_bytes": total,
        "memory_free_bytes": free,
        "cuda_runtime_version": rt.runtimeGetVersion(),
        "cuda_driver_version": rt.driverGetVersion(),
        "cupy": cupy.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "torch_cuda_available": bool(torch is not None and torch.cuda.is_available()),
    }
    try:
        env["nvrtc_version"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as exc:  # noqa: BLE001
        env["nvrtc_version"] = _err(exc)
    try:  # read-only query; never changes the card's settings
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,"
                            "power.draw,utilization.gpu", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = _err(exc)
    return env


# --------------------------------------------------------------------- GPU measurement helpers
class Gpu:
    """What the GPU stages share: libraries, the fused function, the CuPy backend, timing helpers."""

    def __init__(self, cupy: Any, torch: Any, deepcore: Any, mode: str) -> None:
        self.cp = cupy
        self.torch = torch if (torch is not None and torch.cuda.is_available()) else None
        self.dc = deepcore
        self.mode = mode
        self.fsce = None
        self.cupy_backend = None
        self.base_sce = None
        if deepcore is not None:
            from deepcore.backend.base import Backend
            from deepcore.backend.cuda_kernels import fused_softmax_cross_entropy

            self.fsce = fused_softmax_cross_entropy
            self.cupy_backend = deepcore.get_backend("cupy")
            self.base_sce = Backend.softmax_cross_entropy  # the unfused array-API reference, unbound
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.l2_bytes = int(props.get("l2CacheSize") or (50 << 20))
        self.bf16_reachable = False

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()
        if self.torch is not None:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        self.sync()
        self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def time_cupy(self, call: Callable[[int], Any], n_sets: int, reps: int,
                  after: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Event-timed runs on the current stream, rotating over input sets; `after` runs between the events."""
        cp = self.cp
        starts = [cp.cuda.Event() for _ in range(reps)]
        ends = [cp.cuda.Event() for _ in range(reps)]
        for i in range(reps):
            k = i % n_sets
            starts[i].record()
            call(k)
            ends[i].record()
            if after is not None:
                after(k)
        ends[-1].synchronize()
        return summarize([cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)])

    def time_torch(self, call: Callable[[int], Any], n_sets: int, reps: int) -> dict[str, Any]:
        torch = self.torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            call(i % n_sets)
            ends[i].record()
        ends[-1].synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])

    def reps(self, est_ms: float, kind: str) -> int:
        if self.mode == "quick":
            return 5
        lo, hi, budget_ms = {"fused": (30, 300, 600.0), "unfused": (10, 60, 800.0), "torch": (20, 200, 600.0)}[kind]
        return int(min(hi, max(lo, budget_ms / max(est_ms, 1e-3))))

    def estimate_ms(self, call: Callable[[int], Any], after: Callable[[int], None] | None = None) -> float:
        self.sync()
        t = time.perf_counter()
        call(0)
        self.sync()
        ms = (time.perf_counter() - t) * 1e3
        if after is not None:
            after(0)
            self.sync()
        return ms

    # ---- conversions used by the correctness check
    def is_torch(self, a: Any) -> bool:
        return self.torch is not None and isinstance(a, self.torch.Tensor)

    def as_f64(self, a: Any) -> Any:
        cp = self.cp
        if self.is_torch(a):
            return cp.from_dlpack(a.detach().to(self.torch.float64).contiguous())
        try:
            return a.astype(cp.float64)
        except Exception:  # noqa: BLE001 - e.g. bfloat16 without CuPy kernels: go through torch
            if self.torch is None:
                raise
            return cp.from_dlpack(self.torch.from_dlpack(a).to(self.torch.float64))

    def scalar(self, a: Any) -> float:
        if self.is_torch(a):
            return float(a.detach().double().item())
        return float(self.as_f64(a.reshape(1))[0])

    def clone(self, a: Any) -> Any:
        cp = self.cp
        try:
            b = cp.empty(a.shape, dtype=a.dtype)
        except Exception:  # noqa: BLE001
            return cp.from_dlpack(self.torch.from_dlpack(a).clone())
        b.data.copy_from_device_async(a.data, a.nbytes)
        return b

    def poison_pool(self, nbytes: int) -> None:
        """Leave a freed all-0xFF block (NaN in float32 and bfloat16) where the next allocation of this size lands.

        The pool is emptied first, so no cached block (say, a correct gradient from the warm-up) can serve
        the allocation instead, and the block is 64 MiB larger than asked, so the call's small scratch
        allocations, if carved from it, still leave room for the gradient inside the poison."""
        pool = self.cp.get_default_memory_pool()
        self.sync()
        pool.free_all_blocks()
        p = self.cp.full((nbytes + (64 << 20),), 0xFF, dtype=self.cp.uint8)
        del p

    def compare(self, src: Any, labels: Any, cands: dict[str, tuple[Any, Any]], dtype: str) -> dict[str, Any]:
        """Each candidate (loss, grad) against a float64 reference of mean cross-entropy, in row chunks on the GPU."""
        cp = self.cp
        n, c = (int(d) for d in src.shape)
        rows = max(1, (256 << 20) // (8 * c))
        acc = {k: [0.0, 0.0, True] for k in cands}
        loss_sum = 0.0
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            s = self.as_f64(src[r0:r1])
            y = labels[r0:r1]
            m = s.max(axis=1, keepdims=True)
            e = cp.exp(s - m)
            se = e.sum(axis=1, keepdims=True)
            lse = m[:, 0] + cp.log(se[:, 0])
            idx = cp.arange(r1 - r0)
            loss_sum += float((lse - s[idx, y]).sum())
            g = e / se
            g[idx, y] -= 1.0
            g /= n
            ref2 = float((g * g).sum())
            for k, (_, grad) in cands.items():
                diff = self.as_f64(grad[r0:r1]) - g
                acc[k][0] += float((diff * diff).sum())
                acc[k][1] += ref2
                acc[k][2] = acc[k][2] and bool(cp.isfinite(diff).all())
                del diff
            del s, e, g, m, se, lse
        ref_loss = loss_sum / n
        tol = TOLERANCE[dtype]
        out: dict[str, Any] = {}
        for k, (loss, _) in cands.items():
            num2, den2, finite = acc[k]
            lv = self.scalar(loss)
            grad_rel = math.sqrt(num2 / den2) if den2 > 0 else float("inf")
            loss_rel = abs(lv - ref_loss) / abs(ref_loss) if ref_loss else abs(lv)
            finite = finite and math.isfinite(lv)
            ok = bool(finite and grad_rel <= tol and loss_rel <= tol)
            out[k] = {"grad_rel_err": grad_rel, "loss_rel_err": loss_rel, "loss": lv, "ref_loss": ref_loss,
                      "finite": finite, "tol": tol, "ok": ok}
            log(f"    check {k:<14} grad rel err {grad_rel:.2e}  loss rel err {loss_rel:.2e}"
                f"  (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
        return out

    def cupy_peak(self, fn: Callable[[], Any]) -> int:
        """Bytes a call draws from a fresh CuPy pool: its peak extra device memory (pool blocks are never
        released inside the call, so the pool's size is the high-water mark of its allocations)."""
        cp = self.cp
        self.sync()
        pool = cp.cuda.MemoryPool()
        out = None
        try:
            with cp.cuda.using_allocator(pool.malloc):
                out = fn()
                cp.cuda.Device().synchronize()
                return int(pool.total_bytes())
        finally:
            del out
            pool.free_all_blocks()


# --------------------------------------------------------------------- GPU stages
def measure_copy_bandwidth(g: Gpu, quick: bool) -> dict[str, Any]:
    cp = g.cp
    n = COPY_BYTES // 4
    src = cp.random.RandomState(7).standard_normal(n, dtype=cp.float32)  # never time on zeros
    dst = cp.empty_like(src)
    stream = cp.cuda.get_current_stream()
    d2d = cp.cuda.runtime.memcpyDeviceToDevice

    def memcpy(_: int) -> None:
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, COPY_BYTES, d2d, stream.ptr)

    # 16-byte elements (complex128 views) so the copy kernel moves 16 bytes per load and store.
    copy16 = cp.ElementwiseKernel("T x", "T y", "y = x", "gpu_check_copy16")
    src16, dst16 = src.view(cp.complex128), dst.view(cp.complex128)

    def kernel(_: int) -> None:
        copy16(src16, dst16)

    reps = 5 if quick else 30
    res: dict[str, Any] = {"bytes_per_copy": 2 * COPY_BYTES, "buffer_bytes": COPY_BYTES}
    for name, fn in (("memcpy", memcpy), ("kernel_copy", kernel)):
        for _ in range(3):
            fn(0)
        g.sync()
        st = g.time_cupy(fn, 1, reps)
        if not bool((dst[:: 1 << 16] == src[:: 1 << 16]).all()):
            raise RuntimeError(f"{name}: the copy is wrong")
        dst.fill(0)
        res[name] = st
        res[f"{'memcpy' if name == 'memcpy' else 'kernel'}_gbps"] = 2 * COPY_BYTES / st["median_ms"] / 1e6
    res["gbps"] = max(res["memcpy_gbps"], res["kernel_gbps"])
    log(f"copy bandwidth: cudaMemcpy D2D {res['memcpy_gbps']:.0f} GB/s, copy kernel {res['kernel_gbps']:.0f} GB/s"
        f" ({2 * COPY_BYTES / 2**30:.2f} GiB moved per copy, median of {reps})")
    del src, dst, src16, dst16
    g.free()
    return res


def probe_bf16(g: Gpu) -> dict[str, Any]:
    """Can a bfloat16 CuPy array be made and passed through the fused kernel correctly?"""
    cp = g.cp
    if g.fsce is None:
        return {"reachable": False, "reason": "deepcore did not import"}
    n, c = 64, 1000
    try:
        if g.torch is not None:
            t = (g.torch.randn(n, c, device="cuda") * 3).to(g.torch.bfloat16)
            a = cp.from_dlpack(t)
        else:
            import ml_dtypes
            import numpy

            a = cp.asarray((numpy.random.default_rng(0).standard_normal((n, c)) * 3).astype(ml_dtypes.bfloat16))
    except Exception as exc:  # noqa: BLE001
        return {"reachable": False, "reason": f"no bfloat16 CuPy array: {_err(exc)}"}
    if getattr(a.dtype, "name", str(a.dtype)) != "bfloat16":
        return {"reachable": False, "reason": f"CuPy made dtype {a.dtype!r}, not bfloat16"}
    labels = cp.random.RandomState(3).randint(0, c, size=n).astype(cp.int64)
    try:
        loss, grad = g.fsce(a, labels)
        g.sync()
    except Exception as exc:  # noqa: BLE001
        return {"reachable": False, "reason": f"the fused call refused bfloat16: {_err(exc)}"}
    check = g.compare(a, labels, {"probe": (loss, grad)}, "bfloat16")["probe"]
    return {"reachable": True, "reason": "bfloat16 CuPy array accepted by fused_softmax_cross_entropy",
            "probe_check": check}


def run_case(g: Gpu, rec: Recorder, shape: tuple[int, int], dtype: str) -> dict[str, Any]:
    cp, torch = g.cp, g.torch
    n, c = shape
    label = f"{n}x{c} {dtype}"
    case: dict[str, Any] = {"shape": [n, c], "dtype": dtype, "timings": {}, "memory": {}, "correctness": {},
                            "errors": []}
    fused_here = g.fsce is not None and (dtype == "float32" or g.bf16_reachable)
    if dtype == "bfloat16" and not g.bf16_reachable:
        log("  bf16: not reachable through CuPy -- timing torch bf16 only")
        case["note"] = "bf16: not reachable through CuPy"
    if not fused_here and torch is None:
        raise RuntimeError("nothing to time: no fused kernel for this dtype and no torch with CUDA")
    if dtype == "bfloat16" and torch is None:
        raise RuntimeError("bfloat16 inputs are made through torch, which has no CUDA here")

    b = case_bytes(shape, dtype)
    case["bytes"] = b
    per_set = b["logits"] + b["grad"] + b["labels"]
    n_sets = min(64, max(3, math.ceil(4 * g.l2_bytes / per_set)))
    free, _ = cp.cuda.runtime.memGetInfo()
    copies = 2 if fused_here else 1  # pristine inputs + in-place work buffers
    while n_sets > 3 and n_sets * copies * (b["logits"] + b["labels"]) > 0.3 * free:
        n_sets -= 1
    case["n_sets"] = n_sets
    log(f"  {n_sets} input sets ({n_sets * per_set / 2**20:.0f} MiB per rotation), fixed labels per set")

    # ---- inputs: N(0, 3^2) logits (never zeros), uniform labels; float32 made by CuPy, bf16 through torch
    X: list[Any] = []  # CuPy logits (None where CuPy cannot hold this dtype)
    TX: list[Any] = []  # torch views of the same memory, requires_grad
    Y: list[Any] = []
    TY: list[Any] = []
    for k in range(n_sets):
        rs = cp.random.RandomState(1000 + k)
        x32 = rs.standard_normal((n, c), dtype=cp.float32)
        x32 *= 3.0
        y = rs.randint(0, c, size=n).astype(cp.int64)
        Y.append(y)
        if dtype == "float32":
            X.append(x32)
            tx = torch.from_dlpack(x32) if torch is not None else None
        else:
            tx = torch.from_dlpack(x32).to(torch.bfloat16)
            del x32
            X.append(cp.from_dlpack(tx) if fused_here else None)
        TX.append(tx.detach().requires_grad_(True) if tx is not None else None)
        TY.append(torch.from_dlpack(y) if torch is not None else None)
    W = [g.clone(x) for x in X] if fused_here else []  # in-place work buffers
    g.sync()

    def restore(k: int) -> None:
        W[k].data.copy_from_device_async(X[k].data, X[k].nbytes)

    def fused(k: int) -> Any:
        return g.fsce(X[k], Y[k])

    def inplace(k: int) -> Any:
        return g.fsce(W[k], Y[k], inplace=True)

    def unfused(k: int) -> Any:
        return g.base_sce(g.cupy_backend, X[k], Y[k])

    def torch_step(k: int) -> Any:
        x = TX[k]
        x.grad = None  # the gradient goes to a fresh buffer every time
        loss = torch.nn.functional.cross_entropy(x, TY[k])
        loss.backward()
        return loss

    # ---- warm-up (compiles NVRTC / CuPy kernels outside any timing) and correctness, once, on set 0
    variants: dict[str, Callable[[int], Any]] = {}
    if fused_here:
        variants.update(fused=fused, fused_inplace=inplace, unfused=unfused)
    if torch is not None:
        variants["torch"] = torch_step
    for name, fn in variants.items():
        def warm(fn: Callable[[int], Any] = fn, name: str = name) -> None:
            for k in range(min(3, n_sets)):
                fn(k)
                if name == "fused_inplace":
                    restore(k)
            g.sync()
        rec.guard(f"{label} {name} warm-up", warm)
    cands: dict[str, tuple[Any, Any]] = {}

    def cand_fused() -> None:
        g.poison_pool(b["grad"])
        cands["fused"] = fused(0)

    def cand_inplace() -> None:
        loss, grad = inplace(0)
        if grad.data.ptr != W[0].data.ptr:
            raise RuntimeError("inplace=True returned a gradient that is not the input buffer")
        cands["fused_inplace"] = (loss, grad)

    def cand_unfused() -> None:
        cands["unfused"] = unfused(0)

    def cand_torch() -> None:
        loss = torch_step(0)
        cands["torch"] = (loss.detach(), TX[0].grad)
        TX[0].grad = None

    for name, fn in (("fused", cand_fused), ("fused_inplace", cand_inplace), ("unfused", cand_unfused),
                     ("torch", cand_torch)):
        if name in variants:
            rec.guard(f"{label} {name} correctness run", fn)
    src = X[0] if X and X[0] is not None else TX[0].detach()
    checks = rec.guard(f"{label} correctness check", g.compare, src, Y[0], cands, dtype) or {}
    for name in variants:
        case["correctness"][name] = checks.get(name, {"ok": False, "error": "no checked result"})
    cands.clear()
    if fused_here:
        restore(0)
    g.free()

    # ---- timing
    for name, fn in variants.items():
        kind = "fused" if name.startswith("fused") else name
        after = restore if name == "fused_inplace" else None

        def timed(fn: Callable[[int], Any] = fn, kind: str = kind, after: Any = after, name: str = name) -> Any:
            reps = g.reps(g.estimate_ms(fn, after), kind)
            if name == "torch":
                st = g.time_torch(fn, n_sets, reps)
            else:
                st = g.time_cupy(fn, n_sets, reps, after)
            g.sync()
            log(f"    time  {name:<14} median {st['median_ms']:9.4f} ms  IQR {st['iqr_ms']:.4f}"
                f"  min {st['min_ms']:.4f}  n={st['n']}")
            return st

        st = rec.guard(f"{label} {name} timing", timed)
        case["timings"][name] = st if st is not None else {"error": "timing failed (see stage_errors)"}
        g.free()

    # ---- peak extra memory (fresh CuPy pool per call)
    if fused_here:
        def mem_fused() -> None:
            case["memory"]["fused_peak_extra_bytes"] = g.cupy_peak(lambda: fused(0))

        def mem_inplace() -> None:
            try:
                case["memory"]["fused_inplace_peak_extra_bytes"] = g.cupy_peak(lambda: inplace(0))
            finally:
                restore(0)

        def mem_unfused() -> None:
            case["memory"]["unfused_peak_extra_bytes"] = g.cupy_peak(lambda: unfused(0))

        rec.guard(f"{label} fused peak memory", mem_fused)
        rec.guard(f"{label} in-place peak memory", mem_inplace)
        rec.guard(f"{label} unfused peak memory", mem_unfused)
    if torch is not None:
        def mem_torch() -> None:
            g.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch_step(0)
            torch.cuda.synchronize()
            case["memory"]["torch_peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
            TX[0].grad = None

        rec.guard(f"{label} torch peak memory", mem_torch)
    case["memory"]["grad_bytes"] = b["grad"]
    case["memory"]["row_slack_bytes"] = row_slack(n)
    mem = case["memory"]
    log("    memory: grad buffer {:.1f} MiB; fused extra {} / in-place {} MiB; unfused {} MiB; torch {} MiB".format(
        b["grad"] / 2**20, *(_num(mem.get(k) / 2**20 if mem.get(k) is not None else None, ".1f") for k in (
            "fused_peak_extra_bytes", "fused_inplace_peak_extra_bytes", "unfused_peak_extra_bytes",
            "torch_peak_extra_bytes"))))

    del X, TX, Y, TY, W
    g.free()
    return case


def run_pytest(results: dict[str, Any], out_dir: Path, timeout_s: float, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "tests/test_sce_kernel.py", "-m", "gpu", "-q",
           "-p", "no:cacheprovider"]
    if quick:
        cmd += ["-k", "not large"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log(f"running (timeout {timeout_s:.0f} s): {' '.join(cmd[1:])}")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this script started, nothing else
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
    elapsed = time.perf_counter() - t
    out = out or ""
    summary = ""
    for line in reversed(out.strip().splitlines()):
        if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran)\b", line):
            summary = line.strip("= ").strip()
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pytest.log").write_text(out, encoding="utf-8")
    except OSError as exc:
        log(f"could not write pytest.log: {exc}")
    res = {"cmd": cmd, "rc": proc.returncode, "timed_out": timed_out, "elapsed_s": elapsed,
           "summary": summary or ("(no summary line)" if not timed_out else "(killed at timeout)"),
           "tail": out[-3000:], "skipped": None}
    log(f"pytest: rc={proc.returncode}{' TIMED OUT' if timed_out else ''} in {elapsed:.0f} s: {res['summary']}")
    if proc.returncode not in (0, None) or timed_out:
        for line in out.strip().splitlines()[-15:]:
            log(f"  | {line}")
    return res


def run_gpu(args: argparse.Namespace, cupy: Any, out_dir: Path) -> int:
    mode = "quick" if args.quick else "full"
    results: dict[str, Any] = {"fake": False, "mode": mode, "started": _now(), "argv": sys.argv[1:], "cases": []}
    try:
        _run_gpu_stages(args, cupy, out_dir, results)
    except Exception as exc:  # noqa: BLE001 - a bug outside the guarded stages must not lose the report
        results.setdefault("stage_errors", []).append(
            {"stage": "gpu_check itself", "error": _err(exc), "traceback": traceback.format_exc()[-6000:]})
        log(f"[FAIL] gpu_check itself: {_err(exc)}")
        traceback.print_exc()
    return finish(results, out_dir)


def _run_gpu_stages(args: argparse.Namespace, cupy: Any, out_dir: Path, results: dict[str, Any]) -> None:
    mode = results["mode"]
    rec = Recorder(results)
    deadline = _T0 + TIME_BUDGET_S[mode]
    log(f"gpu_check: mode {mode}, results to {out_dir}")

    deepcore = rec.guard("a. deps (array-api-compat wheel, deepcore import)", ensure_deepcore, results)
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        torch = None
        log(f"torch not importable: {_err(exc)}")
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
            except Exception:  # noqa: BLE001
                pass
        results["cases"].append(case)
        write_json_quietly(results, out_dir)

    if args.no_tests:
        results["pytest"] = {"skipped": "not run (--no-tests)"}
    else:
        lo, hi = PYTEST_TIMEOUT_S[mode]
        left = TIME_BUDGET_S[mode] + 20 - (time.perf_counter() - _T0)
        results["pytest"] = rec.guard("f. pytest GPU tests", run_pytest, results, out_dir,
                                      min(hi, max(lo, left)), args.quick) or {"summary": "stage failed", "rc": None}


def write_json_quietly(results: dict[str, Any], out_dir: Path) -> None:
    """Partial results on disk after every case, in case the run is killed."""
    try:
        write_json(results, out_dir)
    except Exception as exc:  # noqa: BLE001
        log(f"(could not write partial JSON: {exc})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default: $OUT if set, else ./gpu_check_out)")
    p.add_argument("--quick", action="store_true", help="smoke test: one shape, few repeats, short tests")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest GPU tests")
    p.add_argument("--dry-run", action="store_true", help="no GPU: run the reporting code on FAKE numbers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    if args.dry_run:
        log("*** --dry-run: FAKE numbers, no GPU is used; this only tests the reporting code ***")
        return 0 if finish(fake_results(args.quick), out_dir) in (0, 1) else 3
    cupy, why = detect_gpu()
    if cupy is None:
        msg = (f"gpu_check: no usable NVIDIA GPU here: {why}. Nothing was measured and nothing was written.\n"
               "Run it on a machine with an NVIDIA GPU and CuPy, or use --dry-run to test the reporting code"
               " with FAKE numbers.")
        print(msg, file=sys.stderr, flush=True)
        return 2
    return run_gpu(args, cupy, out_dir)


if __name__ == "__main__":
    sys.exit(main())
