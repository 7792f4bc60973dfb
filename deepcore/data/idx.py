"""MNIST and Fashion-MNIST from the IDX files they are distributed as.

An IDX file is a 4-byte magic number ``00 00 TT DD`` (TT the element type,
DD the number of dimensions), DD big-endian uint32 sizes, then the elements,
big-endian, row-major. Files may be gzip-compressed (detected by content,
not by name). A file whose header, size or compression is wrong raises
:class:`DataFormatError` naming the file and the fault, and is never used.

The size a header declares is checked before anything that size is
allocated: a raw file must hold exactly that many bytes; a gzip file cannot
unpack to more than :data:`~deepcore.data.limits.MAX_DEFLATE_RATIO` times its
size, nor to more than the memory available, and reading stops one byte
past the declared end.

The MNIST and Fashion-MNIST loaders verify the gzipped files they find
against the known size, MD5 and SHA-256 (the table in
:mod:`deepcore.data.download`), as a download is verified. The table knows
the files as distributed, so an unpacked copy cannot be verified: it is used
only with ``verify=False`` (``--no-verify``).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from .datasets import ArrayDataset, DatasetSplits
from .download import RESOURCES, Fetch, Resource, download_file, verify_local
from .errors import ChecksumError, DataFormatError, DatasetNotFoundError, worded
from .limits import MAX_DEFLATE_RATIO, check_fits, format_bytes
from .locate import data_root, find_first

__all__ = ["FASHION_MNIST_CLASSES", "MNIST_CLASSES", "load_fashion_mnist", "load_mnist", "read_idx"]

# IDX element type codes (LeCun's format description), all big-endian on disk.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def _read_exact(f: IO[bytes] | io.BufferedIOBase, n: int, path: Path, what: str) -> bytearray:
    # In chunks, so a header that claims a huge size fails at end of file instead of allocating it.
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), _CHUNK))
        if not chunk:
            raise DataFormatError(f"{path}: truncated: {what} needs {n} bytes but the file ends after {len(buf)}")
        buf += chunk
    return buf


def _parse(f: IO[bytes] | io.BufferedIOBase, path: Path, file_size: int | None,
           compressed_size: int | None = None) -> np.ndarray:
    """The array in ``f``; ``file_size`` is the exact size of a raw file, ``compressed_size``
    the size of a gzip file on disk (which bounds what it can hold)."""
    magic = bytes(_read_exact(f, 4, path, "the magic number"))
    if magic[:2] != b"\0\0":
        raise DataFormatError(f"{path}: bad magic number 0x{magic.hex()}: not an IDX file "
                              f"(expected 0x0000TTDD)")
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX element type code 0x{code:02x} "
                              f"(known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
    dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, f"the {ndim} dimension sizes"))
    dtype = np.dtype(_IDX_DTYPES[code])
    header = 4 + 4 * ndim
    payload = math.prod(dims) * dtype.itemsize
    if file_size is not None and file_size != header + payload:
        raise DataFormatError(f"{path}: wrong size: header says {dims} x {dtype.itemsize} bytes = {payload} "
                              f"bytes of data, the file has {file_size - header}")
    if compressed_size is not None and header + payload > MAX_DEFLATE_RATIO * compressed_size + 1024:
        raise DataFormatError(f"{path}: header declares shape {dims}, {format_bytes(payload)} of data, more than "
                              f"{compressed_size} gzipped bytes can hold (gzip packs at most "
                              f"{MAX_DEFLATE_RATIO}:1); the file is corrupt or truncated")
    check_fits(payload, str(path), f"the data of shape {dims}")
    data = _read_exact(f, payload, path, f"the data of shape {dims}")
    if f.read(1):
        raise DataFormatError(f"{path}: wrong size: more data than the {payload} bytes the header declares "
                              f"for shape {dims}")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in the IDX file ``path`` (raw or gzip), in native byte order."""
    path = Path(path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        if size == 0:
            raise DataFormatError(f"{path}: empty file (0 bytes), expected an IDX file (raw or gzipped)")
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not compressed:
            return _parse(raw, path, size)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                # Reading through the end also checks gzip's CRC and length trailer.
                return _parse(f, path, None, compressed_size=size)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def _candidates(base: str) -> list[str]:
    # The canonical names, gzipped or not, and the dotted spelling some mirrors use
    # ("train-images.idx3-ubyte").
    dotted = base.replace("-idx", ".idx")
    return [base + ".gz", base, dotted + ".gz", dotted]


def _find(res: Resource, dirs: list[Path], verify: bool) -> Path | None:
    names = _candidates(res.filename.removesuffix(".gz"))
    if verify:  # a gzipped copy anywhere, which can be verified, before an unpacked one
        return find_first(dirs, [n for n in names if n.endswith(".gz")]) or find_first(dirs, names)
    return find_first(dirs, names)


def _check(path: Path, res: Resource, title: str) -> None:
    if path.name.endswith(".gz"):
        verify_local(path, res, title=title)
        return
    known = f"the known checksums are those of the gzipped files as distributed ({res.filename})"
    raise worded(ChecksumError(f"{title}: cannot verify {path}: it is unpacked, and {known}; put {res.filename} "
                               f"there instead, or pass verify=False to use the unpacked file unchecked"),
                 f"{title}: cannot verify {path}: it is unpacked, and {known}; put {res.filename} there instead, "
                 f"or pass --no-verify to use the unpacked file unchecked")


def _load_idx_set(key: str, title: str, torchvision_name: str, classes: tuple[str, ...],
                  data_dir: Any, download: bool, fetch: Fetch | None, progress: bool | None,
                  verify: bool = True) -> DatasetSplits:
    root = data_root(data_dir)
    dirs = [root / key, root, root / torchvision_name / "raw"]
    found: dict[str, Path] = {}
    missing = []
    for res in RESOURCES[key]:
        path = _find(res, dirs, verify)
        if path is None:
            missing.append(res)
        else:
            found[res.filename.removesuffix(".gz")] = path
    if missing and not download:
        names = ", ".join(r.filename for r in missing)
        where = ", ".join(map(str, dirs))
        raise worded(DatasetNotFoundError(f"{title}: {names} not found in {where}; pass download=True, or put the "
                                          f"IDX files (gzipped) in one of those folders"),
                     f"{title}: {names} not found in {where}; run without --no-download to download them, or put "
                     f"the IDX files (gzipped) in one of those folders, or name another with --data-dir")
    if verify:  # before any download, so a bad local file does not cost one
        for res in RESOURCES[key]:
            base = res.filename.removesuffix(".gz")
            if base in found:
                _check(found[base], res, title)
    for res in missing:
        found[res.filename.removesuffix(".gz")] = download_file(res, root / key, fetch=fetch, progress=progress)

    def part(prefix: str) -> tuple[ArrayDataset, tuple[int, ...]]:
        ipath, lpath = found[f"{prefix}-images-idx3-ubyte"], found[f"{prefix}-labels-idx1-ubyte"]
        images, labels = read_idx(ipath), read_idx(lpath)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataFormatError(f"{ipath}: expected uint8 images of shape (N, rows, cols), "
                                  f"got {images.dtype}{images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataFormatError(f"{lpath}: expected uint8 labels of shape (N,), got {labels.dtype}{labels.shape}")
        if len(images) != len(labels):
            raise DataFormatError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
        bad = np.flatnonzero(labels >= len(classes))
        if bad.size:
            raise DataFormatError(f"{lpath}: label {int(labels[bad[0]])} at index {bad[0]} is not a class "
                                  f"0..{len(classes) - 1}")
        x = images.reshape(len(images), -1).astype(np.float32)
        x /= np.float32(255)
        return ArrayDataset(x, labels.astype(np.int64), name=key, classes=classes), images.shape[1:]

    (train, shape), (test, test_shape) = part("train"), part("t10k")
    if test_shape != shape:
        raise DataFormatError(f"{title}: train images are {shape} but test images are {test_shape}")
    return DatasetSplits(train=train, test=test, name=key, input_shape=shape, classes=classes)


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True,
               fetch: Fetch | None = None, progress: bool | None = None, verify: bool = True) -> DatasetSplits:
    """MNIST: 60,000 train and 10,000 test 28x28 digits, x float32 ``(N, 784)`` in [0, 1], int64 labels.

    Files are looked for in ``ROOT/mnist``, ``ROOT`` and ``ROOT/MNIST/raw``, where
    ROOT is ``data_dir`` or the cache (``$DEEPCORE_DATA``, else ``~/.cache/deepcore``);
    missing ones are downloaded to ``ROOT/mnist`` (checksum-verified) when ``download``.
    Files found are verified too (size, MD5, SHA-256 of the ``.gz`` files as distributed);
    ``verify=False`` uses them unchecked, unpacked copies included.
    """
    return _load_idx_set("mnist", "MNIST", "MNIST", MNIST_CLASSES, data_dir, download, fetch, progress, verify)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True,
                       fetch: Fetch | None = None, progress: bool | None = None, verify: bool = True) -> DatasetSplits:
    """Fashion-MNIST, same format and layout as :func:`load_mnist` (folders ``fashion-mnist``,
    ``FashionMNIST/raw``), 10 clothing classes."""
    return _load_idx_set("fashion-mnist", "Fashion-MNIST", "FashionMNIST", FASHION_MNIST_CLASSES, data_dir,
                         download, fetch, progress, verify)
