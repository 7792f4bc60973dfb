"""Time one data-parallel training step on 1 vs 2 ranks, and the share spent communicating.

    python benchmarks/bench_distributed.py            # runs mpirun itself, prints a table
    python benchmarks/bench_distributed.py --steps 5  # quicker

For each MLP (784-256-10 and 784-4096-4096-10, float32, SGD with momentum, per-rank
batch 128 of random MNIST-shaped data) it starts ``mpirun -n R`` for each
configuration: 1 rank with 1 BLAS thread, 1 rank with 2 BLAS threads, 2 ranks with
1 BLAS thread each. A step is what ``deepcore.train.fit`` does (except that its
backward also forms the input gradient, which ``fit`` skips): forward, loss, backward, the
bucketed gradient allreduce (:class:`deepcore.distributed.GradientReducer`, only with 2 ranks),
optimizer step. Reported: the median step time, the median time
inside the allreduce calls ("comm"), the time packing and unpacking buckets ("pack"),
comm's share of the step, and samples per second over all ranks. The machine is named
in the output; compare rows from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"784-256-10": [784, 256, 10], "784-4096-4096-10": [784, 4096, 4096, 10]}
CONFIGS = [(1, 1), (1, 2), (2, 1)]  # (ranks, BLAS threads per rank)


def worker(widths: list[int], batch: int, steps: int) -> None:
    import numpy as np

    from deepcore import losses, nn
    from deepcore.distributed import GradientReducer, get_communicator
    from deepcore.optim import SGD

    comm = get_communicator()
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers += [nn.Linear(a, b, init="he", seed=i), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    params = model.parameters()
    opt = SGD(params, lr=0.01, momentum=0.9)
    reducer = GradientReducer(params, comm) if comm.size > 1 else None
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((batch, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], batch)
    totals, comms, packs = [], [], []
    for step in range(steps + 3):  # 3 warm-up steps
        comm.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        pred, backward = model.forward(x, train=True)
        loss, grad = losses.softmax_cross_entropy(pred, y)
        backward(grad)
        t1 = time.perf_counter()
        c0 = reducer.comm_seconds if reducer else 0.0
        if reducer is not None:
            reducer.reduce(loss)
        else:
            float(loss)
        t2 = time.perf_counter()
        c = (reducer.comm_seconds - c0) if reducer else 0.0
        opt.step()
        t3 = time.perf_counter()
        if step >= 3:
            totals.append(t3 - t0)
            comms.append(c)
            packs.append(t2 - t1 - c)
    # Each rank's median step, and their mean over ranks (the ranks wait for each other at
    # every allreduce, so they differ little).
    worst = comm.allreduce_host([statistics.median(totals)], "sum")  # sum/size is the mean over ranks
    if comm.rank == 0:
        print(json.dumps({
            "ranks": comm.size, "step": statistics.median(totals), "step_mean_over_ranks": float(worst[0]) / comm.size,
            "comm": statistics.median(comms), "pack": statistics.median(packs),
            "buckets": 0 if reducer is None else len(reducer.buckets),
            "params": sum(int(np.prod(p.shape)) for p in params), "batch": batch,
        }), flush=True)


def _mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.is_file() else shutil.which("mpirun")
    if not found:
        sys.exit("bench_distributed: no mpirun beside this Python or on PATH (pip install -e '.[mpi]')")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 3 warm-up)")
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker([int(w) for w in args.worker.split("-")], args.batch, args.steps)
        return
    mpirun = _mpirun()
    print(f"# {platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"Python {platform.python_version()}; per-rank batch {args.batch}, median of {args.steps} steps")
    header = (f"{'model':18s} {'ranks':>5s} {'thr/rank':>8s} {'step ms':>9s} {'comm ms':>9s} {'pack ms':>8s} "
              f"{'comm %':>7s} {'samples/s':>10s} {'buckets':>7s}")
    print(header)
    print("-" * len(header))
    for name in MODELS:
        for ranks, threads in CONFIGS:
            env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                       OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            cmd = [mpirun, "--oversubscribe", "-n", str(ranks), sys.executable, __file__, "--worker", name,
                   "--steps", str(args.steps), "--batch", str(args.batch)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            if out.returncode != 0:
                print(f"{name:18s} {ranks:5d} failed: {out.stderr.strip()[-500:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            share = 100 * r["comm"] / r["step"]
            print(f"{name:18s} {ranks:5d} {threads:8d} {1e3 * r['step']:9.2f} {1e3 * r['comm']:9.2f} "
                  f"{1e3 * r['pack']:8.2f} {share:6.1f}% {ranks * args.batch / r['step']:10.0f} {r['buckets']:7d}")


if __name__ == "__main__":
    main()
