"""RMSprop and Adagrad with PyTorch's update rules (``torch.optim.RMSprop`` / ``Adagrad``, foreach off).

The arithmetic is ``Backend.rmsprop_update`` / ``adagrad_update`` (NumPy in place with ``out=``,
anything else through the array-API reference); groups, checked steps and state dicts come from
:class:`~deepcore.optim.optimizers.Optimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..backend import Backend
from ..backend.base import Array
from ..nn.module import Param
from .checks import learning_rate, real
from .groups import ParamGroup
from .optimizers import Optimizer

__all__ = ["Adagrad", "RMSprop"]


def _non_negative(h: Mapping[str, Any], name: str, fn: str) -> float:
    return real(h[name], name, fn, ">= 0", lambda x: x >= 0)


class RMSprop(Optimizer):
    """RMSprop as ``torch.optim.RMSprop``: ``g += wd·p``; ``s = α·s + (1-α)·g²``; ``avg = sqrt(s) + eps``
    (centered: ``ḡ += (1-α)(g - ḡ)``, ``avg = sqrt(s - ḡ²) + eps``); with momentum ``b = μ·b + g/avg``,
    ``p -= lr·b``, else ``p -= lr·g/avg``. State: ``step``, ``square_avg``, and ``momentum_buffer`` /
    ``grad_avg`` once momentum / centering is on (zeros when first needed, as PyTorch starts them)."""

    HYPERPARAMS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    STATE_ARRAYS = ("square_avg", "momentum_buffer", "grad_avg")
    STATE_INTS = ("step",)
    STATE_OPTIONAL = ("momentum_buffer", "grad_avg")

    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], lr: float = 0.01, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any], fn: str | None = None) -> dict[str, Any]:
        fn = fn or cls.__name__
        centered = h["centered"]
        if not isinstance(centered, (bool, np.bool_)):
            raise TypeError(f"{fn}: centered must be True or False, got {centered!r}")
        return {
            "lr": learning_rate(h["lr"], fn),
            "alpha": _non_negative(h, "alpha", fn),
            "eps": _non_negative(h, "eps", fn),
            "weight_decay": _non_negative(h, "weight_decay", fn),
            "momentum": _non_negative(h, "momentum", fn),
            "centered": bool(centered),
        }

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any], group: ParamGroup) -> None:
        xp = backend.xp
        if not state:
            state.update(step=0, square_avg=xp.zeros_like(p.value))
        momentum, centered = group["momentum"], group["centered"]
        if momentum > 0.0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = xp.zeros_like(p.value)
        if centered and "grad_avg" not in state:
            state["grad_avg"] = xp.zeros_like(p.value)
        state["step"] += 1
        p.value, state["square_avg"], grad_avg, buf = backend.rmsprop_update(
            p.value, grad, state["square_avg"], state.get("grad_avg"), state.get("momentum_buffer"), lr=group["lr"],
            alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"], momentum=momentum,
            centered=centered,
        )
        if grad_avg is not None:
            state["grad_avg"] = grad_avg
        if buf is not None:
            state["momentum_buffer"] = buf


class Adagrad(Optimizer):
    """Adagrad as ``torch.optim.Adagrad``: ``g += wd·p``; ``clr = lr / (1 + (t-1)·lr_decay)``;
    ``sum += g²`` (``sum`` starting at ``initial_accumulator_value``); ``p -= clr·g / (sqrt(sum) + eps)``,
    ``t`` counted per parameter."""

    HYPERPARAMS = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    STATE_ARRAYS = ("sum",)
    STATE_INTS = ("step",)

    lr_decay: float
    weight_decay: float
    initial_accumulator_value: float
    eps: float

    def __init__(self, params: Iterable[Param] | Iterable[Mapping[str, Any]], lr: float = 0.01,
                 lr_decay: float = 0.0, weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10) -> None:
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps)

    @classmethod
    def _check_hyperparams(cls, h: Mapping[str, Any], fn: str | None = None) -> dict[str, Any]:
        fn = fn or cls.__name__
        return {
            "lr": learning_rate(h["lr"], fn),
            "lr_decay": _non_negative(h, "lr_decay", fn),
            "weight_decay": _non_negative(h, "weight_decay", fn),
            "initial_accumulator_value": _non_negative(h, "initial_accumulator_value", fn),
            "eps": _non_negative(h, "eps", fn),
        }

    def _update(self, p: Param, backend: Backend, grad: Array, state: dict[str, Any], group: ParamGroup) -> None:
        if not state:
            xp = backend.xp
            start = group["initial_accumulator_value"]
            state.update(step=0, sum=xp.full_like(p.value, start) if start else xp.zeros_like(p.value))
        state["step"] += 1
        p.value, state["sum"] = backend.adagrad_update(
            p.value, grad, state["sum"], step=state["step"], lr=group["lr"], lr_decay=group["lr_decay"],
            eps=group["eps"], weight_decay=group["weight_decay"],
        )
