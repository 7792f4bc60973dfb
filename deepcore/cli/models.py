"""The models ``deepcore train`` builds from its flags (``--model linear | mlp | cnn``), their sizes, and the
guard that refuses one too big for the memory there is, before anything is allocated.

The default convolutional network depends on the image shape ``(C, H, W)`` (the rule of :func:`cnn_plan`):

- sides below 20 (the 8x8 digits): LeNet-like with 3x3 convolutions, padding 1;
- sides 20 to 31 (28x28 MNIST): LeNet-like with 5x5 convolutions, padding 2
  (``conv -> ReLU -> MaxPool2d(2)`` per width, ``Flatten``, then the ``--hidden`` Linear-ReLU layers);
- sides of 32 and more (32x32x3 CIFAR-10): VGG-style, per width two ``conv3x3 -> BatchNorm2d -> ReLU`` then
  ``MaxPool2d(2)``, then ``GlobalAvgPool2d`` and the ``--hidden`` layers.

A pooling is left out once a side is 1, so any image size builds. Widths: ``--channels`` (default 32,64,
and 32,64,128 for the VGG style); ``--batchnorm`` puts BatchNorm2d after each LeNet convolution (the
VGG style has it always) and BatchNorm1d after each hidden Linear, as for the MLP.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cli_errors import UsageError

#: The default ``--channels`` of each convolutional style.
CNN_CHANNELS = {"lenet": (32, 64), "vgg": (32, 64, 128)}
_VGG_SIDE = 32  # images with both sides at least this big get the VGG-style net
_LARGE_KERNEL_SIDE = 20  # LeNet-style: 5x5 kernels from this side on, 3x3 below


@dataclass(frozen=True)
class Planned:
    """One layer of a planned model: the ``deepcore.nn`` class name, its arguments, its output per sample."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    out: tuple[int, ...] = ()

    @property
    def parameters(self) -> int:
        """Parameters and buffers: a convolution's ``O*C*KH*KW (+ O)``, a Linear's ``I*O (+ O)``,
        a BatchNorm's weight, bias, running mean and variance."""
        a = self.args
        if self.kind == "Conv2d":
            k = a["kernel_size"]
            return a["out_channels"] * a["in_channels"] * k * k + (a["out_channels"] if a["bias"] else 0)
        if self.kind == "Linear":
            return a["in_features"] * a["out_features"] + a["out_features"]
        if self.kind in ("BatchNorm1d", "BatchNorm2d"):
            return 4 * a["num_features"]
        return 0

    @property
    def im2col(self) -> int:
        """Values of a convolution's unfolded input per sample (``C*KH*KW*OH*OW``), 0 for other layers."""
        if self.kind != "Conv2d":
            return 0
        k = self.args["kernel_size"]
        return self.args["in_channels"] * k * k * math.prod(self.out[1:])


def cnn_style(image_shape: Sequence[int]) -> str:
    """``"vgg"`` for images with both sides >= 32, else ``"lenet"``."""
    return "vgg" if min(image_shape[1:]) >= _VGG_SIDE else "lenet"


