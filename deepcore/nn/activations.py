"""Elementwise activations and softmax, each with its analytic derivative."""

from __future__ import annotations

from ..backend import Backend
from ..backend.base import Array
from ..backend.registry import _by_type as _BACKEND_BY_TYPE
from .chain import chainable
from .module import (
    Backward,
    Module,
    check_grad_shape,
    input_backend,
)


@chainable
class _Activation(Module):
    """Shared closure plumbing: subclasses give ``_f(backend, x)`` and ``_df(backend, dy, x, y)``."""

    def _f(self, backend: Backend, x: Array) -> Array:
        raise NotImplementedError

    def _df(self, backend: Backend, dy: Array, x: Array, y: Array) -> Array:
        raise NotImplementedError

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = _BACKEND_BY_TYPE.get(type(x))
        if not (backend is not None and backend.single_device and backend.is_floating(x)):
            backend = input_backend(self, x)
        y = self._f(backend, x)
        shape = tuple(x.shape)
        df = self._df

        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            if dy.shape != shape:
                check_grad_shape(self, dy, shape)
            return df(backend, dy, x, y) if need_input_grad else None

        backward.deepcore_input_grad_optional = True  # type: ignore[attr-defined]  # input_grad_optional
        return y, backward

    #: An activation's backward may read its output (``_df`` gets ``y``): the next layer keeps off it.
    _chain_output_owned = False

    def _chain_forward(self, backend: Backend, x: Array, owned: bool) -> tuple[Array, None]:
        """``(f(x), None)`` in a chain (see :mod:`deepcore.nn.chain`): ``_f``, as ``forward``."""
        return self._f(backend, x), None

    def _chain_backward(self, backend: Backend, dy: Array, x: Array, y: Array, saved: None,
                        need_dx: bool) -> Array | None:
        return self._df(backend, dy, x, y) if need_dx else None


class ReLU(_Activation):
    """``y = max(0, x)``; ``dy/dx = [x > 0] = [y > 0]``."""

    def _f(self, backend: Backend, x: Array) -> Array:
        return backend.relu(x)

    def _df(self, backend: Backend, dy: Array, x: Array, y: Array) -> Array:
        # The mask from y, which is x's ([max(0, x) > 0] = [x > 0], NaN included): the chain may
        # have written y over x.
        return backend.relu_backward(dy, y)

    def _chain_forward(self, backend: Backend, x: Array, owned: bool) -> tuple[Array, None]:
        """``max(0, x)``, written over ``x`` when the chain owns it (see :mod:`deepcore.nn.chain`)."""
        if owned and type(self)._f is ReLU._f and type(self)._df is ReLU._df:  # (a subclass's own math: its own)
            return backend.relu_inplace(x), None
        return self._f(backend, x), None


class LeakyReLU(_Activation):
    """``y = x`` for ``x > 0``, ``negative_slope * x`` otherwise."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(f"LeakyReLU: negative_slope must be a number, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"

    def _f(self, backend: Backend, x: Array) -> Array:
        return backend.leaky_relu(x, self.negative_slope)

    def _df(self, backend: Backend, dy: Array, x: Array, y: Array) -> Array:
        return backend.leaky_relu_backward(dy, x, self.negative_slope)


class Sigmoid(_Activation):
    """``σ(x) = 1/(1 + e^{-x})``; ``σ' = σ (1 - σ)``."""

    def _f(self, backend: Backend, x: Array) -> Array:
        return backend.sigmoid(x)

    def _df(self, backend: Backend, dy: Array, x: Array, y: Array) -> Array:
        return backend.sigmoid_backward(dy, y)


class Tanh(_Activation):
    """``y = tanh(x)``; ``dy/dx = 1 - y^2``."""

    def _f(self, backend: Backend, x: Array) -> Array:
        return backend.tanh(x)

    def _df(self, backend: Backend, dy: Array, x: Array, y: Array) -> Array:
        return backend.tanh_backward(dy, y)


class Softmax(_Activation):
    """``p_k = e^{x_k} / sum_j e^{x_j}`` along ``axis``; backward applies the full Jacobian
    ``D_ab = p_a (δ_ab - p_b)`` as ``dx = p (dy - sum(dy p))``, never forming the C x C matrix."""

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Softmax: axis must be an int, got {axis!r}")
        self.axis = axis

    def extra_repr(self) -> str:
        return f"axis={self.axis}"

    def _f(self, backend: Backend, x: Array) -> Array:
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"Softmax: axis {self.axis} is out of range for input x of shape {tuple(x.shape)}")
        return backend.softmax(x, axis=self.axis)

    def _df(self, backend: Backend, dy: Array, x: Array, y: Array) -> Array:
        return backend.softmax_backward(dy, y, axis=self.axis)
