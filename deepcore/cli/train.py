"""``deepcore train``: every flag checked before anything runs, then data, model, optimizer and
schedule built from the flags and handed to :func:`deepcore.train.fit`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..backend import BackendUnavailableError, UnknownBackendError, get_backend, use_backend
from ..backend import best_backend as choose_backend
from ..cli_errors import EXIT_FAILURE, UsageError


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` ends each option's help with ``(default: X)``; not for a flag that is off (store_true),
    an option without default (None), or a help that already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or (
                "default" in text):
            return text
        return super()._get_help_string(action)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a model (default: an MLP on the embedded 8x8 digits)",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits | mnist | fashion-mnist | cifar10 | PATH.npz | PATH.csv")
    p.add_argument("--data-dir", type=Path, help="where the dataset files are (or go, when downloaded)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    p.add_argument("--no-verify", action="store_true",
                   help="use MNIST, Fashion-MNIST or CIFAR-10 files found on disk without checking them against the "
                        "known checksums (unpacked copies included)")
    p.add_argument("--label-column", metavar="NAME|INDEX",
                   help="the CSV column of the labels, by header name or 0-based index (default: the column named "
                        "label, target, y or class, else the last)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="the class count of a .npz or .csv file; every label must be below it (default: the "
                        "largest label + 1, refused when most of those classes would be empty)")
    p.add_argument("--model", choices=("linear", "mlp"), default="mlp",
                   help="linear: the course's Wx + b; mlp: Linear-ReLU blocks, then a linear output")
    p.add_argument("--hidden", default="256", help="hidden widths of the MLP, comma-separated")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer")
    p.add_argument("--batchnorm", action="store_true", help="BatchNorm1d after each hidden linear layer")
    p.add_argument("--loss", choices=("softmax-ce", "hinge"), default="softmax-ce",
                   help="softmax cross-entropy or the multiclass SVM (hinge) loss")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of softmax-ce, in [0, 1]")
    p.add_argument("--optimizer", choices=("gd", "sgd", "momentum", "nesterov", "adam", "adamw"), default="momentum",
                   help="momentum and nesterov are SGD with momentum 0.9")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.1 for SGD variants, 1e-3 for Adam and AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="the optimizer's weight decay")
    p.add_argument("--schedule", choices=("none", "step", "exponential", "cosine"), default="cosine",
                   help="learning-rate schedule, stepped once per epoch")
    p.add_argument("--warmup", type=int, default=0, help="epochs of linear learning-rate warm-up")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per step and process (under mpirun -n N a step sees N times as many)")
    p.add_argument("--reg", default="none", help="none | l2:LAMBDA | l1:LAMBDA | elastic:LAMBDA,BETA")
    p.add_argument("--max-norm", type=float, help="max-norm constraint c on each unit's incoming weights")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training set held out")
    p.add_argument("--backend", help="numpy | cupy | ... (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the batch order and dropout")
    p.add_argument("--out", type=Path, default=Path("deepcore-run"), help="output directory")
    p.add_argument("--resume", type=Path, help="continue the run of a checkpoint, with the settings it records "
                   "(--out defaults to its folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint and history)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _mark_defaults(p)  # after every add_argument: tells a flag given with its default from one left out
    p.set_defaults(run=run_command)
    return p


def best_backend() -> str:
    """CuPy when it works here, else NumPy; probes nothing else (see :func:`deepcore.backend.best_backend`)
    and says in one line why an installed CuPy was passed over."""
    name, note = choose_backend()
    if note:
        print(f"deepcore: note: {note}", file=sys.stderr)
    return name


def _parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated positive integers, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise UsageError(f"--hidden must be comma-separated positive integers, got {text!r}")
    return widths


def _parse_reg(text: str) -> Any:
    from .. import regularizers

    kind, _, rest = text.partition(":")
    try:
        values = [float(v) for v in rest.split(",")] if rest else []
    except ValueError:
        raise UsageError(f"--reg: numbers expected after ':', got {text!r}") from None
    if kind == "none" and not values:
        return None
    if kind in ("l2", "l1") and len(values) == 1:
        return (regularizers.L2 if kind == "l2" else regularizers.L1)(values[0])
    if kind == "elastic" and len(values) == 2:
        return regularizers.ElasticNet(values[0], values[1])
    raise UsageError(f"--reg must be none, l2:LAMBDA, l1:LAMBDA or elastic:LAMBDA,BETA; got {text!r}")


def _check_data_flags(args: argparse.Namespace) -> str | None:
    """--label-column, --num-classes and --no-verify against --dataset; the data set's canonical name, if named."""
    from ..data import DATASET_NAMES, dataset_name

    named = dataset_name(args.dataset)
    is_csv = named is None and Path(args.dataset).suffix.lower() == ".csv"
    if args.label_column is not None and not is_csv:
        raise UsageError(f"--label-column applies to a .csv --dataset, not to {args.dataset}")
    if args.num_classes is not None:
        if named is not None:
            raise UsageError(f"--num-classes applies to a .npz or .csv --dataset; {named} has its own 10 classes")
        if args.num_classes < 2:
            raise UsageError(f"--num-classes must be an integer >= 2, got {args.num_classes}")
    if args.no_verify and named in (None, "digits"):
        raise UsageError(f"--no-verify applies to {', '.join(n for n in DATASET_NAMES if n != 'digits')} "
                         f"(files checked against known checksums), not to {args.dataset}")
    return named


