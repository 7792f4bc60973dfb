"""Softmax cross-entropy's loss and gradient on the NumPy backend: NumPy's one-buffer form against
cpu_jit's fused numba loop (``pip install -e ".[jit]"``; the loop runs under ``DEEPCORE_JIT=1``,
whose mode the script sets itself).

    python benchmarks/fused_loss.py    # batches 32 to 4096 of 10 classes, 100 and 1000 classes
    python benchmarks/fused_loss.py --shapes 32x10,2048x10 --rounds 60

Both forms run through ``deepcore.losses.softmax_cross_entropy`` as a training step calls it
("mean", int64 labels, float32 logits of normal values), in one process and one thread (neither
form uses a thread pool); they take turns, in an order reversed every other round, each turn
``--calls`` calls; a form's figure is the median of its per-call times, the ratio the median of the
per-round ratios to NumPy's. The forms are selected by the backend's own size limit
(``numpy_backend._CE_FUSED_MAX_SIZE``), here lifted for the fused form so that it is timed beyond
the limit too; the last column says which form the backend runs at that shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from deepcore import losses
from deepcore.backend import cpu_jit, numpy_backend
from deepcore.sysinfo import cpu_model

SHAPES = ("32x10", "128x10", "512x10", "2048x10", "4096x10", "128x100", "256x100", "256x1000")
#: form -> the backend's size limit while it runs
FORMS = {"numpy": -1, "fused": sys.maxsize}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated NxC logits shapes")
    ap.add_argument("--rounds", type=int, default=30, help="alternated rounds (default 30)")
    ap.add_argument("--calls", type=int, default=20, help="calls per form per round (default 20)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        ap.error(f"--rounds and --calls must be >= 1, got {args.rounds} and {args.calls}")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        ap.error(f"--shapes: expected NxC pairs such as 32x10,2048x10, got {args.shapes!r}")
    if not all(len(s) == 2 and min(s) >= 1 for s in shapes):
        ap.error(f"--shapes: expected NxC pairs of positive sizes, got {args.shapes!r}")
    mode, limit = cpu_jit._mode, numpy_backend._CE_FUSED_MAX_SIZE
    cpu_jit._mode = "on"  # as DEEPCORE_JIT=1 sets it
    try:
        if cpu_jit.softmax_cross_entropy() is None:
            sys.exit(f"fused_loss.py: the fused loops are unavailable: {cpu_jit.status()['reason']}")
        print(f"{cpu_model()}; numpy {np.__version__}; one thread; {args.rounds} alternated rounds of {args.calls} "
              "calls; ratio = median of per-round ratios to NumPy's form [quartiles]")
        print(f"{'logits':<10} {'form':<6} {'per call':>10}  {'ratio':<18} backend runs")
        with threadpool_limits(1):
            for n, c in shapes:
                rng = np.random.default_rng(0)
                logits = rng.standard_normal((n, c), dtype=np.float32)
                labels = rng.integers(0, c, n)
                times: dict[str, list[float]] = {f: [] for f in FORMS}
                for r in range(args.rounds + 1):  # round 0 warms both forms up, untimed
                    for form in FORMS if r % 2 else list(FORMS)[::-1]:
                        numpy_backend._CE_FUSED_MAX_SIZE = FORMS[form]
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            losses.softmax_cross_entropy(logits, labels)
                        if r:
                            times[form].append((time.perf_counter() - t0) / args.calls)
                runs = "fused" if n * c <= limit else "numpy"
                for form in FORMS:
                    ratios = sorted(a / b for a, b in zip(times[form], times["numpy"], strict=True))
                    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                    ratio = f"{statistics.median(ratios):.3f}x [{q[0]:.2f}-{q[2]:.2f}]"
                    print(f"{f'{n}x{c}':<10} {form:<6} {statistics.median(times[form]) * 1e6:8.1f}us  {ratio:<18} "
                          f"{runs if form == 'fused' else ''}".rstrip())
    finally:  # the backend's switches as they were
        cpu_jit._mode, numpy_backend._CE_FUSED_MAX_SIZE = mode, limit
    return 0


if __name__ == "__main__":
    sys.exit(main())
