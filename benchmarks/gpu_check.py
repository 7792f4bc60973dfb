#!/usr/bin/env python3
"""The GPU check: deepcore's GPU tests and GPU benchmarks on a GPU machine, a table printed last.

    python3 benchmarks/gpu_check.py [--out DIR] [--plan] [--offline | --online] [--no-torch]

Run from anywhere on a machine with an NVIDIA GPU and its driver; in under 5 minutes it

1. finds the driver's CUDA version (libcuda's ``cuDriverGetVersion``, else ``nvidia-smi``) and so the
   extra, ``cuda12`` or ``cuda13``, and asks a fresh interpreter what imports (CuPy and for which CUDA,
   NumPy, array-api-compat, ml_dtypes, pytest, pytest-benchmark, hypothesis, PyTorch with CUDA);
2. installs what is missing: with a package index, ``pip install -e ".[test,bench,cudaNN]"`` and
   PyTorch for that CUDA from PyTorch's index (unless ``--no-torch``); without one (the lent GPU
   machine reaches none), each missing package from a wheel in ``benchmarks/wheels/`` (array-api-compat,
   deepcore's one pure-Python dependency such a machine lacks) or ``.whl/``, installed with
   ``--no-index --no-deps``. deepcore itself runs from this checkout (the root on ``PYTHONPATH``);
3. runs the GPU benchmark cases, ``pytest benchmarks/test_gpu_kernels.py -m gpu --benchmark-only``
   (pytest-benchmark's JSON to ``DIR/gpu_benchmarks.json``), then the GPU tests, ``pytest tests -m gpu``
   (``DIR/gpu_tests.xml`` and ``.log``), each in a subprocess with a time limit;
4. prints the tests' and benchmarks' counts and the benchmark table last (median per call, GB/s,
   GFLOP/s, % of the copy bandwidth, speed-up over PyTorch, issue 14's targets for the fused loss).

DIR is ``--out``, else ``$OUT``, else ``./gpu_check_out``. ``--plan`` prints what it found and would
install, and changes nothing. Exit status: 0 everything ran and passed (a missed speed target does not
fail it), 1 a test or benchmark failed or ran out of time, 2 it could not start (no driver, no CuPy
that can be installed, no pytest).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIRS = (REPO / "benchmarks" / "wheels", REPO / ".whl")
BENCH_FILE = "benchmarks/test_gpu_kernels.py"
BUDGET_S = 285.0  # the whole script, installs included
BENCH_LIMIT_S = 150.0
TORCH_INDEX = {12: "https://download.pytorch.org/whl/cu126", 13: "https://download.pytorch.org/whl/cu130"}
#: Import name -> wheel name prefix. cupy and numpy are needed; without pytest-benchmark the benchmarks
#: skip, without hypothesis test_losses.py cannot be collected, without ml_dtypes bfloat16 skips.
NEEDED = {"numpy": "numpy", "array_api_compat": "array_api_compat", "pytest": "pytest"}
WANTED = {"pytest_benchmark": "pytest_benchmark", "ml_dtypes": "ml_dtypes", "hypothesis": "hypothesis"}
#: Issue 14's targets for the fused softmax-cross-entropy: size -> (min % of copy bandwidth, min x torch).
TARGETS = {"8192x32768": (90.0, 3.0), "16384x131072": (90.0, 3.0), "128x10": (None, 1.0)}

T0 = time.monotonic()


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ the driver
def parse_nvidia_smi(text: str) -> tuple[int, int] | None:
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def driver_cuda_version(load: Any = ctypes.CDLL, run: Any = subprocess.run) -> tuple[int, int] | None:
    """The CUDA version the driver supports, (13, 0) for 13000; None without a driver."""
    try:
        lib = load("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
            return v.value // 1000, (v.value % 1000) // 10
    except (OSError, AttributeError):
        pass
    try:
        return parse_nvidia_smi(run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_extra(version: tuple[int, int]) -> str:
    """deepcore's extra for a driver: cuda13 from CUDA 13, cuda12 for 12.x (CuPy wheels need >= 12)."""
    if version[0] >= 13:
        return "cuda13"
    if version[0] == 12:
        return "cuda12"
    raise ValueError(f"the driver supports CUDA {version[0]}.{version[1]}; deepcore's CuPy needs CUDA >= 12")


