"""Fetching the public data sets: mirrors and checksums, verified atomic writes, progress.

A download goes to a hidden ``.NAME.*.part`` file in the destination folder,
is checked against the known size, MD5 and SHA-256, and only then is
``os.replace``d to ``NAME``; a failed, interrupted or mismatched download
deletes its temporary file. So a file under its final name is always
complete and verified.

The network is reached only through ``fetch(url, dest)``: pass your own to
:func:`download_file` (and to the loaders), or monkeypatch
:func:`urllib_fetch`, e.g. to keep tests offline.

Files found on disk are held to the same table (:func:`verify_local`): a copy that differs
from the original in size, MD5 or SHA-256 is refused, naming the file. Hashing 170 MB takes
a second or so, so a file that passed is remembered in ``verified.json`` in the cache folder
(:func:`default_data_dir`) by its path, size, inode and modification and change times; any
change to the file, even one that keeps its mtime, makes it be hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._io import fsync_directory, new_file_mode, write_bytes_atomic
from .._progress import Progress
from .errors import ChecksumError, DownloadError, worded

__all__ = ["LOCAL_RESOURCES", "RESOURCES", "Resource", "default_data_dir", "download_file", "file_digests",
           "remember_verified", "urllib_fetch", "verify_local"]

Fetch = Callable[[str, Path], None]


@dataclass(frozen=True)
class Resource:
    """One file of a public data set: its name, mirrors (tried in order), size and digests."""

    filename: str
    urls: tuple[str, ...]
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


def _mirrored(filename: str, mirrors: tuple[str, ...], size: int, md5: str, sha256: str) -> Resource:
    return Resource(filename, tuple(m + filename for m in mirrors), size, md5, sha256)


# Sources: file names, mirrors and MD5s as listed in torchvision/datasets/mnist.py (MNIST,
# FashionMNIST); the CIFAR-10 binary archive's URL and MD5 from its authors' page
# (cs.toronto.edu/~kriz/cifar.html); sizes and SHA-256s from TensorFlow Datasets'
# url_checksums/{mnist,fashion_mnist,cifar10}.txt. Both digests are checked.
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": (
        _mirrored("train-images-idx3-ubyte.gz", _MNIST_MIRRORS, 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                  "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        _mirrored("train-labels-idx1-ubyte.gz", _MNIST_MIRRORS, 28881, "d53e105ee54ea40749a09fcbcd1e9432",
                  "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        _mirrored("t10k-images-idx3-ubyte.gz", _MNIST_MIRRORS, 1648877, "9fb629c4189551a2d022fa330f9573f3",
                  "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        _mirrored("t10k-labels-idx1-ubyte.gz", _MNIST_MIRRORS, 4542, "ec29112dd5afa0611ce80d1b7f02629c",
                  "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
    "fashion-mnist": (
        _mirrored("train-images-idx3-ubyte.gz", _FASHION_MIRRORS, 26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                  "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        _mirrored("train-labels-idx1-ubyte.gz", _FASHION_MIRRORS, 29515, "25c81989df183df01b3e8a0aad5dffbe",
                  "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        _mirrored("t10k-images-idx3-ubyte.gz", _FASHION_MIRRORS, 4422102, "bef4ecab320f06d8554ea6380940ec79",
                  "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        _mirrored("t10k-labels-idx1-ubyte.gz", _FASHION_MIRRORS, 5148, "bb300cfdad3c16e7a12a480ee83cd310",
                  "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ),
    "cifar10": (
        Resource("cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                 170052171, "c32a1d4ab5d03f1284b67883e8d87530",
                 "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    ),
}

# Local forms that are never downloaded but whose originals are known: the python version of
# CIFAR-10, its archive and its batch files. MD5s as listed in torchvision/datasets/cifar.py
# (from the authors' page), the archive's size as it is served; no SHA-256 is published.
_CIFAR_PY_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                 "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                 "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
LOCAL_RESOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (Resource("cifar-10-python.tar.gz", (), 170498071, "c58f30108f718f92721af3b95e74349a"),
                *(Resource(name, (), None, md5) for name, md5 in _CIFAR_PY_MD5.items())),
}

DATA_ENV_VAR = "DEEPCORE_DATA"
_CHUNK = 1 << 20


def default_data_dir() -> Path:
    """``$DEEPCORE_DATA`` if set, else ``~/.cache/deepcore``."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepcore"


