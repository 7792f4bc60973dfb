"""The report: table, targets and verdict printed last, and the JSON results file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .common import T0, err, fmt_num, log, median_of
from .targets import derive, evaluate

# --------------------------------------------------------------------- report
_COLS = (("shape", 13, "<"), ("dtype", 8, "<"), ("fused ms", 9, ">"), ("unfused ms", 10, ">"),
         ("torch ms", 9, ">"), ("fused GB/s", 10, ">"), ("%copy", 6, ">"), ("x unfused", 9, ">"),
         ("x torch", 7, ">"), ("peak MiB", 9, ">"))


def _cell_ms(case: dict[str, Any], key: str) -> str:
    entry = case.get("timings", {}).get(key)
    ms = median_of(entry)
    if ms is not None:
        return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"
    if isinstance(entry, dict) and entry.get("error"):
        return "ERR"
    return "n/a"


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
        peak = mem.get("fused_peak_extra_bytes")
        cells = [f"{c['shape'][0]}x{c['shape'][1]}", c["dtype"], _cell_ms(c, "fused"),
                 _cell_ms(c, "unfused"), _cell_ms(c, "torch"), fmt_num(d.get("fused_gbps"), ".0f"),
                 fmt_num(d.get("fused_pct_copy"), ".1f"), fmt_num(d.get("speedup_vs_unfused"), ".2f"),
                 fmt_num(d.get("speedup_vs_torch"), ".2f"),
                 fmt_num(peak / 2**20 if peak is not None else None, ".1f")]
        lines.append(" ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLS, strict=True)))
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
                     f" {fmt_num(copy.get('memcpy_gbps'), '.0f')},"
                     f" copy kernel {fmt_num(copy.get('kernel_gbps'), '.0f')}; bytes read + written)")
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
    results["elapsed_s"] = time.perf_counter() - T0
    for c in results.get("cases", []):
        try:
            derive(c, (results.get("copy_bandwidth") or {}).get("gbps"))
        except Exception as exc:
            c.setdefault("errors", []).append(f"derive: {err(exc)}")
    results["targets"] = evaluate(results)
    try:
        path = write_json(results, out_dir)
        saved = f"JSON written to {path}"
    except Exception as exc:  # the table still has to be printed
        saved = f"[FAIL] could not write JSON to {out_dir}: {err(exc)}"
    log("")
    log(saved)
    log(format_report(results))  # LAST: the reply's output tail carries it
    return 1 if any(t["status"] == "FAIL" for t in results["targets"]) else 0
