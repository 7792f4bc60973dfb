"""Gradient clipping as ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``.

Both take an optimizer, a Module, one Param or a list of Params; parameters without a gradient
are skipped. The clipped gradients are new arrays (``p.grad`` is rebound, never written into, so
an array the caller still holds is left as it was). ``clip_grad_norm`` reads nothing back to the
host: the total norm comes back as a 0-d array of the gradients' backend.
"""

from __future__ import annotations

import math
from typing import Any

from ..backend import backend_of
from ..backend.base import Array
from .checks import real
from .groups import params_of

__all__ = ["clip_grad_norm", "clip_grad_value"]


def clip_grad_norm(params: Any, max_norm: float, norm_type: float | str = 2.0, *,
                   error_if_nonfinite: bool = False) -> Array | float:
    """Scale every gradient by ``min(1, max_norm / (total + 1e-6))``, ``total`` being the ``norm_type``-norm of
    all gradients together (the norm of the per-gradient norms; ``"inf"``: the largest magnitude), as
    ``torch.nn.utils.clip_grad_norm_``. Returns ``total`` (a 0-d array, before clipping; ``0.0`` when no
    parameter has a gradient, as PyTorch's ``tensor(0.)``). The norm is computed in float32 for half-precision
    gradients. ``error_if_nonfinite=True`` raises on an inf/NaN total (a host sync)."""
    fn = "clip_grad_norm"
    max_norm = real(max_norm, "max_norm", fn, ">= 0", lambda x: x >= 0)
    p_norm = _norm_type(norm_type, fn)
    grads = [(p, p.grad) for p in params_of(params, fn) if p.grad is not None]
    if not grads:
        return 0.0
    backend = backend_of(*[g for _, g in grads])
    xp = backend.xp
    wide = [backend.astype(g, backend.compute_dtype(g.dtype)) for _, g in grads]
    dtype = xp.result_type(*wide) if len(wide) > 1 else wide[0].dtype
    if p_norm == math.inf:
        norms = [xp.max(xp.abs(w)) for w in wide]
        total = norms[0] if len(norms) == 1 else xp.max(xp.stack([backend.astype(n, dtype) for n in norms]))
    else:
        norms = [_p_norm(xp, w, p_norm) for w in wide]
        total = norms[0] if len(norms) == 1 else _p_norm(xp, xp.stack([backend.astype(n, dtype) for n in norms]),
                                                         p_norm)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"{fn}: the total norm of order {norm_type} of the gradients is {float(total)}; "
                           f"pass error_if_nonfinite=False to clip anyway")
    coef = max_norm / (total + 1e-6)
    coef = xp.where(coef < 1.0, coef, xp.ones_like(coef))
    for (p, g), w in zip(grads, wide, strict=True):
        p.grad = backend.astype(w * backend.astype(coef, w.dtype), g.dtype)
    return total


def clip_grad_value(params: Any, clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (``torch.nn.utils.clip_grad_value_``;
    NaN stays NaN)."""
    fn = "clip_grad_value"
    c = real(clip_value, "clip_value", fn, ">= 0", lambda x: x >= 0)
    for p in params_of(params, fn):
        g = p.grad
        if g is None:
            continue
        xp = backend_of(g).xp
        lo = xp.full_like(g, -c)
        hi = xp.full_like(g, c)
        # where(), not clip(): NaN must stay NaN on every library, as torch.clamp keeps it.
        p.grad = xp.where(g < lo, lo, xp.where(g > hi, hi, g))


def _p_norm(xp: Any, x: Array, p: float) -> Array:
    a = xp.abs(x)
    if p == 2.0:
        return xp.sqrt(xp.sum(a * a))
    if p == 1.0:
        return xp.sum(a)
    return xp.sum(a**p) ** (1.0 / p)


def _norm_type(value: Any, fn: str) -> float:
    if isinstance(value, str):
        if value.lower() != "inf":
            raise ValueError(f"{fn}: norm_type must be a positive number or 'inf', got {value!r}")
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"{fn}: norm_type must be a positive number or 'inf', got {value!r}")
    return float(value)
