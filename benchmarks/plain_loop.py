"""The README's plain training loop against the same step hand-written in NumPy and PyTorch eager,
each contender in its own process, in lockstep rounds, medians of per-round ratios.

    python benchmarks/plain_loop.py                      # 1 and 2 threads, every size (~12 min)
    python benchmarks/plain_loop.py --threads 2 --rounds 9 --sizes 784-256-10:32

For every (MLP, batch) and thread count, one process per contender starts and stays: each builds
the workload of ``deepcore.bench`` (the same code as ``deepcore bench`` and the pytest suite) and
warms up. Then, round after round, each process in turn (a fixed order, reversed every other round) runs the same number
of steps, about ``--chunk`` seconds of deepcore's, while the others wait on their pipe; a short
idle gap before each turn lets the previous process's BLAS/OpenMP threads stop spinning. A
contender's figure is the median over rounds of its time per step; each ratio is the median of
the per-round ratios, with their quartiles. Rounds a few seconds apart see the same state of a
shared machine, whose speed drifts by 10-30% over seconds; earlier versions of this script started
a process per contender per round and compared figures taken a minute apart, and a faster
contender got further into training, where repeating one batch breeds subnormal numbers in the
momentum buffer that slow its update: here every contender is at the same step in every round.

Contenders: ``numpy`` (deepcore's loop as the README writes it: forward, loss, ``backward(g)``,
``opt.step()``, ``opt.zero_grad()``, with ``DEEPCORE_JIT=1``: numba's fused momentum step and
softmax cross-entropy where numba is installed, deepcore/backend/cpu_jit.py; with the variable
unset a long run reaches the fused step after a second but keeps NumPy's loss), ``numpy-nojit``
(the same loop with ``DEEPCORE_JIT=0``, as a NumPy-only install runs it), ``numpy-plain`` (the
step by hand in NumPy), ``torch`` (PyTorch eager), and the matrix products of the step alone in
NumPy and torch (``gemms``), the floor that each library's BLAS sets. Only deepcore's process keeps its allocator tuning
(deepcore/backend/malloc_tuning.py); the others run with glibc's defaults, as a user's own
NumPy or PyTorch loop would. deepcore's workers report whether the momentum step ran fused
and, without it, which NumPy form the warm-up timed faster for each large parameter
(deepcore/backend/faster_form.py); the table's last lines name them. Only the torch contenders'
processes import torch. Each process pins its pools after NumPy (and torch, or numba) are loaded, since
threadpoolctl reaches only the libraries already loaded, and stops with an error unless every
pool runs at the thread count asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
threads, case, contender, batch, sizes = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
workload = "numpy" if contender == "numpy-nojit" else contender  # DEEPCORE_JIT=0 set by the parent
import numpy  # loaded before the pools are pinned: threadpoolctl pins only the libraries loaded
if contender.startswith("torch"):
    import torch
    torch.set_num_threads(threads)
if contender == "numpy":  # numba, where installed, imports SciPy, whose own OpenBLAS pool must be pinned too
    from deepcore.backend import cpu_jit
    cpu_jit.preload()  # (make_workload would load it too, after the pools are pinned)
from threadpoolctl import threadpool_info, threadpool_limits
threadpool_limits(threads)
from deepcore.bench import make_workload
def fresh(warmup):  # the workload from its initial state (the same seeds), warmed up
    wl = make_workload(case, workload, batch=batch, sizes=tuple(int(s) for s in sizes.split("-")))
    for _ in range(warmup):
        wl.fn()
    return wl
wl = fresh(int(sys.argv[6]))
pools = threadpool_info()
# Every pool, and torch's, at the count asked for, or the cell's figures would mean nothing.
wrong = [f"{p['internal_api']} {p['filepath']}: {p['num_threads']}" for p in pools if p["num_threads"] != threads]
if contender.startswith("torch") and torch.get_num_threads() != threads:
    wrong.append(f"torch: {torch.get_num_threads()}")
if wrong:
    sys.exit(f"{contender}: asked for {threads} thread(s), running with " + "; ".join(wrong))
blas = [p for p in pools if p["user_api"] == "blas"]
blas = f"{blas[0]['internal_api']} {blas[0]['version']} {blas[0].get('architecture')}" if blas else None
from deepcore.backend import cpu_jit, numpy_backend  # the momentum step's forms, per large parameter
forms = {f"{size} {dtype}": "blocked" if blocked else "one-pass"
         for (size, dtype), blocked in numpy_backend._MOMENTUM_FORMS.chosen().items()}
jit = cpu_jit.status()
jit = "fused (numba)" if jit["loaded"] else (jit["reason"] or "not needed")
if cpu_jit.softmax_cross_entropy() is not None:  # DEEPCORE_JIT=1: the loss as numba's loop too
    jit += "; softmax cross-entropy fused"
print(json.dumps({"ready": True, "blas": blas, "threads": {p["internal_api"]: p["num_threads"] for p in pools},
                  "momentum_forms": forms, "jit": jit}), flush=True)
for line in sys.stdin:  # "reset": start training again; "N": run N steps, answer the seconds they took
    if line.strip() == "reset":
        del wl
        wl = fresh(3)
        print(json.dumps({"ready": True}), flush=True)
        continue
    n = int(line)
    t0 = time.perf_counter()
    for _ in range(n):
        wl.fn()
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
"""