def model_size(kind: str, in_features: int, num_classes: int, hidden: Sequence[int], batchnorm: bool = False) -> int:
    """The number of values in :func:`build_model`'s model: weights, biases, BatchNorm's parameters and buffers."""
    if kind == "linear":
        return in_features * num_classes + num_classes
    total, width = 0, in_features
    for h in hidden:
        total += width * h + h + (4 * h if batchnorm else 0)
        width = h
    return total + width * num_classes + num_classes


# Copies of the parameters that training holds: the parameters, their gradients, the snapshot
# taken before each step (to undo a diverged one), plus the optimizer's per-parameter state.
_OPTIMIZER_SLOTS = {"gd": 0, "sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2}


def _memory_available(backend_name: str) -> int:
    from ..data.limits import memory_limit

    if backend_name == "cupy":
        try:
            import cupy

            return int(cupy.cuda.Device().mem_info[0])
        except Exception:  # noqa: BLE001 - no device information: judge by the host's memory
            pass
    return memory_limit()


def check_model_size(args: argparse.Namespace, in_features: int, num_classes: int, hidden: Sequence[int],
                     backend_name: str, *, at_least: bool = False) -> None:
    """UsageError, naming --hidden (or --model linear, --num-classes), when training the model would need
    more memory than the backend has: parameters, gradients, the step's snapshot and the optimizer's state
    in float32, plus a batch's activations. Checked before anything is allocated; ``at_least`` when the
    data's size is not known yet (a lower bound, with 1 feature)."""
    from ..data.limits import format_bytes

    params = model_size(args.model, in_features, num_classes, hidden, args.batchnorm)
    widths = [] if args.model == "linear" else list(hidden)
    activations = args.batch_size * (in_features + 3 * sum(widths) + 2 * num_classes) * 2
    need = 4 * (params * (3 + _OPTIMIZER_SLOTS.get(args.optimizer, 2)) + activations)
    available = _memory_available(backend_name)
    if need <= available:
        return
    flags = f"--hidden {args.hidden}" if args.model == "mlp" else "--model linear"
    if args.num_classes is not None:
        flags += f" with --num-classes {args.num_classes}"
    shape = "-".join(map(str, [in_features, *widths, num_classes]))
    what = f"{'at least ' if at_least else ''}{params:,} parameters ({format_bytes(4 * params)} as float32)"
    where = "GPU memory free" if backend_name == "cupy" else "memory available"
    raise UsageError(f"{flags}: the {shape} {'MLP' if args.model == 'mlp' else 'linear model'} has "
                     f"{what}, and training it with {args.optimizer} needs about {format_bytes(need)}, more than "
                     f"the {format_bytes(available)} of {where}; choose smaller "
                     + ("--hidden widths" if args.model == "mlp" else "--num-classes"))


def build_model(kind: str, in_features: int, num_classes: int, hidden: Sequence[int], *, dropout: float = 0.0,
                batchnorm: bool = False, seed: int = 0) -> Any:
    """``linear``: the course's ``f(x, W) = Wx + b``; ``mlp``: Linear-ReLU blocks, then a linear output."""
    from .. import nn

    if kind == "linear":
        return nn.Sequential(nn.Linear(in_features, num_classes, seed=seed))
    layers: list[nn.Module] = []
    width = in_features
    for i, h in enumerate(hidden):
        layers.append(nn.Linear(width, h, init="he", seed=seed + i))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout, seed=seed + 100 + i))
        width = h
    layers.append(nn.Linear(width, num_classes, seed=seed + len(hidden)))
    return nn.Sequential(*layers)


