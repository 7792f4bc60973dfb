"""``deepcore demo NAME``: the course's worked examples (:mod:`deepcore.demos`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="the course's worked examples")
    p.add_argument("name", choices=("regression", "overfit", "hinge"))
    p.add_argument("--out", type=Path, default=Path("."), help="where plots go (default: here)")
    p.set_defaults(run=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    from .. import demos

    return {"regression": demos.regression, "overfit": demos.overfit, "hinge": demos.hinge}[args.name](args.out)
