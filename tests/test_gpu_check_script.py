"""benchmarks/gpu_check.py, the one-shot GPU check, as far as it can be checked without a GPU.

The entry script is thin; the stages live in ``benchmarks/gpu_check_lib/``. Its
reporting code (targets, table, JSON) runs here on FAKE numbers through
``--dry-run`` and directly; without a usable GPU the real run stops at once with
exit status 2 and says why. Every module is imported, and the measurement code
(copy bandwidth, bf16 probe, one case) runs on a NumPy stand-in for CuPy, so a
NameError or a wrong call there shows up here; the numbers need a GPU.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import glob
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import deepcore as dc

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"
LIB = BENCH / "gpu_check_lib"
MODULES = sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__")

# Import the package without leaving benchmarks/ on sys.path (its test_*.py must not shadow anything).
sys.path.insert(0, str(BENCH))
try:
    lib = importlib.import_module("gpu_check_lib")
    common = importlib.import_module("gpu_check_lib.common")
    targets = importlib.import_module("gpu_check_lib.targets")
    report = importlib.import_module("gpu_check_lib.report")
    fake = importlib.import_module("gpu_check_lib.fake")
    gpu_mod = importlib.import_module("gpu_check_lib.gpu")
    measure = importlib.import_module("gpu_check_lib.measure")
finally:
    sys.path.remove(str(BENCH))


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=env)


def _statuses(results: dict) -> dict[str, str]:
    return {t["target"]: t["status"] for t in results["targets"]}


# --------------------------------------------------------------------- layout
def test_script_parses_and_ships_the_array_api_compat_wheel():
    for path in [SCRIPT, *sorted(LIB.glob("*.py"))]:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # The GPU machine has no package index: deepcore's one missing dependency travels as a wheel,
    # and the script looks for it where it is.
    assert list((BENCH / "wheels").glob("array_api_compat-*-py3-none-any.whl"))
    assert common.REPO == ROOT
    assert glob.glob(common.WHEEL_GLOB)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    mod = importlib.import_module(f"gpu_check_lib.{name}")
    assert mod.__doc__ and Path(mod.__file__).parent == LIB
    assert Path(lib.__file__) == LIB / "__init__.py"  # a regular package, not a namespace one


# --------------------------------------------------------------------- pure functions
def test_summarize_and_case_bytes():
    st = common.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert st["n"] == 5 and st["median_ms"] == 3.0 and st["min_ms"] == 1.0 and st["max_ms"] == 5.0
    assert st["iqr_ms"] == st["q3_ms"] - st["q1_ms"] == 2.0
    assert st["samples_ms"] == [3.0, 1.0, 2.0, 4.0, 5.0]  # in the order measured
    assert common.summarize([2.0])["iqr_ms"] == 0.0
    with pytest.raises(ValueError):
        common.summarize([])
    b = common.case_bytes((8192, 32768), "bfloat16")
    assert b["logits"] == b["grad"] == 8192 * 32768 * 2 and b["labels"] == 8192 * 8
    assert b["fused_min"] == b["logits"] + b["grad"] + b["labels"]
    assert common.median_of({"median_ms": 0.0}) is None and common.median_of({"error": "x"}) is None
    assert common.fmt_num(None, ".1f") == "-" and common.fmt_num(2.345, ".1f") == "2.3"


def test_derive_from_the_medians():
    case = {"shape": [1000, 1000], "dtype": "float32",
            "timings": {"fused": {"median_ms": 2.0}, "unfused": {"median_ms": 10.0}, "torch": {"error": "x"}}}
    targets.derive(case, copy_gbps=8.0)
    moved = 2 * 1000 * 1000 * 4 + 1000 * 8
    d = case["derived"]
    assert d["fused_gbps"] == pytest.approx(moved / 2.0 / 1e6)
    assert d["fused_pct_copy"] == pytest.approx(100 * d["fused_gbps"] / 8.0)
    assert d["speedup_vs_unfused"] == 5.0 and "speedup_vs_torch" not in d
    assert set(d) == {"fused_gbps", "fused_pct_copy", "speedup_vs_unfused"}


def _evaluated(res: dict) -> dict:
    res = copy.deepcopy(res)
    for c in res["cases"]:
        targets.derive(c, (res.get("copy_bandwidth") or {}).get("gbps"))
    res["targets"] = targets.evaluate(res)
    return res


def test_evaluate_on_fake_results():
    res = _evaluated(fake.fake_results(quick=False))
    st = _statuses(res)
    assert st == {
        "fused >= 85% of copy bandwidth @8192x32768 float32": "PASS",
        "fused >= 3x faster than torch eager @8192x32768 float32": "FAIL",  # fake 2.4x
        "fused >= 85% of copy bandwidth @8192x32768 bfloat16": "N/A",
        "fused >= 3x faster than torch eager @8192x32768 bfloat16": "N/A",
        "peak extra memory out-of-place <= one gradient buffer (+O(N) rows)": "PASS",
        "every timed result matches the float64 reference": "PASS",
        "pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu": "FAIL",  # fake: "no tests were run"
        "no stage raised an error": "FAIL",  # the fake stage error
    }
    detail = {t["target"]: t["detail"] for t in res["targets"]}
    assert detail["every timed result matches the float64 reference"] == "12 result(s) checked"  # 4x3 + torch bf16
    quick = _statuses(_evaluated(fake.fake_results(quick=True)))
    assert quick["fused >= 85% of copy bandwidth @8192x32768 bfloat16"] == "N/A"


def test_evaluate_catches_each_kind_of_failure():
    base = fake.fake_results(quick=False)

    res = copy.deepcopy(base)
    head = res["cases"][0]
    head["memory"]["fused_peak_extra_bytes"] = 3 * head["memory"]["grad_bytes"]
    head["correctness"]["unfused"]["ok"] = False
    del res["cases"][2]["correctness"]["torch"]
    res["copy_bandwidth"] = {"error": "stage failed"}
    res["bf16"] = {"reachable": True, "reason": "test"}
    res["cases"] = [c for c in res["cases"] if c["dtype"] != "bfloat16"]
    res["pytest"] = {"rc": 0, "timed_out": True, "summary": "3 passed", "skipped": None}
    res["stage_errors"] = []
    res = _evaluated(res)
    st = _statuses(res)
    detail = {t["target"]: t["detail"] for t in res["targets"]}
    assert st["fused >= 85% of copy bandwidth @8192x32768 float32"] == "FAIL"
    assert detail["fused >= 85% of copy bandwidth @8192x32768 float32"] == "no copy bandwidth"
    assert st["fused >= 3x faster than torch eager @8192x32768 float32"] == "FAIL"
    assert detail["fused >= 85% of copy bandwidth @8192x32768 bfloat16"] == "not measured"  # reachable, not run
    assert st["peak extra memory out-of-place <= one gradient buffer (+O(N) rows)"] == "FAIL"
    assert detail["peak extra memory out-of-place <= one gradient buffer (+O(N) rows)"].startswith(
        "8192x32768 float32: ")
    corr = detail["every timed result matches the float64 reference"]
    assert "8192x32768 float32 unfused" in corr and "4096x32000 float32 torch: unchecked" in corr
    assert st["pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu"] == "FAIL"
    assert detail["pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu"].startswith("TIMED OUT")
    assert st["no stage raised an error"] == "PASS"

    res = copy.deepcopy(base)
    res["pytest"] = {"rc": 0, "timed_out": False, "summary": "40 passed, 2 skipped in 9.1s", "skipped": None}
    assert _statuses(_evaluated(res))["pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu"] == "PASS"
    res["pytest"] = {"skipped": "not run (--no-tests)"}
    assert _statuses(_evaluated(res))["pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu"] == "N/A"
    res["cases"] = []
    st = _statuses(_evaluated(res))
    assert st["peak extra memory out-of-place <= one gradient buffer (+O(N) rows)"] == "FAIL"
    assert st["every timed result matches the float64 reference"] == "FAIL"  # nothing checked


def test_format_table_and_report():
    res = _evaluated(fake.fake_results(quick=False))
    table = report.format_table(res).splitlines()
    assert "FAKE NUMBERS" in table[0]
    assert table[1].startswith("shape") and table[1].index("dtype") < table[1].index("fused ms")
    assert "inpl" not in table[1] and "peak MiB" in table[1]
    assert len(table[2]) == len(table[1]) and set(table[2]) == {"-"}
    rows = table[3:]
    assert len(rows) == 5 and all(len(r) <= len(table[1]) + 1 for r in rows)
    head = rows[0].split()
    assert head[:2] == ["8192x32768", "float32"] and head[-1] == "1024.2"  # grad 1024 MiB + 24 B/row
    assert rows[1].split()[2:4] == ["n/a", "n/a"]  # bf16: no fused or unfused time
    assert rows[3].split()[3] == "ERR"  # the fake failed unfused timing

    text = report.format_report(res)
    assert text.splitlines()[0].startswith("*** FAKE DATA")
    assert "FAKE OVERALL: FAIL (3 of 8 targets failed; mode full;" in text
    real = copy.deepcopy(res)
    real.update(fake=False, env={"device": "NVIDIA H200"})
    assert "device: NVIDIA H200" in report.format_table(real) and "FAKE" not in report.format_table(real)


def test_write_json_names_fake_results_apart(tmp_path):
    res = _evaluated(fake.fake_results(quick=True))
    assert report.write_json(res, tmp_path / "a").name == "gpu_check_FAKE.json"
    res["fake"] = False
    path = report.write_json(res, tmp_path / "a")
    assert path.name == "gpu_check.json" and json.loads(path.read_text(encoding="utf-8"))["fake"] is False
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["gpu_check.json", "gpu_check_FAKE.json"]


def test_recorder_keeps_going_and_records(capsys):
    results: dict = {}
    rec = common.Recorder(results)
    assert rec.guard("ok stage", lambda x: x + 1, 1) == 2

    def boom():
        raise RuntimeError("kaput")

    assert rec.guard("bad stage", boom) is None
    assert [e["stage"] for e in results["stage_errors"]] == ["bad stage"]
    assert results["stage_errors"][0]["error"] == "RuntimeError: kaput"
    assert "[FAIL] bad stage: RuntimeError: kaput" in capsys.readouterr().out


# --------------------------------------------------------------------- the script
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_dry_run_writes_json_and_prints_the_table_last(tmp_path, quick):
    # From a working directory outside the repository: the script finds its package itself.
    r = _run("--dry-run", "--out", str(tmp_path / "out"), *(["--quick"] if quick else []), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr

    data = json.loads((tmp_path / "out" / "gpu_check_FAKE.json").read_text(encoding="utf-8"))
    assert not (tmp_path / "out" / "gpu_check.json").exists()  # fake numbers never under the real file's name
    assert data["fake"] is True and data["mode"] == ("quick" if quick else "full")
    n_cases = 1 if quick else 5
    assert len(data["cases"]) == n_cases
    head = data["cases"][0]
    assert head["shape"] == [8192, 32768] and head["dtype"] == "float32"
    assert set(head["timings"]) == {"fused", "unfused", "torch"}
    # Bandwidth counts logits read once, grad written once and int64 labels.
    moved = 2 * 8192 * 32768 * 4 + 8192 * 8
    assert head["bytes"]["fused_min"] == moved
    assert head["derived"]["fused_gbps"] == pytest.approx(moved / head["timings"]["fused"]["median_ms"] / 1e6)
    statuses = _statuses(data)
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
    assert "inpl" not in lines[header]
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


def test_dry_run_default_out_dir_is_relative_to_the_cwd(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = _run("--dry-run", "--quick", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "gpu_check_out" / "gpu_check_FAKE.json").is_file()


def test_without_a_gpu_it_exits_2_at_once(tmp_path):
    if dc.available_backends().get("cupy") is True:
        pytest.skip("a GPU is here: the real check would run")
    r = _run("--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no usable NVIDIA GPU" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- measurement code on a NumPy stand-in
class _Arr(np.ndarray):
    """A NumPy array with CuPy's ``.data.ptr``."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.ctypes.data)


