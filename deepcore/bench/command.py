"""``deepcore bench``: parse its flags, check them all, then pin the thread pools, run the suite
and print the table (or compare two saved runs). Imported only when that subcommand runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli_errors import UsageError
from .cases import preload_jit
from .contenders import ALL_CONTENDERS, CASES
from .environment import describe_environment, environment
from .report import compare, format_table, load_results, save_results
from .runner import default_cooldown, run
from .suites import suite
from .threads import restore_threads, set_threads


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to ``deepcore``'s subcommands."""
    p = subparsers.add_parser("bench", help="time deepcore's backends against each other and PyTorch",
                              description="Time a quick subset of the benchmark suite, interleaved, and print "
                                          "each contender's median and its ratio to the reference (PyTorch "
                                          "on the same device when installed, else NumPy/CuPy).")
    p.add_argument("--suite", choices=("tiny", "quick", "full"), default="quick",
                   help="which specs: quick (default, about a minute), full (the pytest suite's sweep), "
                        "tiny (seconds, for tests)")
    p.add_argument("--quick", dest="suite", action="store_const", const="tiny",
                   help="same as --suite tiny: tiny sizes, a smoke test")
    p.add_argument("--cases", help=f"comma-separated cases to keep ({', '.join(CASES)})")
    p.add_argument("--backends", "--contenders", dest="contenders",
                   help=f"comma-separated contenders ({', '.join(ALL_CONTENDERS)}); default: all present")
    p.add_argument("--threads", type=int, help="BLAS/OpenMP and torch threads (default: leave as is)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per contender (default 5)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed sample (default 0.05; 0.002 for --quick)")
    p.add_argument("--cooldown", type=float, default=None,
                   help="seconds to pause before each sample so idle thread pools fall asleep "
                        "(default 0.25 with more than one thread, else 0)")
    p.add_argument("--include-slow", action="store_true", help="keep specs marked slow (4096^3 matmul)")
    p.add_argument("--save", type=Path, metavar="FILE.json", help="write the results as pytest-benchmark JSON")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="compare two saved runs (B / A) instead of running")
    p.set_defaults(run=run_command)
    return p


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def run_command(args: argparse.Namespace) -> int:
    if args.compare:
        a_path, b_path = args.compare
        for p in (a_path, b_path):
            if not p.is_file():
                raise UsageError(f"--compare: no file at {p}")
        a, b = load_results(a_path), load_results(b_path)
        for label, d, p in (("A", a, a_path), ("B", b, b_path)):
            env = d.get("machine_info", {}).get("deepcore_env")
            print(f"{label}: {p}" + (f"  [{describe_environment(env)}]" if env else ""))
        print(compare(a, b))
        return 0
    if args.rounds < 1:
        raise UsageError(f"--rounds must be a positive integer, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {args.threads}")
    specs = suite(args.suite)
    cases = _names(args.cases)
    if cases:
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            raise UsageError(f"--cases: unknown {unknown}; cases: {', '.join(CASES)}")
        specs = [s for s in specs if s.case in cases]
    if not args.include_slow:
        specs = [s for s in specs if not s.slow]
    contenders = _names(args.contenders)
    if contenders:
        unknown = sorted(set(contenders) - set(ALL_CONTENDERS))
        if unknown:
            raise UsageError(f"--backends: unknown {unknown}; contenders: {', '.join(ALL_CONTENDERS)}")
    min_time = args.min_time if args.min_time is not None else (0.002 if args.suite == "tiny" else 0.05)
    if any(c.startswith("torch") for c in (contenders or ALL_CONTENDERS)):
        try:
            import torch  # noqa: F401  (imported before pinning threads, so torch's pool is pinned too)
        except ImportError:
            pass
    if args.cooldown is not None and args.cooldown < 0:
        raise UsageError(f"--cooldown must be >= 0, got {args.cooldown}")
    preload_jit((s.case, c) for s in specs for c in (contenders or ALL_CONTENDERS))  # before the pools are pinned
    # Arguments are checked: only now change the process's thread pools (restored at the end).
    threads = set_threads(args.threads)
    try:
        return _run_and_report(args, specs, contenders, min_time, threads)
    finally:
        restore_threads()


def _run_and_report(args: Any, specs: Any, contenders: Any, min_time: float, threads: dict[str, Any]) -> int:
    env = environment()
    print(f"deepcore bench: {describe_environment(env)}")
    if threads["requested"] is not None and threads["method"] == "env":
        print("  note: threadpoolctl is not installed, so --threads could not pin NumPy's BLAS; set "
              "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before starting, or pip install threadpoolctl")
    cooldown = default_cooldown() if args.cooldown is None else args.cooldown
    if args.suite == "tiny" and args.cooldown is None:
        cooldown = 0.0
    print(f"  {len(specs)} specs, {args.rounds} interleaved rounds, >= {min_time:g} s per sample, "
          f"{cooldown:g} s pause before each; medians per call")
    results = run(specs, contenders, rounds=args.rounds, min_time=min_time, cooldown=cooldown, log=print)
    print()
    print(format_table(results))
    if args.save:
        path = save_results(args.save, results, env, rounds=args.rounds, min_time=min_time, cooldown=cooldown)
        print(f"wrote {path}")
    return 0
