"""Fetching the public data sets: mirrors and checksums, verified atomic writes, progress.

A download goes to a hidden ``.NAME.*.part`` file in the destination folder,
is checked against the known size, MD5 and SHA-256, and only then is
``os.replace``d to ``NAME``; a failed, interrupted or mismatched download
deletes its temporary file. So a file under its final name is always
complete and verified.

The network is reached only through ``fetch(url, dest)``: pass your own to
:func:`download_file` (and to the loaders), or monkeypatch
:func:`urllib_fetch`, e.g. to keep tests offline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._io import fsync_directory, new_file_mode
from .._progress import Progress
from .errors import ChecksumError, DownloadError

__all__ = ["RESOURCES", "Resource", "default_data_dir", "download_file", "file_digests", "urllib_fetch"]

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

DATA_ENV_VAR = "DEEPCORE_DATA"
_CHUNK = 1 << 20


def default_data_dir() -> Path:
    """``$DEEPCORE_DATA`` if set, else ``~/.cache/deepcore``."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepcore"


def urllib_fetch(url: str, dest: Path, *, progress: bool | None = None, timeout: float = 60.0) -> None:
    """Write the body of ``url`` to ``dest`` (the default ``fetch``; the only code that opens sockets)."""
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


def _verify(path: Path, resource: Resource, url: str) -> None:
    size, md5, sha = file_digests(path)
    problems = []
    if resource.size is not None and size != resource.size:
        problems.append(f"size {size} bytes, expected {resource.size}")
    if resource.md5 is not None and md5 != resource.md5.lower():
        problems.append(f"md5 {md5}, expected {resource.md5}")
    if resource.sha256 is not None and sha != resource.sha256.lower():
        problems.append(f"sha256 {sha}, expected {resource.sha256}")
    if problems:
        raise ChecksumError(f"{resource.filename} from {url}: " + "; ".join(problems))


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
            return final
        except Exception as exc:  # noqa: BLE001 - every failure moves on to the next mirror
            failures.append((url, exc))
        finally:
            # Also runs on KeyboardInterrupt: an interrupted download leaves nothing behind.
            tmp.unlink(missing_ok=True)
    cls = ChecksumError if all(isinstance(e, ChecksumError) for _, e in failures) else DownloadError
    reasons = "\n".join(f"  {url}: {type(e).__name__}: {e}" for url, e in failures)
    raise cls(f"could not download {resource.filename} into {dest_dir}:\n{reasons}\n"
              f"Download it by hand into that folder, or pass data_dir= to a folder that has it.") from failures[-1][1]


def _fsync(path: Path) -> None:
    # Flush the verified bytes to disk before the rename makes them look final.
    try:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError:  # some file systems do not support fsync; the rename is still atomic
        pass
