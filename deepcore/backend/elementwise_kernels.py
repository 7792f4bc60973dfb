"""Bodies of the CuPy ``ElementwiseKernel`` s the CUDA backend fuses its elementwise passes into.

Each is plain data here (no CuPy import), so ``cupy_backend`` builds the kernels from it on a
GPU and the CPU emulator (tools/cuda_emulator/elementwise.py) compiles the very same bodies
for the tests on machines without one. One kernel reads and writes each element once where
the array-API reference makes several passes and temporaries (``sigmoid``: five).

CuPy's rules for these strings: ``T`` is the arrays' dtype; a Python-float scalar passed for
a ``T`` parameter is cast to ``T`` (as PyTorch casts its scalar arguments to the tensor's
dtype); output parameters are references, so an output that is also read updates in place;
the names ``n``, ``i`` and any leading underscore are reserved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ACTIVATIONS", "ALL", "OPTIMIZERS", "RANDOM", "ElementwiseSpec", "adam_update", "dropout_mask",
           "sgd_update"]


@dataclass(frozen=True)
class ElementwiseSpec:
    name: str
    in_params: str
    out_params: str
    body: str
    math: str  # what it computes, for readers and error messages

    def params(self) -> list[tuple[str, str, bool]]:
        """``(type, name, is_output)`` for every parameter, inputs first."""
        out = []
        for text, is_output in ((self.in_params, False), (self.out_params, True)):
            for param in filter(None, (p.strip() for p in text.split(","))):
                ctype, name = param.rsplit(" ", 1)
                out.append((ctype.strip(), name, is_output))
        return out


# ------------------------------------------------------------------ optimizers
# PyTorch's single-tensor rules, in its order of floating-point operations (see
# Backend.sgd_update / adam_update, the reference these are tested against).

SGD = ElementwiseSpec(
    "deepcore_sgd", "T g, T lr, T weight_decay", "T p",
    """
    T d = g;
    if (weight_decay != 0) d = d + weight_decay * p;
    p = p - lr * d;
    """,
    # The wd != 0 test keeps an inf parameter from making NaN through 0 * inf.
    "p -= lr (g + wd p)",
)

SGD_MOMENTUM = ElementwiseSpec(
    "deepcore_sgd_momentum",
    "T g, T lr, T weight_decay, T momentum, T one_minus_dampening, int32 nesterov, int32 first",
    "T p, T buf",
    """
    T d = g;
    if (weight_decay != 0) d = d + weight_decay * p;
    T b = first ? d : buf * momentum + one_minus_dampening * d;
    buf = b;
    if (nesterov) d = d + momentum * b; else d = b;
    p = p - lr * d;
    """,
    "buf = d on the first step else momentum buf + (1-dampening) d; p -= lr (d + momentum buf if nesterov else buf)",
)

ADAM = ElementwiseSpec(
    "deepcore_adam",
    "T g, T l2, T decay, T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T step_size, T bc2_sqrt",
    "T p, T m, T v",
    """
    T d = g;
    if (l2 != 0) d = d + l2 * p;
    p = p * decay;
    m = m + one_minus_beta1 * (d - m);
    v = v * beta2 + one_minus_beta2 * d * d;
    p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps);
    """,
    # l2 is Adam's weight decay (0 for AdamW), decay AdamW's 1 - lr wd (1 for Adam).
    "m += (1-b1)(d - m); v = b2 v + (1-b2) d^2; p -= step_size m / (sqrt(v)/sqrt(1-b2^t) + eps)",
)

# ----------------------------------------------------------------- activations
# NaN in, NaN out, as in the reference: `x < 0 ? 0 : x` keeps a NaN where `x > 0 ? x : 0` would not,
# and `+ 0` turns -0.0 into +0.0 as the reference's maximum(x, 0) does.

RELU = ElementwiseSpec("deepcore_relu", "T x", "T y", "y = x < (T)0 ? (T)0 : x + (T)0;", "y = max(x, 0)")

RELU_BACKWARD = ElementwiseSpec(
    "deepcore_relu_backward", "T dy, T x", "T dx", "dx = x > (T)0 ? dy : (T)0;", "dx = dy [x > 0]")

LEAKY_RELU = ElementwiseSpec(
    "deepcore_leaky_relu", "T x, T slope", "T y", "y = x > (T)0 ? x : x * slope;", "y = x if x > 0 else slope x")

LEAKY_RELU_BACKWARD = ElementwiseSpec(
    "deepcore_leaky_relu_backward", "T dy, T x, T slope", "T dx", "dx = x > (T)0 ? dy : dy * slope;",
    "dx = dy if x > 0 else slope dy")

SIGMOID = ElementwiseSpec(
    "deepcore_sigmoid", "T x", "T y",
    """
    T e = exp(-fabs(x));
    y = x >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
    """,
    "y = 1/(1+e^-x), through e^-|x| so that no exponential overflows",
)

SIGMOID_BACKWARD = ElementwiseSpec(
    "deepcore_sigmoid_backward", "T dy, T y", "T dx", "dx = dy * y * ((T)1 - y);", "dx = dy y (1 - y), y = sigmoid(x)")

TANH_BACKWARD = ElementwiseSpec(
    "deepcore_tanh_backward", "T dy, T y", "T dx", "dx = dy * ((T)1 - y * y);", "dx = dy (1 - y^2), y = tanh(x)")

# ---------------------------------------------------------------- random masks
# The counter-based dropout mask of deepcore/backend/dropout_hash.py (its docstring has the
# definition; tests/test_dropout_hash.py checks this body bit for bit against the NumPy version
# on the CPU emulator): element i hashes (key, gamma, i // 2) with SplitMix64 and keeps the
# element when its 32-bit half of the hash is >= threshold. No array is read and no generator
# state exists: `i` is CuPy's flat (C-order) index of the output, whose dtype decides T. The
# constants are literals so that this file keeps no import; the tests compare them.

DROPOUT_MASK = ElementwiseSpec(
    "deepcore_dropout_mask", "uint64 key, uint64 gamma, uint64 threshold, T scale", "T m",
    """
    unsigned long long z = key + ((unsigned long long)(i >> 1) + 1ull) * gamma;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    unsigned long long word = (i & 1) ? (z >> 32) : (z & 0xFFFFFFFFull);
    m = word >= threshold ? scale : (T)0.0f;
    """,
    "m = scale if 32-bit half (i % 2) of splitmix64(key + (i // 2 + 1) gamma) >= threshold else 0",
)

OPTIMIZERS = (SGD, SGD_MOMENTUM, ADAM)
ACTIVATIONS = (RELU, RELU_BACKWARD, LEAKY_RELU, LEAKY_RELU_BACKWARD, SIGMOID, SIGMOID_BACKWARD, TANH_BACKWARD)
ALL = OPTIMIZERS + ACTIVATIONS
#: Kernels with uint64 parameters that read CuPy's index `i` (tools/check_kernels.py binds
#: uint64 and defines `i` for these), apart from ALL's float/int-only bodies.
RANDOM = (DROPOUT_MASK,)


# ------------------------------------------------------------- host side
# The array module and the kernel factory are passed in (cupy and cupy.ElementwiseKernel in
# the CUDA backend; numpy and the CPU emulator in the tests), so the argument plumbing the
# GPU runs is the plumbing the tests check.

Kernels = Callable[[ElementwiseSpec], Any]


def sgd_update(xp: Any, kernel: Kernels, value: Any, grad: Any, buf: Any | None, *, lr: float, momentum: float,
               dampening: float, nesterov: bool, weight_decay: float, first_step: bool) -> tuple[Any, Any | None]:
    """``Backend.sgd_update`` in one kernel launch, in place on ``value`` (and ``buf``)."""
    if momentum == 0.0:
        kernel(SGD)(grad, lr, weight_decay, value)
        return value, buf
    first = first_step or buf is None
    if first:
        buf = xp.empty_like(value)  # written, never read, on the first step
    kernel(SGD_MOMENTUM)(grad, lr, weight_decay, momentum, 1.0 - dampening, int(nesterov), int(first), value, buf)
    return value, buf


def adam_update(kernel: Kernels, value: Any, grad: Any, m: Any, v: Any, *, step: int, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, decoupled: bool) -> tuple[Any, Any, Any]:
    """``Backend.adam_update`` in one kernel launch, in place on ``value``, ``m`` and ``v``."""
    # Imported here so that tools/check_kernels.py can load this file without the package.
    from .base import _adam_scalars

    step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
    l2 = 0.0 if decoupled else weight_decay
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    kernel(ADAM)(grad, l2, decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, bc2_sqrt, value, m, v)
    return value, m, v


def dropout_mask(xp: Any, kernel: Kernels, key: int, gamma: int, threshold: int, scale: float,
                 shape: tuple[int, ...], dtype: Any) -> Any:
    """``Backend.dropout_mask`` in one kernel launch: a new C-order array of ``dtype``, ``scale`` (already
    rounded to ``dtype``) where kept, 0 where dropped. The 64-bit values go as ``xp.uint64`` scalars (a
    Python int above 2**63 would not convert)."""
    out = xp.empty(shape, dtype=dtype)
    if out.size:
        kernel(DROPOUT_MASK)(xp.uint64(key), xp.uint64(gamma), xp.uint64(threshold), scale, out)
    return out
