"""How the ``deepcore`` command reports a mistake: one line, ``deepcore: error: ...``, and an
exit status (2 for a bad argument, 1 for anything else), never a traceback.

Its own module so that every subcommand (``train`` in :mod:`deepcore.cli.train`, ``bench`` in
:mod:`deepcore.bench.command`) can raise :class:`UsageError` without importing the other.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A bad command-line value, reported as one line with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``deepcore: error: ...``), not usage plus error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"deepcore: error: {where}{message} (see {self.prog} --help)\n")
