"""How much a data file may make deepcore allocate: every size a file's header declares is checked
here, against the bytes present and the memory the machine has, before anything that size exists.

- A compressed stream (gzip, a zip entry) cannot unpack to more than :data:`MAX_DEFLATE_RATIO`
  times its size: DEFLATE's limit is 1032:1, so a header that declares more than that lies.
- :data:`MAX_ZIP_RATIO` is the ratio beyond which a large ``.npz`` member is taken for a zip
  bomb: real arrays compress 1.5 to 20 times, a bomb thousands of times (stacked or overlapping
  entries).
- Nothing is unpacked that would exceed :func:`memory_limit`, the memory available now.
"""

from __future__ import annotations

import os

from .errors import DataFormatError

__all__ = ["MAX_DEFLATE_RATIO", "MAX_ZIP_RATIO", "check_fits", "format_bytes", "memory_limit"]

MAX_DEFLATE_RATIO = 1032
MAX_ZIP_RATIO = 200
# A compressed member this small is harmless whatever its ratio: a tiny label array of zeros
# compresses 1000:1 and is no bomb.
SMALL_BYTES = 64 << 20


def format_bytes(n: float) -> str:
    """``n`` bytes for a person: ``"512 bytes"``, ``"3.4 MiB"``, ``"47.7 GiB"``."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def memory_limit() -> int:
    """Bytes of host memory available now: Linux's ``MemAvailable``, else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        return 8 << 30


def check_fits(nbytes: int, where: str, what: str) -> None:
    """DataFormatError unless ``nbytes`` (what a file asks for) fits in the memory available."""
    limit = memory_limit()
    if nbytes > limit:
        raise DataFormatError(f"{where}: {what} would need {format_bytes(nbytes)} of memory, more than the "
                              f"{format_bytes(limit)} available; the file is corrupt or far too large")
