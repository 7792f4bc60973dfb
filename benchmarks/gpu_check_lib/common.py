"""Constants, logging, the stage recorder and the small statistics every part of the check shares."""

from __future__ import annotations

import datetime
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # benchmarks/gpu_check_lib/common.py -> the repository root
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

# The targets.
TARGET_PCT_COPY = 85.0
TARGET_SPEEDUP_TORCH = 3.0
# Relative error vs the float64 reference: ||out - ref|| / ||ref|| for the gradient, |.|/|.| for the loss.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
# "Peak extra" allowance for the O(N) per-row scratch of the fused call (loss_row,
# label weights, the mean's denominator) and reduction temporaries.
ROW_SLACK_BYTES_PER_ROW = 32
ROW_SLACK_FIXED = 2 << 20

COPY_BYTES = 2 << 30  # 2 GiB buffer: 4 GiB moved per copy (read + write)
TIME_BUDGET_S = {"full": 270.0, "quick": 150.0}  # benchmarks + tests, whole script under 5 minutes
PYTEST_TIMEOUT_S = {"full": (60.0, 200.0), "quick": (45.0, 120.0)}  # (min, max)

VARIANTS = ("fused", "unfused", "torch")
T0 = time.perf_counter()


def log(msg: str = "") -> None:
    print(msg, flush=True)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Recorder:
    """Runs stages so that one failure never loses the rest: errors are printed and kept."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        results.setdefault("stage_errors", [])

    def guard(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # every stage must be allowed to fail alone
            tb = traceback.format_exc()
            log(f"[FAIL] {stage}: {err(exc)}")
            for line in tb.strip().splitlines()[-4:-1]:
                log(f"       {line}")
            self.results["stage_errors"].append({"stage": stage, "error": err(exc), "traceback": tb[-6000:]})
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


def median_of(entry: Any) -> float | None:
    if isinstance(entry, dict) and isinstance(entry.get("median_ms"), (int, float)) and entry["median_ms"] > 0:
        return float(entry["median_ms"])
    return None


def fmt_num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def case_bytes(shape: list[int] | tuple[int, int], dtype: str) -> dict[str, int]:
    n, c = shape
    logits = n * c * ITEMSIZE[dtype]
    b = {"logits": logits, "grad": logits, "labels": n * LABEL_BYTES}
    b["fused_min"] = b["logits"] + b["grad"] + b["labels"]  # read logits once, write grad once, read labels
    return b


def row_slack(n_rows: int) -> int:
    return ROW_SLACK_BYTES_PER_ROW * n_rows + ROW_SLACK_FIXED