def build_optimizer(name: str, params: list[Any], lr: float | None, weight_decay: float) -> Any:
    from .. import optim

    sgd_lr = 0.1 if lr is None else lr
    if name == "gd":
        return optim.GD(params, lr=sgd_lr)
    if name in ("sgd", "momentum", "nesterov"):
        return optim.SGD(params, lr=sgd_lr, momentum=0.0 if name == "sgd" else 0.9, nesterov=name == "nesterov",
                         weight_decay=weight_decay)
    cls = optim.Adam if name == "adam" else optim.AdamW
    return cls(params, lr=1e-3 if lr is None else lr, weight_decay=weight_decay)


def build_schedule(name: str, optimizer: Any, epochs: int, warmup: int) -> Any:
    from .. import optim

    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if name == "none" and not warmup:
        return None
    main = {
        "none": lambda: None,
        "step": lambda: optim.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1),
        "exponential": lambda: optim.ExponentialLR(optimizer, gamma=0.95),
        "cosine": lambda: optim.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup)),
    }[name]
    warm = optim.LinearWarmup(optimizer, warmup_steps=warmup) if warmup else None
    after = main()
    if warm is None or after is None:
        return warm or after
    return optim.SequentialSchedule(optimizer, [warm, after], milestones=[warmup])


def run_command(args: argparse.Namespace) -> int:
    """Under ``mpirun -n N`` every rank runs this, training data-parallel (:mod:`deepcore.distributed`);
    rank 0 alone prints and writes files, and an error on any rank ends the whole job."""
    from .. import blas_threads
    from ..distributed import abort_on_error, init
    from ..train import TrainingDiverged

    blas_threads.configure()  # under a launcher: each rank its share of the cores, never more
    comm = init()
    with abort_on_error(comm, passthrough=(TrainingDiverged,), show_traceback=False):
        try:
            return _train(args, comm)
        except TrainingDiverged:
            if comm.is_root:
                raise
            return EXIT_FAILURE  # every rank stopped together; rank 0 reports it


