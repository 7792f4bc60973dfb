"""CIFAR-10 from its binary version (fixed 3073-byte records), or the python version read safely.

Binary version (``cifar-10-binary.tar.gz`` / ``cifar-10-batches-bin/``): files
``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``, each a
run of records of one label byte then 3072 pixel bytes (1024 red, 1024
green, 1024 blue, rows of 32). The tar.gz is read in place; nothing is
extracted, so member paths never touch the file system.

Python version (``cifar-10-python.tar.gz`` / ``cifar-10-batches-py/``): pickled
dicts. They are read with :class:`RestrictedUnpickler`, which builds exactly
what a batch holds (one uint8 array of shape (N, 3072), N <= 10,000, lists
and text) and refuses every other global, so a malicious pickle can neither
run code nor make NumPy allocate a size of its choosing.

No file or archive entry larger than a CIFAR-10 batch is read, and copies
found on disk are verified against the known checksums (see
:func:`load_cifar10`).
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import ArrayDataset, DatasetSplits
from .download import LOCAL_RESOURCES, RESOURCES, Fetch, Resource, download_file, verify_local
from .errors import ChecksumError, DataFormatError, DatasetNotFoundError, worded
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


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise DataFormatError(f"{path}: {size} bytes is more than a CIFAR-10 {what} holds ({limit} bytes at most, "
                              f"for {_MAX_IMAGES} images); not a CIFAR-10 file")
    return path.read_bytes()


def read_cifar_binary(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels uint8 (N,))`` from one binary batch file."""
    path = Path(path)
    return _parse_records(_read_capped(path, _MAX_BINARY_BYTES, "binary batch"), str(path))


# ----------------------------------------------------------------- python version
# A CIFAR-10 batch holds 10,000 images: its binary file is 30,730,000 bytes, its pickle about
# 31 MB. Nothing larger is read, whatever a header or a tar entry claims.
_MAX_IMAGES = 10_000
_MAX_BINARY_BYTES = _MAX_IMAGES * _RECORD
_MAX_PICKLE_BYTES = 40 << 20


class _Refused(pickle.UnpicklingError):
    pass


def _numpy_core(module: str) -> Any:
    # NumPy 2 moved numpy.core to numpy._core (the old name still imports, with a warning).
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


def _check_image_array(shape: Any, dtype: Any, nbytes: int | None) -> None:
    """Only what a CIFAR-10 batch's ``data`` is: uint8, shape (N, 3072) with 1 <= N <= 10,000."""
    if np.dtype(dtype) != np.uint8:
        raise _Refused(f"refusing an array of dtype {dtype}: a CIFAR-10 batch holds uint8 images only")
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(type(d) is int for d in shape)
            and 1 <= shape[0] <= _MAX_IMAGES and shape[1] == _RECORD - 1):
        raise _Refused(f"refusing an array of shape {shape!r}: a CIFAR-10 batch holds (N, 3072) images, "
                       f"N at most {_MAX_IMAGES}")
    if nbytes is not None and nbytes != shape[0] * shape[1]:
        raise _Refused(f"refusing an array of shape {shape}: it comes with {nbytes} bytes of data, "
                       f"not {shape[0] * shape[1]}")


class _Budget:
    """The bytes one unpickling may build. A pickle can name the same 30 MB string a thousand
    times (its memo), and each rebuild from it would copy it: one batch's worth is allowed, twice
    (the bytes themselves and the array made from them), and no more."""

    def __init__(self) -> None:
        self.left = 2 * _MAX_IMAGES * (_RECORD - 1)

    def charge(self, nbytes: int) -> None:
        if nbytes > self.left:
            raise _Refused("refusing to build more data than a CIFAR-10 batch holds (the pickle repeats its "
                           "arrays or their bytes)")
        self.left -= nbytes


