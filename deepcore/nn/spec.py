"""A model's architecture as plain JSON, and the model back from it: no pickle, no code in the file.

>>> spec = architecture_of(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
>>> spec["model"]["layers"][0]
{'type': 'Linear', 'in_features': 64, 'out_features': 32, 'bias': True, 'dtype': 'float32'}
>>> model = model_from_architecture(spec)   # fresh weights; load a checkpoint's state into it

The document is ``{"version": 1, "model": NODE}``, a NODE being ``{"type": NAME, ...the constructor
arguments}``: ``Linear`` (in_features, out_features, bias, dtype), ``Conv2d`` (in_channels, out_channels,
kernel_size, stride, padding, dilation, groups, bias, dtype), ``MaxPool2d`` (kernel_size, stride,
padding), ``AvgPool2d`` (kernel_size, stride, padding, count_include_pad), ``GlobalAvgPool2d``, ``ReLU``,
``LeakyReLU`` (negative_slope), ``Sigmoid``, ``Tanh``, ``Softmax`` (axis), ``Dropout`` (p),
``BatchNorm1d`` and ``BatchNorm2d`` (num_features, eps, momentum, affine, track_running_stats, dtype),
``Flatten`` (start_dim, end_dim), ``Sequential`` (layers: a list of NODEs) and ``Residual`` (block: a
NODE, shortcut: a NODE or null), nested to any depth. A pair (kernel_size, stride, padding, dilation)
is written as a list of two integers (an integer alone is read as both); Conv2d's padding may also be
``"same"``. Weights, running statistics and dropout's seed and call count are state, not architecture:
they live in the checkpoint's tensors and extra states. Only these built-in layers are described, each
by its exact class (a subclass may change what its constructor means): anything else raises
:class:`ArchitectureError` naming the module.

Save it with a checkpoint, ``save_checkpoint(path, model, extra={"architecture": architecture_of(model)})``
(:func:`deepcore.train.fit` does so itself), and rebuild with :func:`model_from_architecture`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .activations import LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d
from .containers import Flatten, Residual, Sequential
from .conv import Conv2d
from .dropout import Dropout
from .linear import Linear
from .module import Module
from .pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d

__all__ = ["ARCHITECTURE_VERSION", "ArchitectureError", "architecture_of", "input_channels", "input_features",
           "model_from_architecture", "output_features"]

#: The layout written by :func:`architecture_of`; :func:`model_from_architecture` reads 1..this.
ARCHITECTURE_VERSION = 1
_DTYPES = ("float16", "float32", "float64")


class ArchitectureError(ValueError):
    """A model that cannot be described, or a description that does not build (the message says where)."""


def _dtype_name(dtype: Any) -> str:
    # NumPy / CuPy dtypes have .name; torch's print as "torch.float32"; jax's are NumPy's.
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).rpartition(".")[2]


# For each layer type: its class, and (argument, how to read it off an instance, check of a JSON value).
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_pair(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(e) for e in v))


def _pair(v: Any) -> list[int]:
    # Layers keep pairs as tuples; JSON has lists.
    return [int(e) for e in v] if isinstance(v, (list, tuple)) else [int(v), int(v)]


_Field = tuple[str, Callable[[Any], Any], Callable[[Any], bool], str]
_PAIR = "an integer or a list of two integers"
_BOOL: tuple[Callable[[Any], bool], str] = (lambda v: isinstance(v, bool), "true or false")
_DTYPE: tuple[Callable[[Any], bool], str] = (lambda v: v in _DTYPES, f"one of {', '.join(_DTYPES)}")


_WINDOW: tuple[_Field, ...] = (
    ("kernel_size", lambda m: _pair(m.kernel_size), _is_pair, _PAIR),
    ("stride", lambda m: _pair(m.stride), _is_pair, _PAIR),
    ("padding", lambda m: _pair(m.padding), _is_pair, _PAIR),
)
_BATCHNORM: tuple[_Field, ...] = (
    ("num_features", lambda m: m.num_features, _is_int, "an integer"),
    ("eps", lambda m: m.eps, _is_number, "a number"),
    ("momentum", lambda m: m.momentum, lambda v: v is None or _is_number(v), "a number or null"),
    ("affine", lambda m: bool(m.affine), *_BOOL),
    ("track_running_stats", lambda m: bool(m.track_running_stats), *_BOOL),
    ("dtype", lambda m: _bn_dtype(m), *_DTYPE),
)
_LAYERS: dict[str, tuple[type[Module], tuple[_Field, ...]]] = {
    "Linear": (Linear, (
        ("in_features", lambda m: m.in_features, _is_int, "an integer"),
        ("out_features", lambda m: m.out_features, _is_int, "an integer"),
        ("bias", lambda m: m.bias is not None, *_BOOL),
        ("dtype", lambda m: _dtype_name(m.weight.dtype), *_DTYPE),
    )),
    "Conv2d": (Conv2d, (
        ("in_channels", lambda m: m.in_channels, _is_int, "an integer"),
        ("out_channels", lambda m: m.out_channels, _is_int, "an integer"),
        ("kernel_size", lambda m: _pair(m.kernel_size), _is_pair, _PAIR),
        ("stride", lambda m: _pair(m.stride), _is_pair, _PAIR),
        ("padding", lambda m: m.padding if isinstance(m.padding, str) else _pair(m.padding),
         lambda v: v == "same" or _is_pair(v), f"{_PAIR}, or \"same\""),
        ("dilation", lambda m: _pair(m.dilation), _is_pair, _PAIR),
        ("groups", lambda m: m.groups, _is_int, "an integer"),
        ("bias", lambda m: m.bias is not None, *_BOOL),
        ("dtype", lambda m: _dtype_name(m.weight.dtype), *_DTYPE),
    )),
    "MaxPool2d": (MaxPool2d, _WINDOW),
    "AvgPool2d": (AvgPool2d, (*_WINDOW, ("count_include_pad", lambda m: bool(m.count_include_pad), *_BOOL))),
    "GlobalAvgPool2d": (GlobalAvgPool2d, ()),
    "ReLU": (ReLU, ()),
    "LeakyReLU": (LeakyReLU, (("negative_slope", lambda m: m.negative_slope, _is_number, "a number"),)),
    "Sigmoid": (Sigmoid, ()),
    "Tanh": (Tanh, ()),
    "Softmax": (Softmax, (("axis", lambda m: m.axis, _is_int, "an integer"),)),
    "Dropout": (Dropout, (("p", lambda m: m.p, _is_number, "a number"),)),
    "BatchNorm1d": (BatchNorm1d, _BATCHNORM),
    "BatchNorm2d": (BatchNorm2d, _BATCHNORM),
    "Flatten": (Flatten, (("start_dim", lambda m: m.start_dim, _is_int, "an integer"),
                          ("end_dim", lambda m: m.end_dim, _is_int, "an integer"))),
}
_REQUIRED = {"Linear": ("in_features", "out_features"), "Conv2d": ("in_channels", "out_channels", "kernel_size"),
             "MaxPool2d": ("kernel_size",), "AvgPool2d": ("kernel_size",), "BatchNorm1d": ("num_features",),
             "BatchNorm2d": ("num_features",)}
_CONTAINERS = ("Sequential", "Residual")


def _bn_dtype(m: BatchNorm1d | BatchNorm2d) -> str:
    for _, value in (*((n, p.value) for n, p in m.named_parameters()), *m.named_buffers()):
        if _dtype_name(value.dtype).startswith("float"):
            return _dtype_name(value.dtype)
    return "float32"


def architecture_of(model: Module) -> dict[str, Any]:
    """The JSON-able description of ``model`` (a tree of the built-in layers); see the module docstring."""
    return {"version": ARCHITECTURE_VERSION, "model": _node_of(model, "model")}


def _node_of(module: Any, where: str) -> dict[str, Any]:
    if type(module) is Sequential:
        return {"type": "Sequential", "layers": [_node_of(m, f"{where}[{i}]") for i, m in enumerate(module)]}
    if type(module) is Residual:
        return {"type": "Residual", "block": _node_of(module.block, f"{where}.block"),
                "shortcut": None if module.shortcut is None else _node_of(module.shortcut, f"{where}.shortcut")}
    for name, (cls, fields) in _LAYERS.items():
        if type(module) is cls:
            return {"type": name, **{arg: get(module) for arg, get, _, _ in fields}}
    raise ArchitectureError(
        f"architecture_of: {where} is a {type(module).__module__}.{type(module).__qualname__}, which has no "
        f"JSON description; describable: {', '.join((*_CONTAINERS, *_LAYERS))} (exact classes, not subclasses)")


def model_from_architecture(spec: Any) -> Module:
    """A new model (fresh parameters on the current default backend) built from :func:`architecture_of`'s
    output. Every field is checked first; an error names the place, e.g. ``model.layers[2].p``."""
    if not isinstance(spec, dict):
        raise ArchitectureError(f"architecture must be a JSON object, got {type(spec).__name__}")
    version = spec.get("version")
    if not _is_int(version) or not 1 <= version <= ARCHITECTURE_VERSION:
        raise ArchitectureError(f"architecture: unsupported version {version!r}; this deepcore reads version 1 to "
                                f"{ARCHITECTURE_VERSION}")
    unknown = sorted(set(spec) - {"version", "model"})
    if unknown:
        raise ArchitectureError(f"architecture: unknown fields {unknown}; expected 'version' and 'model'")
    if "model" not in spec:
        raise ArchitectureError("architecture: the field 'model' is missing")
    return _build(spec["model"], "model")


def _build(node: Any, where: str) -> Module:
    if not isinstance(node, dict):
        raise ArchitectureError(f"architecture {where}: a layer must be a JSON object, got {node!r}")
    kind = node.get("type")
    if kind == "Sequential":
        layers = node.get("layers")
        if set(node) != {"type", "layers"} or not isinstance(layers, list):
            raise ArchitectureError(f"architecture {where}: Sequential takes exactly 'layers', a list of layers; "
                                    f"got fields {sorted(node)}")
        return Sequential(*(_build(child, f"{where}.layers[{i}]") for i, child in enumerate(layers)))
    if kind == "Residual":
        if "block" not in node or not set(node) <= {"type", "block", "shortcut"}:
            raise ArchitectureError(f"architecture {where}: Residual takes 'block' (a layer) and 'shortcut' (a "
                                    f"layer or null); got fields {sorted(node)}")
        shortcut = node.get("shortcut")
        return Residual(_build(node["block"], f"{where}.block"),
                        None if shortcut is None else _build(shortcut, f"{where}.shortcut"))
    if kind not in _LAYERS:
        raise ArchitectureError(f"architecture {where}: unknown layer type {kind!r}; known: "
                                f"{', '.join((*_CONTAINERS, *_LAYERS))}")
    cls, fields = _LAYERS[kind]
    known = {arg: (ok, want) for arg, _, ok, want in fields}
    unknown = sorted(set(node) - {"type"} - set(known))
    if unknown:
        raise ArchitectureError(f"architecture {where}: {kind} has no argument {unknown[0]!r}; its arguments: "
                                f"{', '.join(known) or 'none'}")
    for arg in _REQUIRED.get(kind, ()):
        if arg not in node:
            raise ArchitectureError(f"architecture {where}: {kind} needs {arg!r}")
    kwargs = {}
    for arg, value in node.items():
        if arg == "type":
            continue
        ok, want = known[arg]
        if not ok(value):
            raise ArchitectureError(f"architecture {where}.{arg}: expected {want}, got {value!r}")
        kwargs[arg] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ArchitectureError(f"architecture {where}: {exc}") from None


def _layers_in_order(node: Any) -> list[dict[str, Any]]:
    """The leaves in forward order; a Residual's block stands for it (its output has the block's shape)."""
    if isinstance(node, dict) and node.get("type") == "Sequential" and isinstance(node.get("layers"), list):
        return [leaf for child in node["layers"] for leaf in _layers_in_order(child)]
    if isinstance(node, dict) and node.get("type") == "Residual":
        return _layers_in_order(node.get("block"))
    return [node] if isinstance(node, dict) else []


_WIDTH = {"Linear": ("in_features", "out_features"), "BatchNorm1d": ("num_features", "num_features")}
_CHANNELS = {"Conv2d": ("in_channels", "out_channels"), "BatchNorm2d": ("num_features", "num_features")}
_SPATIAL = ("MaxPool2d", "AvgPool2d")  # keep the channels, change the size: (N, C, H, W) in and out


def input_features(spec: dict[str, Any]) -> int | None:
    """The width of the model's input rows: the first Linear's ``in_features`` (or BatchNorm1d's
    ``num_features``) in forward order; None when no layer fixes it, or when the model takes images
    (a Conv2d, BatchNorm2d or pooling comes first: see :func:`input_channels`)."""
    for layer in _layers_in_order(spec.get("model")):
        kind = layer.get("type")
        if kind in _WIDTH:
            return layer.get(_WIDTH[kind][0])
        if kind in _CHANNELS or kind in _SPATIAL or kind == "GlobalAvgPool2d":
            return None
    return None


def input_channels(spec: dict[str, Any]) -> int | None:
    """The channels C of the images ``(N, C, H, W)`` a convolutional model takes: the first Conv2d's
    ``in_channels`` (or BatchNorm2d's ``num_features``) in forward order, poolings passed over; None
    for a model that takes rows (a Linear or BatchNorm1d first) or when no layer fixes it."""
    for layer in _layers_in_order(spec.get("model")):
        kind = layer.get("type")
        if kind in _CHANNELS:
            return layer.get(_CHANNELS[kind][0])
        if kind in _WIDTH or kind == "GlobalAvgPool2d":
            return None
    return None


def output_features(spec: dict[str, Any]) -> int | None:
    """The width of the model's output rows: the last Linear's ``out_features`` (or BatchNorm1d's
    ``num_features``); after a GlobalAvgPool2d, the channels of the Conv2d or BatchNorm2d before it. None
    when no layer fixes it or the output is not rows (a model ending in a convolution or a pooling)."""
    pooled = False  # the output is (N, C): a GlobalAvgPool2d comes after everything seen so far
    for layer in reversed(_layers_in_order(spec.get("model"))):
        kind = layer.get("type")
        if kind in _WIDTH:
            return layer.get(_WIDTH[kind][1])
        if kind == "GlobalAvgPool2d":
            pooled = True
        elif kind in _CHANNELS:
            return layer.get(_CHANNELS[kind][1]) if pooled else None
        elif kind in _SPATIAL and not pooled:
            return None
    return None
