"""A user's own classification data from a ``.npz`` archive or a ``.csv`` table.

``.npz``: arrays ``x`` (N, features...) and ``y`` (N,) of integer labels,
optionally ``x_test``/``y_test`` and ``x_val``/``y_val``. The archive is read
here, not by ``np.load``: each member's .npy header is parsed and checked
(object arrays, which need pickle, are refused), its declared shape times
itemsize must equal the zip entry's size, and the entries' sizes are checked
against their compressed sizes (:data:`~deepcore.data.limits.MAX_ZIP_RATIO`)
and the memory available before anything is unpacked.

``.csv``: one sample per row, numeric cells, an optional header row (taken
as a header when any of its cells is not a number), the label in the column
named ``label``, ``target``, ``y`` or ``class``, or chosen by
``label_column``, else the last one. Rows in messages are file line numbers
(1-based, header included), as an editor shows them.

Without a test set in the file, ``test_fraction`` of the rows are held out,
stratified by class and fixed by ``seed``. The class count rule is
:func:`_class_count`'s.
"""

from __future__ import annotations

import ast
import csv
import math
import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .._checks import check_int
from .datasets import ArrayDataset, DatasetSplits, split_indices
from .errors import DataFormatError, worded
from .limits import MAX_ZIP_RATIO, SMALL_BYTES, check_fits, format_bytes

__all__ = ["load_file", "read_npz_arrays"]

SUFFIXES = (".npz", ".csv")
_MAX_LABEL = 2**53


def _labels(y: np.ndarray, where: str, describe: Any) -> np.ndarray:
    """Integer labels >= 0 as int64; ``describe(i)`` names sample i in an error."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataFormatError(f"{where}: labels must have shape (N,), got {y.shape}")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        bad = np.flatnonzero((y < 0) | (y > _MAX_LABEL))
        if bad.size:
            raise DataFormatError(f"{where}: labels must be integers in [0, 2**53], got {describe(bad[0])} = "
                                  f"{y[bad[0]]}")
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        raise DataFormatError(f"{where}: labels must be integers >= 0, got dtype {y.dtype}")
    # Whole-number floats (a CSV column, or a float array) are accepted as class labels.
    # Above 2**53 a float is no longer an exact integer, and casting huge ones to int64 wraps.
    bad = np.flatnonzero(~np.isfinite(y) | (y < 0) | (y != np.round(y)) | (y > _MAX_LABEL))
    if bad.size:
        raise DataFormatError(f"{where}: labels must be integers >= 0 (at most 2**53), got {describe(bad[0])} = "
                              f"{y[bad[0]]}")
    return y.astype(np.int64)


def _features(x: np.ndarray, where: str, dtype: np.dtype) -> np.ndarray:
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataFormatError(f"{where}: features must be numeric, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim < 2 or x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
        raise DataFormatError(f"{where}: features must have shape (N, features...) with N >= 1, got {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        bad = np.argwhere(~np.isfinite(x))
        if bad.size:
            idx = tuple(int(i) for i in bad[0])
            raise DataFormatError(f"{where}: non-finite value {x[idx]} at row {idx[0]}, "
                                  f"column {', '.join(map(str, idx[1:]))}")
    return x.astype(dtype, copy=False)


# ----------------------------------------------------------------- .npz
_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 10_000  # NumPy's own limit for a header it parses without allow_pickle
_ARRAY_NAMES = ("x", "y", "x_test", "y_test", "x_val", "y_val")
_LABELS_OF = {"train": "y", "test": "y_test", "val": "y_val"}


def _npy_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, header_bytes)`` of the .npy stream ``f``, every field checked.

    Parsed here rather than by NumPy, so that no message of NumPy's (which may suggest
    ``allow_pickle``) reaches the user, and a header nested deep or declaring any size fails
    as a :class:`DataFormatError` naming the member.
    """
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
        raise DataFormatError(f"{where}: not a .npy array (bad magic {magic[:6]!r})")
    major, minor = magic[6], magic[7]
    if major not in (1, 2, 3) or minor != 0:
        raise DataFormatError(f"{where}: unsupported .npy format version {major}.{minor} (known: 1.0, 2.0, 3.0)")
    width = 2 if major == 1 else 4
    size_bytes = f.read(width)
    length = int.from_bytes(size_bytes, "little")
    if len(size_bytes) < width or length > _MAX_NPY_HEADER:
        raise DataFormatError(f"{where}: .npy header of {length} bytes; at most {_MAX_NPY_HEADER} are read")
    text = f.read(length)
    if len(text) < length:
        raise DataFormatError(f"{where}: truncated .npy header")
    try:
        header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, UnicodeDecodeError):
        raise DataFormatError(f"{where}: malformed .npy header (not a literal dict of descr, fortran_order and "
                              f"shape)") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise DataFormatError(f"{where}: malformed .npy header: expected the keys descr, fortran_order and shape")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape) \
            or not isinstance(fortran, bool):
        raise DataFormatError(f"{where}: malformed .npy header: shape {shape!r}, fortran_order {fortran!r}")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError, KeyError, IndexError, RecursionError, MemoryError):
        raise DataFormatError(f"{where}: .npy header has an unknown dtype {str(header['descr'])[:80]!r}") from None
    if dtype.hasobject:
        raise DataFormatError(f"{where}: holds Python objects (dtype {dtype}), which only pickle can read; "
                              f"deepcore never unpickles a data file: save plain numeric arrays")
    return shape, dtype, fortran, 8 + width + length


