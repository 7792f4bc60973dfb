"""Inverted dropout."""

from __future__ import annotations

from typing import Any

from ..backend.base import Array
from ..backend.dropout_hash import stream
from ..rng import check_seed
from .module import (
    Backward,
    Module,
    check_grad_shape,
    input_backend,
    input_grad_optional,
)


@input_grad_optional
def _identity(dy: Array, *, need_input_grad: bool = True) -> Array | None:
    return dy if need_input_grad else None


class Dropout(Module):
    """Training: ``y = x * m / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)``, and ``dx = dy * m / (1 - p)``;
    inference: ``y = x``. The same as PyTorch's ``nn.Dropout``.

    ``m`` is a pure function of ``(seed, calls, element index)`` (the counter-based hash of
    ``deepcore/backend/dropout_hash.py``), so every backend draws the same masks and a run resumed
    from the extra state ``{"seed", "calls"}``, on any backend, continues the same sequence."""

    def __init__(self, p: float = 0.5, *, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = check_seed(seed, "Dropout")
        #: Training calls so far; the mask of call k depends only on (seed, k), so a
        #: checkpoint that stores this counter resumes the same sequence of masks.
        self.calls = 0

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = check_seed(state["seed"], "Dropout")
        self.calls = int(state["calls"])

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        backend = input_backend(self, x)
        if not train or self.p == 0.0:
            return x, _identity
        shape = tuple(x.shape)
        mask = backend.dropout_mask(stream(self.seed, self.calls), shape, self.p, dtype=x.dtype,
                                    device=backend.device(x))
        self.calls += 1

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, shape)
            return dy * mask if need_input_grad else None

        return x * mask, backward