def _train(args: argparse.Namespace, comm: Any) -> int:
    started = time.perf_counter()  # for the last line, "done in 12.3 s"
    from .. import data
    from ..checkpoint import save_checkpoint
    from ..distributed import root_first
    from ..nn.spec import architecture_of
    from ..plotting import training_curves
    from ..regularizers import MaxNorm
    from ..train import evaluate, fit

    given = _given_flags(args)
    resumed = None
    if args.resume is not None:  # the run's settings come from its checkpoint; its folder is the default --out
        resumed = _take_settings(args, given)
        if "out" not in given:
            args.out = args.resume.parent
    hidden = _parse_hidden(args.hidden)
    regularizer = _parse_reg(args.reg)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.resume is not None and not args.resume.is_file():
        raise UsageError(f"--resume: no checkpoint at {args.resume}")
    for name, value, ok, want in (("--lr", args.lr, args.lr is None or args.lr > 0, "> 0"),
                                  ("--max-norm", args.max_norm, args.max_norm is None or args.max_norm > 0, "> 0"),
                                  ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
                                  ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing <= 1,
                                   "in [0, 1]"),
                                  ("--warmup", args.warmup, 0 <= args.warmup < args.epochs, "in [0, --epochs)"),
                                  ("--seed", args.seed, args.seed >= 0, ">= 0")):
        if not ok:
            raise UsageError(f"{name} must be {want}, got {value}")
    if args.label_smoothing and args.loss != "softmax-ce":
        raise UsageError(f"--label-smoothing applies to --loss softmax-ce, not {args.loss}")
    if args.weight_decay and args.optimizer == "gd":
        raise UsageError("--weight-decay needs --optimizer sgd, momentum, nesterov, adam or adamw (gd has none)")
    named = _check_data_flags(args)
    backend_name = args.backend or best_backend()
    try:
        get_backend(backend_name)
    except (UnknownBackendError, BackendUnavailableError) as exc:
        raise UsageError(f"--backend: {exc}") from None
    # The model's size before the data is read: exact for a named set, a lower bound for a file.
    features, classes = data.KNOWN_SIZES.get(named, (1, args.num_classes or 2))
    check_model_size(args, features, classes, hidden, backend_name, at_least=named is None)
    report = (lambda _m: None) if args.quiet or not comm.is_root else print
    _check_out(args)
    if resumed is not None and resumed.note is not None:
        report(resumed.note)

    # Arguments are all checked: only now load (and perhaps download) the data; rank 0 first.
    with root_first(comm):
        try:
            splits = data.load_dataset(args.dataset, data_dir=args.data_dir, download=not args.no_download,
                                       seed=args.seed, val_fraction=args.val_fraction, verify=not args.no_verify,
                                       label_column=args.label_column, num_classes=args.num_classes)
        except (ValueError, OSError) as exc:  # in the command's words: --no-download, not download=True
            if getattr(exc, "cli_message", None):
                exc.args = (exc.cli_message,)
            raise
    split = _split_record(splits)
    if resumed is not None:
        _check_split(resumed, split, args.dataset)
    train_ds, val_ds = splits.train, splits.val
    in_features = splits.num_features
    n_val = 0 if val_ds is None else len(val_ds)
    labels = f", labels in column {splits.label_column}" if splits.label_column else ""
    report(f"deepcore {__version__}: {splits.name}, {len(train_ds)} train / {n_val} val / "
        f"{len(splits.test)} test, {in_features} features, {splits.num_classes} classes{labels}; "
        f"backend {backend_name}")

    check_model_size(args, in_features, splits.num_classes, hidden, backend_name)
    with use_backend(backend_name):
        model = build_model(args.model, in_features, splits.num_classes, hidden, dropout=args.dropout,
                            batchnorm=args.batchnorm, seed=args.seed)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    planned = args.epochs if resumed is None else max(resumed.planned, args.epochs)
    # What every checkpoint of the run records (extra["settings"]), and --resume takes back.
    settings = {dest: getattr(args, dest) for dest in RUN_SETTINGS if hasattr(args, dest)} | {
        "dataset": _dataset_key(args.dataset), "hidden": ",".join(map(str, hidden)), "lr": float(optimizer.lr),
        "epochs": planned, "split": split}
    # Built for the total it was planned for: a resumed schedule keeps its T_max, step size, milestones.
    schedule = build_schedule(args.schedule, optimizer, args.epochs if resumed is None else resumed.planned,
                              args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.safetensors"
    loss_name = args.loss
    loss_kwargs = {"label_smoothing": args.label_smoothing} if args.label_smoothing else {}
    history = fit(model, loss_name, optimizer, train_ds, val_ds, epochs=args.epochs, batch_size=args.batch_size,
                  regularizer=regularizer, constraint=None if args.max_norm is None else MaxNorm(args.max_norm),
                  scheduler=schedule, seed=args.seed, verbose=not args.quiet, checkpoint=ckpt, resume=args.resume,
                  loss_kwargs=loss_kwargs, run_settings=settings)
    if not comm.is_root:  # rank 0 alone evaluates, writes and prints the results
        comm.barrier()
        return 0
    test = evaluate(model, loss_name, splits.test)
    history_path = history.save(args.out / "history.json")
    last_epoch = int(history.epochs[-1]["epoch"]) - 1 if history.epochs else args.epochs - 1
    save_checkpoint(ckpt, model, optimizer, epoch=last_epoch,
                    extra={"history": history.to_dict(), "test": test, "args": _jsonable(vars(args)),
                           "settings": settings}
                    | ({"scheduler": schedule.state_dict()} if schedule is not None else {})
                    | {"architecture": architecture_of(model)}  # for `deepcore evaluate` / `predict`
                    | ({"classes": list(splits.classes)} if splits.classes else {}))
    png = training_curves(history, args.out / "curves.png", note=report, dataset=splits.name,
                          model=_describe_model(args), test_accuracy=test.get("accuracy"))
    acc = f", test accuracy {test['accuracy']:.2%}" if "accuracy" in test else ""
    print(f"test loss {test['loss']:.4f}{acc}")
    report(f"wrote {ckpt}, {history_path}" + (f", {png}" if png else ""))
    report(f"done in {time.perf_counter() - started:.1f} s")
    comm.barrier()
    return 0


def _describe_model(args: argparse.Namespace) -> str:
    """``mlp 256,128 + BatchNorm + dropout 0.2`` (the curves' title)."""
    if args.model == "linear":
        return "linear"
    return (f"mlp {args.hidden}" + (" + BatchNorm" if args.batchnorm else "")
            + (f" + dropout {args.dropout:g}" if args.dropout else ""))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "run"}


