"""``deepcore export CKPT -o model.onnx``: a trained model as an ONNX file (inference form, dynamic batch).

The model is rebuilt from the architecture the checkpoint records (as ``evaluate`` rebuilds it) and
written by :func:`deepcore.export.to_onnx`. Its input: ``(N, F)`` rows for a model that starts with a
Linear, ``(N, C, H, W)`` images for a convolutional one, the image shape as ``deepcore train``
recorded it, or ``--input-shape C,H,W`` where none is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..cli_errors import UsageError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a checkpoint's model as an ONNX file (needs deepcore[onnx])")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint written by deepcore train (or fit)")
    p.add_argument("-o", "--output", type=Path, metavar="PATH",
                   help="where the .onnx file goes (default: CKPT's name with .onnx)")
    p.add_argument("--opset", type=int, help="the ONNX opset to write (default 17; at least 13)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="a convolutional model's image shape, channels first, when the checkpoint records none "
                        "(default: as recorded)")
    p.set_defaults(run=run_command)
    return p


def _check_flags(args: argparse.Namespace) -> Path:
    from ..checkpoint import SUFFIXES
    from ..export import DEFAULT_OPSET, MIN_OPSET

    ckpt: Path = args.checkpoint
    if ckpt.suffix.lower() not in SUFFIXES:
        raise UsageError(f"CKPT: expected a {' or '.join(SUFFIXES)} checkpoint, got {str(ckpt)!r}")
    if not ckpt.is_file():
        raise UsageError(f"CKPT: no checkpoint file at {str(ckpt)!r}")
    out: Path = args.output or ckpt.with_suffix(".onnx")
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"-o/--output: expected a path ending in .onnx, got {str(out)!r}")
    if not out.parent.is_dir():
        raise UsageError(f"-o/--output: directory {str(out.parent)!r} does not exist")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise UsageError(f"--opset must be at least {MIN_OPSET} (default {DEFAULT_OPSET}), got {args.opset}")
    for lib in ("onnx",):
        if importlib.util.find_spec(lib) is None:
            raise RuntimeError(f"deepcore export needs the {lib} package, which is not installed; "
                               f"pip install 'deepcore[onnx]'")
    return out


def _sample_shape(trained: Any, flag: str | None) -> tuple[int, ...]:
    """One sample's shape: ``(F,)`` for a model of rows, ``(C, H, W)`` for a convolutional one."""
    from .evaluate import shape_text
    from .run_settings import parse_input_shape

    channels = getattr(trained, "in_channels", None)
    if channels is None:
        if flag is not None:
            raise UsageError(f"--input-shape: the model in {trained.path} takes rows of {trained.in_features} "
                             f"values, not images; leave the flag out")
        if trained.in_features is None:
            raise ValueError(f"{trained.path}: the recorded architecture fixes no input width (no Linear, Conv2d or "
                             f"BatchNorm comes first), so the model's input shape is unknown")
        return (int(trained.in_features),)
    recorded = getattr(trained, "input_shape", None)
    if flag is None:
        if recorded is None:
            raise UsageError(f"--input-shape: {trained.path} does not record the image shape its convolutional model "
                             f"was trained on; give it as C,H,W (e.g. --input-shape {channels},28,28)")
        return tuple(recorded)
    shape = parse_input_shape(flag)
    if shape[0] != channels:
        raise UsageError(f"--input-shape: {shape_text(shape)} has {shape[0]} channel(s), but the model in "
                         f"{trained.path} takes {channels}")
    return shape


def run_command(args: argparse.Namespace) -> int:
    from ..export import DEFAULT_OPSET, to_onnx
    from .evaluate import CLASSIFIER_LOSSES, build_trained, read_trained

    out = _check_flags(args)
    # Any loss exports: naming one here only keeps read_trained from refusing a non-classifier.
    trained = read_trained(args.checkpoint, CLASSIFIER_LOSSES[0], "export")
    shape = _sample_shape(trained, args.input_shape)
    model = build_trained(trained, "numpy")
    params = model.parameters()
    dtype = params[0].value.dtype if params else np.float32
    # Two samples: a BatchNorm without running statistics normalises over the batch, which needs more than one.
    example = np.zeros((2, *shape), dtype=dtype)
    written = to_onnx(model, example, out, opset=args.opset)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    print(f"wrote {written} (ONNX opset {opset}; input 'input' of shape (N, {', '.join(map(str, shape))}), "
          f"{np.dtype(dtype).name}; output 'output')")
    return 0
