"""A run's identity on the command line: the settings every checkpoint records, which flags were
given explicitly, the checks of ``--resume`` against its checkpoint (a contradicting flag is an
error naming both values), the data split's fingerprint, and ``--out``'s guard against replacing
a previous run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli_errors import UsageError


def parse_widths(text: str, flag: str = "--hidden") -> list[int]:
    """``"256,128"`` -> ``[256, 128]``; anything but positive integers, comma-separated, is a UsageError naming
    ``flag``."""
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise UsageError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return widths


def parse_hidden(text: str) -> list[int]:
    return parse_widths(text, "--hidden")


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``--input-shape C,H,W`` -> ``(C, H, W)``, three positive integers."""
    try:
        dims = tuple(int(d) for d in str(text).split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise UsageError(f"--input-shape must be C,H,W, three positive integers (channels, height, width), "
                         f"got {text!r}")
    return dims[0], dims[1], dims[2]


#: The flags that make a run what it is. Every checkpoint of the run records them (extra["settings"]);
#: on --resume they come from there, and one given on the command line that contradicts the record is
#: an error. A new flag that changes the data, its split, the model or the training belongs here.
RUN_SETTINGS = ("dataset", "label_column", "num_classes", "val_fraction", "seed", "model", "input_shape",
                "channels", "hidden", "dropout", "batchnorm", "loss", "label_smoothing", "optimizer", "lr",
                "weight_decay", "schedule", "warmup", "epochs", "batch_size", "reg", "max_norm", "precision",
                "accumulate", "clip_grad_norm")
_TRACKED = (*RUN_SETTINGS, "out")  # flags whose presence on the command line matters
#: The files that make a folder hold a run, which a new run must not silently replace.
RUN_FILES = ("checkpoint.safetensors", "history.json")
#: Schedules whose rate for an epoch does not depend on the planned total: a finished run may go on.
_EXTENSIBLE = ("none", "step", "exponential")


class _Default:
    """A flag's default until the command has seen whether the flag was given (see :func:`given_flags`);
    prints as the value itself, so ``--help`` shows the default."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def mark_defaults(parser: argparse.ArgumentParser) -> None:
    """Wrap the tracked flags' defaults, so that a flag given with its default value still counts as given.
    A None or False default needs no wrapping: no command line produces it."""
    parser.set_defaults(**{dest: _Default(parser.get_default(dest)) for dest in _TRACKED
                           if parser.get_default(dest) is not None and parser.get_default(dest) is not False})


def given_flags(args: argparse.Namespace) -> set[str]:
    """The tracked flags given on the command line; the others get their plain defaults back in ``args``."""
    given = set()
    for dest in _TRACKED:
        value = getattr(args, dest, None)
        if isinstance(value, _Default):
            setattr(args, dest, value.value)
        elif value is not None and value is not False:
            given.add(dest)
    return given


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def dataset_key(text: str) -> str:
    """A data set by name in lower case; a file by its absolute path (so a resume from elsewhere finds it)."""
    path = Path(text)
    if path.suffix.lower() in (".npz", ".csv") or path.is_file():
        return str(path.resolve())
    return text.strip().lower()


def _comparable(dest: str, value: Any) -> Any:
    """``value`` of flag ``dest`` in a form where equal settings compare equal ("l2:1e-4" and "l2:0.0001")."""
    if value is None or isinstance(value, bool):
        return value
    try:
        if dest in ("hidden", "channels"):
            return tuple(parse_widths(str(value), _flag(dest)))
        if dest == "input_shape":
            return parse_input_shape(value if isinstance(value, str) else ",".join(map(str, value)))
        if dest == "reg":
            kind, _, rest = str(value).partition(":")
            return kind, tuple(float(v) for v in rest.split(",")) if rest else ()
    except (UsageError, ValueError):
        return value
    if dest == "dataset":
        return dataset_key(str(value))
    if isinstance(value, (int, float)):
        return float(value)
    return value


def _shown(dest: str, value: Any) -> str:
    if value is None or isinstance(value, bool):
        return _flag(dest) if value else f"no {_flag(dest)}"
    return f"{_flag(dest)} {value}"


class Resumed:
    """What ``--resume`` takes from its checkpoint: the epochs done and planned, the recorded split."""

    def __init__(self, path: Path, done: int, planned: int, split: Any, note: str | None) -> None:
        self.path, self.done, self.planned, self.split, self.note = path, done, planned, split, note


def take_settings(args: argparse.Namespace, given: set[str]) -> Resumed:
    """``--resume``: the run's settings from its checkpoint into ``args``; a given flag that contradicts one,
    or an ``--epochs`` that trains nothing or that the schedule cannot follow, is a UsageError."""
    from ..checkpoint import load_checkpoint

    path = args.resume
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    extra = ckpt.extra or {}
    if isinstance(extra.get("diverged"), dict):
        raise UsageError(f"--resume {path}: this file holds the parameters from within epoch "
                         f"{extra['diverged'].get('epoch')}, written when training diverged, and cannot be resumed; "
                         f"resume from {path.parent / 'checkpoint.safetensors'} (the last finished epoch) instead")
    done = 0 if ckpt.epoch is None else ckpt.epoch + 1
    stored = extra.get("settings")
    if not isinstance(stored, dict):  # before the per-epoch settings: the end-of-run record of the flags
        legacy = extra.get("args")
        # (its --lr is None when left at the optimizer's default, which build_optimizer picks again)
        stored = {k: v for k, v in legacy.items() if k in RUN_SETTINGS and not (k == "lr" and v is None)} \
            if isinstance(legacy, dict) else {}
    note = None if stored else (f"note: {path} records no run settings (an older deepcore): resuming with the "
                                f"flags as given, which must be those of the run")
    for dest in RUN_SETTINGS:
        if dest == "epochs" or dest not in stored or not hasattr(args, dest):
            continue
        if dest in given and _comparable(dest, getattr(args, dest)) != _comparable(dest, stored[dest]):
            raise UsageError(f"{_shown(dest, getattr(args, dest))} contradicts {path}, whose run has "
                             f"{_shown(dest, stored[dest])}; leave {_flag(dest)} out to resume with the run's, "
                             f"or start a new run (another --out)")
        setattr(args, dest, stored[dest])
    planned = stored.get("epochs") if isinstance(stored.get("epochs"), int) else max(done, args.epochs)
    target = args.epochs if "epochs" in given else planned
    extensible = args.schedule in _EXTENSIBLE
    if target <= done:
        if "epochs" in given:
            raise UsageError(f"--epochs {target}: {path} has already trained {done} epochs (--epochs counts the "
                             f"whole run, not the epochs to add); give --epochs greater than {done}")
        if extensible:
            raise UsageError(f"--resume: {path} has trained all {done} epochs of its run; give --epochs greater "
                             f"than {done} to train on")
        raise UsageError(f"--resume: {path} has trained all {done} epochs of its run, and its {args.schedule} "
                         f"schedule cannot go on (its rate was planned for {planned} epochs and would climb back "
                         f"after them); start a new run (another --out) instead")
    if target > planned and not extensible:
        instead = (f"all {planned} are trained: start a new run (another --out)" if done >= planned
                   else f"give --epochs up to {planned}, or start a new run (another --out)")
        raise UsageError(f"--epochs {target}: the run in {path} was planned for {planned} epochs, and its "
                         f"{args.schedule} schedule anneals the rate to its minimum at epoch {planned} and would "
                         f"climb back after it; {instead}")
    if target > planned and args.schedule == "step":
        note = (f"note: training past the run's planned {planned} epochs, the step schedule keeps dividing the "
                f"rate by 10 every {max(1, planned // 3)} epochs")
    args.epochs = target
    return Resumed(path, done, planned, stored.get("split"), note)


def split_record(splits: Any) -> dict[str, Any]:
    """The sizes of the train / val / test split and a hash of their labels: a re-split or changed file shows."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    sizes = {}
    for part in ("train", "val", "test"):
        ds = getattr(splits, part)
        sizes[part] = 0 if ds is None else len(ds)
        if ds is not None:
            digest.update(part.encode() + np.ascontiguousarray(ds.y).tobytes())
    return {**sizes, "labels_sha256": digest.hexdigest()}


def check_split(resumed: Resumed, record: dict[str, Any], dataset: str) -> None:
    if isinstance(resumed.split, dict) and resumed.split != record:
        def sizes(r: dict[str, Any]) -> str:
            return f"{r.get('train')}/{r.get('val')}/{r.get('test')}"

        same = sizes(resumed.split) == sizes(record)
        raise UsageError(f"--resume: {dataset} no longer splits as it did for {resumed.path} (train/val/test "
                         f"{sizes(resumed.split)} then, {sizes(record)} now" + (", with other labels" if same else "")
                         + "); was the data changed? Resume with the data the run was trained on")


def check_out(args: argparse.Namespace) -> None:
    """--out must be a folder this process can write, and must not hold another run unless --overwrite
    (or --resume continues the run it holds); refused before any data is read or anything trained."""
    from .._io import writable_problem

    out = args.out
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        if existing == out.absolute():
            raise UsageError(f"--out {out} is a file, not a folder")
        raise UsageError(f"--out {out} lies under {existing}, which is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    problem = writable_problem(out)
    if problem is not None:
        raise UsageError(f"--out {out} is not writable ({problem})")
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if not previous or args.overwrite:
        return
    ckpt = out / RUN_FILES[0]
    if args.resume is not None and ckpt.exists() and args.resume.resolve() == ckpt.resolve():
        return
    raise UsageError(f"--out {out} holds a previous run ({', '.join(previous)}); continue it with --resume {ckpt}, "
                     f"replace it with --overwrite, or choose another --out")
