"""Layers in closure style: ``y, backward = layer.forward(x, train=True)``; ``dx = backward(dy)``."""

from .activations import LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .batchnorm import BatchNorm1d
from .containers import Flatten, Sequential
from .dropout import Dropout
from .linear import Linear
from .module import Module, ModuleSnapshot, Param

__all__ = [
    "BatchNorm1d",
    "Dropout",
    "Flatten",
    "LeakyReLU",
    "Linear",
    "Module",
    "ModuleSnapshot",
    "Param",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
]