# ------------------------------------------------------------------ what imports
PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}, "cupy_dists": {}}
for name in NAMES:
    try:
        mod = importlib.import_module(name)
        out["modules"][name] = str(getattr(mod, "__version__", "?"))
    except Exception as exc:
        out["modules"][name] = None
for dist in ("cupy-cuda12x", "cupy-cuda13x"):
    try:
        out["cupy_dists"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        pass
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["torch_cuda_available"] = bool(torch.cuda.is_available())
    if out["torch_cuda_available"]:
        out["gpu"] = torch.cuda.get_device_name()
except Exception:
    out["torch_cuda_available"] = False
try:
    import deepcore
    out["deepcore"] = deepcore.__version__
    status = deepcore.available_backends().get("cupy")
    out["cupy_backend"] = True if status is True else str(status)
except Exception as exc:
    out["deepcore"] = None
    out["cupy_backend"] = f"deepcore does not import: {type(exc).__name__}: {exc}"
print("PROBE " + json.dumps(out))
"""


def probe(env: dict[str, str]) -> dict[str, Any]:
    """What a fresh interpreter (this one, with ``env``) can import; deepcore's verdict on CuPy."""
    names = [*NEEDED, *WANTED, "cupy", "torch"]
    code = PROBE.replace("NAMES", repr(names))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    raise RuntimeError(f"the environment probe failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


def index_reachable(url: str | None = None, timeout: float = 4.0) -> bool:
    """Whether pip's index answers (a TCP connection, in a thread so that a hung DNS lookup cannot stall)."""
    url = url or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path).is_dir()
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


# ------------------------------------------------------------------ the install plan
@dataclass
class Plan:
    extra: str | None
    online: bool
    commands: list[list[str]] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)  # what is missing and cannot be installed: no run
    lacking: list[str] = field(default_factory=list)  # missing, not installable, the run goes on
    pythonpath: list[str] = field(default_factory=list)


def find_wheel(prefix: str, dirs: tuple[Path, ...]) -> Path | None:
    found = sorted(p for d in dirs if d.is_dir() for p in d.glob(f"{prefix}-*.whl"))
    return found[-1] if found else None


def cupy_major(env: dict[str, Any]) -> int | None:
    for dist in env.get("cupy_dists", {}):
        return int(re.search(r"cuda(\d+)x", dist).group(1))
    return None


def install_plan(env: dict[str, Any], driver: tuple[int, int] | None, online: bool,
                 wheel_dirs: tuple[Path, ...] = WHEEL_DIRS, with_torch: bool = True) -> Plan:
    """What to install so that the GPU tests and benchmarks can run, from what ``probe`` found."""
    plan = Plan(None, online, pythonpath=[str(REPO)])
    if driver is None:
        plan.fatal.append("an NVIDIA driver (no libcuda.so.1, no nvidia-smi)")
        return plan
    try:
        plan.extra = cuda_extra(driver)
    except ValueError as exc:
        plan.fatal.append(str(exc))
        return plan
    mods = env.get("modules", {})
    have_cupy = cupy_major(env)
    cupy_ok = mods.get("cupy") is not None and have_cupy is not None and have_cupy <= driver[0]
    missing = [m for m in (*NEEDED, *WANTED) if mods.get(m) is None]
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if online:
        if have_cupy is not None and have_cupy > driver[0]:  # two CuPy packages must not coexist
            plan.commands.append([sys.executable, "-m", "pip", "uninstall", "--yes", f"cupy-cuda{have_cupy}x"])
        if missing or not cupy_ok:
            plan.commands.append([*pip, "-e", f"{REPO}[test,bench,{plan.extra}]"])
        if with_torch and mods.get("torch") is None:
            plan.commands.append([*pip, "torch", "--index-url", TORCH_INDEX[min(driver[0], 13)]])
        return plan
    for name in missing:
        wheel = find_wheel({**NEEDED, **WANTED}[name], wheel_dirs)
        if wheel is not None:
            plan.commands.append([*pip, "--no-index", "--no-deps", "--no-cache-dir", str(wheel)])
        else:
            (plan.fatal if name in NEEDED else plan.lacking).append(name)
    if not cupy_ok:
        major = min(driver[0], 13)
        wheel = find_wheel(f"cupy_cuda{major}x", wheel_dirs)
        if wheel is not None:
            plan.commands.append([*pip, "--no-index", "--no-deps", "--no-cache-dir", str(wheel)])
        else:
            plan.fatal.append(f"cupy-cuda{major}x (CuPy for CUDA {major}; no package index and no wheel)")
    return plan


