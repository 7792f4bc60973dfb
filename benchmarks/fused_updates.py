"""The NumPy backend's optimizer steps of one large parameter: NumPy's forms against cpu_jit's fused
numba loops (``pip install -e ".[jit]"``), the same bits either way.

    python benchmarks/fused_updates.py    # SGD (three ways), Adam, RMSprop, Adagrad; 65536 to 3.1M weights
    python benchmarks/fused_updates.py --sizes 200704 --rounds 40

Every form runs through ``NumpyBackend`` as an optimizer calls it (``sgd_update_many`` on a steady
step: momentum 0.9, ``sgd-plain`` without momentum, ``sgd+nwd`` Nesterov momentum 0.9 with weight
decay 5e-4; ``adam_update``, ``rmsprop_update`` and ``adagrad_update`` with their defaults), on its
own arrays of float32 normal values, in one process and one thread (element-wise loops: no thread
pools to interfere); the forms take turns, in an order reversed every other round, each turn
``--calls`` calls; a form's figure is the median of its per-call times, each ratio the median of
the per-round ratios to the first NumPy form (SGD momentum's: the one-pass form). The NumPy forms
are selected by the backend's own switches: the fused loops off (``_FUSED_MIN``), and the momentum
step's form forced (``faster_form.FormChooser(fixed=...)``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from deepcore.backend import cpu_jit, numpy_backend
from deepcore.backend.faster_form import FormChooser
from deepcore.sysinfo import cpu_model

SIZES = (65536, 200_704, 1_048_576, 3_145_728)


def _sgd(n: int, nb: numpy_backend.NumpyBackend, momentum: float = 0.9, nesterov: bool = False,
         weight_decay: float = 0.0):
    rng = np.random.default_rng(0)
    value, buf = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    step = iter(range(1, 1 << 62))

    def call() -> None:
        s = next(step)
        if s % numpy_backend._FLUSH_EVERY == 0:
            s += 1  # steady steps only: the flush steps are one in 16 of every form's
        nb.sgd_update_many([value], [grad], [buf if momentum else None], lr=0.01, momentum=momentum, dampening=0.0,
                           nesterov=nesterov, weight_decay=weight_decay, step=s)

    return call


def _sgd_plain(n: int, nb: numpy_backend.NumpyBackend):
    """SGD without momentum (the course's gradient descent): ``value -= lr g``."""
    return _sgd(n, nb, momentum=0.0)


def _sgd_nesterov_wd(n: int, nb: numpy_backend.NumpyBackend):
    """The common recipe's step: Nesterov momentum 0.9, weight decay 5e-4."""
    return _sgd(n, nb, nesterov=True, weight_decay=5e-4)


def _adam(n: int, nb: numpy_backend.NumpyBackend):
    rng = np.random.default_rng(0)
    value, grad, m = (rng.standard_normal(n, dtype=np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n, dtype=np.float32))
    step = iter(range(1, 1 << 62))

    def call() -> None:
        nb.adam_update(value, grad, m, v, step=next(step), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0, decoupled=False)

    return call


def _rmsprop(n: int, nb: numpy_backend.NumpyBackend):
    """RMSprop's default step (alpha 0.99, not centered, no momentum)."""
    rng = np.random.default_rng(0)
    value, grad = (rng.standard_normal(n, dtype=np.float32) for _ in range(2))
    square_avg = np.abs(rng.standard_normal(n, dtype=np.float32))

    def call() -> None:
        nb.rmsprop_update(value, grad, square_avg, None, None, lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.0,
                          momentum=0.0, centered=False)

    return call


def _adagrad(n: int, nb: numpy_backend.NumpyBackend):
    rng = np.random.default_rng(0)
    value, grad = (rng.standard_normal(n, dtype=np.float32) for _ in range(2))
    state_sum = np.abs(rng.standard_normal(n, dtype=np.float32))
    step = iter(range(1, 1 << 62))

    def call() -> None:
        nb.adagrad_update(value, grad, state_sum, step=next(step), lr=1e-2, lr_decay=0.0, eps=1e-10,
                          weight_decay=0.0)

    return call


#: (update, form) -> (the fused loop on, the momentum form forced: True blocked, False one pass)
FORMS = {("sgd", "numpy one-pass"): (False, False), ("sgd", "numpy blocked"): (False, True),
         ("sgd", "fused"): (True, None), ("sgd-plain", "numpy"): (False, None), ("sgd-plain", "fused"): (True, None),
         ("sgd+nwd", "numpy"): (False, None), ("sgd+nwd", "fused"): (True, None),
         ("adam", "numpy"): (False, None), ("adam", "fused"): (True, None),
         ("rmsprop", "numpy"): (False, None), ("rmsprop", "fused"): (True, None),
         ("adagrad", "numpy"): (False, None), ("adagrad", "fused"): (True, None)}
#: Each update's step: SGD momentum, SGD without momentum, SGD with Nesterov momentum and weight decay,
#: Adam, RMSprop, Adagrad.
UPDATES = {"sgd": _sgd, "sgd-plain": _sgd_plain, "sgd+nwd": _sgd_nesterov_wd, "adam": _adam, "rmsprop": _rmsprop,
           "adagrad": _adagrad}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated weights per parameter")
    ap.add_argument("--rounds", type=int, default=30, help="alternated rounds (default 30)")
    ap.add_argument("--calls", type=int, default=10, help="calls per form per round (default 10)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        ap.error(f"--rounds and --calls must be >= 1, got {args.rounds} and {args.calls}")
    if cpu_jit.sgd_momentum() is None:
        sys.exit(f"fused_updates.py: the fused loops are unavailable: {cpu_jit.status()['reason']}")
    nb = numpy_backend.NumpyBackend()
    fused_min, chooser = numpy_backend._FUSED_MIN, numpy_backend._MOMENTUM_FORMS
    print(f"{cpu_model()}; numpy {np.__version__}; one thread; {args.rounds} alternated rounds of {args.calls} "
          "calls; ratio = median of per-round ratios to the NumPy form [quartiles]")
    print(f"{'update':<9} {'weights':>9}  {'form':<15} {'per call':>10}  ratio")
    limits = threadpool_limits(1)  # undone below: a test calls main() in its own process
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            for update, make in UPDATES.items():
                forms = [f for u, f in FORMS if u == update]
                calls = {f: make(n, nb) for f in forms}
                times: dict[str, list[float]] = {f: [] for f in forms}
                for r in range(args.rounds + 1):  # round 0 warms every form up, untimed
                    for form in forms if r % 2 else forms[::-1]:
                        fused, blocked = FORMS[(update, form)]
                        numpy_backend._FUSED_MIN = fused_min if fused else sys.maxsize
                        numpy_backend._MOMENTUM_FORMS = FormChooser(fixed=blocked) if blocked is not None else chooser
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            calls[form]()
                        if r:
                            times[form].append((time.perf_counter() - t0) / args.calls)
                base = times[forms[0]]
                for form in forms:
                    ratios = sorted(a / b for a, b in zip(times[form], base, strict=True))
                    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                    print(f"{update:<9} {n:>9}  {form:<15} {statistics.median(times[form]) * 1e6:8.1f}us  "
                          f"{statistics.median(ratios):.3f}x [{q[0]:.2f}-{q[2]:.2f}]")
    finally:  # the backend's switches and the thread pools as they were
        numpy_backend._FUSED_MIN, numpy_backend._MOMENTUM_FORMS = fused_min, chooser
        limits.restore_original_limits()
    return 0


if __name__ == "__main__":
    sys.exit(main())
