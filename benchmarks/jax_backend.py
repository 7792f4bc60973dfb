"""An epoch of the 784-256-10 MLP on JAX arrays (the jax backend, deepcore/backend/jax_backend.py) against
the NumPy backend and the array-API reference on JAX; each contender in its own process, alternated,
medians of several rounds.

    python benchmarks/jax_backend.py                      # 60000 samples, batch 128, 3 rounds, one core
    python benchmarks/jax_backend.py --samples 20000 --rounds 5 --cores 0,1

The epoch is the README's loop over shuffled batches gathered on the host (``deepcore.to_backend``),
``losses.softmax_cross_entropy``, ``backward``, SGD with momentum. Every process is pinned to the same
cores (``--cores``) so that XLA's thread pool and OpenBLAS get the same CPUs, and runs one warm-up epoch
(JAX compiles there: the full batches and the last, shorter one) before the two it times; it reports
the faster. The ratio per round is the contender's epoch over NumPy's, the figure printed their median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys, time
contender, n, batch, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
import numpy as np
import deepcore as dc
from deepcore import losses, nn, optim
name = "jax" if contender.startswith("jax") else contender
if contender == "jax-reference":
    import jax.numpy as jnp
    from deepcore.backend import Backend, register_backend
    register_backend("jax", lambda: Backend(jnp, name="jax"), namespaces=("jax.numpy",), replace=True)
rng = np.random.default_rng(0)
x_h = rng.random((n, 784), dtype=np.float32)
y_h = rng.integers(0, 10, n)
with dc.use_backend(name):
    model = nn.Sequential(nn.Linear(784, 256, seed=0), nn.ReLU(), nn.Linear(256, 10, seed=1))
opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
backend = dc.get_backend(name)

def epoch(k):
    order = np.random.default_rng(k).permutation(n)
    for i in range(0, n, batch):
        idx = order[i:i + batch]
        logits, back = model.forward(dc.to_backend(x_h[idx], backend), train=True)
        loss, grad = losses.softmax_cross_entropy(logits, dc.to_backend(y_h[idx], backend))
        back(grad)
        opt.step()
        opt.zero_grad()
    return float(loss)  # waits for the last step

epoch(0)
times = []
for k in (1, 2):
    t0 = time.perf_counter()
    epoch(k)
    times.append(time.perf_counter() - t0)
print(json.dumps({"epoch_s": min(times), "backend": type(backend).__name__}))
"""

CONTENDERS = ("numpy", "jax", "jax-reference")


def _run(contender: str, samples: int, batch: int, cores: str) -> dict:
    threads = str(len(cores.split(",")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    out = subprocess.run([sys.executable, "-c", WORKER, contender, str(samples), str(batch), cores],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=60000, help="samples per epoch (default 60000)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    p.add_argument("--cores", default="0", help="CPUs every process is pinned to, comma-separated (default 0)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"default {','.join(CONTENDERS)}")
    args = p.parse_args(argv)
    contenders = args.contenders.split(",")
    times: dict[str, list[float]] = {c: [] for c in contenders}
    for _ in range(args.rounds):
        for c in contenders:
            times[c].append(_run(c, args.samples, args.batch, args.cores)["epoch_s"])
    line = ", ".join(f"{c} {statistics.median(v):.2f} s" for c, v in times.items())
    if "numpy" in times:
        line += "; " + ", ".join(
            f"{c}/numpy {statistics.median(t / r for t, r in zip(v, times['numpy'], strict=True)):.2f}x"
            for c, v in times.items() if c != "numpy")
    print(f"784-256-10 epoch, {args.samples} samples, batch {args.batch}, cores {args.cores}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
