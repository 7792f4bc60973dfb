"""The ``deepcore`` command: ``train``, ``evaluate``, ``predict``, ``export``, ``info``, ``demo`` and ``bench``, one
module each.

Bad arguments and failures the user can fix print one line, ``deepcore: error: ...``,
and exit with status 2 (arguments) or 1 (anything else); never a traceback.
The benchmark tooling (:mod:`deepcore.bench`) is imported only when ``bench`` runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..cli_errors import EXIT_FAILURE, EXIT_USAGE, OneLineParser, UsageError
from . import demo, evaluate, export, info, predict, train

BENCH_HELP = "time deepcore's backends against each other and PyTorch"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(with_bench=command == "bench")
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"deepcore: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:  # the backend errors included
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"deepcore: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except MemoryError as exc:  # numpy's _ArrayMemoryError, CuPy's OutOfMemoryError, a plain MemoryError
        print(f"deepcore: error: {_out_of_memory(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("deepcore: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(exc: MemoryError) -> str:
    """One line: what was being allocated (shape, dtype, size, where in deepcore), as far as it is known."""
    import math
    import os

    from ..data.limits import format_bytes, memory_limit

    shape, dtype = getattr(exc, "shape", None), getattr(exc, "dtype", None)
    if shape is not None and dtype is not None:  # numpy's _ArrayMemoryError
        size = math.prod(shape) * dtype.itemsize
        what = f"could not allocate an array of shape {tuple(shape)} and dtype {dtype} ({format_bytes(size)})"
    else:  # CuPy says how much it asked for: "Out of memory allocating 1,024 bytes (allocated so far: ...)"
        what = " ".join(str(exc).split()) or "no details"
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = [f for f in frames if os.path.abspath(f.f_code.co_filename).startswith(package + os.sep)]
    where = ""
    if ours:
        code = ours[-1].f_code
        where = f" in {os.path.relpath(code.co_filename, os.path.dirname(package))} ({code.co_name})"
    return (f"out of memory: {what}{where}; {format_bytes(memory_limit())} of host memory is available now. "
            f"Use a smaller model (--hidden), --batch-size or data set")


def _parser(with_bench: bool = True) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="deepcore", description="Train neural networks on NumPy or CuPy.")
    parser.add_argument("--version", action="version", version=f"deepcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,export,info,demo,bench}")
    for command in (train, evaluate, predict, export, info, demo):
        command.add_parser(sub)
    if with_bench:
        from ..bench.command import add_parser as add_bench_parser

        add_bench_parser(sub)
    else:  # listed in --help; the benchmark package is imported only when the command runs
        sub.add_parser("bench", help=BENCH_HELP)
    return parser
