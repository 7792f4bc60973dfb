"""Layers in closure style: ``y, backward = layer.forward(x, train=True)``; ``dx = backward(dy)``."""

from .activations import LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d
from .containers import Flatten, Residual, Sequential
from .conv import Conv2d
from .dropout import Dropout
from .linear import Linear
from .module import Module, ModuleSnapshot, Param
from .pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d

__all__ = [
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2d",
    "LeakyReLU",
    "Linear",
    "MaxPool2d",
    "Module",
    "ModuleSnapshot",
    "Param",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
]
