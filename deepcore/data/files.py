"""A user's own classification data from a ``.npz`` archive or a ``.csv`` table.

``.npz``: arrays ``x`` (N, features...) and ``y`` (N,) of integer labels,
optionally ``x_test``/``y_test`` and ``x_val``/``y_val``; read with
``allow_pickle=False``, so object arrays are refused rather than unpickled.

``.csv``: one sample per row, numeric cells, an optional header row (taken
as a header when any of its cells is not a number), the label in the named
column or the last one. Rows in messages are file line numbers (1-based,
header included), as an editor shows them.

Without a test set in the file, ``test_fraction`` of the rows are held out,
stratified by class and fixed by ``seed``.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import ArrayDataset, DatasetSplits, split_indices
from .errors import DataFormatError

__all__ = ["load_file"]

SUFFIXES = (".npz", ".csv")


def _labels(y: np.ndarray, where: str, describe: Any) -> np.ndarray:
    """Integer labels >= 0 as int64; ``describe(i)`` names sample i in an error."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataFormatError(f"{where}: labels must have shape (N,), got {y.shape}")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        bad = np.flatnonzero(y < 0)
        if bad.size:
            raise DataFormatError(f"{where}: labels must be integers >= 0, got {describe(bad[0])} = {y[bad[0]]}")
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        raise DataFormatError(f"{where}: labels must be integers >= 0, got dtype {y.dtype}")
    # Whole-number floats (a CSV column, or a float array) are accepted as class labels.
    bad = np.flatnonzero(~np.isfinite(y) | (y < 0) | (y != np.round(y)))
    if bad.size:
        raise DataFormatError(f"{where}: labels must be integers >= 0, got {describe(bad[0])} = {y[bad[0]]}")
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


def _read_npz(path: Path, dtype: np.dtype) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npz archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataFormatError(f"{path}: holds a single array, expected an .npz archive with arrays 'x' and 'y'")
    with npz:
        names = set(npz.files)
        if not {"x", "y"} <= names:
            raise DataFormatError(f"{path}: needs arrays 'x' and 'y', has {sorted(names) or 'none'}")
        out = {}
        for part, suffix in (("train", ""), ("test", "_test"), ("val", "_val")):
            xk, yk = "x" + suffix, "y" + suffix
            if (xk in names) != (yk in names):
                raise DataFormatError(f"{path}: has {xk if xk in names else yk!r} without "
                                      f"{yk if xk in names else xk!r}; give both or neither")
            if xk not in names:
                continue
            try:
                x, y = npz[xk], npz[yk]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                # Object arrays need pickle, which allow_pickle=False refuses: that is the point.
                raise DataFormatError(f"{path}: cannot read {xk!r}/{yk!r} without pickle ({exc})") from exc
            x = _features(x, f"{path}: {xk}", dtype)
            if y.ndim == 0 or len(y) != len(x):
                raise DataFormatError(f"{path}: {xk} has {len(x)} rows but {yk} has shape {y.shape}")
            out[part] = (x, _labels(y, f"{path}: {yk}", lambda i, k=yk: f"{k}[{i}]"))
    return out


def _read_csv(path: Path, label_column: int | str | None, dtype: np.dtype,
              delimiter: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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
    if label_column is None:
        label = ncols - 1
    elif isinstance(label_column, str):
        if header is None:
            raise DataFormatError(f"{path}: label_column={label_column!r} names a column but the file has no "
                                  f"header row")
        if label_column not in header:
            raise DataFormatError(f"{path}: no column named {label_column!r}; columns: {', '.join(header)}")
        label = header.index(label_column)
    elif isinstance(label_column, int) and not isinstance(label_column, bool) and -ncols <= label_column < ncols:
        label = label_column % ncols
    else:
        raise ValueError(f"load_file: label_column must be a column name or an index in [{-ncols}, {ncols}), "
                         f"got {label_column!r}")
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
    return {"train": (x, y)}


def load_file(path: str | os.PathLike[str], *, label_column: int | str | None = None, test_fraction: float = 0.2,
              seed: int = 0, dtype: Any = "float32", delimiter: str = ",") -> DatasetSplits:
    """A classification data set from ``path`` (``.npz`` or ``.csv``), x flattened to ``(N, features)``.

    ``label_column`` (CSV only) is a header name or a column index; default
    the last column. x is cast to ``dtype``; labels become int64 and must be
    whole numbers >= 0; NaN or inf anywhere is an error naming its place.
    ``input_shape`` keeps the per-sample shape of an npz ``x``.
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
    if suffix == ".csv":
        parts = _read_csv(path, label_column, dt, delimiter)
    else:
        if label_column is not None:
            raise ValueError("load_file: label_column applies to .csv files; an .npz has its labels in 'y'")
        parts = _read_npz(path, dt)
    shape = parts["train"][0].shape[1:]
    for part, (x, _) in parts.items():
        if x.shape[1:] != shape:
            raise DataFormatError(f"{path}: {part} samples have shape {x.shape[1:]} but train samples have {shape}")
    if "test" not in parts:
        x, y = parts["train"]
        keep, held = split_indices(y, test_fraction, seed=seed, stratify=True, fn="load_file")
        parts["train"], parts["test"] = (x[keep], y[keep]), (x[held], y[held])
    num_classes = max(int(y.max()) + 1 for _, y in parts.values() if len(y))
    name = path.stem
    data = {k: ArrayDataset(x.reshape(len(x), -1), y, name=name, classes=num_classes) for k, (x, y) in parts.items()}
    return DatasetSplits(train=data["train"], test=data["test"], val=data.get("val"), name=name,
                         input_shape=shape, classes=None, num_classes=num_classes)