def pip_fallback(command: list[str], plan: Plan) -> None:
    """A pure-Python wheel that pip could not install is imported from the file itself (zipimport)."""
    wheel = command[-1]
    if wheel.endswith("-py3-none-any.whl"):
        plan.pythonpath.append(wheel)
        log(f"   pip failed; {Path(wheel).name} goes on PYTHONPATH instead")


# ------------------------------------------------------------------ running pytest
@dataclass
class Stage:
    name: str
    rc: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)  # reason -> count
    note: str = ""

    @property
    def ok(self) -> bool:
        return (self.rc == 0 and not self.timed_out and not self.counts.get("failed")
                and not self.counts.get("error"))


def run_pytest(name: str, args: list[str], env: dict[str, str], limit_s: float, log_path: Path) -> Stage:
    """``python -m pytest -v ...`` in its own process group, killed (that group only) at ``limit_s``."""
    stage = Stage(name)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", *args]
    log(f"== {name}: {' '.join(cmd[1:])} (limit {limit_s:.0f} s, output in {log_path})")
    t = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            stage.rc = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            stage.timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            stage.rc = proc.wait()
    stage.seconds = time.monotonic() - t
    text = log_path.read_text(encoding="utf-8", errors="replace")
    stage.counts, stage.failed = parse_pytest_log(text)
    stage.skips = skip_reasons(text)
    log(f"   {summary_line(stage)}")
    return stage


