"""Derived numbers (GB/s, %-of-copy, speed-ups) and PASS/FAIL/N/A against the issue's targets."""

from __future__ import annotations

import re
from typing import Any

from .common import HEADLINE, TARGET_PCT_COPY, TARGET_SPEEDUP_TORCH, VARIANTS, case_bytes, median_of, row_slack


def derive(case: dict[str, Any], copy_gbps: float | None) -> None:
    """Bandwidth, %-of-copy and speed-ups from the medians (fills case['bytes'] and case['derived'])."""
    b = case_bytes(case["shape"], case["dtype"])
    case["bytes"] = b
    t = case.get("timings", {})
    d: dict[str, Any] = {}
    fused = median_of(t.get("fused"))
    if fused is not None:
        d["fused_gbps"] = b["fused_min"] / fused / 1e6  # bytes / (ms * 1e-3) / 1e9
        if copy_gbps:
            d["fused_pct_copy"] = 100.0 * d["fused_gbps"] / copy_gbps
    for other in ("unfused", "torch"):
        ms = median_of(t.get(other))
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

    # Memory of the fused call, every case where it was measured: the gradient it returns plus O(N) row scratch.
    name = "peak extra memory out-of-place <= one gradient buffer (+O(N) rows)"
    measured = [(c, c.get("memory", {}).get("fused_peak_extra_bytes")) for c in cases]
    measured = [(c, v) for c, v in measured if isinstance(v, (int, float))]
    if not measured:
        out.append(_target(name, "FAIL", "not measured"))
    else:
        def limit_of(c: dict[str, Any]) -> int:
            return c["bytes"]["grad"] + row_slack(c["shape"][0])

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
            if median_of(c.get("timings", {}).get(v)) is None:
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
