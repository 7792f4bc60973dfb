"""benchmarks/gpu_check.py and the GPU benchmark cases (benchmarks/test_gpu_kernels.py), as far as
they can be checked without a GPU: the driver's CUDA version and the extra it picks, the install
plan (online, and offline from the shipped wheels), the table from pytest-benchmark's JSON, the
pytest output it parses, the whole run with its parts faked, and the benchmark cases' code paths on
the CPU (PyTorch on "cpu" for the torch contender, a NumPy stand-in for CuPy)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import deepcore as dc
from tests.helpers import HAVE_TORCH, load_tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
gc = load_tool("benchmarks/gpu_check.py")
kernels = load_tool("benchmarks/test_gpu_kernels.py")

FULL_ENV = {"python": "3.12.3", "executable": "/opt/torch/.venv/bin/python3",
            "modules": {"numpy": "2.5.2", "array_api_compat": "1.16.0", "pytest": "8", "pytest_benchmark": "5",
                        "ml_dtypes": "0.5", "hypothesis": "6", "cupy": "14.2.0", "torch": "2.11.0"},
            "cupy_dists": {"cupy-cuda13x": "14.2.0"}, "torch_cuda": "13.0", "torch_cuda_available": True,
            "deepcore": "0.1.0", "cupy_backend": True}


def _env(**changes):
    env = json.loads(json.dumps(FULL_ENV))
    for key, value in changes.items():
        if key in env["modules"]:
            env["modules"][key] = value
        else:
            env[key] = value
    return env


# ------------------------------------------------------------------ the driver
class _FakeLibcuda:
    def __init__(self, version: int, rc: int = 0) -> None:
        self.version, self.rc = version, rc

    def cuDriverGetVersion(self, ref):  # noqa: N802 (the driver's name)
        ref._obj.value = self.version
        return self.rc


def _no_smi(*args, **kwargs):
    raise FileNotFoundError("nvidia-smi")


def _smi(text):
    return lambda *args, **kwargs: SimpleNamespace(stdout=text)


def _no_lib(name):
    raise OSError(f"{name}: cannot open shared object file")


def test_driver_version_from_libcuda_then_nvidia_smi():
    assert gc.driver_cuda_version(lambda name: _FakeLibcuda(13000), _no_smi) == (13, 0)
    assert gc.driver_cuda_version(lambda name: _FakeLibcuda(12080), _no_smi) == (12, 8)
    smi = "| NVIDIA-SMI 580.159.03   Driver Version: 580.159.03   CUDA Version: 13.0     |"
    assert gc.driver_cuda_version(_no_lib, _smi(smi)) == (13, 0)
    assert gc.driver_cuda_version(lambda name: _FakeLibcuda(0, rc=100), _smi(smi)) == (13, 0)  # no device: smi
    assert gc.driver_cuda_version(_no_lib, _no_smi) is None
    assert gc.driver_cuda_version(_no_lib, _smi("NVIDIA-SMI has failed")) is None
    assert isinstance(ctypes.c_int(0), ctypes.c_int)


@pytest.mark.parametrize(("version", "extra"), [((13, 0), "cuda13"), ((13, 2), "cuda13"), ((12, 2), "cuda12"),
                                                ((12, 9), "cuda12"), ((14, 0), "cuda13")])
def test_the_extra_matches_the_driver(version, extra):
    assert gc.cuda_extra(version) == extra


def test_a_driver_older_than_cuda_12_is_refused():
    with pytest.raises(ValueError, match="CUDA 11.8"):
        gc.cuda_extra((11, 8))
    plan = gc.install_plan(FULL_ENV, (11, 8), online=True)
    assert plan.fatal and "needs CUDA >= 12" in plan.fatal[0] and not plan.commands


# ------------------------------------------------------------------ the install plan
def test_nothing_to_install_on_the_lent_machine_but_array_api_compat():
    """The lent H200 image: CuPy 14 for CUDA 13, torch, pytest and pytest-benchmark, no array-api-compat,
    no package index: the shipped wheel, --no-index, and the checkout on PYTHONPATH."""
    plan = gc.install_plan(_env(array_api_compat=None), (13, 0), online=False)
    assert plan.extra == "cuda13" and not plan.fatal and not plan.lacking
    assert plan.pythonpath == [str(ROOT)]
    (cmd,) = plan.commands
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-index" in cmd and "--no-deps" in cmd
    assert Path(cmd[-1]).parent == ROOT / "benchmarks" / "wheels" and Path(cmd[-1]).is_file()
    assert Path(cmd[-1]).name.startswith("array_api_compat-")
    assert gc.install_plan(FULL_ENV, (13, 0), online=False).commands == []


def test_offline_without_cupy_or_pytest_cannot_run(tmp_path):
    plan = gc.install_plan(_env(cupy=None, cupy_dists={}, pytest=None, hypothesis=None), (13, 0), online=False,
                           wheel_dirs=(tmp_path,))
    assert any("cupy-cuda13x" in f for f in plan.fatal) and "pytest" in plan.fatal
    assert plan.lacking == ["hypothesis"]  # the run would go on without it
    # A wheel carried in .whl/ (the device README's way) is installed instead.
    for name in ("cupy_cuda13x-14.2.0-cp312-cp312-manylinux2014_x86_64.whl", "pytest-8.4.0-py3-none-any.whl",
                 "hypothesis-6.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    plan = gc.install_plan(_env(cupy=None, cupy_dists={}, pytest=None, hypothesis=None), (13, 0), online=False,
                           wheel_dirs=(tmp_path,))
    assert not plan.fatal and not plan.lacking
    assert sorted(Path(c[-1]).name.split("-")[0] for c in plan.commands) == ["cupy_cuda13x", "hypothesis", "pytest"]


def test_online_installs_the_extra_matching_the_driver_and_torch_for_it():
    plan = gc.install_plan(_env(cupy=None, cupy_dists={}, torch=None, torch_cuda_available=False), (12, 4),
                           online=True)
    assert plan.extra == "cuda12" and not plan.fatal
    pip_e, torch = plan.commands
    assert pip_e[-2:] == ["-e", f"{ROOT}[test,bench,cuda12]"]
    assert torch[-3:] == ["torch", "--index-url", "https://download.pytorch.org/whl/cu126"]
    plan = gc.install_plan(_env(torch=None), (13, 0), online=True, with_torch=False)
    assert plan.commands == []  # CuPy and the rest are there; --no-torch
    plan = gc.install_plan(_env(torch=None), (13, 0), online=True)
    assert plan.commands[0][-1] == "https://download.pytorch.org/whl/cu130"


def test_a_cupy_newer_than_the_driver_is_replaced():
    """CuPy for CUDA 13 does not run on a CUDA 12 driver (the other way round it does)."""
    plan = gc.install_plan(FULL_ENV, (12, 8), online=True)
    assert plan.commands[0][-3:] == ["uninstall", "--yes", "cupy-cuda13x"]
    assert plan.commands[1][-1] == f"{ROOT}[test,bench,cuda12]"
    offline = gc.install_plan(FULL_ENV, (12, 8), online=False, wheel_dirs=())
    assert offline.fatal == ["cupy-cuda12x (CuPy for CUDA 12; no package index and no wheel)"]
    older = gc.install_plan(_env(cupy_dists={"cupy-cuda12x": "14.2.0"}), (13, 0), online=False)
    assert older.commands == [] and not older.fatal


def test_no_driver_is_fatal():
    plan = gc.install_plan(FULL_ENV, None, online=True)
    assert plan.fatal == ["an NVIDIA driver (no libcuda.so.1, no nvidia-smi)"] and plan.commands == []


def test_the_index_check_takes_file_urls_and_gives_up_quickly(tmp_path):
    assert gc.index_reachable(tmp_path.as_uri()) is True
    assert gc.index_reachable((tmp_path / "none").as_uri()) is False
    assert gc.index_reachable("http://127.0.0.1:9/simple/", timeout=1.0) is False  # the discard port: refused


def test_the_probe_reports_this_interpreter():
    env = gc.probe(dict(os.environ, PYTHONPATH=str(ROOT)))
    assert env["modules"]["numpy"] == np.__version__ and env["deepcore"] == dc.__version__
    status = dc.available_backends()["cupy"]
    assert env["cupy_backend"] == (True if status is True else str(status))


# ------------------------------------------------------------------ pytest's output
def test_pytest_log_and_junit_parsing(tmp_path):
    text = "\n".join([
        "tests/test_cuda.py::test_a[10] PASSED                                   [ 10%]",
        "tests/test_cuda.py::test_a[4000] FAILED                                 [ 20%]",
        "tests/test_sce_kernel.py::test_b[gpu-1x10] SKIPPED (no usable CUDA device) [ 30%]",
        "tests/test_x.py::test_c ERROR                                           [ 40%]",
        "ERROR tests/test_losses.py - ModuleNotFoundError: No module named 'hypothesis'",
        "FAILED tests/test_cuda.py::test_a[4000] - AssertionError: no",
        "ERROR tests/test_x.py::test_c - RuntimeError",
        "SKIPPED [1] tests/test_sce_kernel.py:12: no usable CUDA device",
    ])
    counts, failed = gc.parse_pytest_log(text)
    assert counts == {"passed": 1, "failed": 1, "skipped": 1, "error": 2}
    assert failed == ["tests/test_cuda.py::test_a[4000]", "tests/test_x.py::test_c", "tests/test_losses.py"]
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
                   'skipped="3" tests="10" time="1.0"></testsuite></testsuites>')
    assert gc.junit_counts(xml) == {"passed": 4, "failed": 2, "error": 1, "skipped": 3}
    assert gc.junit_counts(tmp_path / "missing.xml") is None
    skips = gc.skip_reasons(text + "\nSKIPPED [3] benchmarks/test_gpu_kernels.py:140: CuPy cannot make bfloat16 arrays")
    assert skips == {"CuPy cannot make bfloat16 arrays": 3, "no usable CUDA device": 1}
    stage = gc.Stage("tests", rc=1, seconds=12.3, counts=counts, failed=failed, skips=skips)
    line = gc.summary_line(stage)
    assert line.startswith("tests: 1 passed, 1 failed, 2 error, 1 skipped (rc 1, 12 s)") and "test_a[4000]" in line
    assert line.splitlines()[-2:] == ["     skipped 3: CuPy cannot make bfloat16 arrays",
                                      "     skipped 1: no usable CUDA device"]
    assert not stage.ok and gc.Stage("b", rc=0, counts={"passed": 3}).ok
    assert not gc.Stage("b", rc=0, timed_out=True, counts={"passed": 3}).ok


def test_run_pytest_kills_its_own_run_at_the_limit(tmp_path):
    stage = gc.run_pytest("slow", [str(_write(tmp_path / "test_slow.py", "import time\n\ndef test_s():\n"
                                                                          "    time.sleep(60)\n")), "-q"],
                          dict(os.environ), 3.0, tmp_path / "slow.log")
    assert stage.timed_out and not stage.ok and stage.seconds < 30


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ the table
def _bench(case, size, dtype, contender, median, **info):
    return {"name": f"test_{case}[{size}-{dtype}-{contender}]", "group": f"{case}[{size}-{dtype}]",
            "extra_info": {"case": case, "size": size, "dtype": dtype, "contender": contender, "gpu": "NVIDIA H200",
                           **info},
            "stats": {"median": median, "mean": median, "iqr": 0.0, "rounds": 10}}


def _fake_results():
    b = kernels.sce_bytes
    return {"machine_info": {}, "benchmarks": [
        _bench("copy", "2 GiB", "float32", "cupy", 1.0e-3, bytes=4 << 30),
        _bench("copy", "2 GiB", "float32", "torch-cuda", 1.1e-3, bytes=4 << 30),
        _bench("softmax_ce", "128x10", "float32", "cupy", 8e-6, bytes=b(128, 10, "float32")),
        _bench("softmax_ce", "128x10", "float32", "torch-cuda", 40e-6, bytes=b(128, 10, "float32")),
        # 8192x32768 float32: 2.15 GB at 0.52 ms = 4.1 TB/s = 96% of 4.29; torch 3.5x slower
        _bench("softmax_ce", "8192x32768", "float32", "cupy", 0.52e-3, bytes=b(8192, 32768, "float32")),
        _bench("softmax_ce", "8192x32768", "float32", "torch-cuda", 1.82e-3, bytes=b(8192, 32768, "float32")),
        # bfloat16: 80% of the copy bandwidth: missed
        _bench("softmax_ce", "8192x32768", "bfloat16", "cupy", 0.3125e-3, bytes=b(8192, 32768, "bfloat16")),
        _bench("softmax_ce", "16384x131072", "bfloat16", "cupy", 2.2e-3, bytes=b(16384, 131072, "bfloat16")),
        _bench("conv", "128x64x32x32->64", "float32", "cupy", 2e-3, flops=2.9e10, bytes=1 << 27),
        _bench("cnn_step", "lenet-b128", "float32", "cupy", 1.5e-3, flops=3e9),
        {"name": "never_ran", "extra_info": {}, "stats": {}},
    ]}


def test_table_rows_from_pytest_benchmark_json():
    rows = {(r["case"], r["size"], r["dtype"], r["contender"]): r for r in gc.benchmark_rows(_fake_results())}
    assert len(rows) == 10
    copy = rows["copy", "2 GiB", "float32", "cupy"]
    assert copy["gbps"] == pytest.approx((4 << 30) / 1e-3 / 1e9) and copy["pct_copy"] is None
    head = rows["softmax_ce", "8192x32768", "float32", "cupy"]
    assert head["pct_copy"] == pytest.approx(100 * head["gbps"] / copy["gbps"])
    assert head["x_torch"] == pytest.approx(1.82 / 0.52) and head["target"] == "met"
    assert rows["softmax_ce", "8192x32768", "float32", "torch-cuda"]["x_torch"] is None
    assert rows["softmax_ce", "8192x32768", "bfloat16", "cupy"]["target"] == "n/a"  # no torch row to compare
    assert rows["softmax_ce", "128x10", "float32", "cupy"]["target"] == "met"  # 5x torch; no bandwidth target
    conv = rows["conv", "128x64x32x32->64", "float32", "cupy"]
    assert conv["gflops"] == pytest.approx(2.9e10 / 2e-3 / 1e9) and conv["target"] == "" and conv["pct_copy"] is None
    assert rows["cnn_step", "lenet-b128", "float32", "cupy"]["gbps"] is None


def test_a_missed_target_shows():
    data = _fake_results()
    data["benchmarks"].append(_bench("softmax_ce", "8192x32768", "bfloat16", "torch-cuda", 0.5e-3,
                                     bytes=kernels.sce_bytes(8192, 32768, "bfloat16")))
    rows = gc.benchmark_rows(data)
    bf16 = next(r for r in rows if r["size"] == "8192x32768" and r["dtype"] == "bfloat16" and r["contender"] == "cupy")
    assert bf16["pct_copy"] == pytest.approx(80.0, abs=1.0) and bf16["target"] == "MISSED"
    text = gc.format_table(rows)
    assert "targets (issue 14, fused softmax-CE): 2 met, 1 missed, 1 n/a of 4 rows" in text


def test_format_table():
    lines = gc.format_table(gc.benchmark_rows(_fake_results())).splitlines()
    head = lines[0]
    for col in ("case", "size", "dtype", "contender", "median", "GB/s", "GFLOP/s", "%copy", "x torch", "target"):
        assert col in head
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(head)
    sce = next(line for line in lines if "8192x32768" in line and "float32" in line and "cupy" in line)
    assert sce.split()[4:6] == ["520.0", "us"] and sce.split()[-2:] == ["3.50x", "met"]
    assert "96.2" in sce.split()  # % of the copy bandwidth: 4130 of 4295 GB/s
    assert all(len(line) <= len(head) for line in lines[2:12])
    assert gc.format_table([]).splitlines()[1].startswith("---")
    assert gc._fmt_time(1.5) == "1.50 s" and gc._fmt_time(2.5e-3) == "2.500 ms"


# ------------------------------------------------------------------ the whole run, faked
def test_the_run_in_order_with_the_table_last(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_pytest(name, args, env, limit_s, log_path):
        calls.append((name, args, env["PYTHONPATH"].split(os.pathsep)[0], limit_s))
        if name == "benchmarks":
            Path(args[-1].split("=", 1)[1]).write_text(json.dumps(_fake_results()), encoding="utf-8")
        else:
            Path(args[4].split("=", 1)[1]).write_text(
                '<testsuites><testsuite errors="0" failures="0" skipped="5" tests="905"/></testsuites>')
        return gc.Stage(name, rc=0, seconds=1.0, counts={"passed": 1})

    monkeypatch.setattr(gc, "driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(gc, "probe", lambda env: _env())
    monkeypatch.setattr(gc, "run_pytest", fake_run_pytest)
    monkeypatch.setattr(gc, "index_reachable", lambda: pytest.fail("--offline must not probe the network"))
    assert gc.main(["--out", str(tmp_path), "--offline"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert [c[0] for c in calls] == ["benchmarks", "tests"]
    bench_args, test_args = calls[0][1], calls[1][1]
    assert bench_args[:4] == ["benchmarks/test_gpu_kernels.py", "-m", "gpu", "--benchmark-only"]
    assert test_args[:3] == ["tests", "-m", "gpu"] and calls[0][2] == str(ROOT)
    assert calls[0][3] <= gc.BENCH_LIMIT_S and calls[1][3] <= gc.BUDGET_S
    assert out[-1].startswith("gpu_check: PASS in ")
    assert out[-2].startswith("targets (issue 14")
    assert any(line.startswith("tests: 900 passed, 0 failed, 0 error, 5 skipped") for line in out)
    assert any("on NVIDIA H200" in line for line in out)
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text(encoding="utf-8"))
    assert summary["tests"]["counts"]["passed"] == 900 and len(summary["rows"]) == 10


def test_the_run_fails_when_a_test_fails_and_stops_without_cupy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(gc, "probe", lambda env: _env())
    monkeypatch.setattr(gc, "run_pytest", lambda name, *a: gc.Stage(name, rc=1, counts={"failed": 1}))
    assert gc.main(["--out", str(tmp_path), "--offline"]) == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("gpu_check: FAIL")
    monkeypatch.setattr(gc, "probe", lambda env: _env(cupy_backend="CuPy is installed but no CUDA device is visible"))
    assert gc.main(["--out", str(tmp_path), "--offline"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().out
    monkeypatch.setattr(gc, "probe", lambda env: _env(cupy=None, cupy_dists={}))
    assert gc.main(["--out", str(tmp_path), "--offline", "--plan"]) == 2
    assert "cannot run, missing: cupy-cuda13x" in capsys.readouterr().out


def test_the_script_here_without_a_gpu(tmp_path):
    if gc.driver_cuda_version() is not None:
        pytest.skip("an NVIDIA driver is here")
    r = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--out", str(tmp_path / "o")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == ("gpu_check: no NVIDIA driver here (no libcuda.so.1, no nvidia-smi): "
                                         "nothing to run")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the benchmark cases on the CPU
def test_the_check_of_a_softmax_ce_result():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((5, 7)) * 3
    ys = np.array([0, 6, 3, 3, 1])
    p = np.exp(xs - xs.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(5), ys])
    grad = p.copy()
    grad[np.arange(5), ys] -= 1
    check = kernels.check_softmax_ce(xs, ys, 40, grad / 40, loss, 2.0, 2.0)
    assert max(check.values()) < 1e-12
    check = kernels.check_softmax_ce(xs, ys, 40, grad / 20, loss * 1.01, 2.0, 2.2)
    assert check["grad_rel_err"] == pytest.approx(1.0) and check["loss_rel_err"] == pytest.approx(0.01)
    assert check["mean_rel_err"] == pytest.approx(0.2 / 2.2)
    assert kernels.sce_bytes(8192, 32768, "bfloat16") == 2 * 8192 * 32768 * 2 + 8 * 8192
    assert kernels.conv_bytes(128, 64, 64, 32) == 4 * (4 * 128 * 64 * 32 * 32 + 2 * 64 * 64 * 9)


class _RandomState:
    def __init__(self, seed):
        self.g = np.random.default_rng(seed)

    def standard_normal(self, shape, dtype):
        return self.g.standard_normal(shape, dtype=np.float32).astype(dtype)

    def randint(self, low, high, size):
        return self.g.integers(low, high, size)


#: CuPy's calls in the softmax-CE case, answered by NumPy (deepcore's NumPy backend does the loss).
FAKE_CUPY = SimpleNamespace(random=SimpleNamespace(RandomState=_RandomState), empty=np.empty, float32=np.float32,
                            int64=np.int64, uint16=np.uint16, asarray=np.asarray, asnumpy=np.asarray,
                            isfinite=np.isfinite)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cupy_softmax_ce_case_on_a_numpy_stand_in(dtype):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    fn, check = kernels._sce_case(FAKE_CUPY, "cupy", 300, 50, dtype)
    assert check["rows_checked"] >= 50 and check["grad_finite"]
    assert max(v for k, v in check.items() if k.endswith("rel_err")) < kernels.TOLERANCE[dtype]
    loss, grad = fn()
    assert grad.shape == (300, 50) and grad.dtype.name == dtype


def test_a_wrong_gradient_fails_the_case(monkeypatch):
    real = dc.losses.softmax_cross_entropy

    def off_by_one_percent(*args, **kwargs):
        loss, grad = real(*args, **kwargs)
        return loss, grad * np.float32(1.01)

    monkeypatch.setattr(dc.losses, "softmax_cross_entropy", off_by_one_percent)
    with pytest.raises(AssertionError, match="wrong result"):
        kernels._sce_case(FAKE_CUPY, "cupy", 100, 10, "float32")


_PLUGIN = '''
import pytest, torch

def pytest_runtest_setup(item):
    mod = item.module
    if mod.__name__ == "test_gpu_kernels":  # the GPU cases, with PyTorch on the CPU standing in for CUDA
        mod.DEVICE, mod.COPY_BYTES = "cpu", 1 << 22
        def torch_on_cpu():
            mod._sync[0] = lambda: None
            return torch
        mod._torch_cuda = torch_on_cpu
        mod._gpu_name = lambda contender: "FAKE: torch on the CPU"
'''


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed (pip install torch)")
def test_the_benchmark_cases_write_the_json_the_table_reads(tmp_path):
    """benchmarks/test_gpu_kernels.py under pytest-benchmark for real, the torch contender on the CPU
    (the CuPy contender skips here): its JSON goes through the script's table."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "fake_gpu_plugin.py").write_text(_PLUGIN, encoding="utf-8")
    out = tmp_path / "bench.json"
    # Not an xdist worker's environment: pytest-benchmark disables itself under one (-n 2).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), DEEPCORE_BENCH_BUDGET="0.05")
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_gpu_kernels.py", "-m", "gpu",
                        "--benchmark-only", f"--benchmark-json={out}", "-p", "fake_gpu_plugin", "-p",
                        "no:cacheprovider", "-q", "-k", "copy or 128x10"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    ran = {(b["extra_info"]["case"], b["extra_info"]["dtype"]) for b in data["benchmarks"]}
    assert ran == {("copy", "float32"), ("softmax_ce", "float32"), ("softmax_ce", "bfloat16")}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        assert info["contender"] == "torch-cuda" and info["gpu"] == "FAKE: torch on the CPU"
        assert info["gb_per_s"] == pytest.approx(info["bytes"] / b["stats"]["median"] / 1e9)
        assert info["calls_per_round"] >= 1 and b["options"]["timer"].endswith("synced_clock")
        if info["case"] == "softmax_ce":
            assert info["check"]["grad_rel_err"] < kernels.TOLERANCE[info["dtype"]]
    rows = gc.benchmark_rows(data)
    assert len(rows) == 3 and all(r["pct_copy"] for r in rows if r["case"] == "softmax_ce")
    assert "torch-cuda" in gc.format_table(rows)