def _a(x) -> _Arr:
    return np.asarray(x).view(_Arr)


class _Event:
    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass


class _RandomState:
    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)

    def standard_normal(self, size, dtype=np.float64):
        return _a(self.rs.standard_normal(size).astype(dtype))

    def randint(self, low, high, size):
        return _a(self.rs.randint(low, high, size=size))


def _fake_cupy() -> SimpleNamespace:
    import ctypes

    pool = SimpleNamespace(free_all_blocks=lambda: None)
    runtime = SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda dev: {"name": b"FAKE", "l2CacheSize": 1 << 12, "major": 9, "minor": 0},
        memGetInfo=lambda: (8 << 30, 16 << 30),
        memcpyDeviceToDevice=3,
        memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n),
    )
    cuda = SimpleNamespace(
        runtime=runtime,
        Device=lambda *a: SimpleNamespace(id=0, synchronize=lambda: None),
        Event=_Event,
        get_elapsed_time=lambda s, e: (e.t - s.t) * 1e3,
        get_current_stream=lambda: SimpleNamespace(ptr=0),
        MemoryPool=lambda: SimpleNamespace(malloc=None, total_bytes=lambda: 0, free_all_blocks=lambda: None),
        using_allocator=lambda alloc: contextlib.nullcontext(),
    )
    return SimpleNamespace(
        __version__="0-fake", cuda=cuda, random=SimpleNamespace(RandomState=_RandomState),
        float32=np.float32, float64=np.float64, int64=np.int64, uint8=np.uint8, complex128=np.complex128,
        get_default_memory_pool=lambda: pool, empty_like=lambda a: _a(np.empty_like(a)),
        full=lambda shape, v, dtype: _a(np.full(shape, v, dtype=dtype)), asarray=_a,
        exp=np.exp, log=np.log, arange=lambda n: _a(np.arange(n)), isfinite=np.isfinite,
        ElementwiseKernel=lambda *a: (lambda x, y: np.copyto(y, x)),
    )


