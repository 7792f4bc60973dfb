"""The affine layer ``y = x W^T + b``."""

from __future__ import annotations

from typing import Any

from .. import initializers as _init
from .._checks import check_int
from ..backend import Backend, get_backend
from ..backend.base import Array
from ..backend.registry import _by_type as _BACKEND_BY_TYPE
from ..rng import check_seed, host_generator
from .chain import chainable
from .module import (
    Backward,
    Module,
    Param,
    check_grad_shape,
    input_backend,
)


@chainable
class Linear(Module):
    """``y = x W^T + b`` with ``W`` of shape (out_features, in_features), as in PyTorch.

    Gradients: ``dL/dx = dy W``, ``dL/dW = dy^T x``, ``dL/db = sum_n dy``.
    ``init`` is ``"pytorch"`` (default, ``U(±1/sqrt(in))``), ``"he"``, ``"xavier"``,
    ``"zeros"`` or ``f(rng, shape, fan_in, fan_out) -> ndarray``. Parameters are
    created on the current default backend (see ``deepcore.use_backend``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Any = "pytorch", *,
                 seed: int | None = None, dtype: Any = "float32") -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", "Linear", 1)
        self.out_features = check_int(out_features, "out_features", "Linear", 1)
        w_init, b_init = _init.initializers_for(init, "Linear")
        backend = get_backend()
        dt = backend.dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        rng = host_generator(check_seed(seed, "Linear"))
        shape = (self.out_features, self.in_features)
        self.weight = Param(backend.from_numpy(w_init(rng, shape, *shape[::-1]), dtype=dt), "weight")
        self.bias = (
            Param(backend.from_numpy(b_init(rng, (self.out_features,), *shape[::-1]), dtype=dt), "bias")
            if bias else None
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        weight, bias = self.weight, self.bias
        array_type = type(x)
        backend = _BACKEND_BY_TYPE.get(array_type)
        # The usual case in a look-up and three identity tests; anything else is checked in full.
        if not (backend is not None and backend.single_device and type(weight.value) is array_type
                and (bias is None or type(bias.value) is array_type) and backend.is_floating(x)):
            backend = input_backend(self, x, *((weight,) if bias is None else (weight, bias)))
        in_features = self.in_features
        if x.ndim == 0 or x.shape[-1] != in_features:
            raise ValueError(
                f"Linear({in_features}, {self.out_features}): input x must have shape (..., {in_features}), "
                f"got {tuple(x.shape)}"
            )
        in_shape = tuple(x.shape)
        flat = len(in_shape) == 2
        x2 = x if flat else backend.xp.reshape(x, (-1, in_features))
        y = backend.linear(x2, weight.value, None if bias is None else bias.value)
        out_shape = in_shape[:-1] + (self.out_features,)

        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            if dy.shape != out_shape:
                check_grad_shape(self, dy, out_shape)
            dy2 = dy if flat else backend.xp.reshape(dy, (-1, self.out_features))
            dx = self._chain_backward(backend, dy2, x2, None, (weight, bias), need_input_grad)
            if dx is None or flat:
                return dx
            return backend.xp.reshape(dx, in_shape)

        backward.deepcore_input_grad_optional = True  # type: ignore[attr-defined]  # input_grad_optional
        return (y if flat else backend.xp.reshape(y, out_shape)), backward

    #: The chain's next layer may write over this layer's output: a new array, which the backward
    #: (``dy W``, ``dy^T x``) never reads.
    _chain_output_owned = True

    def _chain_forward(self, backend: Backend, x: Array, owned: bool) -> tuple[Array, Any] | None:
        """``(x W^T + b, the parameters)`` for a 2-D ``x`` of ``in_features`` columns on the
        parameters' backend (see :mod:`deepcore.nn.chain`); None for any other input, which
        ``forward`` checks."""
        weight, bias = self.weight, self.bias
        array_type = type(x)
        if (x.ndim != 2 or x.shape[1] != self.in_features or type(weight.value) is not array_type
                or (bias is not None and type(bias.value) is not array_type)):
            return None
        return backend.linear(x, weight.value, None if bias is None else bias.value), (weight, bias)

    def _chain_backward(self, backend: Backend, dy: Array, x: Array, y: Array | None, params: Any,
                        need_dx: bool) -> Array | None:
        """Add ``dy^T x`` to the gradient of the forward's weight and ``sum_n dy`` to its bias's
        (``params``, those the forward used); ``dy W`` if ``need_dx``."""
        weight, bias = params
        dx, dw, db = backend.linear_backward(dy, x, weight.value, need_dx=need_dx, need_bias=bias is not None)
        weight.accumulate_grad(dw, backend)
        if bias is not None:
            bias.accumulate_grad(db, backend)
        return dx