CONTENDERS = (("mlp_step", "numpy"), ("mlp_step", "numpy-plain"), ("mlp_step", "torch"),
              ("mlp_gemms", "numpy"), ("mlp_gemms", "torch"), ("mlp_step", "numpy-nojit"))
SIZES = ("784-256-10:32", "784-256-10:128", "784-256-10:512", "784-256-10:2048", "3072-1024-1024-10:256")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


class _Worker:
    """One contender's process, resident for a whole (threads, MLP, batch) cell: it builds its
    workload and warms up once, then runs ``n`` steps whenever asked and says how long they took."""

    def __init__(self, threads: int, case: str, contender: str, sizes: str, batch: int, warmup: int) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") and not k.endswith("_NUM_THREADS")}
        env["PYTHONPATH"] = str(ROOT)
        env.pop("DEEPCORE_JIT", None)
        if contender == "numpy-nojit":
            env["DEEPCORE_JIT"] = "0"
        elif (case, contender) == ("mlp_step", "numpy"):
            env["DEEPCORE_JIT"] = "1"  # numba from the first step: the optimizer's loops and the loss's
        else:
            # The baselines run as their users run them: glibc's allocator as it comes (deepcore's NumPy
            # backend, which every worker imports, would otherwise tune it for them too).
            env["DEEPCORE_MALLOC_TUNING"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), case, contender, str(batch), sizes,
                                      str(warmup)], env=env, cwd="/", text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.name = f"{case}:{contender}"

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{self.name}: the worker ended (exit status {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> dict:
        return self._answer()

    def reset(self) -> None:
        self.proc.stdin.write("reset\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        self._answer()

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._answer()["seconds"] / steps

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):  # a worker that died or hangs: never leave it behind
            self.proc.kill()
            self.proc.wait()


#: The turns of a round, reversed every other round (so a steady drift of the machine's speed
#: cancels over two rounds): deepcore's loops between the two steps they are compared with, each
#: GEMM floor next to its library's step.
TURN_ORDER = (3, 1, 0, 5, 2, 4)
#: A fresh turn's most steps: from the initial weights a dead unit's momentum takes ~700 steps of
#: 0.9x decay to reach the subnormals, so a fresh turn measures the step without them.
FRESH_MAX_STEPS = 300


def _cell(threads: int, sizes: str, batch: int, rounds: int, chunk_s: float,
          gap_s: float) -> tuple[dict[str, dict], str | None]:
    """Every contender's per-step time in lockstep rounds: in a round each resident process in turn
    (in TURN_ORDER, reversed every other round) runs the same number of steps, about ``chunk_s``
    seconds of deepcore's, while the others wait, so a slow second of a shared machine falls on all.

    Two modes, ``rounds`` rounds each. ``fresh``: each turn starts training again from the initial
    weights (untimed: rebuild and warm up), then times at most FRESH_MAX_STEPS steps, the step as
    it is early in training. ``long``: training goes on from turn to turn on the one repeated
    batch, thousands of steps, into the regime where exactly-zero gradients have left subnormal
    numbers in the momentum buffers; the same step counts keep every contender at the same point."""
    warmup = 20
    workers = [_Worker(threads, case, contender, sizes, batch, warmup) for case, contender in CONTENDERS]
    out: dict[str, dict] = {}
    try:
        blas = None
        ready = [w.ready() for w in workers]  # started together, so they build and warm up at once
        for answer in ready:
            blas = answer["blas"] or blas
        # deepcore's workers (CONTENDERS[0], and [5] without numba)
        out["momentum_forms"] = {"numpy": ready[0]["jit"], "numpy-nojit": ready[5]["momentum_forms"]}
        steps = max(3, round(chunk_s / workers[0].run(warmup)))
        for mode in ("fresh", "long"):
            n = min(steps, FRESH_MAX_STEPS) if mode == "fresh" else steps
            per: dict[tuple[str, str], list[float]] = {c: [] for c in CONTENDERS}
            for w in workers:
                w.reset()
            for r in range(rounds):
                for i in TURN_ORDER if r % 2 == 0 else TURN_ORDER[::-1]:
                    if mode == "fresh" and r:
                        workers[i].reset()
                    time.sleep(gap_s)  # the previous process's BLAS/OpenMP threads stop spinning first
                    per[CONTENDERS[i]].append(workers[i].run(n))
            out[mode] = {"per": per, "steps": n}
    finally:
        for w in workers:
            w.close()
    return out, blas


#: Resamples of the bootstrap interval of a median ratio, and their fixed seed (the same rounds give
#: the same interval).
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


def _median_interval(r: list[float], level: float = 0.9) -> tuple[float, float]:
    """The percentile bootstrap interval of the median of ``r`` at ``level``: how far the median
    itself could move on another run of as many rounds, where the quartiles show one round's spread."""
    rng = random.Random(BOOTSTRAP_SEED)
    meds = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(BOOTSTRAP_RESAMPLES))
    tail = round((1 - level) / 2 * (BOOTSTRAP_RESAMPLES - 1))
    return meds[tail], meds[-1 - tail]


def _ratio(per: dict[tuple[str, str], list[float]], a: tuple[str, str], b: tuple[str, str]) -> dict[str, float]:
    """The median over rounds of a's figure over b's in the same round, with the quartiles and the
    median's 90% bootstrap interval."""
    r = sorted(x / y for x, y in zip(per[a], per[b], strict=True))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    low, high = _median_interval(r)
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2], "ci90_low": low, "ci90_high": high}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated BLAS/torch thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=25, help="lockstep rounds per mode and cell (default 25)")
    ap.add_argument("--chunk", type=float, default=0.1, help="seconds of deepcore's steps per turn (default 0.1)")
    ap.add_argument("--gap", type=float, default=0.03, help="seconds of idle between turns (default 0.03)")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated MLP:BATCH (default: the issue's set)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    for flag, value in (("--rounds", args.rounds), ("--chunk", args.chunk)):
        if value <= 0:
            ap.error(f"{flag} must be positive, got {value}")
    if args.gap < 0:
        ap.error(f"--gap must be >= 0, got {args.gap}")
    rows, blas = [], None
    for threads in (int(t) for t in args.threads.split(",")):
        for spec in args.sizes.split(","):
            sizes, batch = spec.split(":")
            cell, blas = _cell(threads, sizes, int(batch), args.rounds, args.chunk, args.gap)
            forms = cell.pop("momentum_forms")
            for mode, result in cell.items():
                per = result["per"]
                step, plain, torch, nojit = CONTENDERS[0], CONTENDERS[1], CONTENDERS[2], CONTENDERS[5]
                rows.append({"threads": threads, "mlp": sizes, "batch": int(batch), "mode": mode,
                             "steps_per_turn": result["steps"], "deepcore_momentum_forms": forms,
                             **{f"{c[0]}:{c[1]}": statistics.median(v) for c, v in per.items()},
                             "plain_vs_numpy": _ratio(per, step, plain), "plain_vs_torch": _ratio(per, step, torch),
                             "nojit_vs_numpy": _ratio(per, nojit, plain), "nojit_vs_torch": _ratio(per, nojit, torch),
                             "gemms_numpy_vs_torch": _ratio(per, CONTENDERS[3], CONTENDERS[4]),
                             "rounds": {f"{c[0]}:{c[1]}": v for c, v in per.items()}})
            print(f"  done: {threads} thread(s), {sizes} batch {batch}", file=sys.stderr, flush=True)
    print(f"{_cpu()}, {os.cpu_count()} cores; BLAS {blas}; {args.rounds} lockstep rounds per mode of resident "
          f"processes, one per contender; ratio = median of per-round ratios [quartiles] (the median's 90% "
          f"bootstrap interval)")
    print("threads  MLP                 batch  mode   deepcore   by hand    torch     | "
          f"{'deepcore/hand':<33} {'deepcore/torch':<33} | GEMMs numpy  GEMMs torch | "
          f"{'NumPy-only deepcore/hand':<33} {'NumPy-only deepcore/torch':<33}")

    def show(r: dict) -> str:
        return f"{r['median']:.3f}x [{r['q1']:.2f}-{r['q3']:.2f}] ({r['ci90_low']:.3f}-{r['ci90_high']:.3f})"

    for r in rows:
        print(f"{r['threads']:>7}  {r['mlp']:<18} {r['batch']:>6}  {r['mode']:<5} {r['mlp_step:numpy'] * 1e3:7.3f}ms "
              f"{r['mlp_step:numpy-plain'] * 1e3:7.3f}ms {r['mlp_step:torch'] * 1e3:7.3f}ms | "
              f"{show(r['plain_vs_numpy']):<33} {show(r['plain_vs_torch']):<33} | "
              f"{r['mlp_gemms:numpy'] * 1e3:9.3f}ms  {r['mlp_gemms:torch'] * 1e3:9.3f}ms | "
              f"{show(r['nojit_vs_numpy']):<33} {show(r['nojit_vs_torch']):<33}")
    jit = sorted({r["deepcore_momentum_forms"]["numpy"] for r in rows})
    print("deepcore's loops (DEEPCORE_JIT=1), the momentum step of a large parameter and the loss: "
          + "; ".join(jit))
    forms = sorted({f"{size}: {form}" for r in rows
                    for size, form in r["deepcore_momentum_forms"]["numpy-nojit"].items()})
    print("NumPy-only deepcore's, as its warm-up timed it (size dtype: form): "
          + ("; ".join(forms) or "no parameter that large"))
    if args.json:
        args.json.write_text(json.dumps({"cpu": _cpu(), "blas": blas, "rounds": args.rounds, "chunk_s": args.chunk,
                                         "gap_s": args.gap, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