class _ImageArray(np.ndarray):
    """What ``_reconstruct`` builds while unpickling: an empty array whose state (shape, dtype,
    bytes) is checked against a CIFAR-10 image batch before NumPy allocates anything."""

    _budget: _Budget | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused("refusing an array state that is not NumPy's (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype) or fortran not in (False, 0) or not isinstance(raw, (bytes, str)):
            raise _Refused("refusing an array state: a CIFAR-10 batch is a C-ordered uint8 array of raw bytes")
        _check_image_array(shape, dtype, len(raw))
        if self._budget is None:
            raise _Refused("refusing an array state outside of an unpickling")
        self._budget.charge(len(raw))
        super().__setstate__(state)


def _reconstruct(budget: _Budget, cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    # What ndarray.__reduce__ asks for: an empty array of the right class, filled by its state.
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused(f"refusing _reconstruct{(cls, shape, typecode)!r}: not how NumPy pickles an array")
    arr = np.ndarray.__new__(_ImageArray, (0,), "b")
    arr._budget = budget
    return arr


def _frombuffer(budget: _Budget, buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Protocol 5's spelling of an array: the bytes, then dtype, shape and order.
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)) or order != "C":
        raise _Refused("refusing _frombuffer: a CIFAR-10 batch is a C-ordered array of raw bytes")
    _check_image_array(shape, dtype, memoryview(buf).nbytes)
    budget.charge(memoryview(buf).nbytes)
    return _numpy_core("numeric")._frombuffer(buf, dtype, shape, order)


def _dtype(budget: _Budget, spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if spec != "u1":
        raise _Refused(f"refusing dtype {spec!r}: a CIFAR-10 batch holds uint8 ('u1') images only")
    # A fresh descriptor (copy=True, as NumPy's own pickles ask): the pickle's BUILD state then
    # lands on it, never on NumPy's shared uint8.
    return np.dtype("u1", align=False, copy=True)


def _encode(budget: _Budget, text: Any, encoding: Any = "latin1") -> bytes:
    # How a Python 3 pickle at protocol 2 spells bytes: _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused("refusing _codecs.encode other than of text to latin1 bytes")
    budget.charge(len(text))
    return text.encode("latin1")


# The globals a CIFAR-10 python-version batch needs, whichever Python and NumPy pickled it,
# each a checked stand-in for the real one. No builtin is among them: a batch is a dict of
# text, a list of ints, a list of file names and one array, all plain pickle opcodes.
class _Token:
    """Stands for ``numpy.ndarray`` in a pickle: what ``_reconstruct`` expects, never callable,
    so no pickle can call ``ndarray(shape)`` and make NumPy allocate a shape of its choosing."""

    def __repr__(self) -> str:
        return "ndarray"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("refusing to call numpy.ndarray: NumPy's pickles rebuild arrays with _reconstruct")


_NDARRAY = _Token()
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's python-version batches and nothing else.

    It resolves only the globals NumPy uses to pickle an array (``ndarray``, ``dtype``,
    ``_reconstruct``, ``_frombuffer``) and ``_codecs.encode``, each replaced by a stand-in that
    accepts only what a batch holds: one uint8 array of shape ``(N, 3072)``, N at most 10,000,
    whose bytes are all in the file, and no more bytes in all than one batch holds (however
    often the pickle's memo repeats them). Any other global (``os.system``, ``builtins.eval``,
    ``builtins.bytearray``, ...) raises :class:`pickle.UnpicklingError` before anything is
    called, and no shape or size is believed before the bytes behind it are there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budget = _Budget()

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: CIFAR-10 pickles hold only "
                                         f"a NumPy uint8 array, lists and a dict")
        return found if found is _NDARRAY else functools.partial(found, self._budget)


def _unpickle(data: bytes, source: str) -> Any:
    try:
        # latin1 turns Python 2 byte strings (the array buffers) back into the bytes NumPy expects.
        # From bytes in memory, so no length in the pickle makes the reader allocate beyond them.
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataFormatError(f"{source}: {exc}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error,
            RecursionError, MemoryError) as exc:
        raise DataFormatError(f"{source}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    return obj


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
    return _batch_from_pickle(_unpickle(_read_capped(path, _MAX_PICKLE_BYTES, "pickled batch"), str(path)),
                              str(path))


# ----------------------------------------------------------------- finding and loading
def _read_dir(folder: Path, binary: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ext = ".bin" if binary else ""
    names = [*_TRAIN, _TEST]
    missing = [n + ext for n in names if not (folder / (n + ext)).is_file()]
    if missing:
        raise DatasetNotFoundError(f"CIFAR-10: {folder} lacks {', '.join(missing)}")
    read = read_cifar_binary if binary else read_cifar_pickle
    return {n: read(folder / (n + ext)) for n in names}


_MAX_MEMBERS = 64  # the CIFAR-10 archives hold 8 or 9 entries


def _read_tar(archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            # Regular files only, matched by base name; nothing is extracted to disk. Entries are
            # counted as they are read, so an archive of endless headers stops early.
            members: dict[str, tarfile.TarInfo] = {}
            for count, m in enumerate(tar, 1):
                if count > _MAX_MEMBERS:
                    raise DataFormatError(f"{archive}: more than {_MAX_MEMBERS} entries; not a CIFAR-10 archive")
                if m.isfile():
                    members[Path(m.name).name] = m
            binary = "data_batch_1.bin" in members
            ext = ".bin" if binary else ""
            names = [*_TRAIN, _TEST]
            missing = [n + ext for n in names if n + ext not in members]
            if missing:
                raise DataFormatError(f"{archive}: archive lacks {', '.join(missing)} (not a CIFAR-10 archive?)")
            limit = _MAX_BINARY_BYTES if binary else _MAX_PICKLE_BYTES
            out = {}
            for n in names:
                member = members[n + ext]
                source = f"{archive}:{member.name}"
                if member.size > limit:  # before reading: the entry's header sets how much read() returns
                    raise DataFormatError(f"{source}: entry of {member.size} bytes, more than a CIFAR-10 batch "
                                          f"holds ({limit} bytes at most, for {_MAX_IMAGES} images)")
                f = tar.extractfile(member)
                assert f is not None  # a regular file always has content
                with f:
                    if binary:
                        out[n] = _parse_records(f.read(), source)
                    else:
                        out[n] = _batch_from_pickle(_unpickle(f.read(), source), source)
            return out
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:  # gzip.BadGzipFile and short reads
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataFormatError(f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from exc


def _copies(root: Path) -> list[tuple[str, Path]]:
    """Every CIFAR-10 copy under ``root`` as ``("tar" | "bin" | "py", path)``, binary preferred."""
    if root.is_file():
        return [("tar", root)]
    found = []
    for d in (root / "cifar10", root):
        for kind, p in (("bin", d / _BIN_DIR), ("tar", d / _BIN_TAR), ("py", d / _PY_DIR), ("tar", d / _PY_TAR)):
            if (p.is_dir() if kind != "tar" else p.is_file()):
                found.append((kind, p))
        if (d / "data_batch_1.bin").is_file():
            found.append(("bin", d))
        if (d / "data_batch_1").is_file():
            found.append(("py", d))
    return found


def _known(name: str) -> Resource | None:
    for res in (*RESOURCES["cifar10"], *LOCAL_RESOURCES["cifar10"]):
        if res.filename == name:
            return res
    return None


def _verify_copy(kind: str, path: Path) -> None:
    """Check a copy against the known originals: the binary or python archive, or the python
    version's batch files. The unpacked binary version has no published checksums."""
    if kind == "tar":
        res = _known(path.name)
        if res is None:  # an archive under another name: whichever original has its size
            archives = [RESOURCES["cifar10"][0], LOCAL_RESOURCES["cifar10"][0]]
            res = next((r for r in archives if r.size == path.stat().st_size), archives[0])
        verify_local(path, res, title="CIFAR-10")
    elif kind == "py":
        for n in (*_TRAIN, _TEST):
            res = _known(n)
            if res is not None and (path / n).is_file():
                verify_local(path / n, res, title="CIFAR-10")
    else:
        raise worded(ChecksumError(f"CIFAR-10: cannot verify {path}: no checksums are published for the unpacked "
                                   f"binary batches; put {_BIN_TAR} (or the python version) there instead, or pass "
                                   f"verify=False to use these files unchecked"),
                     f"CIFAR-10: cannot verify {path}: no checksums are published for the unpacked binary "
                     f"batches; put {_BIN_TAR} (or the python version) there instead, or pass --no-verify to use "
                     f"these files unchecked")


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True,
                 fetch: Fetch | None = None, progress: bool | None = None, verify: bool = True) -> DatasetSplits:
    """CIFAR-10: 50,000 train and 10,000 test 32x32 colour images, x float32 ``(N, 3072)`` in [0, 1].

    Rows are channel-major (1024 red, 1024 green, 1024 blue), so ``input_shape``
    is ``(3, 32, 32)``; labels are int64 0..9. Looks in ``ROOT/cifar10`` and
    ``ROOT`` (ROOT is ``data_dir``, which may also name an archive, or the
    cache) for ``cifar-10-batches-bin/``, ``cifar-10-binary.tar.gz``, the python
    version, or the batch files themselves; downloads the binary archive
    (checksum-verified) to ``ROOT/cifar10`` when ``download``.

    A copy found is verified like a download: the archives by size and digests,
    the python version's batches by their MD5s. With ``verify`` a verifiable copy
    is preferred; the unpacked binary batches, which have no published
    checksums, are used only with ``verify=False``.
    """
    root = data_root(data_dir)
    copies = _copies(root)
    if verify:  # a copy that can be checked first; the unpacked binary batches, if alone, fail the check
        copies.sort(key=lambda c: c[0] == "bin")
    found = copies[0] if copies else None
    if found is None:
        if not download:
            where = f"{_BIN_DIR}/, {_BIN_TAR}, {_PY_DIR}/, {_PY_TAR} found in {root / 'cifar10'} or {root}"
            raise worded(DatasetNotFoundError(f"CIFAR-10: none of {where}; pass download=True or put one of them "
                                              f"there"),
                         f"CIFAR-10: none of {where}; run without --no-download to download it, or put one of "
                         f"them there, or name another folder with --data-dir")
        found = ("tar", download_file(RESOURCES["cifar10"][0], root / "cifar10", fetch=fetch, progress=progress))
    if verify:
        _verify_copy(*found)
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