def urllib_fetch(url: str, dest: Path, *, progress: bool | None = None, timeout: float = 60.0) -> None:
    """Write the body of ``url`` to ``dest`` (the default ``fetch``; the only code that opens sockets)."""
    import urllib.request  # here, not at the top: http.client and email cost ~25 ms at start-up, unused offline

    request = urllib.request.Request(url, headers={"User-Agent": "deepcore"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        length = response.headers.get("Content-Length")
        bar = Progress(int(length) if length and length.isdigit() else None, url.rsplit("/", 1)[-1],
                       enabled=progress, byte_counts=True)
        try:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()


def file_digests(path: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``(size, md5 hex, sha256 hex)`` of a file, read once in chunks."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            md5.update(chunk)
            sha.update(chunk)
    return size, md5.hexdigest(), sha.hexdigest()


def _problems(path: Path, resource: Resource) -> list[str]:
    if resource.size is not None:
        size = os.stat(path).st_size
        if size != resource.size:  # no need to hash what has the wrong size
            return [f"size {size} bytes, expected {resource.size}"]
    _, md5, sha = file_digests(path)
    problems = []
    if resource.md5 is not None and md5 != resource.md5.lower():
        problems.append(f"md5 {md5}, expected {resource.md5}")
    if resource.sha256 is not None and sha != resource.sha256.lower():
        problems.append(f"sha256 {sha}, expected {resource.sha256}")
    return problems


def _verify(path: Path, resource: Resource, url: str) -> None:
    problems = _problems(path, resource)
    if problems:
        raise ChecksumError(f"{resource.filename} from {url}: " + "; ".join(problems))


# ----------------------------------------------------------------- files found on disk
_MARKER = "verified.json"
_MARKER_MAX_BYTES = 1 << 20


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_marker(path: Path) -> dict:
    # A cache: anything odd in it (too big, not JSON, nested too deep, wrong shape) reads as empty.
    try:
        if path.stat().st_size > _MARKER_MAX_BYTES:
            return {}
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return entries if isinstance(entries, dict) else {}


def verify_local(path: str | os.PathLike[str], resource: Resource, *, title: str = "") -> None:
    """Raise :class:`ChecksumError` unless the file ``path`` is ``resource`` (size, MD5, SHA-256).

    The message names the file and how to use it anyway. A pass is remembered (see the module
    docstring), so a file is hashed once, not on every run.
    """
    path = Path(path)
    st = path.stat()
    digest = resource.sha256 or resource.md5 or ""
    if _read_marker(default_data_dir() / _MARKER).get(str(path.resolve())) == {"stamp": _stamp(st), "digest": digest}:
        return
    problems = _problems(path, resource)
    if problems:
        what = f"the original {resource.filename}" + (f" of {title}" if title else "")
        raise worded(ChecksumError(f"{path}: not {what}: {'; '.join(problems)}. To use this file anyway, pass "
                                   f"verify=False; for data of your own, load_file() reads .npz and .csv"),
                     f"{path}: not {what}: {'; '.join(problems)}. To use this file anyway, pass --no-verify; "
                     f"for data of your own, give it as --dataset PATH.npz or PATH.csv")
    remember_verified(path, resource, st)


def remember_verified(path: Path, resource: Resource, st: os.stat_result | None = None) -> None:
    """Note in the cache that ``path`` (as it was at ``st``, default now) matched ``resource``."""
    try:  # a read-only cache only costs the hashing next time
        now = path.stat()
        if st is not None and _stamp(now) != _stamp(st):  # changed while it was hashed: proves nothing
            return
        marker = default_data_dir() / _MARKER
        entries = _read_marker(marker)
        entries[str(path.resolve())] = {"stamp": _stamp(now), "digest": resource.sha256 or resource.md5 or ""}
        write_bytes_atomic(marker, json.dumps(entries, indent=0, sort_keys=True).encode())
    except OSError:
        pass


def download_file(resource: Resource, dest_dir: str | os.PathLike[str], *, fetch: Fetch | None = None,
                  progress: bool | None = None) -> Path:
    """Download ``resource`` into ``dest_dir`` (created if needed) and return its final path.

    Mirrors are tried in order until one delivers a file whose size and
    digests match; each attempt writes to its own temporary file, which is
    deleted unless it passes. Raises :class:`ChecksumError` when every
    mirror delivered wrong bytes, :class:`DownloadError` otherwise.
    """
    if not resource.urls:
        raise ValueError(f"download_file: {resource.filename} has no URL to download from")
    if resource.md5 is None and resource.sha256 is None:
        raise ValueError(f"download_file: {resource.filename} has no checksum; refusing to download unverified data")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / resource.filename
    failures: list[tuple[str, BaseException]] = []
    for url in resource.urls:
        # Same folder as the final file, so os.replace is an atomic rename on one file system.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{resource.filename}.", suffix=".part", dir=dest_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if fetch is None:
                urllib_fetch(url, tmp, progress=progress)  # looked up at call time, so monkeypatching works
            else:
                fetch(url, tmp)
            _verify(tmp, resource, url)
            _fsync(tmp)
            # mkstemp makes the file private (0600); a shared data folder needs the usual mode.
            mode = new_file_mode(final)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, final)
            fsync_directory(dest_dir)
            remember_verified(final, resource)  # so loading it next does not hash it again
            return final
        except Exception as exc:  # noqa: BLE001 - every failure moves on to the next mirror
            failures.append((url, exc))
        finally:
            # Also runs on KeyboardInterrupt: an interrupted download leaves nothing behind.
            tmp.unlink(missing_ok=True)
    cls = ChecksumError if all(isinstance(e, ChecksumError) for _, e in failures) else DownloadError
    reasons = "\n".join(f"  {url}: {type(e).__name__}: {e}" for url, e in failures)
    raise worded(cls(f"could not download {resource.filename} into {dest_dir}:\n{reasons}\n"
                     f"Download it by hand into that folder, or pass data_dir= to a folder that has it."),
                 f"could not download {resource.filename} into {dest_dir}: "
                 + "; ".join(f"{url}: {type(e).__name__}: {e}" for url, e in failures)
                 + "; download it by hand into that folder, or pass --data-dir with a folder that has it"
                 ) from failures[-1][1]


def _fsync(path: Path) -> None:
    # Flush the verified bytes to disk before the rename makes them look final.
    try:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError:  # some file systems do not support fsync; the rename is still atomic
        pass
