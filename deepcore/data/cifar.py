"""CIFAR-10 from its binary version (fixed 3073-byte records), or the python version read safely.

Binary version (``cifar-10-binary.tar.gz`` / ``cifar-10-batches-bin/``): files
``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``, each a
run of records of one label byte then 3072 pixel bytes (1024 red, 1024
green, 1024 blue, rows of 32). The tar.gz is read in place; nothing is
extracted, so member paths never touch the file system.

Python version (``cifar-10-python.tar.gz`` / ``cifar-10-batches-py/``): pickled
dicts. They are read with :class:`RestrictedUnpickler`, which builds NumPy
arrays and plain containers only and refuses every other global, so a
malicious pickle cannot run code.
"""

from __future__ import annotations

import builtins
import importlib
import io
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .datasets import ArrayDataset, DatasetSplits
from .download import RESOURCES, Fetch, download_file
from .errors import DataFormatError, DatasetNotFoundError
from .locate import data_root

__all__ = ["CIFAR10_CLASSES", "RestrictedUnpickler", "load_cifar10", "read_cifar_binary", "read_cifar_pickle"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_RECORD = 1 + 3 * 32 * 32
_SHAPE = (3, 32, 32)
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = "test_batch"
_BIN_DIR, _PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
_BIN_TAR, _PY_TAR = "cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"


# ----------------------------------------------------------------- binary version
def _parse_records(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % _RECORD:
        raise DataFormatError(f"{source}: {len(data)} bytes is not a whole number of {_RECORD}-byte CIFAR-10 "
                              f"records (1 label byte + 3072 pixel bytes); the file is truncated or not CIFAR-10")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0].copy()
    bad = np.flatnonzero(labels >= len(CIFAR10_CLASSES))
    if bad.size:
        raise DataFormatError(f"{source}: record {bad[0]} has label byte {labels[bad[0]]}, not a class 0..9 "
                              f"(corrupt, or not the CIFAR-10 binary version)")
    return records[:, 1:].reshape((-1,) + _SHAPE).copy(), labels


def read_cifar_binary(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels uint8 (N,))`` from one binary batch file."""
    path = Path(path)
    return _parse_records(path.read_bytes(), str(path))


# ----------------------------------------------------------------- python version
def _numpy_core(module: str) -> Any:
    # NumPy 2 moved numpy.core to numpy._core (the old name still imports, with a warning).
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


def _builtin(name: str) -> Callable[[], Any]:
    return lambda: getattr(builtins, name)


_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "bool",
             "complex")
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    # What a pickled ndarray needs: the array/dtype types and NumPy's own rebuild helpers.
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    **{(f"numpy.{p}.multiarray", "_reconstruct"): (lambda: _numpy_core("multiarray")._reconstruct)
       for p in ("core", "_core")},
    **{(f"numpy.{p}.multiarray", "scalar"): (lambda: _numpy_core("multiarray").scalar) for p in ("core", "_core")},
    **{(f"numpy.{p}.numeric", "_frombuffer"): (lambda: _numpy_core("numeric")._frombuffer)
       for p in ("core", "_core")},
    # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
    **{(m, n): _builtin(n) for m in ("builtins", "__builtin__") for n in _BUILTINS},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only NumPy array reconstruction helpers and plain builtin types.

    Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError` before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        make = _ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: CIFAR-10 pickles hold only "
                                         f"NumPy arrays, lists and dicts")
        return make()


def _unpickle(f: IO[bytes], source: str) -> Any:
    try:
        # latin1 turns Python 2 byte strings (the array buffers) back into the bytes NumPy expects.
        return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataFormatError(f"{source}: {exc}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as exc:
        raise DataFormatError(f"{source}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc


def _batch_from_pickle(obj: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    entry = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _RECORD - 1:
        got = f"{data.dtype}{data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{source}: 'labels' must be a list of integers ({exc})") from exc
    if labels.shape != (len(data),):
        raise DataFormatError(f"{source}: {len(data)} images but 'labels' has shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= len(CIFAR10_CLASSES)))
    if bad.size:
        raise DataFormatError(f"{source}: labels[{bad[0]}] = {labels[bad[0]]} is not a class 0..9")
    return np.ascontiguousarray(data.reshape((-1,) + _SHAPE)), labels.astype(np.uint8)


def read_cifar_pickle(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels uint8 (N,))`` from one python-version batch, safely."""
    path = Path(path)
    with open(path, "rb") as f:
        return _batch_from_pickle(_unpickle(f, str(path)), str(path))


# ----------------------------------------------------------------- finding and loading
def _read_dir(folder: Path, binary: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ext = ".bin" if binary else ""
    names = [*_TRAIN, _TEST]
    missing = [n + ext for n in names if not (folder / (n + ext)).is_file()]
    if missing:
        raise DatasetNotFoundError(f"CIFAR-10: {folder} lacks {', '.join(missing)}")
    read = read_cifar_binary if binary else read_cifar_pickle
    return {n: read(folder / (n + ext)) for n in names}


def _read_tar(archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            # Regular files only, matched by base name; nothing is extracted to disk.
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            binary = "data_batch_1.bin" in members
            ext = ".bin" if binary else ""
            names = [*_TRAIN, _TEST]
            missing = [n + ext for n in names if n + ext not in members]
            if missing:
                raise DataFormatError(f"{archive}: archive lacks {', '.join(missing)} (not a CIFAR-10 archive?)")
            out = {}
            for n in names:
                member = members[n + ext]
                source = f"{archive}:{member.name}"
                f = tar.extractfile(member)
                assert f is not None  # a regular file always has content
                with f:
                    if binary:
                        out[n] = _parse_records(f.read(), source)
                    else:
                        out[n] = _batch_from_pickle(_unpickle(io.BytesIO(f.read()), source), source)
            return out
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:  # gzip.BadGzipFile and short reads
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataFormatError(f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc


def _find(root: Path) -> tuple[str, Path] | None:
    """``("tar" | "bin" | "py", path)`` for the first CIFAR-10 copy under ``root``, binary preferred."""
    if root.is_file():
        return "tar", root
    for d in (root / "cifar10", root):
        for kind, p in (("bin", d / _BIN_DIR), ("tar", d / _BIN_TAR), ("py", d / _PY_DIR), ("tar", d / _PY_TAR)):
            if (p.is_dir() if kind != "tar" else p.is_file()):
                return kind, p
        if (d / "data_batch_1.bin").is_file():
            return "bin", d
        if (d / "data_batch_1").is_file():
            return "py", d
    return None


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True,
                 fetch: Fetch | None = None, progress: bool | None = None) -> DatasetSplits:
    """CIFAR-10: 50,000 train and 10,000 test 32x32 colour images, x float32 ``(N, 3072)`` in [0, 1].

    Rows are channel-major (1024 red, 1024 green, 1024 blue), so ``input_shape``
    is ``(3, 32, 32)``; labels are int64 0..9. Looks in ``ROOT/cifar10`` and
    ``ROOT`` (ROOT is ``data_dir``, which may also name an archive, or the
    cache) for ``cifar-10-batches-bin/``, ``cifar-10-binary.tar.gz``, the python
    version, or the batch files themselves; downloads the binary archive
    (checksum-verified) to ``ROOT/cifar10`` when ``download``.
    """
    root = data_root(data_dir)
    found = _find(root)
    if found is None:
        if not download:
            raise DatasetNotFoundError(
                f"CIFAR-10: none of {_BIN_DIR}/, {_BIN_TAR}, {_PY_DIR}/, {_PY_TAR} found in {root / 'cifar10'} "
                f"or {root}; pass download=True or put one of them there")
        found = ("tar", download_file(RESOURCES["cifar10"][0], root / "cifar10", fetch=fetch, progress=progress))
    kind, path = found
    batches = _read_tar(path) if kind == "tar" else _read_dir(path, binary=(kind == "bin"))

    def part(names: tuple[str, ...]) -> ArrayDataset:
        images = np.concatenate([batches[n][0] for n in names])
        labels = np.concatenate([batches[n][1] for n in names])
        x = images.reshape(len(images), -1).astype(np.float32)
        x /= np.float32(255)
        return ArrayDataset(x, labels.astype(np.int64), name="cifar10", classes=CIFAR10_CLASSES)

    return DatasetSplits(train=part(_TRAIN), test=part((_TEST,)), name="cifar10", input_shape=_SHAPE,
                         classes=CIFAR10_CLASSES)
