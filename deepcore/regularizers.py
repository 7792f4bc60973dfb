"""Weight penalties ``λ R(W)`` for ``L = (1/N) sum L_i + λ R(W)``, and the max-norm constraint.

A penalty adds its value to the loss and its gradient ``λ dR/dW`` into each
regularised ``Param.grad``; call it after the backward pass, before the
optimizer step::

    y, backward = model.forward(x, train=True)
    loss, dy = dc.losses.softmax_cross_entropy(y, labels)
    opt.zero_grad(); backward(dy)
    loss = loss + reg(model.parameters())   # adds λ dR/dW into the grads, returns λ R(W)
    opt.step()
    max_norm.project(model.parameters())    # the constraint comes after the step

By default only weights are regularised (``param.value.ndim >= 2``: Linear
weights; not biases, not BatchNorm's scale and shift); pass
``applies_to=callable(Param) -> bool`` to choose otherwise. Everything runs in
the parameters' own namespace with standard array-API functions, without
host synchronisation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from .backend import get_backend
from .backend.base import Array, Backend
from .nn.module import Module, Param

__all__ = ["L1", "L2", "ElasticNet", "MaxNorm", "Regularizer", "weights_only"]

Params = Iterable[Param] | Module


def weights_only(param: Param) -> bool:
    """The default selection: parameters with at least two dimensions (weights, not biases)."""
    return param.value.ndim >= 2


def _non_negative(value: Any, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_applies_to(applies_to: Any, owner: str) -> Callable[[Param], bool]:
    if applies_to is None:
        return weights_only
    if not callable(applies_to):
        raise TypeError(f"{owner}: applies_to must be a callable(Param) -> bool or None, got {applies_to!r}")
    return applies_to


def _select(params: Params, applies_to: Callable[[Param], bool], owner: str) -> tuple[list[Param], list[Param]]:
    """(all params, the selected ones); a Module stands for its parameters."""
    items = params.parameters() if isinstance(params, Module) else list(params)
    for i, p in enumerate(items):
        if not isinstance(p, Param):
            raise TypeError(f"{owner}: params must be Param objects (e.g. model.parameters()), "
                            f"item {i} is {type(p).__name__}")
    return items, [p for p in items if applies_to(p)]


class Regularizer:
    """A penalty ``λ R(W)`` summed over the selected parameters.

    Subclasses define ``_r(xp, w)`` (``R`` of one array, 0-d) and ``_dr(xp, w)`` (``dR/dW``).
    """

    def __init__(self, lam: float, *, applies_to: Callable[[Param], bool] | None = None) -> None:
        self.lam = _non_negative(lam, "lam", type(self).__name__)
        self.applies_to = _check_applies_to(applies_to, type(self).__name__)

    def _r(self, xp: Any, w: Array) -> Array:
        raise NotImplementedError

    def _dr(self, xp: Any, w: Array) -> Array:
        raise NotImplementedError

    def penalty(self, params: Params) -> Array:
        """``λ R(W)`` over the selected parameters: a 0-d array of their namespace (no host sync).

        With nothing selected it is a zero of the first parameter's namespace and dtype (or of the
        default backend when ``params`` is empty).
        """
        items, selected = _select(params, self.applies_to, type(self).__name__)
        total: Array | None = None
        for p in selected:
            backend = get_backend(p.value)
            # Half precision sums of squares overflow early: sum in float32 (compute_dtype).
            w = backend.astype(p.value, backend.compute_dtype(p.value.dtype))
            term = self._r(backend.xp, w)
            total = term if total is None else total + term
        if total is None:
            backend = get_backend(items[0].value) if items else get_backend()
            dtype = items[0].value.dtype if items else backend.default_float()
            device = backend.device(items[0].value) if items else None
            return backend.xp.zeros((), dtype=dtype, device=device)
        return total * self.lam

    def add_gradient(self, params: Params) -> None:
        """Add ``λ dR/dW`` into each selected ``Param.grad`` (created, in the param's dtype, when None)."""
        _, selected = _select(params, self.applies_to, type(self).__name__)
        # Compute every gradient before touching any Param, so an error leaves all grads as they were.
        updates: list[tuple[Param, Array, Backend]] = []
        for p in selected:
            backend = get_backend(p.value)
            updates.append((p, self._dr(backend.xp, p.value) * self.lam, backend))
        for p, g, backend in updates:
            p.accumulate_grad(g, backend)

    def __call__(self, params: Params) -> Array:
        """``add_gradient(params)`` and return ``penalty(params)``."""
        params = params if isinstance(params, Module) else list(params)  # a generator is read twice below
        value = self.penalty(params)
        self.add_gradient(params)
        return value

    def _args(self) -> str:
        return f"lam={self.lam}"

    def __repr__(self) -> str:
        extra = "" if self.applies_to is weights_only else f", applies_to={self.applies_to!r}"
        return f"{type(self).__name__}({self._args()}{extra})"


class L2(Regularizer):
    """``R = sum W²``, ``dR/dW = 2W``.

    PyTorch's ``SGD(..., weight_decay=wd)`` adds ``wd * W`` to the gradient, which is
    ``L2(lam=wd / 2)`` here (and it decays biases too unless they are in another group).
    """

    def _r(self, xp: Any, w: Array) -> Array:
        return xp.sum(w * w)

    def _dr(self, xp: Any, w: Array) -> Array:
        return w * 2.0


class L1(Regularizer):
    """``R = sum |W|``, ``dR/dW = sign(W)`` (0 at 0, the subgradient PyTorch's ``abs`` uses)."""

    def _r(self, xp: Any, w: Array) -> Array:
        return xp.sum(xp.abs(w))

    def _dr(self, xp: Any, w: Array) -> Array:
        return xp.sign(w)


class ElasticNet(Regularizer):
    """The course's elastic net: ``R = sum (β W² + |W|)``, ``dR/dW = 2βW + sign(W)``."""

    def __init__(self, lam: float, beta: float, *, applies_to: Callable[[Param], bool] | None = None) -> None:
        super().__init__(lam, applies_to=applies_to)
        self.beta = _non_negative(beta, "beta", "ElasticNet")

    def _r(self, xp: Any, w: Array) -> Array:
        return xp.sum(w * w) * self.beta + xp.sum(xp.abs(w))

    def _dr(self, xp: Any, w: Array) -> Array:
        return w * (2.0 * self.beta) + xp.sign(w)

    def _args(self) -> str:
        return f"lam={self.lam}, beta={self.beta}"


class MaxNorm:
    """Max-norm constraint ``||w_j||_2 <= c``: after each optimizer step, ``project(params)``
    rescales every slice that is too long to norm ``c`` and leaves the others unchanged.

    ``axis`` (an int or tuple) is what the norm runs over: the default 1 makes ``w_j`` row ``j``
    of a Linear weight (out, in), the incoming weights of unit ``j``.
    """

    def __init__(self, c: float, axis: int | tuple[int, ...] = 1, *,
                 applies_to: Callable[[Param], bool] | None = None) -> None:
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise TypeError(f"MaxNorm: c must be a real number, got {c!r}")
        if not math.isfinite(c) or c <= 0:
            raise ValueError(f"MaxNorm: c must be a finite number > 0, got {c!r}")
        axes = axis if isinstance(axis, tuple) else (axis,)
        if not axes or any(isinstance(a, bool) or not isinstance(a, int) for a in axes):
            raise TypeError(f"MaxNorm: axis must be an int or a non-empty tuple of ints, got {axis!r}")
        self.c = float(c)
        self.axis = axis
        self._axes = axes
        self.applies_to = _check_applies_to(applies_to, "MaxNorm")

    def project(self, params: Params) -> None:
        """Rescale, in each selected parameter, the slices whose L2 norm exceeds ``c`` to norm ``c``."""
        _, selected = _select(params, self.applies_to, "MaxNorm")
        # Check every parameter and compute every new value first: a bad axis changes nothing.
        new_values: list[tuple[Param, Array]] = []
        for p in selected:
            ndim = p.value.ndim
            if any(not -ndim <= a < ndim for a in self._axes):
                raise ValueError(f"MaxNorm: axis {self.axis!r} is out of range for parameter {p.name!r} "
                                 f"of shape {p.shape}")
            backend = get_backend(p.value)
            xp = backend.xp
            w = backend.astype(p.value, backend.compute_dtype(p.value.dtype))
            norm = xp.sqrt(xp.sum(w * w, axis=self._axes, keepdims=True))
            # c / max(norm, c) is exactly 1 where norm <= c (those slices keep their bits)
            # and c / norm elsewhere; it never divides by zero since c > 0.
            scale = self.c / xp.maximum(norm, xp.full_like(norm, self.c))
            new_values.append((p, backend.astype(w * scale, p.value.dtype)))
        for p, value in new_values:
            p.value = value

    __call__ = project

    def __repr__(self) -> str:
        extra = "" if self.applies_to is weights_only else f", applies_to={self.applies_to!r}"
        return f"MaxNorm(c={self.c}, axis={self.axis!r}{extra})"
