"""``deepcore predict CKPT INPUT``: the predicted class and the class probabilities (softmax-ce) or
scores (hinge) of every row of INPUT, as CSV, the model rebuilt from the checkpoint's architecture.

INPUT is an ``.npz`` (the array named ``x``, or its only array; rows are samples, and a sample of
several dimensions is flattened) or a ``.csv`` of numbers (one sample a row; a first row with any
cell that is not a number is a header). Features only: no label column. A convolutional model takes
an ``.npz`` of images ``(N, C, H, W)`` (or ``(N, H, W)`` for one channel), or flat rows of either kind
of file, reshaped to the image shape its checkpoint records.

The CSV header is ``row,class[,name],p_0,...,p_{C-1}`` for probabilities, ``score_0,...`` for scores;
``row`` counts the input's samples from 0, ``name`` appears when the checkpoint records class names
other than the class numbers.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..cli_errors import UsageError
from .evaluate import add_loss_flag, build_trained, check_common_flags, images_of, read_trained

INPUT_SUFFIXES = (".npz", ".csv")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="predicted class and class probabilities for each row of an "
                                              ".npz or .csv, as CSV")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint written by deepcore train (or fit)")
    p.add_argument("input", type=Path, metavar="INPUT", help="features to classify: PATH.npz (array 'x') or PATH.csv")
    p.add_argument("-o", "--output", type=Path, metavar="PATH", help="write the CSV here (atomically); "
                                                                      "default: standard output")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per forward pass (default 1024)")
    p.add_argument("--backend", help="numpy | cupy | ... (default: the best available)")
    add_loss_flag(p)
    p.set_defaults(run=run_command)
    return p


def read_features(path: Path) -> np.ndarray:
    """The samples of ``path`` as a float64 array ``(N, ...)``: a CSV's rows ``(N, features)``, an npz array
    as stored."""
    x = _read_npz(path) if path.suffix.lower() == ".npz" else _read_csv(path)
    if x.shape[0] == 0:
        raise ValueError(f"INPUT {path}: holds no samples")
    return x


def _read_npz(path: Path) -> np.ndarray:
    from ..data import read_npz_arrays

    def pick(members: list[str]) -> list[str]:
        if "x" in members:
            return ["x"]
        if len(members) == 1:
            return members
        raise ValueError(f"INPUT {path}: expected an array named 'x' (or a single array), got arrays "
                         f"{', '.join(map(repr, members)) or 'none'}")

    # Sizes checked before anything is unpacked, object arrays refused: the same reader as training's.
    (name, x), = read_npz_arrays(path, pick, what=" with an array 'x'").items()
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise ValueError(f"INPUT {path}: array {name!r} must hold real numbers, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"INPUT {path}: array {name!r} is a scalar, expected (samples, features)")
    x = x.astype(np.float64)
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        where = f"row {index[0]}" + (f", column {index[1]}" if x.ndim == 2 else
                                     f", index {list(index[1:])}" if x.ndim > 2 else "")
        raise ValueError(f"INPUT {path}: array {name!r} has a non-finite value ({x[index]}) at {where}")
    return x


def _read_csv(path: Path) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as exc:
        raise ValueError(f"INPUT {path}: not a UTF-8 text file ({exc})") from None
    if not rows:
        raise ValueError(f"INPUT {path}: empty CSV file")

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    _, first = rows[0]
    if any(number(c.strip()) is None for c in first):
        rows = rows[1:]  # a header
    width = len(first)
    table = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"INPUT {path}: line {line} has {len(row)} fields, expected {width} as on line "
                             f"{rows[0][0] if i else line}")
        for j, cell in enumerate(row):
            value = number(cell.strip())
            if value is None or not math.isfinite(value):
                what = "an empty cell" if not cell.strip() else f"{cell.strip()!r} is not a finite number"
                raise ValueError(f"INPUT {path}: line {line}, column {j + 1}: {what}")
            table[i, j] = value
    return table


def _fit_width(x: np.ndarray, in_features: int | None, path: Path) -> np.ndarray:
    if x.ndim > 2:  # a sample of several dimensions is flattened
        x = x.reshape(len(x), -1)
    if x.ndim == 1:
        if in_features not in (None, 1):
            raise ValueError(f"INPUT {path}: a 1-D array of {len(x)} values, but the model takes {in_features} "
                             f"features per sample; save a 2-D array (samples, features), e.g. x[None] for one sample")
        x = x[:, None]
    if in_features is not None and x.shape[1] != in_features:
        hint = (" (is the last column a label? predict reads features only)" if x.shape[1] == in_features + 1
                else "")
        raise ValueError(f"INPUT {path}: rows have {x.shape[1]} features, but the model takes {in_features}{hint}")
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, the largest logit subtracted first."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predictions_csv(logits: np.ndarray, loss: str, classes: list[str] | None) -> str:
    """The CSV text: probabilities (softmax of the logits) for softmax-ce, the raw scores for hinge."""
    n, c = logits.shape
    values = softmax(logits) if loss == "softmax-ce" else logits.astype(np.float64)
    prefix = "p" if loss == "softmax-ce" else "score"
    named = classes is not None and any(name != str(i) for i, name in enumerate(classes))
    pred = np.argmax(logits, axis=1)
    header = ["row", "class", *(["name"] if named else []), *(f"{prefix}_{j}" for j in range(c))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for i in range(n):
        k = int(pred[i])
        writer.writerow([i, k, *([classes[k]] if named else []), *(format(float(v), ".6g") for v in values[i])])
    return out.getvalue()


def run_command(args: argparse.Namespace) -> int:
    from .._io import write_bytes_atomic
    from ..train import predict

    backend = check_common_flags(args)
    path: Path = args.input
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise UsageError(f"INPUT: expected a .npz or .csv file, got {str(path)!r}")
    if not path.is_file():
        raise UsageError(f"INPUT: no file at {str(path)!r}")
    if args.output is not None and args.output.is_dir():
        raise UsageError(f"-o: {str(args.output)!r} is a directory, expected a file path")
    trained = read_trained(args.checkpoint, args.loss, "predict")
    x = read_features(path)
    if trained.in_channels is not None:  # a convolutional model: images, or flat rows reshaped to them
        x = images_of(trained, x[:, None] if x.ndim == 1 else x, None, f"INPUT {path}")
    else:
        x = _fit_width(x, trained.in_features, path)
    model = build_trained(trained, backend)
    params = model.parameters()
    dtype = np.float64 if params and str(params[0].dtype).endswith("float64") else np.float32
    logits = predict(model, x.astype(dtype), batch_size=args.batch_size)
    if logits.ndim != 2:
        raise ValueError(f"{args.checkpoint}: the model's output has shape {logits.shape}, expected (samples, classes)")
    text = predictions_csv(logits, trained.loss, trained.classes)
    kind = "softmax probabilities" if trained.loss == "softmax-ce" else "hinge scores (not probabilities)"
    if not trained.loss_recorded:
        print(f"note: {args.checkpoint} does not record its loss; softmax-ce assumed (set it with --loss)",
              file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
    else:
        write_bytes_atomic(args.output, text.encode("utf-8"))
        print(f"wrote {len(x)} predictions ({kind}) to {args.output}")
    return 0
