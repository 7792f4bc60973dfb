"""A ``Sequential`` of chainable layers run as one loop with one backward closure.

A layer class marked :func:`chainable` gives its math as two methods besides ``forward``:

- ``_chain_forward(backend, x, owned) -> (y, saved) | None``: the output for an input ``x`` that is
  a floating-point array of ``backend`` (checked once for the chain), with what its backward needs
  besides ``x`` and ``y`` (Linear: the parameters the forward used), or None when this input
  needs the layer's own ``forward`` (another shape, a parameter elsewhere): the chain then gives
  way to the layer-by-layer path, which raises the layer's own error. ``owned`` says that ``x``
  belongs to the chain alone (the previous layer's output, which that layer's backward does not
  read): the layer may write its output over it (ReLU does, as a hand-written loop's
  ``np.maximum(h, 0, out=h)``), and its backward then sees the same array as ``x`` and ``y``.
- ``_chain_backward(backend, dy, x, y, saved, need_dx) -> dx | None``: add the parameters'
  gradients and return ``dL/dx`` (None unless ``need_dx``).

They compute what ``forward`` and its closure compute (Linear's closure calls
``_chain_backward`` itself; an activation's are its ``_f`` and ``_df``), so both paths give the
same bits. A class sets ``_chain_output_owned = True`` when its ``_chain_forward`` returns a
new array that its ``_chain_backward`` never reads (Linear): the next layer's input is then owned.
What the chain saves is the per-layer machinery of the closure style (a closure
built and called per layer, the container's call into each child): the forward of an 8-8-2 MLP
takes 10.3 us instead of 13.9 (warm, ``timeit``; benchmarks/README.md has the step). A layer
counts as chainable only while its class's ``forward`` is the marked class's own (a subclass that
overrides ``forward`` is not) and no ``forward`` is set on the instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..backend import Backend
from ..backend.base import Array
from .module import _ENTRY_IMPL, Backward, Module, check_grad_shape, input_grad_optional

__all__ = ["chainable", "has_parameters", "run_chain"]

#: The ``forward`` implementations (as :data:`module._ENTRY_IMPL` holds them) of the classes
#: marked chainable: a layer whose class's ``forward`` maps to one of these runs in a chain.
_CHAIN_IMPLS: set[Callable[..., Any]] = set()

M = TypeVar("M", bound=type[Module])


def chainable(cls: M) -> M:
    """Mark ``cls`` (a Module subclass defining ``forward``, ``_chain_forward`` and ``_chain_backward``)
    as runnable in a chain, it and the subclasses that inherit its ``forward``."""
    _CHAIN_IMPLS.add(_ENTRY_IMPL[cls.__dict__["forward"]])
    return cls


def run_chain(layers: list[Module], backend: Backend, x: Array) -> tuple[Array, Backward] | None:
    """``(y, backward)`` of ``layers`` applied in turn to ``x`` (a floating-point array of
    ``backend``), or None when a layer is not chainable or declines this input: nothing has
    changed then, and the caller runs the layers one by one."""
    if not layers:
        return None
    entry = _ENTRY_IMPL
    for layer in layers:
        if entry.get(type(layer).forward) not in _CHAIN_IMPLS or "forward" in layer.__dict__:
            return None
    values = [x]  # layer i reads values[i] and writes values[i + 1] (perhaps over values[i]: owned)
    saved = []
    owned = False  # the caller's input is never written
    for layer in layers:
        out = layer._chain_forward(backend, x, owned)  # type: ignore[attr-defined]
        if out is None:
            return None  # what an owned input lost was the chain's own: the layers start again from values[0]
        x, kept = out
        values.append(x)
        saved.append(kept)
        owned = layer._chain_output_owned  # type: ignore[attr-defined]
    out_shape = x.shape

    @input_grad_optional
    def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
        if dy.shape != out_shape:
            check_grad_shape(layers[-1], dy, tuple(out_shape))
        stop = 0
        if not need_input_grad:
            # The layers before the first with parameters only form input gradients: not run.
            stop = next((i for i, layer in enumerate(layers) if has_parameters(layer)), len(layers))
        for i in range(len(layers) - 1, stop - 1, -1):
            dy = layers[i]._chain_backward(backend, dy, values[i], values[i + 1],  # type: ignore[attr-defined]
                                           saved[i], need_input_grad or i > stop)
        return dy if need_input_grad else None

    return x, backward


def has_parameters(module: Module) -> bool:
    """Whether ``module`` or any module inside it holds a parameter."""
    return bool(module._params) or any(has_parameters(child) for child in module._children.values())
