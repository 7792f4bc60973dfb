"""Finite-difference gradient checks in float64, for deepcore's layers and losses and your own.

Directional checks, as in Chainer: for random unit directions ``v`` the
central difference ``(f(x + εv) - f(x - εv)) / 2ε`` must equal the analytic
``<∇f, v>``. One direction per input locates a wrong gradient; one joint
direction over all inputs checks they fit together. Everything runs in the
inputs' own namespace, upcast to float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import get_backend
from .backend.base import Array
from .nn.module import Module

__all__ = ["GradcheckError", "GradcheckResult", "check_gradients", "check_layer", "check_loss"]


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with finite differences."""


@dataclass
class GradcheckResult:
    #: (what was perturbed, analytic directional derivative, numeric one)
    checks: list[tuple[str, float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_abs_error(self) -> float:
        return max((abs(a - n) for _, a, n in self.checks), default=0.0)


def check_gradients(f: Callable[[dict[str, Array]], Any], inputs: dict[str, Array], grads: dict[str, Array], *,
                    eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8, directions: int = 2,
                    seed: int = 0, raise_on_failure: bool = True) -> GradcheckResult:
    """Compare ``grads`` (the analytic gradient of the scalar ``f`` at ``inputs``) with central differences.

    ``f`` receives a dict like ``inputs`` (float64 arrays) and returns a scalar.
    Passes when ``|analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)``.
    """
    missing = sorted(set(inputs) - set(grads))
    if missing:
        raise ValueError(f"check_gradients: grads has no entry for inputs {missing}")
    rng = np.random.default_rng(seed)
    x64 = {k: _float64(v) for k, v in inputs.items()}
    g64 = {k: _float64(grads[k]) for k in inputs}
    result = GradcheckResult()
    groups = [[k] for k in x64] + ([list(x64)] if len(x64) > 1 else [])
    for group in groups:
        for _ in range(directions):
            v = _directions(rng, {k: x64[k] for k in group})
            analytic = sum(_dot(g64[k], v[k]) for k in group)
            plus = {k: (x + eps * v[k] if k in v else x) for k, x in x64.items()}
            minus = {k: (x - eps * v[k] if k in v else x) for k, x in x64.items()}
            numeric = (_scalar(f(plus)) - _scalar(f(minus))) / (2.0 * eps)
            label = "+".join(group)
            result.checks.append((label, analytic, numeric))
            tolerance = atol + rtol * max(abs(analytic), abs(numeric))
            if not math.isfinite(analytic) or not abs(analytic - numeric) <= tolerance:
                result.failures.append(
                    f"gradient of {label!r} disagrees with finite differences: analytic {analytic:.10g}, "
                    f"numeric {numeric:.10g} (eps={eps})"
                )
    if raise_on_failure and result.failures:
        raise GradcheckError("\n".join(result.failures))
    return result


def check_layer(layer: Module, x: Array, *, train: bool = False, seed: int = 0, **kwargs: Any) -> GradcheckResult:
    """Check ``dL/dx`` and every parameter's gradient of ``layer`` at ``x``, for ``L = sum(y * g)``
    with a random ``g``. The layer runs in float64 for the check and is restored afterwards
    (parameters, gradients, buffers and extra states are the same as before).

    Every evaluation starts from the layer's extra state as it was on entry (a Dropout's stream
    position), so with ``train=True`` each finite difference sees the mask the analytic
    gradient was taken with."""
    params = list(layer.named_parameters())
    saved = layer.snapshot()
    try:
        layer.to(dtype="float64")
        x64 = _float64(x)
        extra = layer.extra_states()
        y, backward = layer.forward(x64, train=train, input_grad=True)
        backend = get_backend(y)
        g = backend.from_numpy(np.random.default_rng(seed + 1).standard_normal(tuple(y.shape)),
                               dtype=y.dtype, device=backend.device(y))
        layer.zero_grad()
        dx = backward(g)
        inputs = {"x": x64, **{name: p.value for name, p in params}}
        grads = {"x": dx, **{name: p.grad for name, p in params}}
        for name, grad in grads.items():
            if grad is None:
                raise GradcheckError(f"check_layer: backward left no gradient for {name!r}")

        def f(values: dict[str, Array]) -> Any:
            for name, p in params:
                p.value = values[name]
            layer.load_extra_states(extra)
            out = layer.forward(values["x"], train=train)[0]
            return backend.xp.sum(out * g)

        return check_gradients(f, inputs, grads, seed=seed, **kwargs)
    finally:
        layer.restore(saved)


def check_loss(loss_fn: Callable[..., tuple[Array, Array]], pred: Array, target: Array, *, seed: int = 0,
               check_kwargs: dict[str, Any] | None = None, **loss_kwargs: Any) -> GradcheckResult:
    """Check the ``grad`` a loss returns against finite differences of its ``loss`` (summed for
    ``reduction="none"``) with respect to ``pred``, in float64."""
    p64 = _float64(pred)
    loss, grad = loss_fn(p64, target, **loss_kwargs)
    xp = get_backend(p64).xp

    def f(values: dict[str, Array]) -> Any:
        return xp.sum(loss_fn(values["pred"], target, **loss_kwargs)[0])

    return check_gradients(f, {"pred": p64}, {"pred": grad}, seed=seed, **(check_kwargs or {}))


def _float64(x: Array) -> Array:
    backend = get_backend(x)
    return backend.astype(x, backend.xp.float64)


def _directions(rng: np.random.Generator, xs: dict[str, Array]) -> dict[str, Array]:
    """A random direction over ``xs``, of unit norm taken jointly."""
    raw = {k: rng.standard_normal(tuple(x.shape)) for k, x in xs.items()}
    norm = math.sqrt(sum(float(np.sum(r * r)) for r in raw.values())) or 1.0
    out = {}
    for k, x in xs.items():
        backend = get_backend(x)
        out[k] = backend.from_numpy(raw[k] / norm, dtype=x.dtype, device=backend.device(x))
    return out


def _dot(a: Array, b: Array) -> float:
    return float(get_backend(a).xp.sum(a * b))


def _scalar(v: Any) -> float:
    return float(v)