def cnn_plan(image_shape: Sequence[int], num_classes: int, channels: Sequence[int] | None, hidden: Sequence[int],
             *, batchnorm: bool = False, dropout: float = 0.0) -> list[Planned]:
    """The default convolutional network for ``(C, H, W)`` images (see the module docstring), layer by layer."""
    c, h, w = (int(d) for d in image_shape)
    style = cnn_style((c, h, w))
    widths = CNN_CHANNELS[style] if channels is None else tuple(channels)
    layers: list[Planned] = []

    def conv(width: int, k: int, norm: bool) -> None:
        nonlocal c
        # A bias before BatchNorm would be subtracted again by it: left out.
        layers.append(Planned("Conv2d", {"in_channels": c, "out_channels": width, "kernel_size": k,
                                         "padding": k // 2, "bias": not norm}, (width, h, w)))
        if norm:
            layers.append(Planned("BatchNorm2d", {"num_features": width}, (width, h, w)))
        layers.append(Planned("ReLU", {}, (width, h, w)))
        c = width

    for width in widths:
        if style == "vgg":
            conv(width, 3, True)
            conv(width, 3, True)
        else:
            conv(width, 5 if min(h, w) >= _LARGE_KERNEL_SIDE else 3, batchnorm)
        if h >= 2 and w >= 2:  # never pool a side down to 0
            h, w = h // 2, w // 2
            layers.append(Planned("MaxPool2d", {"kernel_size": 2}, (c, h, w)))
    if style == "vgg":
        layers.append(Planned("GlobalAvgPool2d", {}, (c,)))
        features = c
    else:
        features = c * h * w
        layers.append(Planned("Flatten", {}, (features,)))
    for hid in hidden:
        layers.append(Planned("Linear", {"in_features": features, "out_features": hid, "init": "he"}, (hid,)))
        if batchnorm:
            layers.append(Planned("BatchNorm1d", {"num_features": hid}, (hid,)))
        layers.append(Planned("ReLU", {}, (hid,)))
        if dropout > 0:
            layers.append(Planned("Dropout", {"p": dropout}, (hid,)))
        features = hid
    layers.append(Planned("Linear", {"in_features": features, "out_features": num_classes}, (num_classes,)))
    return layers


def describe_cnn(image_shape: Sequence[int], channels: Sequence[int] | None) -> str:
    """``lenet 3x3 32,64`` / ``vgg 32,64,128``: the style and widths :func:`cnn_plan` picks."""
    style = cnn_style(image_shape)
    widths = ",".join(map(str, CNN_CHANNELS[style] if channels is None else channels))
    if style == "vgg":
        return f"vgg {widths}"
    k = 5 if min(image_shape[1:]) >= _LARGE_KERNEL_SIDE else 3
    return f"lenet {k}x{k} {widths}"


def model_size(kind: str, in_features: int, num_classes: int, hidden: Sequence[int], batchnorm: bool = False, *,
               image_shape: Sequence[int] | None = None, channels: Sequence[int] | None = None) -> int:
    """The number of values in :func:`build_model`'s model: weights, biases, BatchNorm's parameters and buffers."""
    if kind == "cnn":
        return sum(p.parameters for p in cnn_plan(_shape(image_shape), num_classes, channels, hidden,
                                                  batchnorm=batchnorm))
    if kind == "linear":
        return in_features * num_classes + num_classes
    total, width = 0, in_features
    for h in hidden:
        total += width * h + h + (4 * h if batchnorm else 0)
        width = h
    return total + width * num_classes + num_classes


def _shape(image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3:
        raise ValueError(f"--model cnn needs the image shape (C, H, W), got {image_shape!r}")
    return int(image_shape[0]), int(image_shape[1]), int(image_shape[2])


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
                     backend_name: str, *, at_least: bool = False, image_shape: Sequence[int] | None = None,
                     channels: Sequence[int] | None = None) -> None:
    """UsageError, naming --hidden (--channels for a cnn; or --model linear, --num-classes), when training the
    model would need more memory than the backend has: parameters, gradients, the step's snapshot and the
    optimizer's state in float32, plus a batch's activations (for a cnn every layer's output twice, value
    and gradient, and the largest convolution's unfolded input). Checked before anything is allocated;
    ``at_least`` when the data's size is not known yet (a lower bound)."""
    from ..data.limits import format_bytes

    slots = 3 + _OPTIMIZER_SLOTS.get(args.optimizer, 2)
    if args.model == "cnn":
        plan = cnn_plan(_shape(image_shape), num_classes, channels, hidden, batchnorm=args.batchnorm)
        params = sum(p.parameters for p in plan)
        outputs = sum(math.prod(p.out) for p in plan)
        activations = args.batch_size * (in_features + 2 * outputs + max(p.im2col for p in plan))
    else:
        params = model_size(args.model, in_features, num_classes, hidden, args.batchnorm)
        widths = [] if args.model == "linear" else list(hidden)
        activations = args.batch_size * (in_features + 3 * sum(widths) + 2 * num_classes) * 2
    need = 4 * (params * slots + activations)
    available = _memory_available(backend_name)
    if need <= available:
        return
    what = f"{'at least ' if at_least else ''}{params:,} parameters ({format_bytes(4 * params)} as float32)"
    where = "GPU memory free" if backend_name == "cupy" else "memory available"
    classes = f" with --num-classes {args.num_classes}" if args.num_classes is not None else ""
    if args.model == "cnn":
        shape = "x".join(map(str, _shape(image_shape)))
        flags = f"--channels {','.join(map(str, channels or CNN_CHANNELS[cnn_style(_shape(image_shape))]))}, " \
                f"--hidden {args.hidden}{classes}"
        model = f"{describe_cnn(_shape(image_shape), channels)} cnn for {shape} images"
        fix = "--channels or --hidden widths, or a smaller --batch-size"
    elif args.model == "mlp":
        flags, fix = f"--hidden {args.hidden}{classes}", "--hidden widths"
        model = f"{'-'.join(map(str, [in_features, *hidden, num_classes]))} MLP"
    else:
        flags, fix = f"--model linear{classes}", "--num-classes"
        model = f"{in_features}-{num_classes} linear model"
    batch = f" at --batch-size {args.batch_size}" if args.model == "cnn" else ""
    raise UsageError(f"{flags}: the {model} has {what}, and training it with {args.optimizer}{batch} needs about "
                     f"{format_bytes(need)}, more than the {format_bytes(available)} of {where}; choose smaller {fix}")


def build_model(kind: str, in_features: int, num_classes: int, hidden: Sequence[int], *, dropout: float = 0.0,
                batchnorm: bool = False, seed: int = 0, image_shape: Sequence[int] | None = None,
                channels: Sequence[int] | None = None) -> Any:
    """``linear``: the course's ``f(x, W) = Wx + b``; ``mlp``: Linear-ReLU blocks, then a linear output;
    ``cnn``: :func:`cnn_plan`'s network for ``image_shape`` (inputs ``(N, C, H, W)``)."""
    from .. import nn

    if kind == "linear":
        return nn.Sequential(nn.Linear(in_features, num_classes, seed=seed))
    layers: list[Any] = []
    if kind == "cnn":
        shape = _shape(image_shape)
        if math.prod(shape) != in_features:
            raise ValueError(f"build_model: image shape {shape} holds {math.prod(shape)} values, not the "
                             f"{in_features} in_features")
        for i, p in enumerate(cnn_plan(shape, num_classes, channels, hidden, batchnorm=batchnorm, dropout=dropout)):
            cls = getattr(nn, p.kind)
            # Each layer with weights or a mask draws from its own seed, as the MLP's layers do.
            seeded = p.kind in ("Conv2d", "Linear", "Dropout")
            layers.append(cls(**p.args, **({"seed": seed + i} if seeded else {})))
        return nn.Sequential(*layers)
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
