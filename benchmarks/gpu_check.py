#!/usr/bin/env python3
"""One-shot GPU check of deepcore's fused softmax cross-entropy: tests, speed, memory, accuracy.

    python benchmarks/gpu_check.py [--out DIR] [--quick] [--no-tests] [--dry-run]

Written to be run ONCE, unattended, on a lent H100/H200 that has CUDA, CuPy,
NumPy, PyTorch and pytest but no package index: it finishes in a few minutes,
keeps going when one stage fails (the error is printed, recorded and marked
FAIL), writes everything to ``DIR/gpu_check.json`` (DIR: ``--out``, else
``$OUT``, else ``./gpu_check_out``) and prints a short table LAST, followed by
PASS/FAIL against the issue's targets.

Stages, in order:
  a. deepcore made importable with no index (array-api-compat from the wheel in
     benchmarks/wheels/, the repository root put on sys.path);
  b. device, driver, runtime and library versions;
  c. copy bandwidth: a 2 GiB device-to-device copy, bytes read + written, median
     of >= 20 event-timed runs (cudaMemcpy and a CuPy copy kernel; the faster is
     the ceiling);
  d. can bfloat16 reach the fused kernel through CuPy at all?
  e. per shape and dtype: deepcore's fused kernel, deepcore's unfused reference
     path (``Backend.softmax_cross_entropy`` called on the CuPy backend) and
     PyTorch eager ``F.cross_entropy`` + ``backward()``,
     all on the same data; each result checked once against a float64 reference
     computed on the GPU; then timed with CUDA events (warm-up first, median and
     IQR, rotating among >= 3 input sets, more for small shapes so the whole
     rotation is >= 4x the L2 cache); then the peak extra memory of the fused
     call, measured in a fresh CuPy memory pool;
  f. the GPU tests (``pytest tests/test_cuda.py tests/test_sce_kernel.py -m gpu``) in a subprocess with a
     timeout. They run last so they cannot disturb the timings.

Without a usable GPU it prints why and exits 2 at once. ``--dry-run`` needs no
GPU: it runs the reporting code (table, targets, JSON) on FAKE numbers, each
output labelled FAKE. Exit status: 0 all targets pass, 1 something failed,
2 no GPU.

This file is the entry point only (arguments, dry run or real run); the stages
live in the package ``gpu_check_lib/`` next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The code lives in the package gpu_check_lib next to this file; put this folder on sys.path so that
# `python3 benchmarks/gpu_check.py` works from any working directory (also under `python -P`).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from gpu_check_lib.common import log  # noqa: E402
from gpu_check_lib.environment import detect_gpu  # noqa: E402
from gpu_check_lib.fake import fake_results  # noqa: E402
from gpu_check_lib.report import finish  # noqa: E402
from gpu_check_lib.run import run_gpu  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default: $OUT if set, else ./gpu_check_out)")
    p.add_argument("--quick", action="store_true", help="smoke test: one shape, few repeats, short tests")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest GPU tests")
    p.add_argument("--dry-run", action="store_true", help="no GPU: run the reporting code on FAKE numbers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    if args.dry_run:
        log("*** --dry-run: FAKE numbers, no GPU is used; this only tests the reporting code ***")
        return 0 if finish(fake_results(args.quick), out_dir) in (0, 1) else 3
    cupy, why = detect_gpu()
    if cupy is None:
        msg = (f"gpu_check: no usable NVIDIA GPU here: {why}. Nothing was measured and nothing was written.\n"
               "Run it on a machine with an NVIDIA GPU and CuPy, or use --dry-run to test the reporting code"
               " with FAKE numbers.")
        print(msg, file=sys.stderr, flush=True)
        return 2
    return run_gpu(args, cupy, out_dir)


if __name__ == "__main__":
    sys.exit(main())
