"""Stage f: the GPU tests in a subprocess with a timeout, run last so they cannot disturb the timings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import REPO, log


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
