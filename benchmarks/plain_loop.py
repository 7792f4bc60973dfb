"""The README's plain training loop against the same step hand-written in NumPy and PyTorch eager,
each contender in its own process, alternated, medians of several rounds.

    python benchmarks/plain_loop.py                      # 1 and 2 threads, every size (~5 min)
    python benchmarks/plain_loop.py --threads 2 --rounds 3 --sizes 784-256-10:32

For every (MLP, batch) and thread count, each round starts one fresh process per contender (in
turn, so a slow minute of a shared machine hits all of them) that builds the workload of
``deepcore.bench`` (the same code as ``deepcore bench`` and the pytest suite), warms it up, and
reports the median of 7 samples of at least 0.2 s each; the contender's figure is the median over
rounds, and each ratio is the median over rounds of the two processes' figures in that round.

Contenders: ``numpy`` (deepcore's loop as the README writes it: forward, loss, ``backward(g)``,
``opt.step()``, ``opt.zero_grad()``), ``numpy-plain`` (the step by hand in NumPy), ``torch``
(PyTorch eager), and the matrix products of the step alone in NumPy and torch (``gemms``), the
floor that each library's BLAS sets. Only deepcore's process keeps its allocator tuning
(deepcore/backend/malloc_tuning.py); the others run with glibc's defaults, as a user's own
NumPy or PyTorch loop would.
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
threads, case, contender, batch, sizes = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
import numpy as np
try:
    import torch
    torch.set_num_threads(threads)
except ImportError:
    pass
from threadpoolctl import threadpool_info, threadpool_limits
threadpool_limits(threads)
from deepcore.bench import make_workload
wl = make_workload(case, contender, batch=batch, sizes=tuple(int(s) for s in sizes.split("-")))
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 0.3 or n < 20:
    wl.fn(); n += 1
per = (time.perf_counter() - t0) / n
calls = max(3, int(0.2 / per))
samples = []
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(calls):
        wl.fn()
    samples.append((time.perf_counter() - t0) / calls)
blas = [p for p in threadpool_info() if p["user_api"] == "blas"][0]
print(json.dumps({"median": sorted(samples)[3], "blas": f"{blas['internal_api']} {blas['version']} "
                  f"{blas.get('architecture')}", "blas_threads": blas["num_threads"]}))
"""

CONTENDERS = (("mlp_step", "numpy"), ("mlp_step", "numpy-plain"), ("mlp_step", "torch"),
              ("mlp_gemms", "numpy"), ("mlp_gemms", "torch"))
SIZES = ("784-256-10:32", "784-256-10:128", "784-256-10:512", "784-256-10:2048", "3072-1024-1024-10:256")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _run(threads: int, case: str, contender: str, sizes: str, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    if (case, contender) != ("mlp_step", "numpy"):
        # The baselines run as their users run them: glibc's allocator as it comes (deepcore's NumPy
        # backend, which every worker imports, would otherwise tune it for them too).
        env["DEEPCORE_MALLOC_TUNING"] = "0"
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), case, contender, str(batch), sizes],
                         env=env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(per: dict[tuple[str, str], list[float]], a: tuple[str, str], b: tuple[str, str]) -> float:
    """The median over rounds of a's figure over b's in the same round."""
    return statistics.median(x / y for x, y in zip(per[a], per[b], strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated BLAS/torch thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated MLP:BATCH (default: the issue's set)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    rows, blas = [], None
    for threads in (int(t) for t in args.threads.split(",")):
        for spec in args.sizes.split(","):
            sizes, batch = spec.split(":")
            per: dict[tuple[str, str], list[float]] = {c: [] for c in CONTENDERS}
            for _ in range(args.rounds):
                for c in CONTENDERS:
                    r = _run(threads, c[0], c[1], sizes, int(batch))
                    per[c].append(r["median"])
                    blas = r["blas"]

            step, plain, torch = CONTENDERS[0], CONTENDERS[1], CONTENDERS[2]
            row = {"threads": threads, "mlp": sizes, "batch": int(batch),
                   **{f"{c[0]}:{c[1]}": statistics.median(v) for c, v in per.items()},
                   "plain_vs_numpy": _ratio(per, step, plain), "plain_vs_torch": _ratio(per, step, torch),
                   "gemms_numpy_vs_torch": _ratio(per, CONTENDERS[3], CONTENDERS[4])}
            rows.append(row)
            print(f"  done: {threads} thread(s), {sizes} batch {batch}", file=sys.stderr, flush=True)
    print(f"{_cpu()}, {os.cpu_count()} cores; BLAS {blas}; {args.rounds} alternated rounds, one process each")
    print("threads  MLP                 batch  deepcore   by hand    torch     | deepcore/hand  deepcore/torch"
          "  | GEMMs numpy  GEMMs torch")
    for r in rows:
        print(f"{r['threads']:>7}  {r['mlp']:<18} {r['batch']:>6}  {r['mlp_step:numpy'] * 1e3:7.3f}ms "
              f"{r['mlp_step:numpy-plain'] * 1e3:7.3f}ms {r['mlp_step:torch'] * 1e3:7.3f}ms | "
              f"{r['plain_vs_numpy']:12.3f}x  {r['plain_vs_torch']:13.3f}x  | "
              f"{r['mlp_gemms:numpy'] * 1e3:9.3f}ms  {r['mlp_gemms:torch'] * 1e3:9.3f}ms")
    if args.json:
        args.json.write_text(json.dumps({"cpu": _cpu(), "blas": blas, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
