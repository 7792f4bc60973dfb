"""Mixed precision: forward and backward in float16/bfloat16, float32 master weights for the optimizer.

A step under :class:`HalfWeights` is

1. every floating parameter's float32 value (the master) is cast to the half type and put in the
   model for the step, so the forward pass and its closures compute in the half type;
2. the backward pass adds half-precision gradients into ``Param.grad``;
3. on leaving, each parameter gets its master back, and its gradient cast to float32, so the
   optimizer (and a loss scaler's unscaling, and gradient clipping) work on float32 arrays.

Buffers (BatchNorm's running statistics) stay float32; BatchNorm and softmax-cross-entropy compute
in float32 inside. This is Chainer's ``use_fp32_update`` and PyTorch's autocast-with-float32-weights
as one explicit step, without a tape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .backend import Backend
from .backend.base import Array
from .nn.module import Module

#: ``fit(precision=...)`` / ``--precision``: the name and the dtype the step computes in.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_precision(precision: Any, fn: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


class HalfWeights:
    """``with HalfWeights(model, "float16", backend):`` runs the body on half-precision copies of the
    float32 parameters; afterwards parameters hold their masters again and float32 gradients."""

    def __init__(self, model: Module, dtype_name: str, backend: Backend) -> None:
        self.backend = backend
        self.dtype = backend.dtype_from_name(dtype_name)
        self.params = [p for p in model.parameters() if backend.is_floating(p.value)]
        for p in self.params:
            if backend.dtype_name(p.value.dtype) != "float32":
                raise TypeError(f"mixed precision keeps float32 master weights, but parameter {p.name!r} is "
                                f"{backend.dtype_name(p.value.dtype)}; build the model in float32")

    def cast_input(self, x: Array) -> Array:
        """A floating batch in the step's half type (labels and other integers unchanged)."""
        return self.backend.astype(x, self.dtype) if self.backend.is_floating(x) else x

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        backend = self.backend
        masters = [p.value for p in self.params]
        old_grads = [p.grad for p in self.params]
        for p in self.params:
            p.value = backend.astype(p.value, self.dtype)
            # Gradients accumulate in the half type during the step and are added to any float32
            # gradient already there (gradient accumulation) when the step ends.
            p.grad = None
        try:
            yield
        finally:
            for p, master, old in zip(self.params, masters, old_grads, strict=True):
                p.value = master
                new = None if p.grad is None else backend.astype(p.grad, master.dtype)
                if old is None:
                    p.grad = new
                elif new is None:
                    p.grad = old
                else:
                    p.grad = backend.add_into(old, new)
