"""The ``deepcore`` command: ``train``, ``info``, ``demo`` and ``bench``, one module each.

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
from . import demo, info, train

BENCH_HELP = "time deepcore's backends against each other and PyTorch"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(with_bench="bench" in argv)
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
    except KeyboardInterrupt:
        print("deepcore: interrupted", file=sys.stderr)
        return 130


def _parser(with_bench: bool = True) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="deepcore", description="Train neural networks on NumPy or CuPy.")
    parser.add_argument("--version", action="version", version=f"deepcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,info,demo,bench}")
    for command in (train, info, demo):
        command.add_parser(sub)
    if with_bench:
        from ..bench.command import add_parser as add_bench_parser

        add_bench_parser(sub)
    else:  # listed in --help; the benchmark package is imported only when the command runs
        sub.add_parser("bench", help=BENCH_HELP)
    return parser
