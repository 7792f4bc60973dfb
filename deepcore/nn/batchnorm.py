"""Batch normalisation over the batch (and length) axes, with PyTorch's running statistics."""

from __future__ import annotations

from typing import Any

from .._checks import check_int
from ..backend import get_backend
from ..backend.base import Array
from .module import (
    Backward,
    Module,
    Param,
    check_grad_shape,
    input_backend,
    input_grad_optional,
)


class BatchNorm1d(Module):
    """``y = γ (x - μ) / sqrt(σ² + eps) + β`` per feature, for input (N, C) or (N, C, L).

    Training normalises with the batch mean and biased variance and updates
    ``running_mean``/``running_var`` with the unbiased variance:
    ``r <- (1 - momentum) r + momentum * stat`` (``momentum=None``: cumulative average),
    as PyTorch does. Backward: with ``x̂`` the normalised input and ``g = dy γ``,
    ``dx = (g - mean(g) - x̂ mean(g x̂)) / sqrt(σ² + eps)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, dtype: Any = "float32") -> None:
        super().__init__()
        num_features = check_int(num_features, "num_features", "BatchNorm1d", 1)
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise ValueError(f"BatchNorm1d: eps must be a positive number, got {eps!r}")
        if momentum is not None and (not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"BatchNorm1d: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        backend = get_backend()
        xp = backend.xp
        dt = backend.dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        self.weight = Param(xp.ones((num_features,), dtype=dt), "weight") if affine else None
        self.bias = Param(xp.zeros((num_features,), dtype=dt), "bias") if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", xp.zeros((num_features,), dtype=dt))
            self.register_buffer("running_var", xp.ones((num_features,), dtype=dt))
            self.register_buffer("num_batches_tracked", xp.asarray(0, dtype=xp.int64))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        params = (self.weight, self.bias) if self.affine else ()
        backend = input_backend(self, x, *params)
        xp = backend.xp
        if x.ndim not in (2, 3) or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm1d({self.num_features}): input x must have shape (N, {self.num_features}) or "
                f"(N, {self.num_features}, L), got {tuple(x.shape)}"
            )
        axes = (0,) if x.ndim == 2 else (0, 2)
        count = x.shape[0] * (1 if x.ndim == 2 else x.shape[2])
        use_batch = train or not self.track_running_stats

        def per_channel(v: Array) -> Array:
            return v if x.ndim == 2 else xp.reshape(v, (-1, 1))

        if use_batch:
            if count <= 1:
                raise ValueError(
                    f"BatchNorm1d: training needs more than one value per channel, got input x of shape "
                    f"{tuple(x.shape)}"
                )
            mean = xp.mean(x, axis=axes)
            centered = x - per_channel(mean)
            var = xp.mean(centered * centered, axis=axes)
        else:
            mean = backend.astype(self.running_mean, x.dtype)
            var = backend.astype(self.running_var, x.dtype)
            centered = x - per_channel(mean)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        x_hat = centered * per_channel(inv_std)
        if self.affine:
            y = x_hat * per_channel(self.weight.value) + per_channel(self.bias.value)
        else:
            y = x_hat

        if train and self.track_running_stats:
            self._update_running(backend, mean, var, count)

        shape = tuple(x.shape)
        weight, bias = self.weight, self.bias

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, shape)
            if weight is not None:
                weight.accumulate_grad(xp.sum(dy * x_hat, axis=axes), backend)
                bias.accumulate_grad(xp.sum(dy, axis=axes), backend)
            if not need_input_grad:
                return None
            g = dy * per_channel(weight.value) if weight is not None else dy
            if not use_batch:
                return g * per_channel(inv_std)
            g_mean = per_channel(xp.mean(g, axis=axes))
            gx_mean = per_channel(xp.mean(g * x_hat, axis=axes))
            return (g - g_mean - x_hat * gx_mean) * per_channel(inv_std)

        return y, backward

    def _update_running(self, backend: Any, mean: Array, var: Array, count: int) -> None:
        xp = backend.xp
        tracked = self.num_batches_tracked + 1
        factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1))
        rm, rv = self.running_mean, self.running_var
        self.running_mean = backend.astype((1.0 - factor) * rm + factor * backend.astype(mean, rm.dtype), rm.dtype)
        self.running_var = backend.astype((1.0 - factor) * rv + factor * backend.astype(unbiased, rv.dtype), rv.dtype)
        self.num_batches_tracked = xp.asarray(tracked, dtype=self.num_batches_tracked.dtype)