def _fused_sce(logits, labels):  # no ``inplace=``: the script must never pass it
    s = np.asarray(logits, dtype=np.float64)
    n = s.shape[0]
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = -np.log(p[rows, labels]).mean()
    p[rows, labels] -= 1.0
    return _a(np.asarray(loss, dtype=logits.dtype)), _a((p / n).astype(logits.dtype))


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(measure, "COPY_BYTES", 1 << 22)
    g = gpu_mod.Gpu(_fake_cupy(), None, None, "quick")
    g.fsce = _fused_sce
    g.cupy_backend = dc.get_backend("numpy")
    from deepcore.backend.base import Backend

    g.base_sce = Backend.softmax_cross_entropy
    return g


def test_measurement_code_runs_on_a_numpy_stand_in(fake_gpu):
    g = fake_gpu
    cb = measure.measure_copy_bandwidth(g, quick=True)
    assert cb["gbps"] == max(cb["memcpy_gbps"], cb["kernel_gbps"]) > 0
    assert cb["buffer_bytes"] == 1 << 22 and cb["memcpy"]["n"] == cb["kernel_copy"]["n"] == 5

    probe = measure.probe_bf16(g)
    assert set(probe) >= {"reachable", "reason"}

    results: dict = {}
    rec = common.Recorder(results)
    case = measure.run_case(g, rec, (64, 100), "float32")
    assert results["stage_errors"] == [], results["stage_errors"]
    assert case["n_sets"] == 3 and set(case["timings"]) == {"fused", "unfused"}  # no torch with CUDA here
    assert all(st["n"] == 5 and st["median_ms"] > 0 for st in case["timings"].values())
    for name in ("fused", "unfused"):
        chk = case["correctness"][name]
        assert chk["ok"] and chk["grad_rel_err"] < 1e-5 and chk["loss_rel_err"] < 1e-5, (name, chk)
    assert set(case["memory"]) == {"fused_peak_extra_bytes", "unfused_peak_extra_bytes", "grad_bytes",
                                   "row_slack_bytes"}

    targets.derive(case, cb["gbps"])
    assert case["derived"]["speedup_vs_unfused"] > 0


def test_a_wrong_gradient_is_caught(fake_gpu):
    g = fake_gpu

    def wrong(logits, labels):
        loss, grad = _fused_sce(logits, labels)
        return loss, grad * 1.01

    g.fsce = wrong
    case = measure.run_case(g, common.Recorder({}), (64, 100), "float32")
    assert case["correctness"]["fused"]["ok"] is False and case["correctness"]["unfused"]["ok"] is True
