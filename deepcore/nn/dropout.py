"""Inverted dropout."""

from __future__ import annotations

from typing import Any

from ..backend.base import Array
from ..rng import check_seed
from .module import Backward, Module, check_grad_shape, input_backend


def _identity(dy: Array) -> Array:
    return dy


class Dropout(Module):
    """Training: ``y = x * m / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)``, and ``dx = dy * m / (1 - p)``;
    inference: ``y = x``. The same as PyTorch's ``nn.Dropout``."""

    def __init__(self, p: float = 0.5, *, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = check_seed(seed, "Dropout")
        self._rngs: dict[str, Any] = {}

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = input_backend(self, x)
        if not train or self.p == 0.0:
            return x, _identity
        rng = self._rngs.get(backend.name)
        if rng is None:
            rng = self._rngs[backend.name] = backend.make_rng(self.seed)
        mask = backend.dropout_mask(rng, tuple(x.shape), self.p, dtype=x.dtype, device=backend.device(x))
        shape = tuple(x.shape)

        def backward(dy: Array) -> Array:
            check_grad_shape(self, dy, shape)
            return dy * mask

        return x * mask, backward
