"""Where a public data set's files are looked for, and what happens when they are missing."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .download import default_data_dir

__all__ = ["data_root", "find_first"]


def data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` if given, else :func:`default_data_dir` (``$DEEPCORE_DATA`` or ``~/.cache/deepcore``)."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def find_first(dirs: Iterable[Path], names: Iterable[str]) -> Path | None:
    """The first regular file ``d / name`` that exists, trying every name in each folder in turn."""
    names = list(names)
    for d in dirs:
        for name in names:
            p = d / name
            if p.is_file():
                return p
    return None
