"""The pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (see README.md here).

Test files are ``test_*.py`` so that ``pytest benchmarks/`` collects them, while the
project's plain ``python -m pytest`` (``testpaths = ["tests"]``) never runs them.
Every test times one contender (numpy, cupy, torch, ...) on one case at one size,
through the same workloads as ``deepcore bench`` (:mod:`deepcore.bench`).

Threads, pinned for every library and reported in each result's ``extra_info``:
``DEEPCORE_BENCH_THREADS`` (default: every core this process may use). The
variables ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` are
set from it below, at import, before this file imports NumPy (pytest and its
plugins do not import it); with threadpoolctl installed the pools are also pinned
at run time, which works even if NumPy came first; PyTorch gets
``torch.set_num_threads``. An explicit ``DEEPCORE_BENCH_THREADS`` overrides those
variables; without it, values already in the environment are kept.

Slow cases (the 4096^3 matmul, ~10 s a call on two CPU cores) run only with
``--run-slow`` or ``DEEPCORE_BENCH_SLOW=1``. CUDA contenders carry the ``gpu``
marker and skip, with the reason, where there is no GPU.
"""

from __future__ import annotations

import math
import os
import time

_requested = os.environ.get("DEEPCORE_BENCH_THREADS")
try:
    _cores = len(os.sched_getaffinity(0))
except (AttributeError, OSError):
    _cores = os.cpu_count() or 1
THREADS = int(_requested) if _requested else _cores
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if _requested:
        os.environ[_var] = str(THREADS)
    else:
        os.environ.setdefault(_var, str(THREADS))

import pytest  # noqa: E402

from deepcore import bench  # noqa: E402  (imports NumPy: after the variables above)

#: Seconds one test may spend timing (rounds are cut to fit; at least 3 rounds).
BUDGET_S = float(os.environ.get("DEEPCORE_BENCH_BUDGET", "1.0"))
#: Seconds a round should last at least (calls are repeated within a round to reach it).
ROUND_MIN_S = 0.01


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="deepcore benchmarks: also run cases marked slow (4096^3 matmul)")


def pytest_configure(config: pytest.Config) -> None:
    try:  # torch first, so that pinning reaches its thread pools too
        import torch  # noqa: F401
    except ImportError:
        pass
    # numba's loops too (the suite's MLP steps; their compile loads SciPy's OpenBLAS, a pool to pin)
    bench.preload_jit([("mlp_step", "numpy")])
    config._deepcore_threads = bench.set_threads(THREADS)


def pytest_unconfigure(config: pytest.Config) -> None:
    bench.restore_threads()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("DEEPCORE_BENCH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow benchmark: run with --run-slow or DEEPCORE_BENCH_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> list[str]:
    t = getattr(config, "_deepcore_threads", {})
    return [f"deepcore benchmarks: {t.get('blas_threads')} BLAS threads ({t.get('method')}), "
            f"torch threads {t.get('torch_threads', '-')}, {t.get('cores')} cores"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``spec, contender`` pairs for the cases a test module names in ``CASES``."""
    if {"spec", "contender"} <= set(metafunc.fixturenames):
        cases = metafunc.module.CASES
        params = []
        for spec in bench.suite("full"):
            if spec.case not in cases:
                continue
            for contender in bench.CASES[spec.case]:
                marks = [pytest.mark.slow] if spec.slow else []
                if contender in bench.GPU_CONTENDERS:
                    marks.append(pytest.mark.gpu)
                params.append(pytest.param(spec, contender, marks=marks,
                                           id=f"{spec.case}-{spec.param_id}-{contender}"))
        metafunc.parametrize("spec, contender", params)


@pytest.fixture(scope="session")
def bench_env() -> dict:
    return bench.environment()


@pytest.fixture
def measure(benchmark, bench_env):
    """``measure(spec, contender)``: set the workload up (skip if it cannot run here), record
    what it is in ``extra_info``, and time it with as many rounds as ``BUDGET_S`` allows."""

    def _measure(spec: bench.Spec, contender: str) -> None:
        try:
            wl = bench.make_workload(spec.case, contender, **spec.kwargs)
        except bench.NotApplicable as exc:
            pytest.skip(str(exc))
        threads = bench_env["threads"]
        benchmark.group = f"{spec.case}[{spec.param_id}]"
        benchmark.extra_info.update(
            wl.info,
            versions={k: bench_env[k] for k in ("deepcore", "numpy", "torch", "cupy") if k in bench_env},
            blas=bench_env["blas"], threads=threads.get("blas_threads"), torch_threads=threads.get("torch_threads"),
            cpu=bench_env["cpu"], cuda_device=bench_env.get("cuda_device") or bench_env.get("torch_cuda_device"),
        )
        pause = bench.default_cooldown()  # let the previous test's idle thread pools fall asleep
        if pause:
            time.sleep(pause)
        wl.call()  # warm-up, outside the timing
        t0 = time.perf_counter()
        wl.call()
        one = max(time.perf_counter() - t0, 1e-7)
        iterations = max(1, math.ceil(ROUND_MIN_S / one))
        rounds = int(min(50, max(3, BUDGET_S // (iterations * one))))
        benchmark.pedantic(wl.call, rounds=rounds, iterations=iterations, warmup_rounds=1)

    return _measure
