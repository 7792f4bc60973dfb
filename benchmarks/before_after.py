"""The MLP training step of two deepcore checkouts, each in its own processes, alternating.

    git archive e3f3eaf deepcore | tar -x -C /tmp/orig     # the code before the speed work
    python benchmarks/before_after.py /tmp/orig . --threads 1 --rounds 5

For each round and each variant a fresh Python process builds the 784-256-10 MLP (float32,
SGD momentum 0.9), warms up 100 steps of batch 128 and times 7 x 200 steps; the variant's
number is its median over rounds. Variants: ``before`` (old checkout, ``backward(grad)``),
``after-dx`` (this checkout, ``backward(grad)``) and ``after`` (this checkout,
``backward(grad, need_input_grad=False)``, as ``deepcore.train.fit`` calls it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import sys, time
import numpy as np
threads, batch, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    from threadpoolctl import threadpool_limits
    threadpool_limits(threads)
except ImportError:
    pass
import deepcore
from deepcore import losses, nn, optim
rng = np.random.default_rng(0)
x = rng.random((batch, 784), dtype=np.float32)
y = rng.integers(0, 10, batch)
model = nn.Sequential(nn.Linear(784, 256, seed=0), nn.ReLU(), nn.Linear(256, 10, seed=1))
opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
def step():
    opt.zero_grad()
    pred, back = model.forward(x, train=True)
    loss, g = losses.softmax_cross_entropy(pred, y)
    if mode == "nodx":
        back(g, need_input_grad=False)
    else:
        back(g)
    opt.step()
for _ in range(100):
    step()
times = []
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(200):
        step()
    times.append((time.perf_counter() - t0) / 200)
times.sort()
print(times[3], deepcore.__file__)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path, help="directory holding the old deepcore/ package")
    ap.add_argument("after", type=Path, help="directory holding this deepcore/ package")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    variants = {"before": (args.before, "dx"), "after-dx": (args.after, "dx"), "after": (args.after, "nodx")}
    env_threads = {k: str(args.threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (root, mode) in variants.items():
            root = root.resolve()
            # numba's loops (where installed) from the first step in every checkout, as the ones
            # before cpu_jit's load rule loaded them (DEEPCORE_JIT=0 in the caller's environment wins)
            env = dict(os.environ, PYTHONPATH=str(root), **env_threads)
            env.setdefault("DEEPCORE_JIT", "1")
            out = subprocess.run([sys.executable, "-c", WORKER, str(args.threads), str(args.batch), mode],
                                 cwd="/", env=env, capture_output=True, text=True, check=True).stdout.split()
            if not Path(out[1]).resolve().is_relative_to(root):
                raise SystemExit(f"{name}: imported {out[1]}, not the package under {root}")
            times[name].append(float(out[0]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads {args.threads}, batch {args.batch}, {args.rounds} rounds (median of per-process medians):")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1e6:8.0f} us   {v / med['before']:.2f}x before")


if __name__ == "__main__":
    main()
