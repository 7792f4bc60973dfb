"""Errors raised while finding, downloading and reading data files.

Some messages tell the reader what to pass next time. The library names its Python arguments
(``download=True``, ``label_column=``); the ``deepcore`` command wants its flags
(``--no-download``, ``--label-column``). Such an error carries both: ``str(exc)`` is the
Python wording and :func:`cli_message` the command-line one (``exc.cli_message``).
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["ChecksumError", "DataFormatError", "DatasetNotFoundError", "DownloadError", "cli_message",
           "worded"]


class DataFormatError(ValueError):
    """A data file is truncated, corrupt, or not in the format its name promises."""


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on disk and downloading was turned off."""


class DownloadError(OSError):
    """No mirror delivered a file whose size and checksums match the table."""


class ChecksumError(DownloadError):
    """A downloaded or local file's size or checksum differs from the known value."""


E = TypeVar("E", bound=BaseException)


def worded(exc: E, cli: str) -> E:
    """``exc``, carrying ``cli`` as the wording for a command-line user (flags, not arguments)."""
    exc.cli_message = cli  # type: ignore[attr-defined]
    return exc


def cli_message(exc: BaseException) -> str:
    """The message of ``exc`` as the ``deepcore`` command shows it."""
    return getattr(exc, "cli_message", None) or str(exc)
