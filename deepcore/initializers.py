"""Weight initialisers for ``nn.Linear``, drawn on the host from a seeded NumPy generator.

Drawing on the host makes a seed give the same initial weights on every
backend; initialisation happens once, so its speed does not matter.
An initialiser is ``f(rng, shape, fan_in, fan_out) -> numpy.ndarray``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Initializer = Callable[[np.random.Generator, tuple[int, ...], int, int], np.ndarray]


def pytorch_default(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    """PyTorch's ``nn.Linear`` default for weight and bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape)


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    """He (Kaiming) normal for ReLU networks: ``N(0, 2/fan_in)``."""
    return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)


def xavier_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    """Glorot/Xavier uniform: ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def zeros(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    return np.zeros(shape)


#: name -> (weight initialiser, bias initialiser)
SCHEMES: dict[str, tuple[Initializer, Initializer]] = {
    "pytorch": (pytorch_default, pytorch_default),
    "he": (he_normal, zeros),
    "xavier": (xavier_uniform, zeros),
    "zeros": (zeros, zeros),
}


def initializers_for(init: str | Initializer, owner: str) -> tuple[Initializer, Initializer]:
    """``(weight initializer, bias initializer)`` for a scheme name; a callable gets zero biases."""
    if callable(init):
        return init, zeros
    if init not in SCHEMES:
        raise ValueError(f"{owner}: init must be one of {sorted(SCHEMES)} or a callable, got {init!r}")
    return SCHEMES[init]
