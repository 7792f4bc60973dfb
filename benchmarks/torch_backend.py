"""deepcore's training step on torch CPU tensors (the torch backend) against PyTorch eager, for the
784-256-10 MLP; each contender in its own process, alternated, medians of several rounds.

    python benchmarks/torch_backend.py                          # batches 32, 128, 512; 1 thread; 5 rounds
    python benchmarks/torch_backend.py --batches 128 --threads 2 --rounds 9

Contenders: ``torch`` (PyTorch eager: ``F.cross_entropy``, ``loss.backward()``, ``torch.optim.SGD``
with momentum; deepcore.bench's workload), ``deepcore-torch`` (the README's loop on torch tensors,
the torch backend of deepcore/backend/torch_backend.py) and ``deepcore-torch-reference`` (the same
loop through the array-API reference, the backend torch tensors had before). Every round starts one
process per contender in turn (so a slow minute of a shared machine hits all of them); each reports
the median of 7 samples of at least 0.2 s. The ratio per round is deepcore's median over torch's, and
the figure printed is the median of those ratios.
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
import json, sys, time
threads, contender, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import torch
torch.set_num_threads(threads)
import numpy as np
if contender == "deepcore-torch-reference":
    import array_api_compat.torch as compat
    from deepcore.backend import Backend, register_backend
    register_backend("torch", lambda: Backend(compat, name="torch"), namespaces=("array_api_compat.torch",),
                     replace=True)
from deepcore.bench import make_workload
wl = make_workload("mlp_step", "torch", batch=batch) if contender == "torch" else None
if wl is None:
    # deepcore.bench's own workload builder, with its backend taken from the (replaced) registry
    from deepcore.bench import mlp
    weights = mlp._init_weights()
    model, opt, backend = mlp._deepcore_mlp("torch", weights)
    step = mlp._deepcore_step(model, opt, input_grad=False)
    x = torch.from_numpy(np.random.default_rng(6).random((batch, 784), dtype=np.float32))
    y = torch.from_numpy(np.random.default_rng(7).integers(0, 10, batch))
    assert type(backend).__name__ == ("Backend" if contender.endswith("reference") else "TorchBackend"), backend
    fn = lambda: step(x, y)
else:
    fn = wl.fn
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 0.3 or n < 20:
    fn(); n += 1
per = (time.perf_counter() - t0) / n
calls = max(3, int(0.2 / per))
samples = []
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    samples.append((time.perf_counter() - t0) / calls)
print(json.dumps({"median": sorted(samples)[3], "torch": torch.__version__}))
"""

CONTENDERS = ("torch", "deepcore-torch", "deepcore-torch-reference")


def _run(threads: int, contender: str, batch: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DEEPCORE_MALLOC_TUNING="0",
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), contender, str(batch)], capture_output=True,
                         text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{contender} (batch {batch}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,128,512", help="comma-separated batch sizes (default 32,128,512)")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads per process (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds (default 5)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        times: dict[str, list[float]] = {c: [] for c in CONTENDERS}
        for _ in range(args.rounds):
            for c in CONTENDERS:
                times[c].append(_run(args.threads, c, batch)["median"])
        ratios = {c: statistics.median(t / ref for t, ref in zip(times[c], times["torch"], strict=True))
                  for c in CONTENDERS if c != "torch"}
        row = {"batch": batch, "threads": args.threads, "rounds": args.rounds,
               "median_ms": {c: 1e3 * statistics.median(v) for c, v in times.items()}, "ratio_to_torch": ratios}
        results.append(row)
        ms = ", ".join(f"{c} {v:.3f} ms" for c, v in row["median_ms"].items())
        print(f"784-256-10, batch {batch}, {args.threads} thread(s): {ms}; "
              + ", ".join(f"{c}/torch {r:.2f}x" for c, r in ratios.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
