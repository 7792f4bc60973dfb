"""``deepcore train``: every flag checked before anything runs, then data, model, optimizer and
schedule built from the flags and handed to :func:`deepcore.train.fit`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..backend import BackendUnavailableError, UnknownBackendError, available_backends, get_backend, use_backend
from ..cli_errors import EXIT_FAILURE, UsageError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a model (default: an MLP on the embedded 8x8 digits)")
    p.add_argument("--dataset", default="digits", help="digits | mnist | fashion-mnist | cifar10 | PATH.npz | PATH.csv")
    p.add_argument("--data-dir", type=Path, help="where the dataset files are (or go, when downloaded)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    p.add_argument("--model", choices=("linear", "mlp"), default="mlp")
    p.add_argument("--hidden", default="256", help="hidden widths of the MLP, comma-separated (default 256)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer (default 0)")
    p.add_argument("--batchnorm", action="store_true", help="BatchNorm1d after each hidden linear layer")
    p.add_argument("--loss", choices=("softmax-ce", "hinge"), default="softmax-ce")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--optimizer", choices=("gd", "sgd", "momentum", "nesterov", "adam", "adamw"), default="momentum")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1 for SGD variants, 1e-3 for Adam)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="the optimizer's weight decay")
    p.add_argument("--schedule", choices=("none", "step", "exponential", "cosine"), default="cosine")
    p.add_argument("--warmup", type=int, default=0, help="epochs of linear learning-rate warm-up")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per step and process (default 64; under mpirun -n N a step sees N times as many)")
    p.add_argument("--reg", default="none", help="none | l2:LAMBDA | l1:LAMBDA | elastic:LAMBDA,BETA")
    p.add_argument("--max-norm", type=float, help="max-norm constraint c on each unit's incoming weights")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training set held out (default 0.1)")
    p.add_argument("--backend", help="numpy | cupy | ... (default: the best available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("deepcore-run"), help="output directory (default ./deepcore-run)")
    p.add_argument("--resume", type=Path, help="continue from a checkpoint written by an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(run=run_command)
    return p


def best_backend() -> str:
    return "cupy" if available_backends().get("cupy") is True else "numpy"


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
    from ..distributed import abort_on_error, init
    from ..train import TrainingDiverged

    comm = init()
    with abort_on_error(comm, passthrough=(TrainingDiverged,), show_traceback=False):
        try:
            return _train(args, comm)
        except TrainingDiverged:
            if comm.is_root:
                raise
            return EXIT_FAILURE  # every rank stopped together; rank 0 reports it


def _train(args: argparse.Namespace, comm: Any) -> int:
    from .. import data
    from ..checkpoint import save_checkpoint
    from ..distributed import root_first
    from ..plotting import training_curves
    from ..regularizers import MaxNorm
    from ..train import evaluate, fit

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
    backend_name = args.backend or best_backend()
    try:
        get_backend(backend_name)
    except (UnknownBackendError, BackendUnavailableError) as exc:
        raise UsageError(f"--backend: {exc}") from None
    report = (lambda _m: None) if args.quiet or not comm.is_root else print

    # Arguments are all checked: only now load (and perhaps download) the data; rank 0 first.
    with root_first(comm):
        splits = data.load_dataset(args.dataset, data_dir=args.data_dir, download=not args.no_download,
                                   seed=args.seed, val_fraction=args.val_fraction)
    train_ds, val_ds = splits.train, splits.val
    in_features = splits.num_features
    n_val = 0 if val_ds is None else len(val_ds)
    report(f"deepcore {__version__}: {splits.name}, {len(train_ds)} train / {n_val} val / "
        f"{len(splits.test)} test, {in_features} features, {splits.num_classes} classes; backend {backend_name}")

    with use_backend(backend_name):
        model = build_model(args.model, in_features, splits.num_classes, hidden, dropout=args.dropout,
                            batchnorm=args.batchnorm, seed=args.seed)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    schedule = build_schedule(args.schedule, optimizer, args.epochs, args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.safetensors"
    loss_name = args.loss
    loss_kwargs = {"label_smoothing": args.label_smoothing} if args.label_smoothing else {}
    history = fit(model, loss_name, optimizer, train_ds, val_ds, epochs=args.epochs, batch_size=args.batch_size,
                  regularizer=regularizer, constraint=None if args.max_norm is None else MaxNorm(args.max_norm),
                  scheduler=schedule, seed=args.seed, verbose=not args.quiet, checkpoint=ckpt, resume=args.resume,
                  loss_kwargs=loss_kwargs)
    if not comm.is_root:  # rank 0 alone evaluates, writes and prints the results
        comm.barrier()
        return 0
    test = evaluate(model, loss_name, splits.test)
    history_path = history.save(args.out / "history.json")
    save_checkpoint(ckpt, model, optimizer, epoch=args.epochs - 1,
                    extra={"history": history.to_dict(), "test": test, "args": _jsonable(vars(args))}
                    | ({"scheduler": schedule.state_dict()} if schedule is not None else {}))
    png = training_curves(history, args.out / "curves.png", note=report)
    acc = f", test accuracy {test['accuracy']:.2%}" if "accuracy" in test else ""
    print(f"test loss {test['loss']:.4f}{acc}")
    report(f"wrote {ckpt}, {history_path}" + (f", {png}" if png else ""))
    comm.barrier()
    return 0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "run"}
