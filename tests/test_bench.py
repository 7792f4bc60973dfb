"""``deepcore bench`` and :mod:`deepcore.bench`: tiny sizes, a few seconds in all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepcore import bench
from deepcore.cli import main
from tests.helpers import HAVE_TORCH

CPU = ["numpy", "numpy-plain"] + (["torch"] if HAVE_TORCH else [])


def _bench(*args: str) -> list[str]:
    return ["bench", "--quick", "--rounds", "2", "--min-time", "0.0005", *args]


def test_bench_prints_a_table_with_ratios(capsys):
    assert main(_bench("--backends", ",".join(CPU + ["numpy-unfused", "numpy-dx", "numpy-fit"]))) == 0
    out = capsys.readouterr().out
    assert "deepcore bench:" in out and "numpy" in out and "BLAS" in out
    table = out[out.index("case "):]
    for case in ("matmul", "softmax", "softmax_ce", "mlp_step", "epoch"):
        assert case in table
    ref = "torch" if HAVE_TORCH else "numpy"
    rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
    assert rows and all(r[-1] == ref for r in rows)
    assert all(r[-2].endswith("x") for r in rows)
    ref_rows = [r for r in rows if r[2] == ref]
    assert ref_rows and all(r[-2] == "1.00x" for r in ref_rows)
    assert {"numpy-unfused", "numpy-dx", "numpy-fit", "numpy-plain"} <= {r[2] for r in rows}


def test_save_writes_pytest_benchmark_json_and_compare_reads_it(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    args = _bench("--backends", "numpy,numpy-plain", "--cases", "matmul,mlp_step", "--threads", "1")
    assert main([*args, "--save", str(a)]) == 0
    assert main([*args, "--save", str(b)]) == 0
    data = json.loads(a.read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(data)
    names = {x["name"] for x in data["benchmarks"]}
    assert names == {"matmul[64x64x64-numpy]", "mlp_step[b16-numpy]", "mlp_step[b16-numpy-plain]",
                     "mlp_step[32-16-16-4-b8-numpy]", "mlp_step[32-16-16-4-b8-numpy-plain]"}
    for entry in data["benchmarks"]:
        stats = entry["stats"]
        assert stats["rounds"] == 2 and stats["min"] <= stats["median"] <= stats["max"] and stats["iterations"] >= 1
        assert len(stats["data"]) == 2
        extra = entry["extra_info"]
        assert extra["device"] == "cpu" and extra["dtype"] == "float32" and extra["shape"]
        assert extra["backend"] == "numpy" and extra["versions"]["numpy"] == np.__version__
        assert extra["blas"]["name"] and extra["reference"] == "numpy" and extra["ratio_to_reference"] > 0
        assert entry["group"] and entry["fullname"].endswith(entry["name"])
    capsys.readouterr()
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "mlp_step[b16-numpy-plain]" in out and "B / A" in out
    loaded = bench.load_results(b)
    assert "x" in bench.compare(data, loaded).splitlines()[2]


def test_compare_and_argument_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--compare", str(tmp_path / "nope.json"), str(tmp_path / "nope2.json")]) == 2
    assert "no file at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["bench", "--compare", str(bad), str(bad)]) == 1
    assert "not a benchmark file" in capsys.readouterr().err
    assert main(["bench", "--cases", "nope"]) == 2
    assert "--cases: unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "--backends", "mxnet"]) == 2
    assert main(["bench", "--rounds", "0"]) == 2


@pytest.mark.parametrize("spec", bench.suite("tiny"), ids=lambda s: f"{s.case}[{s.param_id}]")
def test_every_available_contender_sets_up_and_runs(spec):
    ran = 0
    for contender in bench.CASES[spec.case]:
        try:
            wl = bench.make_workload(spec.case, contender, **spec.kwargs)
        except bench.NotApplicable:
            continue
        wl.call()
        ran += 1
        info = wl.info
        assert info["case"] == spec.case and info["contender"] == contender and info["dtype"] == "float32"
        assert info["device"] in ("cpu", "cuda") and info["shape"]
    assert ran >= 1


@pytest.mark.parametrize("sizes", [(784, 256, 10), (64, 48, 32, 10)], ids=["784-256-10", "deeper"])
def test_the_mlp_step_contenders_compute_the_same_training(sizes):
    """Same weights, same data: deepcore (with and without the input gradient), the hand-written
    NumPy step and PyTorch follow the same loss curve, so the benchmark compares equal work."""
    losses = {}
    for contender in CPU + ["numpy-dx"]:
        wl = bench.make_workload("mlp_step", contender, batch=32, sizes=sizes)
        losses[contender] = [float(np.asarray(wl.fn() if not contender.startswith("torch") else wl.fn().item()))
                             for _ in range(5)]
    ref = losses["numpy-plain"]
    assert ref[-1] < ref[0]
    for name, curve in losses.items():
        np.testing.assert_allclose(curve, ref, rtol=2e-5, err_msg=name)


def test_suites_cover_the_issue():
    full = bench.suite("full")
    matmuls = {s.param_id for s in full if s.case == "matmul"}
    assert {"512x512x512", "2048x2048x2048", "4096x4096x4096", "128x784x256-bT"} <= matmuls
    assert [s.slow for s in full if s.param_id == "4096x4096x4096"] == [True]
    for case in ("softmax", "log_softmax", "softmax_ce"):
        assert {s.kwargs["c"] for s in full if s.case == case} == {10, 1000, 32768}
    steps = {(s.kwargs["batch"], s.kwargs.get("sizes", bench.MLP)) for s in full if s.case == "mlp_step"}
    assert steps == {(32, (784, 256, 10)), (128, (784, 256, 10)), (512, (784, 256, 10)), (2048, (784, 256, 10)),
                     (256, (3072, 1024, 1024, 10))}
    assert steps == {(s.kwargs["batch"], s.kwargs.get("sizes", bench.MLP)) for s in full if s.case == "mlp_gemms"}
    assert [s.kwargs for s in full if s.case == "epoch"] == [{"n": 60000, "batch": 128}]
    with pytest.raises(ValueError, match="unknown suite"):
        bench.suite("huge")


def test_threads_and_environment():
    info = bench.set_threads(1)
    assert info["requested"] == 1 and info["method"] in ("threadpoolctl", "env")
    if info["method"] == "threadpoolctl":
        assert info["blas_threads"] == 1
    env = bench.environment()
    assert env["numpy"] == np.__version__ and env["cores"] >= 1 and "blas" in env
    with pytest.raises(ValueError, match="positive"):
        bench.set_threads(0)
    bench.restore_threads()


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    bench.restore_threads()