# ------------------------------------------------------------------ runs: settings, resume, --out
#: The flags that make a run what it is. Every checkpoint of the run records them (extra["settings"]);
#: on --resume they come from there, and one given on the command line that contradicts the record is
#: an error. A new flag that changes the data, its split, the model or the training belongs here.
RUN_SETTINGS = ("dataset", "label_column", "num_classes", "val_fraction", "seed", "model", "hidden", "dropout",
                "batchnorm", "loss", "label_smoothing", "optimizer", "lr", "weight_decay", "schedule", "warmup",
                "epochs", "batch_size", "reg", "max_norm")
_TRACKED = (*RUN_SETTINGS, "out")  # flags whose presence on the command line matters
#: The files that make a folder hold a run, which a new run must not silently replace.
RUN_FILES = ("checkpoint.safetensors", "history.json")
#: Schedules whose rate for an epoch does not depend on the planned total: a finished run may go on.
_EXTENSIBLE = ("none", "step", "exponential")


class _Default:
    """A flag's default until the command has seen whether the flag was given (see :func:`_given_flags`);
    prints as the value itself, so ``--help`` shows the default."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def _mark_defaults(parser: argparse.ArgumentParser) -> None:
    """Wrap the tracked flags' defaults, so that a flag given with its default value still counts as given.
    A None or False default needs no wrapping: no command line produces it."""
    parser.set_defaults(**{dest: _Default(parser.get_default(dest)) for dest in _TRACKED
                           if parser.get_default(dest) is not None and parser.get_default(dest) is not False})


def _given_flags(args: argparse.Namespace) -> set[str]:
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


def _dataset_key(text: str) -> str:
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
        if dest == "hidden":
            return tuple(_parse_hidden(str(value)))
        if dest == "reg":
            kind, _, rest = str(value).partition(":")
            return kind, tuple(float(v) for v in rest.split(",")) if rest else ()
    except (UsageError, ValueError):
        return value
    if dest == "dataset":
        return _dataset_key(str(value))
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


def _take_settings(args: argparse.Namespace, given: set[str]) -> Resumed:
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


def _split_record(splits: Any) -> dict[str, Any]:
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


def _check_split(resumed: Resumed, record: dict[str, Any], dataset: str) -> None:
    if isinstance(resumed.split, dict) and resumed.split != record:
        def sizes(r: dict[str, Any]) -> str:
            return f"{r.get('train')}/{r.get('val')}/{r.get('test')}"

        same = sizes(resumed.split) == sizes(record)
        raise UsageError(f"--resume: {dataset} no longer splits as it did for {resumed.path} (train/val/test "
                         f"{sizes(resumed.split)} then, {sizes(record)} now" + (", with other labels" if same else "")
                         + "); was the data changed? Resume with the data the run was trained on")


def _check_out(args: argparse.Namespace) -> None:
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
