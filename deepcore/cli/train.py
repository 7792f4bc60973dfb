"""``deepcore train``: every flag checked before anything runs, then data, model, optimizer and
schedule built from the flags and handed to :func:`deepcore.train.fit`."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..backend import BackendUnavailableError, UnknownBackendError, get_backend, use_backend
from ..backend import best_backend as choose_backend
from ..cli_errors import EXIT_FAILURE, UsageError
from ..mixed_precision import PRECISIONS
from .models import CNN_CHANNELS, build_model, check_model_size, cnn_style
from .run_settings import (
    RUN_SETTINGS,
    check_out,
    check_split,
    dataset_key,
    given_flags,
    mark_defaults,
    parse_hidden,
    parse_input_shape,
    parse_widths,
    split_record,
    take_settings,
)


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
    p.add_argument("--model", choices=("linear", "mlp", "cnn"), default="mlp",
                   help="linear: the course's Wx + b; mlp: Linear-ReLU blocks, then a linear output; cnn: a "
                        "convolutional network for the image shape (LeNet-like below 32x32, VGG-style with "
                        "BatchNorm2d from 32x32 on), then the --hidden layers")
    p.add_argument("--channels", metavar="C1,C2,...",
                   help="--model cnn: the convolutions' widths, comma-separated (default: 32,64; 32,64,128 for "
                        "images of 32x32 and more)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="--model cnn: the image shape of a dataset of flat rows (a .csv, a 2-D .npz x), channels "
                        "first; rows are reshaped to it")
    p.add_argument("--hidden", default="256",
                   help="hidden widths of the MLP (of the fully connected layers after a cnn's convolutions), "
                        "comma-separated")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden (fully connected) layer")
    p.add_argument("--batchnorm", action="store_true",
                   help="BatchNorm1d after each hidden linear layer (and for a LeNet-like cnn BatchNorm2d after "
                        "each convolution)")
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
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="forward and backward in float16 (with loss scaling) or bfloat16, float32 master weights")
    p.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="batches per optimizer step (gradient accumulation: one step of K batches)")
    p.add_argument("--clip-grad-norm", type=float, metavar="MAX",
                   help="rescale the gradients to this global L2 norm when they exceed it")
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
    p.add_argument("--curves", choices=("svg", "png", "none"), default="svg",
                   help="the training curves: curves.svg (no dependency), curves.png (needs matplotlib) or none")
    mark_defaults(p)  # after every add_argument: tells a flag given with its default from one left out
    p.set_defaults(run=run_command)
    return p


def best_backend() -> str:
    """CuPy when it works here, else NumPy; probes nothing else (see :func:`deepcore.backend.best_backend`)
    and says in one line why an installed CuPy was passed over."""
    name, note = choose_backend()
    if note:
        print(f"deepcore: note: {note}", file=sys.stderr)
    return name


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

    given = given_flags(args)
    resumed = None
    if args.resume is not None:  # the run's settings come from its checkpoint; its folder is the default --out
        resumed = take_settings(args, given)
        if "out" not in given:
            args.out = args.resume.parent
    hidden = parse_hidden(args.hidden)
    regularizer = _parse_reg(args.reg)
    for name in ("epochs", "batch_size", "accumulate"):
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
                                  ("--clip-grad-norm", args.clip_grad_norm,
                                   args.clip_grad_norm is None or args.clip_grad_norm > 0, "> 0"),
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
        backend = get_backend(backend_name)
    except (UnknownBackendError, BackendUnavailableError) as exc:
        raise UsageError(f"--backend: {exc}") from None
    if args.precision != "fp32":
        try:
            backend.dtype_from_name(PRECISIONS[args.precision])
        except (TypeError, AttributeError) as exc:
            raise UsageError(f"--precision {args.precision}: {exc}") from None
    channels, flag_shape = _check_cnn_flags(args, named)
    # The model's size before the data is read: exact for a named set, a lower bound for a file.
    features, classes = data.KNOWN_SIZES.get(named, (1, args.num_classes or 2))
    image = (flag_shape or data.IMAGE_SHAPES.get(named, (1, 1, 1))) if args.model == "cnn" else None
    if image is not None:
        features = math.prod(image)
    check_model_size(args, features, classes, hidden, backend_name, at_least=named is None, image_shape=image,
                     channels=channels)
    report = (lambda _m: None) if args.quiet or not comm.is_root else print
    check_out(args)
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
    split = split_record(splits)
    if resumed is not None:
        check_split(resumed, split, args.dataset)
    image = None
    if args.model == "cnn":  # the rows seen as (N, C, H, W) images, without a copy
        image = _image_shape(args, splits, flag_shape)
        splits = data.as_images(splits, image)
        args.channels = ",".join(map(str, channels or CNN_CHANNELS[cnn_style(image)]))
    train_ds, val_ds = splits.train, splits.val
    in_features = splits.num_features
    n_val = 0 if val_ds is None else len(val_ds)
    labels = f", labels in column {splits.label_column}" if splits.label_column else ""
    sample = f"{'x'.join(map(str, image))} images" if image else f"{in_features} features"
    report(f"deepcore {__version__}: {splits.name}, {len(train_ds)} train / {n_val} val / "
        f"{len(splits.test)} test, {sample}, {splits.num_classes} classes{labels}; "
        f"backend {backend_name}")

    check_model_size(args, in_features, splits.num_classes, hidden, backend_name, image_shape=image,
                     channels=channels)
    with use_backend(backend_name):
        model = build_model(args.model, in_features, splits.num_classes, hidden, dropout=args.dropout,
                            batchnorm=args.batchnorm, seed=args.seed, image_shape=image, channels=channels)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    planned = args.epochs if resumed is None else max(resumed.planned, args.epochs)
    # What every checkpoint of the run records (extra["settings"]), and --resume takes back; for a cnn
    # the image shape too, with which `deepcore evaluate` and `predict` reshape rows.
    settings = {dest: getattr(args, dest) for dest in RUN_SETTINGS if hasattr(args, dest)} | {
        "dataset": dataset_key(args.dataset), "hidden": ",".join(map(str, hidden)), "lr": float(optimizer.lr),
        "epochs": planned, "split": split, "channels": args.channels if image else None,
        "input_shape": ",".join(map(str, image)) if image else None}
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
                  loss_kwargs=loss_kwargs, run_settings=settings, precision=args.precision,
                  accumulate=args.accumulate, clip_grad_norm=args.clip_grad_norm)
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
                    | ({"classes": list(splits.classes)} if splits.classes else {})
                    | ({"input_shape": list(image)} if image else {}))
    curves = None if args.curves == "none" else training_curves(
        history, args.out / f"curves.{args.curves}", note=report, dataset=splits.name,
        model=_describe_model(args), test_accuracy=test.get("accuracy"))
    for fmt in ("svg", "png"):  # a picture of this folder's earlier run would no longer match its history
        if curves is None or curves.suffix != f".{fmt}":
            (args.out / f"curves.{fmt}").unlink(missing_ok=True)
    acc = f", test accuracy {test['accuracy']:.2%}" if "accuracy" in test else ""
    print(f"test loss {test['loss']:.4f}{acc}")
    report(f"wrote {ckpt}, {history_path}" + (f", {curves}" if curves else ""))
    report(f"done in {time.perf_counter() - started:.1f} s")
    comm.barrier()
    return 0


def _check_cnn_flags(args: argparse.Namespace, named: str | None) -> tuple[list[int] | None, tuple[int, ...] | None]:
    """--channels and --input-shape, checked against --model and --dataset before the data is read:
    ``(the conv widths or None for the default, the image shape given or None)``."""
    from ..data import IMAGE_SHAPES

    for flag, value in (("--channels", args.channels), ("--input-shape", args.input_shape)):
        if value is not None and args.model != "cnn":
            raise UsageError(f"{flag} applies to --model cnn, not to --model {args.model}")
    channels = None if args.channels is None else parse_widths(args.channels, "--channels")
    shape = None
    if args.input_shape is not None:
        given = args.input_shape
        shape = parse_input_shape(given if isinstance(given, str) else ",".join(map(str, given)))
    if named is not None and shape is not None and shape != IMAGE_SHAPES[named]:
        raise UsageError(f"--input-shape {','.join(map(str, shape))}: {named} has images of "
                         f"{'x'.join(map(str, IMAGE_SHAPES[named]))} (C,H,W); leave --input-shape out")
    if args.model == "cnn" and shape is None and named is None and Path(args.dataset).suffix.lower() == ".csv":
        raise UsageError(f"--model cnn needs images, but the rows of {args.dataset} are flat: give their shape "
                         f"with --input-shape C,H,W")
    return channels, shape


def _image_shape(args: argparse.Namespace, splits: Any, given: tuple[int, ...] | None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a cnn sees the data as: --input-shape, else the data's own image shape."""
    from ..data import image_shape

    own = tuple(splits.input_shape)
    if given is not None:
        if math.prod(given) != splits.num_features:
            raise UsageError(f"--input-shape {','.join(map(str, given))}: {math.prod(given)} values per sample, "
                             f"but {args.dataset} has {splits.num_features} features per sample")
        if len(own) > 1 and image_shape(own) != given:
            raise UsageError(f"--input-shape {','.join(map(str, given))}: {args.dataset} has samples of shape "
                             f"{own}, images of {'x'.join(map(str, image_shape(own)))}; leave --input-shape out")
        return given[0], given[1], given[2]
    if len(own) == 1:
        raise UsageError(f"--model cnn needs images, but {args.dataset} has flat rows of {own[0]} features: save x "
                         f"as (N, C, H, W) or (N, H, W), or give the image shape with --input-shape C,H,W")
    if len(own) > 3:
        raise UsageError(f"--model cnn takes images (N, C, H, W), but the samples of {args.dataset} have shape "
                         f"{own}; reshape x to (N, C, H, W), or give --input-shape C,H,W")
    return image_shape(own)


def _describe_model(args: argparse.Namespace) -> str:
    """``mlp 256,128 + BatchNorm + dropout 0.2``, ``cnn 32,64 + fc 256`` (the curves' title)."""
    if args.model == "linear":
        return "linear"
    head = f"cnn {args.channels} + fc {args.hidden}" if args.model == "cnn" else f"mlp {args.hidden}"
    return (head + (" + BatchNorm" if args.batchnorm else "")
            + (f" + dropout {args.dropout:g}" if args.dropout else ""))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "run"}
