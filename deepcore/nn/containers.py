"""Composition: ``Sequential`` chains layers, ``Flatten`` reshapes between them."""

from __future__ import annotations

from collections.abc import Iterator

from ..backend import get_backend
from ..backend.base import Array
from ..backend.registry import _by_type as _BACKEND_BY_TYPE
from ..backend.registry import backend_or_none
from .chain import has_parameters, run_chain
from .module import (
    INPUT_GRAD_OPTIONAL,
    Backward,
    Module,
    check_grad_shape,
    inner_forward,
    input_grad_optional,
    takes_input_grad_flag,
)


class Sequential(Module):
    """``y = f_n(...f_2(f_1(x)))``; backward runs the layers' closures in reverse (the chain rule)."""

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            self.append(layer, _index=i)

    def append(self, layer: Module, *, _index: int | None = None) -> Sequential:
        if not isinstance(layer, Module):
            i = len(self) if _index is None else _index
            raise TypeError(f"Sequential: layer {i} must be a deepcore.nn.Module, got {type(layer).__name__}")
        setattr(self, str(len(self._children)), layer)
        return self

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._children.values())

    def __getitem__(self, i: int) -> Module:
        return list(self._children.values())[i]

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        layers = list(self._children.values())
        backend = _BACKEND_BY_TYPE.get(type(x)) or backend_or_none(x)
        if backend is not None and backend.single_device and backend.is_floating(x):
            chained = run_chain(layers, backend, x)  # Linear and activations only: one loop, one closure
            if chained is not None:
                return chained
        backwards = []
        for layer in layers:
            x, back = inner_forward(layer, x, train)
            backwards.append(back)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            if need_input_grad:
                for back in reversed(backwards):
                    dy = back(dy)
                return dy
            # Without dL/dx, layers before the first one that must run (one with parameters, or
            # one whose closure cannot skip its input gradient) are not run at all, and that
            # layer is asked not to form its own dL/dx.
            first = _first_that_must_run(layers, backwards)
            if first is None:
                return None
            for i in range(len(backwards) - 1, first, -1):
                dy = backwards[i](dy)
            if takes_input_grad_flag(backwards[first]):
                backwards[first](dy, need_input_grad=False)
            else:
                backwards[first](dy)
            return None

        return x, backward


def _first_that_must_run(layers: list[Module], backwards: list[Backward]) -> int | None:
    for i, layer in enumerate(layers):
        if not getattr(backwards[i], INPUT_GRAD_OPTIONAL, False) or has_parameters(layer):
            return i
    return None


class Flatten(Module):
    """Reshape (N, d1, d2, ...) to (N, d1*d2*...) for ``start_dim=1``; backward restores the shape."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = get_backend(x)
        shape = tuple(x.shape)
        nd = len(shape)
        start = self.start_dim + nd if self.start_dim < 0 else self.start_dim
        end = self.end_dim + nd if self.end_dim < 0 else self.end_dim
        if not 0 <= start <= end < max(nd, 1):
            raise ValueError(
                f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim}) does not fit input x of shape {shape}"
            )
        flat = 1
        for d in shape[start:end + 1]:
            flat *= d
        out_shape = shape[:start] + (flat,) + shape[end + 1:]
        y = backend.xp.reshape(x, out_shape)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, out_shape)
            return backend.xp.reshape(dy, shape) if need_input_grad else None

        return y, backward


class Residual(Module):
    """``y = block(x) + shortcut(x)``, the shortcut the identity when None (ResNet's skip connection).

    Backward: ``dx = block'(dy) + shortcut'(dy)`` (``dy`` itself for the identity); both branches add
    their parameters' gradients.
    """

    def __init__(self, block: Module, shortcut: Module | None = None) -> None:
        super().__init__()
        if not isinstance(block, Module):
            raise TypeError(f"Residual: block must be a deepcore.nn.Module, got {type(block).__name__}")
        if shortcut is not None and not isinstance(shortcut, Module):
            raise TypeError(f"Residual: shortcut must be a deepcore.nn.Module or None, got {type(shortcut).__name__}")
        self.block = block
        self.shortcut = shortcut

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        y, block_back = inner_forward(self.block, x, train)
        if self.shortcut is None:
            skip, skip_back = x, None
        else:
            skip, skip_back = inner_forward(self.shortcut, x, train)
        if tuple(y.shape) != tuple(skip.shape):
            what = "the input" if self.shortcut is None else "the shortcut's output"
            raise ValueError(f"Residual: the block's output has shape {tuple(y.shape)} but {what} has shape "
                             f"{tuple(skip.shape)}; give a shortcut that maps x to the block's output shape")
        out = y + skip
        out_shape = tuple(out.shape)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, out_shape)
            if not need_input_grad:
                for back in (block_back, skip_back):
                    if back is not None:
                        if takes_input_grad_flag(back):
                            back(dy, need_input_grad=False)
                        else:
                            back(dy)
                return None
            dx = block_back(dy)
            return dx + (dy if skip_back is None else skip_back(dy))

        return out, backward
