"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write goes through a temporary file next to the target, ``.<name>.<pid>.<random>.tmp``,
locked (``flock``) by its writer while it writes, then renamed over the target.
A writer killed mid-write (``kill -9``, a power cut) leaves its temporary file behind, so
each write first removes the stale ones of *its own target*: files of exactly that name
pattern, older than the write in progress, that no process holds locked and whose writer
is gone (its pid is dead, or now belongs to a process started after the file was last
written). A concurrent writer's file is locked, or its writer alive, and is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

try:  # POSIX; elsewhere stale files are recognised by their dead writer alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "fsync_directory", "new_file_mode", "remove_stale_temps", "temp_pattern",
           "writable_problem", "write_bytes_atomic"]


def temp_pattern(path: Path) -> re.Pattern[str]:
    """The names of the temporary files :func:`atomic_write` makes for ``path``; group 1 is the pid."""
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same directory and ``os.replace`` it onto ``path``."""
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    mode = new_file_mode(path)
    started = time.time()
    tmp = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                      delete=False)
    try:
        with tmp:
            _lock(tmp.fileno())  # held while the file is written: it marks a live writer
            remove_stale_temps(path, before=started, keep=Path(tmp.name).name)
            write(tmp.file)
            tmp.flush()
            os.fsync(tmp.fileno())  # the data is on disk before the name points at it
        # Closed, so unlocked, but its writer (this process) is alive: no one removes it meanwhile.
        if mode is not None:
            os.chmod(tmp.name, mode)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    fsync_directory(directory)


def remove_stale_temps(path: Path, *, before: float | None = None, keep: str | None = None) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_write` calls for ``path`` left behind.

    Only names of :func:`temp_pattern` (other files and other targets' temporaries are never
    touched), last modified before ``before`` (default: now), not locked by a live writer, and
    whose writer is gone. Best effort: a file that cannot be checked or removed stays. Returns
    the files removed.
    """
    before = time.time() if before is None else before
    pattern = temp_pattern(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or name == keep:
            continue
        candidate = path.parent / name
        try:
            info = os.stat(candidate, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= before:
                continue
            if not _writer_gone(int(match.group(1)), info.st_mtime) or _locked(candidate):
                continue
            os.unlink(candidate)
        except OSError:
            continue
        removed.append(candidate)
    return removed


def _lock(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: the pid check still guards
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _locked(path: Path) -> bool:
    """Whether some process holds ``path`` locked (a writer still at work); False where locks do not exist."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True  # cannot tell: leave it
    try:
        # Shared, which a read-only descriptor may take everywhere (NFS too); it conflicts with the writer's.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no locks on this file system
    finally:
        os.close(fd)  # also releases the lock just taken
    return False


def _writer_gone(pid: int, mtime: float) -> bool:
    """True when no process ``pid`` exists, or the one that does started after the file was last written
    (the pid was reused); False while the writer may still be alive, or when that cannot be known."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass  # PermissionError: alive, another user's
    except OSError:
        return False
    start = _process_start_time(pid)
    return start is not None and start > mtime + 2.0  # /proc's boot time has whole seconds


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc on Linux; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writable_problem(directory: Path) -> str | None:
    """None when a file can be created and removed in ``directory``, else why not (the OS's words).

    Tried for real, not read from the mode bits, which say nothing for root, ACLs or a read-only mount."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".deepcore-probe-", suffix=".tmp")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(name)
    except OSError as exc:
        return f"a file created there cannot be removed: {exc.strerror or exc}"
    return None


def new_file_mode(path: Path) -> int | None:
    """The permissions ``path`` would get from a plain ``open``: an existing file's, else 0o666 less the
    umask. tempfile creates 0o600, which would make every checkpoint private. None: leave it so."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    # The umask is read from /proc: os.umask() can only read it by changing it, racing other threads.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    return None


def fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; not possible everywhere (Windows), so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating the parent directory if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))
    return path
