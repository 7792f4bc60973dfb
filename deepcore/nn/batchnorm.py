"""Batch normalisation per channel (1-D and 2-D), with PyTorch's running statistics."""

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


class _BatchNorm(Module):
    """``y = γ (x - μ) / sqrt(σ² + eps) + β`` per channel (axis 1), the statistics taken over every other axis.

    Training normalises with the batch mean and biased variance and updates
    ``running_mean``/``running_var`` with the unbiased variance:
    ``r <- (1 - momentum) r + momentum * stat`` (``momentum=None``: cumulative average),
    as PyTorch does. Backward: with ``x̂`` the normalised input and ``g = dy γ``,
    ``dx = (g - mean(g) - x̂ mean(g x̂)) / sqrt(σ² + eps)``. Half-precision inputs are
    normalised in float32 and the output cast back.
    """

    #: The input ranks accepted, and how the error message spells the shapes.
    _ranks: tuple[int, ...] = ()
    _shapes: str = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, dtype: Any = "float32") -> None:
        super().__init__()
        fn = type(self).__name__
        num_features = check_int(num_features, "num_features", fn, 1)
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise ValueError(f"{fn}: eps must be a positive number, got {eps!r}")
        if momentum is not None and (not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"{fn}: momentum must be in [0, 1] or None, got {momentum!r}")
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
        if x.ndim not in self._ranks or x.shape[1] != self.num_features:
            shapes = self._shapes.format(c=self.num_features)
            raise ValueError(f"{type(self).__name__}({self.num_features}): input x must have shape {shapes}, "
                             f"got {tuple(x.shape)}")
        axes = (0, *range(2, x.ndim))
        count = x.shape[0]
        for d in x.shape[2:]:
            count *= d
        use_batch = train or not self.track_running_stats
        out_dtype = x.dtype
        dt = backend.compute_dtype(x.dtype)
        xc = backend.astype(x, dt)
        channel_shape = (-1,) + (1,) * (x.ndim - 2)

        def per_channel(v: Array) -> Array:
            return v if x.ndim == 2 else xp.reshape(v, channel_shape)

        if use_batch:
            if count <= 1:
                raise ValueError(
                    f"{type(self).__name__}: training needs more than one value per channel, got input x of shape "
                    f"{tuple(x.shape)}"
                )
            mean = xp.mean(xc, axis=axes)
            centered = xc - per_channel(mean)
            var = xp.mean(centered * centered, axis=axes)
        else:
            mean = backend.astype(self.running_mean, dt)
            var = backend.astype(self.running_var, dt)
            centered = xc - per_channel(mean)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        x_hat = centered * per_channel(inv_std)
        gamma = None if self.weight is None else backend.astype(self.weight.value, dt)
        if self.affine:
            y = x_hat * per_channel(gamma) + per_channel(backend.astype(self.bias.value, dt))
        else:
            y = x_hat

        if train and self.track_running_stats:
            self._update_running(backend, mean, var, count)

        shape = tuple(x.shape)
        weight, bias = self.weight, self.bias

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, shape)
            dyc = backend.astype(dy, dt)
            if weight is not None:
                weight.accumulate_grad(xp.sum(dyc * x_hat, axis=axes), backend)
                bias.accumulate_grad(xp.sum(dyc, axis=axes), backend)
            if not need_input_grad:
                return None
            g = dyc * per_channel(gamma) if gamma is not None else dyc
            if not use_batch:
                return backend.astype(g * per_channel(inv_std), out_dtype)
            g_mean = per_channel(xp.mean(g, axis=axes))
            gx_mean = per_channel(xp.mean(g * x_hat, axis=axes))
            return backend.astype((g - g_mean - x_hat * gx_mean) * per_channel(inv_std), out_dtype)

        return backend.astype(y, out_dtype), backward

    def _update_running(self, backend: Any, mean: Array, var: Array, count: int) -> None:
        xp = backend.xp
        tracked = self.num_batches_tracked + 1
        rm, rv = self.running_mean, self.running_var
        # The cumulative average's 1/t stays on the device: float(tracked) would make the host wait for it.
        factor = 1.0 / backend.astype(tracked, rm.dtype) if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean = backend.astype((1.0 - factor) * rm + factor * backend.astype(mean, rm.dtype), rm.dtype)
        self.running_var = backend.astype((1.0 - factor) * rv + factor * backend.astype(unbiased, rv.dtype), rv.dtype)
        self.num_batches_tracked = xp.asarray(tracked, dtype=self.num_batches_tracked.dtype)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) input over the batch (and length) axes; see :class:`_BatchNorm`."""

    _ranks = (2, 3)
    _shapes = "(N, {c}) or (N, {c}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) images per channel, over the batch and both spatial axes;
    see :class:`_BatchNorm`."""

    _ranks = (4,)
    _shapes = "(N, {c}, H, W)"
