"""benchmarks/gpu_check.py, the one-shot GPU check, as far as it can be checked without a GPU.

Its reporting code (targets, table, JSON) runs here on FAKE numbers through
``--dry-run``; without a usable GPU the real run stops at once with exit status 2
and says why. The measurements themselves need a GPU and are not tested here.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import deepcore as dc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_script_parses_and_ships_the_array_api_compat_wheel():
    ast.parse(SCRIPT.read_text(encoding="utf-8"))
    # The GPU machine has no package index: deepcore's one missing dependency travels as a wheel.
    assert list((ROOT / "benchmarks" / "wheels").glob("array_api_compat-*-py3-none-any.whl"))


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_dry_run_writes_json_and_prints_the_table_last(tmp_path, quick):
    r = _run("--dry-run", "--out", str(tmp_path), *(["--quick"] if quick else []))
    assert r.returncode == 0, r.stdout + r.stderr

    data = json.loads((tmp_path / "gpu_check_FAKE.json").read_text(encoding="utf-8"))
    assert not (tmp_path / "gpu_check.json").exists()  # fake numbers never under the real file's name
    assert data["fake"] is True and data["mode"] == ("quick" if quick else "full")
    n_cases = 1 if quick else 5
    assert len(data["cases"]) == n_cases
    head = data["cases"][0]
    assert head["shape"] == [8192, 32768] and head["dtype"] == "float32"
    # Bandwidth counts logits read once, grad written once and int64 labels.
    moved = 2 * 8192 * 32768 * 4 + 8192 * 8
    assert head["bytes"]["fused_min"] == moved
    assert head["derived"]["fused_gbps"] == pytest.approx(moved / head["timings"]["fused"]["median_ms"] / 1e6)
    statuses = {t["target"]: t["status"] for t in data["targets"]}
    assert set(statuses.values()) <= {"PASS", "FAIL", "N/A"}
    assert statuses["fused >= 85% of copy bandwidth @8192x32768 float32"] == "PASS"
    assert statuses["fused >= 3x faster than torch eager @8192x32768 float32"] == "FAIL"  # fake 2.4x
    assert statuses["fused >= 85% of copy bandwidth @8192x32768 bfloat16"] == "N/A"

    out = r.stdout
    assert "FAKE" in out.splitlines()[0]
    assert "bf16: not reachable through CuPy" in out
    lines = out.rstrip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("shape") and "fused ms" in line)
    for col in ("unfused ms", "torch ms", "fused GB/s", "%copy", "x torch", "peak MiB"):
        assert col in lines[header]
    rows = lines[header + 2:header + 2 + n_cases]
    assert rows[0].split()[:2] == ["8192x32768", "float32"]
    # After the table only the targets, the verdict and FAKE banners: the table is printed last.
    rest = lines[header + 2 + n_cases:]
    assert rest[0].startswith("== FAKE targets") and all("FAKE" in line for line in rest)
    assert "FAKE OVERALL: FAIL" in out and "FAKE DATA" in lines[-1]
    if not quick:
        bf16_row = next(row for row in rows if row.split()[1] == "bfloat16")
        assert bf16_row.split()[2] == "n/a"  # no fused time where bf16 cannot reach the kernel
        assert any(" ERR " in row for row in rows)  # a failed stage shows as ERR, the rest still reported


def test_without_a_gpu_it_exits_2_at_once(tmp_path):
    if dc.available_backends().get("cupy") is True:
        pytest.skip("a GPU is here: the real check would run")
    r = _run("--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no usable NVIDIA GPU" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "out").exists()