_RESULT = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_pytest_log(text: str) -> tuple[dict[str, int], list[str]]:
    """Counts per outcome and the failed test ids from ``pytest -v`` output, also of a killed run."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    for line in text.splitlines():
        m = _RESULT.match(line)
        if m:
            kind = m.group(2).lower()
            counts[kind] = counts.get(kind, 0) + 1
            if kind in ("failed", "error"):
                failed.append(m.group(1))
        elif line.startswith("ERROR ") and " - " in line and "::" not in line:  # a module that did not collect
            counts["error"] = counts.get("error", 0) + 1
            failed.append(line[6:].split(" - ")[0])
    return counts, failed


def skip_reasons(text: str) -> dict[str, int]:
    """``-rs``'s ``SKIPPED [n] file:line: reason`` lines as {reason: n}, the most frequent first."""
    reasons: dict[str, int] = {}
    for m in re.finditer(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", text, re.MULTILINE):
        reasons[m.group(2)] = reasons.get(m.group(2), 0) + int(m.group(1))
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def junit_counts(path: Path) -> dict[str, int] | None:
    """Counts from pytest's JUnit XML (authoritative when the run finished)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "error": n["errors"], "skipped": n["skipped"]}


def summary_line(stage: Stage) -> str:
    parts = [f"{stage.counts.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped")]
    extra = [f"{v} {k}" for k, v in stage.counts.items() if k in ("xfail", "xpass") and v]
    state = "TIMED OUT" if stage.timed_out else f"rc {stage.rc}"
    head = f"{stage.name}: {', '.join(parts + extra)} ({state}, {stage.seconds:.0f} s)"
    if stage.note:
        head += f"; {stage.note}"
    if stage.failed:
        head += "\n     failed: " + ", ".join(stage.failed[:8]) + (" ..." if len(stage.failed) > 8 else "")
    for reason, n in list(stage.skips.items())[:3]:
        head += f"\n     skipped {n}: {reason[:150]}"
    return head


# ------------------------------------------------------------------ the table
def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def benchmark_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark of pytest-benchmark's JSON, with the derived columns."""
    rows = []
    for b in data.get("benchmarks", []):
        info, median = b.get("extra_info", {}), b.get("stats", {}).get("median")
        if not median:
            continue
        rows.append({"case": info.get("case", b.get("group") or b.get("name")), "size": info.get("size", "?"),
                     "dtype": info.get("dtype", "?"), "contender": info.get("contender", "?"), "median": median,
                     "gbps": info["bytes"] / median / 1e9 if info.get("bytes") else None,
                     "gflops": info["flops"] / median / 1e9 if info.get("flops") else None,
                     "gpu": info.get("gpu")})
    copies = [r["gbps"] for r in rows if r["case"] == "copy" and r["gbps"]]
    ceiling = max(copies) if copies else None
    torch = {(r["case"], r["size"], r["dtype"]): r["median"] for r in rows if r["contender"] == "torch-cuda"}
    for r in rows:
        # Only for the bandwidth-bound case; the convolution and the CNN step are counted in FLOPs.
        r["pct_copy"] = 100.0 * r["gbps"] / ceiling if ceiling and r["gbps"] and r["case"] == "softmax_ce" else None
        t = torch.get((r["case"], r["size"], r["dtype"]))
        r["x_torch"] = t / r["median"] if t and r["contender"] != "torch-cuda" else None
        r["target"] = target_status(r)
    return rows


def target_status(row: dict[str, Any]) -> str:
    """'met' / 'MISSED' for the fused loss's rows that issue 14 sets a target for, else ''."""
    if row["case"] != "softmax_ce" or row["contender"] != "cupy" or row["size"] not in TARGETS:
        return ""
    min_pct, min_x = TARGETS[row["size"]]
    checks = [(row["x_torch"], min_x)] + ([(row["pct_copy"], min_pct)] if min_pct else [])
    if any(v is None for v, _ in checks):
        return "n/a"
    return "met" if all(v >= lo for v, lo in checks) else "MISSED"


_COLUMNS = (("case", 10, "<"), ("size", 17, "<"), ("dtype", 8, "<"), ("contender", 10, "<"), ("median", 11, ">"),
            ("GB/s", 7, ">"), ("GFLOP/s", 8, ">"), ("%copy", 6, ">"), ("x torch", 7, ">"), ("target", 6, "<"))


def format_table(rows: list[dict[str, Any]]) -> str:
    head = " ".join(f"{name:{align}{width}}" for name, width, align in _COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = (r["case"], r["size"], r["dtype"], r["contender"], _fmt_time(r["median"]), _fmt(r["gbps"], ".0f"),
                 _fmt(r["gflops"], ".0f"), _fmt(r["pct_copy"], ".1f"), _fmt(r["x_torch"], ".2f", "x"), r["target"])
        lines.append(" ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, _COLUMNS, strict=True)))
    marked = [r["target"] for r in rows if r["target"]]
    if marked:
        lines.append(f"targets (issue 14, fused softmax-CE): {marked.count('met')} met, {marked.count('MISSED')} "
                     f"missed, {marked.count('n/a')} n/a of {len(marked)} rows (>= 90% of the copy bandwidth and "
                     ">= 3x torch at 8192x32768 and 16384x131072; >= 1x torch at 128x10)")
    return "\n".join(lines)


def load_benchmarks(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------ the run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--plan", action="store_true", help="print what was found and would be installed; change nothing")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--offline", action="store_true", help="never use a package index (default: try it)")
    net.add_argument("--online", action="store_true", help="use the package index without checking it answers")
    p.add_argument("--no-torch", action="store_true", help="do not install PyTorch (the torch rows then skip)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S:g})")
    return p.parse_args(argv)


def run_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([*plan.pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def describe(env: dict[str, Any], driver: tuple[int, int] | None) -> str:
    mods = env.get("modules", {})
    drv = f"CUDA {driver[0]}.{driver[1]}" if driver else "none"
    cupy = ", ".join(f"{k} {v}" for k, v in env.get("cupy_dists", {}).items()) or "no CuPy"
    torch = f"torch {mods.get('torch')} (CUDA {env.get('torch_cuda')}, available: {env.get('torch_cuda_available')})" \
        if mods.get("torch") else "no torch"
    return (f"driver {drv}; python {env.get('python')} ({env.get('executable')}); {cupy}; {torch}; numpy "
            f"{mods.get('numpy')}; deepcore {env.get('deepcore')}; deepcore's CuPy backend: {env.get('cupy_backend')}")


def main(argv: list[str] | None = None) -> int:
    global T0
    T0 = time.monotonic()
    args = parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    driver = driver_cuda_version()
    env = probe(run_env(Plan(None, False, pythonpath=[str(REPO)])))
    log(f"gpu_check: {describe(env, driver)}")
    if driver is None:
        log("gpu_check: no NVIDIA driver here (no libcuda.so.1, no nvidia-smi): nothing to run")
        return 2
    online = args.online or (not args.offline and index_reachable())
    plan = install_plan(env, driver, online, with_torch=not args.no_torch)
    log(f"gpu_check: package index {'reachable' if online else 'not used'}; extra {plan.extra}; "
        f"{len(plan.commands)} install command(s)")
    for cmd in plan.commands:
        log(f"   {' '.join(cmd)}")
    if plan.lacking:
        log(f"   not installable here, the run goes on without: {', '.join(plan.lacking)}")
    if plan.fatal:
        log(f"gpu_check: cannot run, missing: {'; '.join(plan.fatal)}")
        return 2
    if args.plan:
        return 0
    for cmd in plan.commands:
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            if "--no-index" in cmd:
                pip_fallback(cmd, plan)
            else:
                log(f"gpu_check: failed: {' '.join(cmd)}")
    if plan.commands:
        env = probe(run_env(plan))
        log(f"gpu_check: after installing: {describe(env, driver)}")
    if env.get("cupy_backend") is not True:
        log(f"gpu_check: deepcore's CuPy backend is not usable: {env.get('cupy_backend')}")
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    renv = run_env(plan)
    left = lambda: args.budget - (time.monotonic() - T0)  # noqa: E731
    bench_json, junit = out_dir / "gpu_benchmarks.json", out_dir / "gpu_tests.xml"
    bench_json.unlink(missing_ok=True)
    junit.unlink(missing_ok=True)
    if env.get("modules", {}).get("pytest_benchmark") is None:
        bench = Stage("benchmarks", note="not run: pytest-benchmark is missing")
    else:
        bench = run_pytest("benchmarks", [BENCH_FILE, "-m", "gpu", "--benchmark-only",
                                          f"--benchmark-json={bench_json}"],
                           renv, max(30.0, min(BENCH_LIMIT_S, left() - 60)), out_dir / "gpu_benchmarks.log")
    tests = run_pytest("tests", ["tests", "-m", "gpu", "--continue-on-collection-errors", f"--junitxml={junit}",
                                 "--durations=10"], renv, max(30.0, left() - 10), out_dir / "gpu_tests.log")
    tests.counts = junit_counts(junit) or tests.counts
    rows = benchmark_rows(load_benchmarks(bench_json))
    if not rows and not bench.note:
        bench.note = f"no benchmark results in {bench_json}"
    summary = {"driver": driver, "environment": env, "plan": plan.__dict__, "tests": tests.__dict__,
               "benchmarks": bench.__dict__, "rows": rows, "seconds": time.monotonic() - T0}
    (out_dir / "gpu_check_summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    ok = tests.ok and bench.ok and bool(rows)
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), env.get("gpu", "?"))
    log("")
    log(f"== gpu_check on {gpu}: {describe(env, driver)}")
    log(f"{summary_line(tests)}")
    log(f"{summary_line(bench)}")
    log(f"results in {out_dir}: gpu_benchmarks.json, gpu_tests.xml, *.log, gpu_check_summary.json")
    log(format_table(rows))
    log(f"gpu_check: {'PASS' if ok else 'FAIL'} in {time.monotonic() - T0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
