"""Errors raised while finding, downloading and reading data files."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file is truncated, corrupt, or not in the format its name promises."""


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on disk and downloading was turned off."""


class DownloadError(OSError):
    """No mirror delivered a file whose size and checksums match the table."""


class ChecksumError(DownloadError):
    """A downloaded file's size or checksum differs from the known value."""
