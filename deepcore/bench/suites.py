"""Suites: which cases run at which sizes (``tiny`` for tests, ``quick`` for ``deepcore bench``,
``full`` for the pytest-benchmark suite)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cnn import HIDDEN, LENET_SHAPE
from .mlp import MLP, WIDE_MLP


@dataclass(frozen=True)
class Spec:
    """One case at one parameter setting."""

    case: str
    params: tuple[tuple[str, Any], ...]
    slow: bool = False

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def param_id(self) -> str:
        p = self.kwargs
        if self.case == "matmul":
            tag = f"{p['m']}x{p['k']}x{p['n']}"
            return tag + ("-bT" if p.get("transpose_b") else "")
        if self.case in ("softmax", "log_softmax", "softmax_ce"):
            return f"{p['n']}x{p['c']}"
        if self.case in ("mlp_step", "mlp_gemms"):
            sizes = p.get("sizes", MLP)
            return ("" if tuple(sizes) == MLP else "-".join(map(str, sizes)) + "-") + f"b{p['batch']}"
        if self.case in ("cnn_step", "cnn_epoch"):
            tag = "x".join(map(str, p.get("image_shape", LENET_SHAPE)))
            if self.case == "cnn_epoch":
                tag = f"{p['n']}x{tag}"
            if p.get("channels") is not None:
                tag += "-c" + ",".join(map(str, p["channels"]))
            if tuple(p.get("hidden", HIDDEN)) != HIDDEN:
                tag += "-h" + ",".join(map(str, p["hidden"]))
            return tag + f"-b{p['batch']}"
        if self.case in ("conv", "conv_gemms"):
            tag = f"{p['n']}x{p['c']}x{p['hw']}x{p['hw']}-o{p['o']}-k{p.get('k', 3)}"
            return tag + ("-bias" if p.get("bias") else "")
        return f"{p['n']}x{MLP[0]}-b{p['batch']}"


def _spec(case: str, slow: bool = False, **params: Any) -> Spec:
    return Spec(case, tuple(params.items()), slow)


#: (N, C) shapes of the softmax cases: C = 10, 1000, 32768 with N chosen so that a CPU call
#: stays in milliseconds.
SOFTMAX_SHAPES = ((8192, 10), (4096, 1000), (256, 32768))

#: The 784-256-10 MLP's matrix products at batch 128 (forward x W1^T, dW1 = dy^T x, dx = dy W1)
#: and the forward at batch 1024.
MLP_MATMULS = ((128, 784, 256, True), (256, 128, 784, False), (128, 256, 784, False), (1024, 784, 256, True))


#: The README loop's batches for the 784-256-10 MLP, and the wide MLP at batch 256.
MLP_STEP_BATCHES = (32, 128, 512, 2048)


def _mlp_specs() -> list[Spec]:
    """Each step beside its matrix products alone (the floor that BLAS sets)."""
    out = []
    for batch, sizes in [*((b, MLP) for b in MLP_STEP_BATCHES), (256, WIDE_MLP)]:
        kw = {} if sizes == MLP else {"sizes": sizes}
        out += [_spec("mlp_step", batch=batch, **kw), _spec("mlp_gemms", batch=batch, **kw)]
    return out


#: The 3x3 convolution of the issue: N=128, 64 -> 64 channels, 32x32, padding 1, no bias (as before a
#: BatchNorm2d); its plain GEMMs beside it.
CONV = {"n": 128, "c": 64, "o": 64, "hw": 32}
#: Tiny convolutional sizes for the tests: an 8x8 LeNet-like net with widths 4, 8 and one hidden layer of 16.
TINY_CNN = {"image_shape": (1, 8, 8), "channels": (4, 8), "hidden": (16,)}


def _cnn_specs(full: bool) -> list[Spec]:
    """The LeNet step of ``deepcore train --model cnn`` on 28x28 at batch 128 (and in ``full`` the
    VGG-style CIFAR step at batch 64 and the MNIST-sized epoch, slow), the 3x3 convolution, its GEMMs."""
    out = [_spec("cnn_step", batch=128)]
    if full:
        out.append(_spec("cnn_step", batch=64, image_shape=(3, 32, 32)))
    out += [_spec("conv", **CONV), _spec("conv_gemms", **CONV)]
    if full:
        out.append(_spec("cnn_epoch", slow=True, n=60000, batch=128))
    return out


def suite(name: str) -> list[Spec]:
    """``"tiny"`` (seconds; for tests), ``"quick"`` (``deepcore bench``'s default) or ``"full"``
    (what the pytest-benchmark suite sweeps; 4096^3 matmul and the CNN epoch marked slow)."""
    if name == "tiny":
        return [_spec("matmul", m=64, k=64, n=64), _spec("softmax", n=64, c=10),
                _spec("softmax_ce", n=64, c=10), _spec("mlp_step", batch=16),
                _spec("mlp_step", batch=8, sizes=(32, 16, 16, 4)), _spec("mlp_gemms", batch=16),
                _spec("epoch", n=512, batch=128), _spec("cnn_step", batch=8, **TINY_CNN),
                _spec("conv", n=2, c=4, o=4, hw=8), _spec("conv_gemms", n=2, c=4, o=4, hw=8),
                _spec("cnn_epoch", n=64, batch=16, **TINY_CNN)]
    if name == "quick":
        return [_spec("matmul", m=512, k=512, n=512), _spec("matmul", m=128, k=784, n=256, transpose_b=True),
                _spec("softmax", n=4096, c=1000), _spec("softmax_ce", n=4096, c=1000),
                _spec("softmax_ce", n=128, c=10),
                *_mlp_specs(), _spec("epoch", n=60000, batch=128), *_cnn_specs(full=False)]
    if name == "full":
        specs = [_spec("matmul", m=s, k=s, n=s, slow=s >= 4096) for s in (512, 2048, 4096)]
        specs += [_spec("matmul", m=m, k=k, n=n, transpose_b=t) for m, k, n, t in MLP_MATMULS]
        for case in ("softmax", "log_softmax", "softmax_ce"):
            specs += [_spec(case, n=n, c=c) for n, c in SOFTMAX_SHAPES]
        specs += _mlp_specs()
        specs.append(_spec("epoch", n=60000, batch=128))
        return specs + _cnn_specs(full=True)
    raise ValueError(f"unknown suite {name!r}; suites: tiny, quick, full")


