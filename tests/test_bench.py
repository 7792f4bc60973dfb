"""``deepcore bench`` and :mod:`deepcore.bench`: tiny sizes, a few seconds in all."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepcore import bench
from deepcore.cli import main
from tests.helpers import HAVE_TORCH

CPU = ["numpy", "numpy-plain"] + (["torch"] if HAVE_TORCH else [])


def _bench(*args: str) -> list[str]:
    return ["bench", "--quick", "--rounds", "2", "--min-time", "0.0005", *args]


def _benchmark_script(name: str) -> Any:
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert f"fused CPU loops: {env['cpu_jit']}" in bench.describe_environment(env)


def test_environment_says_whether_the_fused_loops_run(monkeypatch):
    from deepcore.backend import cpu_jit
    from deepcore.sysinfo import optional_integrations

    def untried() -> None:
        for name, value in (("_kernels", None), ("_tried", False), ("_reason", "")):
            monkeypatch.setattr(cpu_jit, name, value)

    numba = optional_integrations()["numba"]
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    untried()
    assert bench.environment()["cpu_jit"] == (f"numba {numba}" if numba else "off (numba not installed)")
    monkeypatch.setenv("DEEPCORE_JIT", "1")
    untried()
    assert bench.environment()["cpu_jit"] == (f"numba {numba}, loss fused (DEEPCORE_JIT=1)" if numba
                                              else "off (numba not installed)")
    monkeypatch.setenv("DEEPCORE_JIT", "0")
    untried()
    assert bench.environment()["cpu_jit"] == "off (disabled by DEEPCORE_JIT=0)"
    with pytest.raises(ValueError, match="positive"):
        bench.set_threads(0)
    bench.restore_threads()


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    bench.restore_threads()


# ---- the convolutional cases (deepcore/bench/cnn.py)

TINY_LENET = {"image_shape": (1, 8, 8), "channels": (4, 8), "hidden": (16,)}
TINY_VGG = {"image_shape": (3, 32, 32), "channels": (4, 8, 8), "hidden": (16,)}


@pytest.mark.skipif(not HAVE_TORCH, reason="needs PyTorch")
@pytest.mark.parametrize("net", [TINY_LENET, TINY_VGG], ids=["lenet", "vgg-batchnorm"])
def test_the_cnn_step_contenders_compute_the_same_training(net):
    """deepcore's ``--model cnn`` network and its PyTorch mirror (same layers, same initial weights, same
    data) follow the same loss curve, so the benchmark compares equal work."""
    curves = {}
    for contender in ("numpy", "torch"):
        wl = bench.make_workload("cnn_step", contender, batch=4, **net)
        curves[contender] = [float(np.asarray(wl.fn() if contender == "numpy" else wl.fn().item()))
                             for _ in range(4)]
    assert curves["numpy"][-1] < curves["numpy"][0]
    np.testing.assert_allclose(curves["torch"], curves["numpy"], rtol=1e-4)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs PyTorch")
@pytest.mark.parametrize("bias", [False, True])
def test_the_conv_contenders_compute_the_same_gradient(bias):
    got = {c: bench.make_workload("conv", c, n=2, c=3, o=4, hw=6, bias=bias) for c in ("numpy", "torch")}
    dx_np, dx_torch = got["numpy"].fn(), got["torch"].fn().numpy()
    assert dx_np.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(dx_np, dx_torch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["numpy"].fn(), dx_np)  # no gradient accumulates between calls


def test_conv_flops_and_the_gemms_of_the_same_size():
    conv = bench.make_workload("conv", "numpy", n=2, c=3, o=4, hw=6)
    gemms = bench.make_workload("conv_gemms", "numpy", n=2, c=3, o=4, hw=6)
    fwd = 2 * 2 * 4 * 6 * 6 * 3 * 3 * 3  # 2 N O OH OW C KH KW (padding 1 keeps 6x6)
    assert conv.info["flops_forward"] == fwd and conv.info["flops"] == 3 * fwd and conv.info["bias"] is False
    assert gemms.info["flops"] == conv.info["flops"]
    nl, ckk = 2 * 6 * 6, 3 * 9
    assert gemms.info["gemms"] == [[4, ckk, nl], [ckk, nl, 4], [ckk, 4, nl]]
    assert sum(2 * m * k * n for m, k, n in gemms.info["gemms"]) == gemms.info["flops"]


def test_the_lenet_step_counts_its_flops():
    """1x28x28 LeNet (conv5x5 32, pool, conv3x3 64 (the side is 14 by then), pool, 3136-256-10): 3x each
    layer's forward, 2x the first conv's (no dx)."""
    from deepcore.bench.cnn import _deepcore_cnn, network_flops

    model = _deepcore_cnn("numpy", (1, 28, 28), None, (256,))
    n = 128
    conv1 = 2 * n * 32 * 28 * 28 * 1 * 25
    conv2 = 2 * n * 64 * 14 * 14 * 32 * 9
    fcs = 2 * n * (64 * 7 * 7 * 256 + 256 * 10)
    assert network_flops(model, n, (1, 28, 28)) == 2 * conv1 + 3 * (conv2 + fcs)
    wl = bench.make_workload("cnn_step", "numpy", batch=2, **TINY_LENET)
    assert wl.info["flops"] > 0 and "lenet 3x3 4,8" in wl.info["model"]


def test_the_cnn_epoch_contenders_each_run_an_epoch():
    for contender in ("numpy", "numpy-fit") + (("torch",) if HAVE_TORCH else ()):
        wl = bench.make_workload("cnn_epoch", contender, n=24, batch=8, **TINY_LENET)
        wl.call()
        assert wl.info["steps"] == 3 and wl.info["shape"] == [24, 1, 8, 8]


def test_suites_cover_the_convolutional_cases():
    for name in ("quick", "full"):
        ids = {f"{s.case}[{s.param_id}]" for s in bench.suite(name)}
        assert {"cnn_step[1x28x28-b128]", "conv[128x64x32x32-o64-k3]", "conv_gemms[128x64x32x32-o64-k3]"} <= ids
    full = bench.suite("full")
    assert "cnn_step[3x32x32-b64]" in {f"{s.case}[{s.param_id}]" for s in full}
    assert [(s.kwargs, s.slow) for s in full if s.case == "cnn_epoch"] == [({"n": 60000, "batch": 128}, True)]
    assert bench.CASES["conv_gemms"] == ("numpy", "torch")


def test_the_table_and_the_json_give_gflops(capsys, tmp_path):
    out = tmp_path / "conv.json"
    assert main(_bench("--backends", "numpy", "--cases", "conv,conv_gemms,mlp_step", "--save", str(out))) == 0
    table = capsys.readouterr().out
    assert "GFLOP/s" in table
    rows = {r.split()[0] + r.split()[1]: r.split() for r in table[table.index("case "):].splitlines()[2:] if r}
    assert float(rows["conv2x4x8x8-o4-k3"][-3]) > 0 and rows["mlp_stepb16"][-3] == "-"
    gflops = {b["name"]: b["extra_info"]["gflops"] for b in json.loads(out.read_text())["benchmarks"]}
    assert gflops["conv[2x4x8x8-o4-k3-numpy]"] > 0 and gflops["conv_gemms[2x4x8x8-o4-k3-numpy]"] > 0


def test_a_numpy_workload_loads_no_other_library():
    """A benchmark process of one contender (``benchmarks/cnn_step.py``, ``plain_loop.py``) loads only that
    contender's library: probing every registered backend would import torch, JAX, Dask and SciPy's BLAS."""
    import subprocess
    import sys

    code = ("import sys\nfrom deepcore.bench import make_workload\n"
            "make_workload('conv', 'numpy', n=1, c=2, o=2, hw=4).call()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'dask', 'scipy', 'cupy'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plain_loop_workers_run_at_the_thread_count_asked_for():
    """benchmarks/plain_loop.py pins each worker's pools after NumPy is loaded: threadpoolctl reaches
    only loaded libraries, and a worker pinned before NumPy ran its "1 thread" rows on every core."""
    plain_loop = _benchmark_script("plain_loop")
    # The "numpy" worker runs with DEEPCORE_JIT=1, whatever this process has: its update and loss fused
    # where numba loads (an installed numba that refuses this NumPy or fails to compile: the worker
    # says why).
    fused = importlib.util.find_spec("numba") is not None
    worker = plain_loop._Worker(1, "mlp_step", "numpy", "8-4-2", 4, 1)
    try:
        ready = worker.ready()
        assert ready["threads"] and all(n == 1 for n in ready["threads"].values()), ready
        assert ready["momentum_forms"] == {}  # no parameter large enough to time the forms on
        # deepcore's worker loads numba's kernels up front, before its pools are pinned
        assert (ready["jit"] == "fused (numba); softmax cross-entropy fused" if fused
                else ready["jit"].startswith("numba unavailable"))
        fused = ready["jit"].startswith("fused (numba)")
        assert worker.run(2) > 0
    finally:
        worker.close()
    # 400 x 300 weights: the warm-up's 13 steady steps time both NumPy momentum forms in the worker
    # without numba, which says which won; with numba the step runs fused and nothing is timed.
    worker = plain_loop._Worker(1, "mlp_step", "numpy-nojit", "300-400-2", 4, 14)
    try:
        ready = worker.ready()
        assert list(ready["momentum_forms"].items()) in ([("120000 float32", "blocked")],
                                                         [("120000 float32", "one-pass")])
        assert ready["jit"] == "disabled by DEEPCORE_JIT=0"
    finally:
        worker.close()
    worker = plain_loop._Worker(1, "mlp_step", "numpy", "300-400-2", 4, 14)
    try:
        ready = worker.ready()
        assert ready["momentum_forms"] == {} if fused else len(ready["momentum_forms"]) == 1
    finally:
        worker.close()


def test_plain_loop_median_interval_matches_the_exact_bootstrap():
    """The 90% interval of a median ratio (benchmarks/plain_loop.py) against the exact bootstrap
    distribution of the median of 25 rounds: P(median <= x_(j)) is the chance that at least 13 of
    25 draws are <= x_(j), a binomial tail with p = j/25. Its 5% and 95% points (x_(9) and x_(17),
    each 0.02 of probability from the next order statistic, four standard errors of 2,000 resamples)
    are what the resampling must find."""
    from math import comb

    plain_loop = _benchmark_script("plain_loop")
    n = 25
    r = [0.80 + 0.01 * ((7 * k) % n) for k in range(n)]  # 25 distinct values, not in order
    order = sorted(r)
    cdf = [sum(comb(n, k) * (j / n) ** k * (1 - j / n) ** (n - k) for k in range(13, n + 1)) for j in range(1, n + 1)]
    low = order[next(j for j, c in enumerate(cdf) if c >= 0.05)]
    high = order[next(j for j, c in enumerate(cdf) if c >= 0.95)]
    assert (low, high) == (order[8], order[16])
    assert plain_loop._median_interval(r) == (low, high)
    assert plain_loop._median_interval([1.02] * 7) == (1.02, 1.02)
    ratio = plain_loop._ratio({"a": [2.0, 3.0, 4.0], "b": [1.0, 1.0, 1.0]}, "a", "b")
    assert ratio["median"] == 3.0 and ratio["ci90_low"] <= 3.0 <= ratio["ci90_high"]


def test_fused_updates_benchmark_times_every_form(capsys):
    """benchmarks/fused_updates.py: one row per form and size, each ratio against the NumPy form."""
    from deepcore.backend import cpu_jit, numpy_backend

    if cpu_jit.sgd_momentum() is None:
        pytest.skip(f"the fused loops are unavailable: {cpu_jit.status()['reason']}")
    mod = _benchmark_script("fused_updates")
    fused_min, forms = numpy_backend._FUSED_MIN, numpy_backend._MOMENTUM_FORMS
    assert mod.main(["--sizes", str(fused_min), "--rounds", "2", "--calls", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], int(r[1]), " ".join(r[2:-3])) for r in rows] == [
        ("sgd", fused_min, "numpy one-pass"), ("sgd", fused_min, "numpy blocked"), ("sgd", fused_min, "fused")] + [
        (update, fused_min, form) for update in ("sgd-plain", "sgd+nwd", "adam", "rmsprop", "adagrad")
        for form in ("numpy", "fused")]
    assert {rows[i][-2] for i in (0, 3, 5, 7, 9, 11)} == {"1.000x"}  # the NumPy forms against themselves
    # the backend's switches are as they were
    assert numpy_backend._FUSED_MIN == fused_min and numpy_backend._MOMENTUM_FORMS is forms
    with pytest.raises(SystemExit):
        mod.main(["--rounds", "0"])


def test_fused_loss_benchmark_times_both_forms_and_says_which_the_backend_runs(capsys):
    """benchmarks/fused_loss.py: a row per form and shape, the ratio against NumPy's form, the switches restored."""
    from deepcore.backend import cpu_jit, numpy_backend

    if cpu_jit.sgd_momentum() is None:
        pytest.skip(f"the fused loops are unavailable: {cpu_jit.status()['reason']}")
    mod = _benchmark_script("fused_loss")
    mode, limit = cpu_jit._mode, numpy_backend._CE_FUSED_MAX_SIZE
    assert mod.main(["--shapes", f"4x3,{limit + 1}x1", "--rounds", "2", "--calls", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:2] for r in rows] == [["4x3", "numpy"], ["4x3", "fused"], [f"{limit + 1}x1", "numpy"],
                                     [f"{limit + 1}x1", "fused"]]
    assert rows[0][3] == rows[2][3] == "1.000x" and rows[1][-1] == "fused" and rows[3][-1] == "numpy"
    assert cpu_jit._mode == mode and numpy_backend._CE_FUSED_MAX_SIZE == limit
    for bad in (["--rounds", "0"], ["--shapes", "32x"], ["--shapes", "0x10"]):
        with pytest.raises(SystemExit):
            mod.main(bad)