def _npz_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    with zf.open(info) as f:
        shape, dtype, fortran, header = _npy_header(f, where)
        nbytes = math.prod(shape) * dtype.itemsize
        # The zip entry's uncompressed size bounds what reading it can return: the header must agree.
        if header + nbytes != info.file_size:
            raise DataFormatError(f"{where}: header declares shape {shape} of {dtype}, {format_bytes(nbytes)}, but "
                                  f"the entry holds {format_bytes(max(info.file_size - header, 0))}; the file is "
                                  f"corrupt")
        out = np.empty(math.prod(shape), dtype=dtype)
        flat = out.view(np.uint8)
        done = 0
        while done < nbytes:
            chunk = f.read(min(nbytes - done, 1 << 24))
            if not chunk:
                raise DataFormatError(f"{where}: truncated: {done} of {nbytes} bytes of data")
            flat[done:done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            done += len(chunk)
        if f.read(1):  # not reached for a consistent entry; also completes the CRC check
            raise DataFormatError(f"{where}: more data than its header declares")
    return out.reshape(shape[::-1]).transpose() if fortran else out.reshape(shape)


def read_npz_arrays(path: str | os.PathLike[str], names: Callable[[list[str]], list[str]] | None = None,
                    *, what: str = "") -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive ``path``, read safely (see the module docstring).

    ``names(members)`` picks which members (names without ``.npy``) to read, from all of
    them (default: all); it may raise to refuse the archive. Every size is checked before a
    byte is unpacked; every failure is a one-line :class:`DataFormatError` naming the file,
    never one of NumPy's messages. ``what`` describes the expected content in messages.
    """
    path = Path(path)
    expected = f", expected an .npz archive{what}"
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:6] == _NPY_MAGIC:
        raise DataFormatError(f"{path}: holds a single array (.npy){expected}")
    if not head:
        raise DataFormatError(f"{path}: empty file (0 bytes){expected}")
    if head[:2] != b"PK":
        kind = " (it looks like a pickle, which deepcore never loads)" if head[:1] == b"\x80" else ""
        raise DataFormatError(f"{path}: not a readable .npz archive: not a zip file{kind}")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename.removesuffix(".npy"): info for info in zf.infolist() if not info.is_dir()}
            infos = {name: members[name] for name in (names(list(members)) if names else list(members))}
            # Sizes first, all of them, before a byte is unpacked.
            for name, info in infos.items():
                if info.file_size > SMALL_BYTES and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
                    raise DataFormatError(f"{path}: '{name}' unpacks {info.compress_size} bytes to "
                                          f"{format_bytes(info.file_size)}, more than {MAX_ZIP_RATIO} times "
                                          f"(a zip bomb, or not a data set)")
            check_fits(sum(i.file_size for i in infos.values()), str(path), "unpacking its arrays")
            return {name: _npz_member(zf, info, f"{path}: '{name}'") for name, info in infos.items()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError,
            RuntimeError) as exc:  # RuntimeError: an encrypted entry
        raise DataFormatError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc


def _read_npz(path: Path, dtype: np.dtype) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    def pick(members: list[str]) -> list[str]:
        names = set(members) & set(_ARRAY_NAMES)
        if not {"x", "y"} <= names:
            raise DataFormatError(f"{path}: needs arrays 'x' and 'y', has {sorted(members) or 'none'}")
        for xk, yk in (("x_test", "y_test"), ("x_val", "y_val")):
            if (xk in names) != (yk in names):
                raise DataFormatError(f"{path}: has {xk if xk in names else yk!r} without "
                                      f"{yk if xk in names else xk!r}; give both or neither")
        return sorted(names)

    arrays = read_npz_arrays(path, pick, what=" with arrays 'x' and 'y'")
    out = {}
    for part, suffix in (("train", ""), ("test", "_test"), ("val", "_val")):
        xk, yk = "x" + suffix, "y" + suffix
        if xk not in arrays:
            continue
        x = _features(arrays[xk], f"{path}: {xk}", dtype)
        y = arrays[yk]
        if y.ndim == 0 or len(y) != len(x):
            raise DataFormatError(f"{path}: {xk} has {len(x)} rows but {yk} has shape {y.shape}")
        out[part] = (x, _labels(y, f"{path}: {yk}", lambda i, k=yk: f"{k}[{i}]"))
    return out


# ----------------------------------------------------------------- .csv
LABEL_NAMES = ("label", "target", "y", "class")


def _pick_label(path: Path, header: list[str] | None, ncols: int, label_column: int | str | None) -> int:
    """The index of the label column (see :func:`load_file`)."""
    if label_column is None:
        if header is not None:
            named = [j for j, h in enumerate(header) if h.lower() in LABEL_NAMES]
            if len(named) > 1:
                both = " and ".join(f"{header[j]!r} (index {j})" for j in named)
                raise worded(DataFormatError(f"{path}: columns {both} could each be the label; choose one with "
                                             f"label_column="),
                             f"{path}: columns {both} could each be the label; choose one with --label-column")
            if named:
                return named[0]
        return ncols - 1
    if isinstance(label_column, str):
        if header is not None and label_column in header:
            return header.index(label_column)
        try:
            index = int(label_column)
        except ValueError:
            if header is None:
                raise worded(DataFormatError(f"{path}: label_column={label_column!r} names a column but the file "
                                             f"has no header row"),
                             f"{path}: --label-column {label_column!r} names a column but the file has no header "
                             f"row; give the column's index instead") from None
            raise worded(DataFormatError(f"{path}: no column named {label_column!r}; columns: {', '.join(header)}"),
                         f"{path}: --label-column: no column named {label_column!r}; columns: "
                         f"{', '.join(header)}") from None
        label_column = index
    if isinstance(label_column, (int, np.integer)) and not isinstance(label_column, bool) \
            and -ncols <= label_column < ncols:
        return int(label_column) % ncols
    raise worded(ValueError(f"load_file: label_column must be a column name or an index in [{-ncols}, {ncols}), "
                            f"got {label_column!r}"),
                 f"{path}: --label-column must be a header name or a column index in [{-ncols}, {ncols}) "
                 f"(the file has {ncols} columns), got {label_column!r}")


def _read_csv(path: Path, label_column: int | str | None, dtype: np.dtype,
              delimiter: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, Callable[[int], str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise DataFormatError(f"{path}: empty CSV file")

    def is_number(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    first_line, first = rows[0]
    header = None if all(is_number(c) for c in first) else [c.strip() for c in first]
    if header is not None:
        rows = rows[1:]
    ncols = len(first)
    if ncols < 2:
        raise DataFormatError(f"{path}: need at least one feature column and a label column, got {ncols} column")
    label = _pick_label(path, header, ncols, label_column)
    if not rows:
        raise DataFormatError(f"{path}: no data rows after the header")

    def col_name(j: int) -> str:
        return f"{header[j]!r} (#{j + 1})" if header is not None else f"#{j + 1}"

    table = np.empty((len(rows), ncols), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != ncols:
            raise DataFormatError(f"{path}: row {line} has {len(row)} fields, expected {ncols}")
        for j, cell in enumerate(row):
            text = cell.strip()
            try:
                value = float(text)
            except ValueError:
                what = "an empty cell" if not text else f"cannot parse {text!r} as a number"
                raise DataFormatError(f"{path}: row {line}, column {col_name(j)}: {what}") from None
            if not math.isfinite(value):
                raise DataFormatError(f"{path}: row {line}, column {col_name(j)}: value {text!r} is not finite "
                                      f"(NaN or inf)")
            table[i, j] = value
    lines = [line for line, _ in rows]
    y = _labels(table[:, label], f"{path}: column {col_name(label)}", lambda i: f"row {lines[i]}")
    x = np.delete(table, label, axis=1).astype(dtype)
    used = f"{header[label]!r} (index {label})" if header is not None else f"index {label}"
    return {"train": (x, y)}, used, lambda i: f"row {lines[i]}"


# ----------------------------------------------------------------- the class count
def _class_count(path: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int | None,
                 column: str, csv_file: bool, describe: Callable[[str, int], str]) -> int:
    """The number of classes: ``num_classes`` when given, else ``max(label) + 1``, if the data can support it.

    Without ``num_classes`` the count is refused when it exceeds the number of samples, or when
    more than half of the classes in ``[0, max(label)]`` have no sample: integer labels like that
    are prices, counts or IDs (a regression target), not classes, and a model with one output
    per value would be mostly empty (a label of 10**9 would ask for a billion outputs). With
    ``num_classes`` every label must be below it. Sizes here follow the samples, never a label's
    value (no ``bincount``).
    """
    if num_classes is not None:
        for part, (_, y) in parts.items():
            bad = np.flatnonzero(y >= num_classes)
            if bad.size:
                i = int(bad[0])
                at = describe(part, i)
                raise worded(DataFormatError(f"{path}: label {int(y[i])} at {at} ({column}) is not below "
                                             f"num_classes={num_classes}"),
                             f"{path}: label {int(y[i])} at {at} ({column}) is not below --num-classes "
                             f"{num_classes}")
        return num_classes
    ys = [y for _, y in parts.values() if len(y)]
    n = sum(len(y) for y in ys)
    top = max(int(y.max()) for y in ys)
    count = top + 1
    present = len(np.unique(np.concatenate(ys)))
    empty = count - present
    if count > n or 2 * empty > count:
        pick = ("choose the label column with label_column=, or " if csv_file else "")
        cli_pick = ("choose the label column with --label-column, or " if csv_file else "")
        fact = (f"{path}: {column} has labels up to {top}, so {count} classes, but {n} samples with {present} "
                f"distinct labels: {empty} of the {count} classes would have no sample. This looks like a "
                f"regression target (or IDs), not class labels; ")
        raise worded(DataFormatError(fact + pick + "give the class count with num_classes=N if these are classes"),
                     fact + cli_pick + "give the class count with --num-classes N if these are classes")
    return count


def load_file(path: str | os.PathLike[str], *, label_column: int | str | None = None, test_fraction: float = 0.2,
              seed: int = 0, dtype: Any = "float32", delimiter: str = ",",
              num_classes: int | None = None) -> DatasetSplits:
    """A classification data set from ``path`` (``.npz`` or ``.csv``), x flattened to ``(N, features)``.

    ``label_column`` (CSV only) is a header name or a column index (0-based,
    negative from the end; a string that is not a header name but an integer
    is an index). By default a column whose header is ``label``, ``target``,
    ``y`` or ``class`` (any case) is the label wherever it stands, else the
    last column; ``DatasetSplits.label_column`` says which was used.

    x is cast to ``dtype``; labels become int64 and must be whole numbers >= 0;
    NaN or inf anywhere is an error naming its place. ``input_shape`` keeps
    the per-sample shape of an npz ``x``.

    The class count is ``num_classes`` if given (every label must be below
    it), else ``max(label) + 1`` provided the data supports it: refused when it
    exceeds the number of samples or when more than half of the classes have
    no sample (the column is then a regression target or IDs, not classes).
    A training set with a single class is an error.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"load_file: {path} has suffix {path.suffix!r}; supported: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"load_file: no such file: {path}")
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"load_file: dtype must be a floating type, got {dt}")
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", "load_file", 2)
    if suffix == ".csv":
        parts, used, row = _read_csv(path, label_column, dt, delimiter)
        column = f"column {used}"

        def describe(part: str, i: int) -> str:
            return row(i)
    else:
        if label_column is not None:
            raise ValueError("load_file: label_column applies to .csv files; an .npz has its labels in 'y'")
        parts, used = _read_npz(path, dt), None
        column = "'y'"

        def describe(part: str, i: int) -> str:
            return f"{_LABELS_OF[part]}[{i}]"
    shape = parts["train"][0].shape[1:]
    for part, (x, _) in parts.items():
        if x.shape[1:] != shape:
            raise DataFormatError(f"{path}: {part} samples have shape {x.shape[1:]} but train samples have {shape}")
    count = _class_count(path, parts, num_classes, column, suffix == ".csv", describe)
    if "test" not in parts:
        x, y = parts["train"]
        keep, held = split_indices(y, test_fraction, seed=seed, stratify=True, fn="load_file")
        parts["train"], parts["test"] = (x[keep], y[keep]), (x[held], y[held])
    train_labels = np.unique(parts["train"][1])
    if len(train_labels) < 2:
        raise worded(DataFormatError(f"{path}: the training set has a single class (label {int(train_labels[0])} "
                                     f"in all {len(parts['train'][1])} rows of {column}): nothing to tell apart"
                                     + ("; is that the label column? choose another with label_column="
                                        if suffix == ".csv" else "")),
                     f"{path}: the training set has a single class (label {int(train_labels[0])} in all "
                     f"{len(parts['train'][1])} rows of {column}): nothing to tell apart"
                     + ("; is that the label column? choose another with --label-column" if suffix == ".csv" else ""))
    name = path.stem
    data = {k: ArrayDataset(x.reshape(len(x), -1), y, name=name, classes=count) for k, (x, y) in parts.items()}
    return DatasetSplits(train=data["train"], test=data["test"], val=data.get("val"), name=name,
                         input_shape=shape, classes=None, num_classes=count, label_column=used)
