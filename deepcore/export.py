"""A deepcore model as an ONNX file, in inference form, with a dynamic batch dimension.

>>> to_onnx(model, x[:4], "model.onnx")      # x: an example batch; its size does not matter

Each built-in layer (its exact class, as :mod:`deepcore.nn.spec` describes them) becomes the ONNX
operators that compute what its ``forward(x, train=False)`` computes:

- ``Linear``: ``Gemm(x, W, b, transB=1)`` on 2-D input (``MatMul(x, W^T) + b`` on more axes);
- ``ReLU``, ``LeakyReLU(alpha)``, ``Sigmoid``, ``Tanh``; ``Softmax(axis)``; ``Dropout``: ``Identity``;
- ``BatchNorm1d`` / ``BatchNorm2d``: ``BatchNormalization`` with the running statistics
  (``y = γ (x - μ) / sqrt(σ² + eps) + β``), or, without running statistics, the batch's own
  (``ReduceMean``), as deepcore and PyTorch normalise then even in inference;
- ``Flatten``: ``Flatten`` (start_dim 1, end_dim -1) or ``Reshape``;
- ``Conv2d``: ``Conv`` (pads as ONNX orders them, ``[top, left, bottom, right]``), ``MaxPool2d``:
  ``MaxPool``, ``AvgPool2d``: ``AveragePool(count_include_pad)``, ``GlobalAvgPool2d``:
  ``GlobalAveragePool`` then ``Flatten`` to (N, C);
- ``Sequential``: the chain; ``Residual``: ``Add(block(x), shortcut(x) or x)``.

The model runs once on ``example_input`` while the graph is built, which fixes every shape but the
batch dimension and checks that the input fits. Anything else (a user's own ``Module``, a subclass
of a built-in, whose ``forward`` may differ) raises :class:`ExportError` naming the layer's path.
Needs the ``onnx`` package (``pip install 'deepcore[onnx]'``), imported only here; onnxruntime
is not needed to export, only to run the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .backend import get_backend
from .backend.base import Array
from .nn import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    LeakyReLU,
    Linear,
    MaxPool2d,
    Module,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ExportError", "to_onnx"]

#: The opset written when none is asked for (ONNX Runtime >= 1.12 runs it); 13 is the least that
#: has Softmax along one axis and ReduceMean's axes as an attribute.
DEFAULT_OPSET = 17
MIN_OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "N"


class ExportError(ValueError):
    """A model, input or option that cannot be exported (the message names the layer or the argument)."""


class _Graph:
    """The nodes and initializers built so far; names are made unique by a counter."""

    def __init__(self, helper: Any, numpy_helper: Any, dtype: np.dtype) -> None:
        self.helper, self.numpy_helper, self.dtype = helper, numpy_helper, dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, hint: str, dtype: Any = None) -> str:
        name = self.name(hint)
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype or self.dtype))
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


# A converter: (layer, its path, the graph, the input's name, the example input) -> (output's name, output).
_Converter = Callable[[Any, str, _Graph, str, Array], tuple[str, Array]]


def _host(a: Array) -> np.ndarray:
    return get_backend(a).to_numpy(a)


def _where(path: str) -> str:
    return f"layer {path!r}" if path else "the model"


def _linear(m: Linear, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    w = _host(m.weight.value)
    b = None if m.bias is None else _host(m.bias.value)
    hint = path or "linear"
    if ex.ndim == 2:
        inputs = [x, g.const(w, f"{hint}.weight")] + ([] if b is None else [g.const(b, f"{hint}.bias")])
        return g.op("Gemm", inputs, hint, transB=1), m(ex)
    y = g.op("MatMul", [x, g.const(w.T, f"{hint}.weight_t")], hint)
    if b is not None:
        y = g.op("Add", [y, g.const(b, f"{hint}.bias")], hint)
    return y, m(ex)


def _elementwise(op_type: str, **attrs_of: Callable[[Any], Any]) -> _Converter:
    def convert(m: Module, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
        attrs = {k: get(m) for k, get in attrs_of.items()}
        return g.op(op_type, [x], path or op_type.lower(), **attrs), m(ex)

    return convert


def _softmax(m: Softmax, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    y = m(ex)  # checks the axis against the input's rank
    return g.op("Softmax", [x], path or "softmax", axis=m.axis), y


def _batchnorm(m: BatchNorm1d | BatchNorm2d, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    y = m(ex)  # checks the shape
    hint = path or "batchnorm"
    c = m.num_features
    gamma = np.ones(c) if m.weight is None else _host(m.weight.value)
    beta = np.zeros(c) if m.bias is None else _host(m.bias.value)
    if m.track_running_stats:
        inputs = [x, g.const(gamma, f"{hint}.weight"), g.const(beta, f"{hint}.bias"),
                  g.const(_host(m.running_mean), f"{hint}.running_mean"),
                  g.const(_host(m.running_var), f"{hint}.running_var")]
        return g.op("BatchNormalization", inputs, hint, epsilon=m.eps), y
    # Without running statistics inference normalises with the batch's biased mean and variance.
    axes = [0, *range(2, ex.ndim)]
    channel = (c,) + (1,) * (ex.ndim - 2)
    mean = g.op("ReduceMean", [x], f"{hint}.mean", axes=axes, keepdims=1)
    centered = g.op("Sub", [x, mean], f"{hint}.centered")
    var = g.op("ReduceMean", [g.op("Mul", [centered, centered], f"{hint}.sq")], f"{hint}.var", axes=axes,
               keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(m.eps, f"{hint}.eps")], f"{hint}.var_eps")], f"{hint}.std")
    scaled = g.op("Mul", [g.op("Div", [centered, std], f"{hint}.x_hat"),
                          g.const(gamma.reshape(channel), f"{hint}.weight")], f"{hint}.scaled")
    return g.op("Add", [scaled, g.const(beta.reshape(channel), f"{hint}.bias")], hint), y


def _flatten(m: Flatten, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    y = m(ex)  # checks start_dim and end_dim against the input
    nd = ex.ndim
    start = m.start_dim + nd if m.start_dim < 0 else m.start_dim
    end = m.end_dim + nd if m.end_dim < 0 else m.end_dim
    hint = path or "flatten"
    if start == 1 and end == nd - 1:
        return g.op("Flatten", [x], hint, axis=1), y
    # Reshape: 0 copies the batch dimension as it comes; a flattened batch becomes -1.
    target = [0] + [int(d) for d in y.shape[1:]] if start > 0 else [-1] + [int(d) for d in y.shape[1:]]
    return g.op("Reshape", [x, g.const(target, f"{hint}.shape", np.int64)], hint), y


def _window_attrs(m: MaxPool2d | AvgPool2d) -> dict[str, Any]:
    ph, pw = m.padding
    return {"kernel_shape": list(m.kernel_size), "strides": list(m.stride), "pads": [ph, pw, ph, pw]}


def _conv(m: Conv2d, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    y = m(ex)
    hint = path or "conv"
    top, bottom, left, right = m._pads
    inputs = [x, g.const(_host(m.weight.value), f"{hint}.weight")]
    if m.bias is not None:
        inputs.append(g.const(_host(m.bias.value), f"{hint}.bias"))
    return g.op("Conv", inputs, hint, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                pads=[top, left, bottom, right], dilations=list(m.dilation), group=m.groups), y


def _max_pool(m: MaxPool2d, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    return g.op("MaxPool", [x], path or "maxpool", **_window_attrs(m)), m(ex)


def _avg_pool(m: AvgPool2d, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    return g.op("AveragePool", [x], path or "avgpool", count_include_pad=int(m.count_include_pad),
                **_window_attrs(m)), m(ex)


def _global_avg_pool(m: GlobalAvgPool2d, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    y = m(ex)
    hint = path or "gap"
    return g.op("Flatten", [g.op("GlobalAveragePool", [x], f"{hint}.pool")], hint, axis=1), y


def _sequential(m: Sequential, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    for name, layer in m._children.items():
        x, ex = _convert(layer, f"{path}.{name}" if path else name, g, x, ex)
    return x, ex


def _residual(m: Residual, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    prefix = f"{path}." if path else ""
    y, y_ex = _convert(m.block, prefix + "block", g, x, ex)
    skip, skip_ex = (x, ex) if m.shortcut is None else _convert(m.shortcut, prefix + "shortcut", g, x, ex)
    if tuple(y_ex.shape) != tuple(skip_ex.shape):
        m(ex)  # raises the layer's own message
    return g.op("Add", [y, skip], path or "residual"), y_ex + skip_ex


_CONVERTERS: dict[type, _Converter] = {
    Linear: _linear,
    ReLU: _elementwise("Relu"),
    LeakyReLU: _elementwise("LeakyRelu", alpha=lambda m: m.negative_slope),
    Sigmoid: _elementwise("Sigmoid"),
    Tanh: _elementwise("Tanh"),
    Softmax: _softmax,
    Dropout: _elementwise("Identity"),
    BatchNorm1d: _batchnorm,
    BatchNorm2d: _batchnorm,
    Flatten: _flatten,
    Conv2d: _conv,
    MaxPool2d: _max_pool,
    AvgPool2d: _avg_pool,
    GlobalAvgPool2d: _global_avg_pool,
    Sequential: _sequential,
    Residual: _residual,
}


def exportable_layers() -> list[str]:
    """The class names :func:`to_onnx` converts."""
    return [cls.__name__ for cls in _CONVERTERS]


def _convert(layer: Module, path: str, g: _Graph, x: str, ex: Array) -> tuple[str, Array]:
    convert = _CONVERTERS.get(type(layer))
    if convert is None:
        cls = type(layer)
        subclass = next((base.__name__ for base in cls.__mro__[1:] if base in _CONVERTERS), None)
        why = (f"a subclass of {subclass}, whose forward may differ from the built-in's" if subclass
               else "not a built-in layer")
        raise ExportError(f"to_onnx: {_where(path)} is a {cls.__module__}.{cls.__qualname__} ({why}), which has no "
                          f"ONNX conversion; exportable (exact classes): {', '.join(exportable_layers())}")
    return convert(layer, path, g, x, ex)


def _check_dtypes(model: Module, dtype: np.dtype) -> None:
    arrays = [(name, p.value) for name, p in model.named_parameters()] + list(model.named_buffers())
    for name, a in arrays:
        backend = get_backend(a)
        if backend.is_floating(a) and np.dtype(backend.dtype_name(a.dtype)) != dtype:
            raise ExportError(f"to_onnx: example_input has dtype {dtype} but the model's {name!r} is "
                              f"{backend.dtype_name(a.dtype)}; cast the input or the model (model.to(dtype=...)) "
                              f"so they match")


def to_onnx(model: Module, example_input: Array, path: str | os.PathLike[str], *, opset: int | None = None) -> Path:
    """Write ``model`` in inference form to ``path`` as an ONNX file (atomically) and return the path.

    ``example_input``: one batch of any size (an array of the model's backend, or a NumPy array),
    floating point of the parameters' dtype; the first axis is the batch and stays dynamic (``"N"``).
    ``opset``: the ONNX opset to write, from 13 to what the installed onnx knows (default 17).
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        raise ImportError(f"to_onnx needs the onnx package ({exc}); install it with pip install 'deepcore[onnx]'"
                          ) from None
    from ._io import write_bytes_atomic

    if not isinstance(model, Module):
        raise ExportError(f"to_onnx: model must be a deepcore.nn.Module, got {type(model).__name__}")
    newest = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"to_onnx: opset must be an integer from {MIN_OPSET} to {newest} (the installed onnx's "
                          f"newest), got {opset!r}")
    backend = model.backend
    if isinstance(example_input, np.ndarray) and get_backend(example_input) is not backend:
        example_input = backend.from_numpy(example_input)
    try:
        in_backend = get_backend(example_input)
    except TypeError:
        raise ExportError(f"to_onnx: example_input must be an array, got {type(example_input).__name__}") from None
    if not in_backend.is_floating(example_input) or example_input.ndim < 1:
        raise ExportError(f"to_onnx: example_input must be a floating-point array with a batch axis, got dtype "
                          f"{example_input.dtype} and shape {tuple(example_input.shape)}")
    dtype = np.dtype(in_backend.dtype_name(example_input.dtype))
    _check_dtypes(model, dtype)

    g = _Graph(helper, numpy_helper, dtype)
    out, y = _convert(model, "", g, INPUT_NAME, example_input)
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name=OUTPUT_NAME))
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    batch = int(example_input.shape[0])
    in_shape = [BATCH_DIM] + [int(d) for d in example_input.shape[1:]]
    # The output's first axis is the batch unless a layer merged it away (Flatten from axis 0).
    out_dims = [int(d) for d in y.shape]
    out_shape: list[Any] = [BATCH_DIM, *out_dims[1:]] if out_dims and out_dims[0] == batch else out_dims
    if any(type(m) is Flatten and m.start_dim in (0, -example_input.ndim) for _, m in model.named_modules()):
        out_shape = [None] * len(out_dims)
    graph = helper.make_graph(g.nodes, "deepcore_model",
                              [helper.make_tensor_value_info(INPUT_NAME, elem, in_shape)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, elem, out_shape)],
                              initializer=g.initializers)
    from . import __version__

    proto = helper.make_model(graph, producer_name="deepcore", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", opset)])
    # The IR version the opset came with, not the newest: older runtimes refuse files newer than they are.
    proto.ir_version = min(proto.ir_version, _ir_version_for(helper, opset))
    onnx.checker.check_model(proto, full_check=True)
    return write_bytes_atomic(path, proto.SerializeToString())


def _ir_version_for(helper: Any, opset: int) -> int:
    table = getattr(helper, "VERSION_TABLE", [])
    versions = [ir for _, ir, ai_onnx, *_ in table if ai_onnx == opset]
    return min(versions) if versions else 8
