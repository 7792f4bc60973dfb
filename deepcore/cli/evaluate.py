"""``deepcore evaluate CKPT``: loss, accuracy, per-class accuracy and the confusion matrix of a trained
model on the test split of its data set, the model rebuilt from the architecture in the checkpoint.

Also the shared part of ``evaluate`` and ``predict`` (:mod:`deepcore.cli.predict`): reading what a
checkpoint says about its model (:func:`read_trained`) and building the model from it (:func:`build_trained`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import BackendUnavailableError, UnknownBackendError, get_backend, use_backend
from ..cli_errors import UsageError

#: The losses whose model outputs are class scores; the first is assumed when a checkpoint names none.
CLASSIFIER_LOSSES = ("softmax-ce", "hinge")
MATRIX_MAX_PRINTED = 30  # wider confusion matrices go to --json and the PNG only


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="loss, accuracy, per-class accuracy and confusion matrix of a "
                                               "checkpoint on its data set's test split")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint written by deepcore train (or fit)")
    p.add_argument("--dataset", help="digits | mnist | fashion-mnist | cifar10 | PATH.npz | PATH.csv "
                                     "(default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", type=Path, help="where the dataset files are (default: as in training)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per forward pass (default 1024)")
    p.add_argument("--backend", help="numpy | cupy | ... (default: the best available)")
    add_loss_flag(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON (notes go to stderr)")
    p.add_argument("--plot", type=Path, metavar="PATH",
                   help="where the confusion-matrix PNG goes (default: CKPT's name with -confusion.png)")
    p.add_argument("--no-plot", action="store_true", help="no confusion-matrix PNG")
    p.set_defaults(run=run_command)
    return p


def add_loss_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss", choices=CLASSIFIER_LOSSES,
                   help="the loss the model was trained with (default: as recorded in the checkpoint, "
                        "else softmax-ce)")


# ------------------------------------------------------------ shared with predict
def check_common_flags(args: argparse.Namespace) -> str:
    """Check CKPT, --batch-size and --backend (before any work); returns the backend's name."""
    from ..checkpoint import SUFFIXES
    from .train import best_backend

    ckpt: Path = args.checkpoint
    if ckpt.suffix.lower() not in SUFFIXES:
        raise UsageError(f"CKPT: expected a {' or '.join(SUFFIXES)} checkpoint, got {str(ckpt)!r}")
    if not ckpt.is_file():
        raise UsageError(f"CKPT: no checkpoint file at {str(ckpt)!r}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    name = args.backend or best_backend()
    try:
        get_backend(name)
    except (UnknownBackendError, BackendUnavailableError) as exc:
        raise UsageError(f"--backend: {exc}") from None
    return name


@dataclass
class Trained:
    """What a checkpoint says about its model, read before the model is built."""

    path: Path
    checkpoint: Any  # deepcore.checkpoint.Checkpoint (metadata and host arrays)
    architecture: dict[str, Any]
    in_features: int | None
    num_outputs: int | None
    loss: str
    loss_recorded: bool
    classes: list[str] | None
    settings: dict[str, Any]  # the training run's settings (`deepcore train`'s flags), {} when absent
    in_channels: int | None = None  # a convolutional model's input channels (it takes (N, C, H, W) images)
    input_shape: tuple[int, int, int] | None = None  # the (C, H, W) it was trained on, when recorded


def _settings(extra: dict[str, Any]) -> dict[str, Any]:
    """The run's settings: ``fit(run_settings=...)`` stores them under "settings" (``deepcore train``: the
    flags that make the run), and ``deepcore train`` all its flags under "args" at the end of training
    (``--data-dir`` among them); "settings" wins where both have a key."""
    merged: dict[str, Any] = {}
    for key in ("args", "settings"):
        value = extra.get(key)
        if isinstance(value, dict):
            merged.update(value)
    return merged


def read_trained(path: Path, loss_flag: str | None, command: str) -> Trained:
    """The checkpoint's metadata and architecture; a one-line error when it cannot be rebuilt."""
    from ..checkpoint import load_checkpoint
    from ..nn.spec import input_channels, input_features, output_features

    ckpt = load_checkpoint(path)
    extra = ckpt.extra or {}
    architecture = extra.get("architecture")
    if architecture is None:
        raise ValueError(f"{path}: the checkpoint records no model architecture (written by an older deepcore, or "
                         f"by save_checkpoint without extra={{'architecture': architecture_of(model)}}), so "
                         f"{command} cannot rebuild the model; re-save it with the architecture "
                         f"(deepcore.nn.spec.architecture_of)")
    if not isinstance(architecture, dict):
        raise ValueError(f"{path}: the recorded architecture must be a JSON object, got {architecture!r}")
    settings = _settings(extra)
    recorded = settings.get("loss")
    if loss_flag is not None:
        loss = loss_flag
    elif recorded is None:
        loss = CLASSIFIER_LOSSES[0]
    elif recorded in CLASSIFIER_LOSSES:
        loss = recorded
    else:
        raise ValueError(f"{path}: the model was trained with loss {recorded!r}; {command} handles classifiers "
                         f"trained with {' or '.join(CLASSIFIER_LOSSES)}")
    classes = extra.get("classes")
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        classes = None
    n_out = output_features(architecture)
    if classes is not None and n_out is not None and len(classes) != n_out:
        classes = None  # names for another head: better none than wrong ones
    channels = input_channels(architecture)
    return Trained(path, ckpt, architecture, input_features(architecture), n_out, loss,
                   loss_flag is not None or recorded is not None, classes, settings, channels,
                   _input_shape(path, extra, settings, channels))


def _input_shape(path: Path, extra: dict[str, Any], settings: dict[str, Any],
                 channels: int | None) -> tuple[int, int, int] | None:
    """The (C, H, W) images a convolutional model was trained on: ``extra["input_shape"]`` (``deepcore train``'s
    last checkpoint), else the run's settings (every epoch's checkpoint), as ``[C, H, W]`` or ``"C,H,W"``."""
    value = extra.get("input_shape", settings.get("input_shape"))
    if value is None or channels is None:
        return None
    dims = value.split(",") if isinstance(value, str) else value
    try:
        shape = tuple(int(d) for d in dims) if isinstance(dims, (list, tuple)) else ()
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{path}: the recorded input_shape must be [C, H, W], three positive integers, got {value!r}")
    if shape[0] != channels:
        raise ValueError(f"{path}: the recorded input_shape {list(shape)} has {shape[0]} channels, but the model's "
                         f"first layer takes {channels}")
    return shape[0], shape[1], shape[2]


def shape_text(shape: tuple[int, ...]) -> str:
    """``1x8x8``."""
    return "x".join(map(str, shape))


def images_of(trained: Trained, x: np.ndarray, own_shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    """The samples ``x`` as the ``(N, C, H, W)`` images ``trained``'s convolutional model takes, without a copy.

    ``x`` is ``(N, C, H, W)``, ``(N, H, W)`` (one channel) or flat rows ``(N, C*H*W)``, which are reshaped to
    the image shape the checkpoint records, else to ``own_shape`` (the data set's own image shape, if any).
    A ValueError starting with ``what`` (e.g. ``"INPUT x.npz"``) names the shapes that do not fit.
    """
    from ..data import image_shape

    channels = trained.in_channels
    want = trained.input_shape
    takes = f"takes {shape_text(want)} images" if want else f"takes images of {channels} channel(s)"
    model = f"the model in {trained.path} {takes}"
    if x.ndim in (3, 4):
        images = x[:, None] if x.ndim == 3 else x
        got = tuple(images.shape[1:])
        if (want is not None and got != want) or got[0] != channels:
            seen = "" if x.ndim == 4 else f"samples of shape {tuple(x.shape[1:])} (one channel), "
            raise ValueError(f"{what}: {seen}images of {shape_text(got)} (C x H x W), but {model}")
        return images
    if x.ndim != 2:
        raise ValueError(f"{what}: samples of shape {tuple(x.shape[1:])}, but {model} (N, C, H, W), or flat rows")
    if want is None and own_shape is not None and len(own_shape) in (2, 3):
        want = image_shape(own_shape)
    if want is None:
        raise ValueError(f"{what}: flat rows of {x.shape[1]} values, but {trained.path} does not record the image "
                         f"shape its convolutional model was trained on; give the samples as (N, C, H, W) images")
    if own_shape is not None and len(own_shape) > 1 and image_shape(own_shape) != want:
        raise ValueError(f"{what}: images of {shape_text(image_shape(own_shape))}, but {model}")
    if x.shape[1] != math.prod(want) or want[0] != channels:
        raise ValueError(f"{what}: rows of {x.shape[1]} values, but {model} ({math.prod(want)} values per row)")
    return x.reshape(len(x), *want)


def build_trained(trained: Trained, backend: str) -> Any:
    """The model from the recorded architecture, on ``backend``, holding the checkpoint's state."""
    from ..checkpoint import load_checkpoint
    from ..nn.spec import model_from_architecture

    with use_backend(backend):
        model = model_from_architecture(trained.architecture)
    try:
        load_checkpoint(trained.path, model)
    except (KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ValueError(f"{trained.path}: its state does not fit the recorded architecture: {message}") from None
    return model


def class_label(i: int, classes: list[str] | None) -> str:
    """``"3"``, or ``"3 cat"`` when the class has a name other than its number."""
    if classes is None or classes[i] == str(i):
        return str(i)
    return f"{i} {classes[i]}"


# ------------------------------------------------------------------ the metrics
def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[t, p]``: how many samples of true class ``t`` were predicted as ``p``."""
    return np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def run_command(args: argparse.Namespace) -> int:
    from .. import data
    from ..train import get_loss, predict

    backend = check_common_flags(args)
    if args.plot is not None:
        if args.no_plot:
            raise UsageError("--plot and --no-plot contradict each other; give one")
        if args.plot.suffix.lower() != ".png":
            raise UsageError(f"--plot: expected a path ending in .png, got {str(args.plot)!r}")
        if not args.plot.parent.is_dir():
            raise UsageError(f"--plot: directory {str(args.plot.parent)!r} does not exist")
    trained = read_trained(args.checkpoint, args.loss, "evaluate")
    settings = trained.settings
    dataset = args.dataset or settings.get("dataset")
    if not dataset:
        raise UsageError(f"--dataset: {args.checkpoint} does not record the data set it was trained on; "
                         f"name one with --dataset")
    data_dir = args.data_dir or settings.get("data_dir")
    seed = settings.get("seed", 0)
    val_fraction = settings.get("val_fraction", 0.0)
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0
    val_fraction = (float(val_fraction) if isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
                    and 0 <= val_fraction < 1 else 0.0)
    model = build_trained(trained, backend)

    # The same call as training's (seed, hold-out, a file's label column and class count), so the
    # test split is the same rows.
    file_options = {} if args.dataset else {k: settings[k] for k in ("label_column", "num_classes")
                                            if settings.get(k) is not None}
    splits = data.load_dataset(dataset, data_dir=data_dir, download=not args.no_download, seed=seed,
                               val_fraction=val_fraction, **file_options)
    test = splits.test
    where = f"{splits.name or dataset} test split"
    if trained.in_features is not None and splits.num_features != trained.in_features:
        raise ValueError(f"--dataset: {where} has {splits.num_features} features per sample, but the model in "
                         f"{args.checkpoint} takes {trained.in_features}")
    if len(test) == 0:
        raise ValueError(f"--dataset: {where} is empty")
    x = np.asarray(test.x).reshape(len(test), -1)
    if trained.in_channels is not None:  # a convolutional model: the rows as its images
        x = images_of(trained, x, tuple(splits.input_shape), f"--dataset: {where}")
    y = np.asarray(test.y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"--dataset: {where} has no class labels (y is {y.dtype} of shape {y.shape})")
    logits = predict(model, x, batch_size=args.batch_size)
    if logits.ndim != 2:
        raise ValueError(f"{args.checkpoint}: the model's output has shape {logits.shape}, expected (samples, classes)")
    n_classes = logits.shape[1]
    if int(y.max()) >= n_classes:
        raise ValueError(f"--dataset: {where} has labels up to {int(y.max())}, but the model in {args.checkpoint} "
                         f"has {n_classes} outputs (classes 0 to {n_classes - 1})")
    y = y.astype(np.int64)
    classes = trained.classes or (list(splits.classes) if splits.classes and len(splits.classes) == n_classes
                                  else None)

    loss_value, _ = get_loss(trained.loss)(logits, y)
    pred = np.argmax(logits, axis=1)
    matrix = confusion_matrix(y, pred, n_classes)
    counts = matrix.sum(axis=1)
    correct = np.diag(matrix)
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "epoch": trained.checkpoint.epoch,
        "dataset": str(dataset),
        "split": "test",
        "samples": len(y),
        "backend": backend,
        "loss_name": trained.loss,
        "loss": float(loss_value),
        "accuracy": float(correct.sum() / len(y)),
        "classes": classes or [str(i) for i in range(n_classes)],
        "per_class": [{"class": i, "name": (classes or [str(i) for i in range(n_classes)])[i],
                       "samples": int(counts[i]), "correct": int(correct[i]),
                       "accuracy": float(correct[i] / counts[i]) if counts[i] else None} for i in range(n_classes)],
        "confusion_matrix": matrix.tolist(),
        "plot": None,
    }
    note: Callable[[str], None] = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if not trained.loss_recorded:
        note(f"note: {args.checkpoint} does not record its loss; softmax-ce assumed (set it with --loss)")
    if not args.json:
        print(format_report(result, classes))
    if not args.no_plot:
        path = args.plot or args.checkpoint.with_name(args.checkpoint.stem + "-confusion.png")
        written = plot_confusion(matrix, classes, path, f"{splits.name or dataset} test: accuracy "
                                 f"{result['accuracy']:.2%}", note)
        if written is not None:
            result["plot"] = str(written)
            note(f"wrote {written}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def format_report(r: dict[str, Any], classes: list[str] | None) -> str:
    n_classes = len(r["per_class"])
    epoch = "" if r["epoch"] is None else f" (epoch {r['epoch'] + 1})"
    lines = [
        f"checkpoint  {r['checkpoint']}{epoch}",
        f"data        {r['dataset']}, test split, {r['samples']} samples; backend {r['backend']}",
        f"loss        {r['loss']:.4f} ({r['loss_name']})",
        f"accuracy    {r['accuracy']:.2%} ({sum(c['correct'] for c in r['per_class'])} of {r['samples']})",
        "",
    ]
    labels = [class_label(i, classes) for i in range(n_classes)]
    w = max(len("class"), *(len(s) for s in labels))
    lines.append(f"{'class':<{w}}  {'samples':>7}  {'correct':>7}  {'accuracy':>8}")
    for label, c in zip(labels, r["per_class"], strict=True):
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.2%}"
        lines.append(f"{label:<{w}}  {c['samples']:>7}  {c['correct']:>7}  {acc:>8}")
    lines.append("")
    matrix = r["confusion_matrix"]
    if n_classes > MATRIX_MAX_PRINTED:
        lines.append(f"confusion matrix: {n_classes} x {n_classes}, too wide to print (see --json or the PNG)")
        return "\n".join(lines)
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    cw = max(len(str(n_classes - 1)), *(len(str(v)) for row in matrix for v in row))
    lines.append(" " * w + "  " + " ".join(f"{j:>{cw}}" for j in range(n_classes)))
    for label, row in zip(labels, matrix, strict=True):
        lines.append(f"{label:<{w}}  " + " ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, classes: list[str] | None, path: Path, title: str,
                   note: Callable[[str], None]) -> Path | None:
    """The confusion matrix as a PNG (matplotlib, without pyplot), written atomically; None with a note
    when matplotlib is not installed."""
    from .._io import write_bytes_atomic

    try:
        from matplotlib.figure import Figure
    except ImportError:
        note("matplotlib is not installed: skipping the confusion-matrix PNG (pip install matplotlib)")
        return None
    n = matrix.shape[0]
    names = classes or [str(i) for i in range(n)]
    size = min(4.0 + 0.45 * n, 16.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if n <= MATRIX_MAX_PRINTED:
        ax.set_xticks(range(n), names, rotation=45 if max(len(s) for s in names) > 2 else 0, ha="right"
                      if max(len(s) for s in names) > 2 else "center")
        ax.set_yticks(range(n), names)
        threshold = matrix.max() / 2 if matrix.size else 0
        for t in range(n):
            for p in range(n):
                if matrix[t, p]:
                    ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                            color="white" if matrix[t, p] > threshold else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())
