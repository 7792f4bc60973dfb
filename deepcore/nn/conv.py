"""2-D convolution over NCHW images, PyTorch's ``nn.Conv2d``."""

from __future__ import annotations

from typing import Any

from .. import initializers as _init
from .._checks import check_int, check_pair
from ..backend import get_backend
from ..backend.base import Array
from ..rng import check_seed, host_generator
from .module import (
    Backward,
    Module,
    Param,
    check_grad_shape,
    input_backend,
    input_grad_optional,
)


class Conv2d(Module):
    """``y[n,o] = b[o] + sum_c w[o,c] ⋆ x[n, g(o) C/G + c]`` (cross-correlation, as PyTorch), ``w`` of
    shape (out_channels, in_channels/groups, kh, kw).

    Gradients: ``dW = sum_n dy ⋆ x`` (through im2col: ``dW = dy cols^T``), ``db = sum_{n,i,j} dy``,
    ``dx = col2im(W^T dy)``. ``kernel_size``, ``stride``, ``padding`` and ``dilation`` take an int or a
    pair; ``padding="same"`` (stride 1 only) pads ``d (k-1)`` in total, one less before than after when
    that is odd, as PyTorch; ``"valid"`` is 0. Initialisation as ``nn.Linear`` with
    ``fan_in = in_channels/groups * kh * kw`` (``"pytorch"`` is PyTorch's default).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, init: Any = "pytorch", *,
                 seed: int | None = None, dtype: Any = "float32") -> None:
        super().__init__()
        fn = "Conv2d"
        self.in_channels = check_int(in_channels, "in_channels", fn, 1)
        self.out_channels = check_int(out_channels, "out_channels", fn, 1)
        self.kernel_size = check_pair(kernel_size, "kernel_size", fn, 1)
        self.stride = check_pair(stride, "stride", fn, 1)
        self.dilation = check_pair(dilation, "dilation", fn, 1)
        self.groups = check_int(groups, "groups", fn, 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{fn}: groups={self.groups} must divide in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{fn}: padding must be an integer, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride={self.stride}")
            self.padding: tuple[int, int] | str = (0, 0) if padding == "valid" else "same"
        else:
            self.padding = check_pair(padding, "padding", fn, 0)
        self._pads = self._explicit_padding()
        if not isinstance(bias, bool):
            raise TypeError(f"{fn}: bias must be True or False, got {bias!r}")
        w_init, b_init = _init.initializers_for(init, fn)
        backend = get_backend()
        dt = backend.dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        rng = host_generator(check_seed(seed, fn))
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, kh, kw)
        fan_in, fan_out = shape[1] * kh * kw, shape[0] * kh * kw
        self.weight = Param(backend.from_numpy(w_init(rng, shape, fan_in, fan_out), dtype=dt), "weight")
        self.bias = (Param(backend.from_numpy(b_init(rng, (self.out_channels,), fan_in, fan_out), dtype=dt), "bias")
                     if bias else None)

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right)."""
        if self.padding == "same":
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        ph, pw = self.padding
        return ph, ph, pw, pw

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + f", bias={self.bias is not None}"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(OH, OW)`` for an input of ``height x width``: ``(H + pads - d (k-1) - 1) // s + 1``."""
        top, bottom, left, right = self._pads
        return tuple(  # type: ignore[return-value]
            (size + before + after - d * (k - 1) - 1) // s + 1
            for size, before, after, k, s, d in zip((height, width), (top, left), (bottom, right),
                                                     self.kernel_size, self.stride, self.dilation, strict=True))

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Backward]:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        backend = input_backend(self, x, *params)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d({self.in_channels}, {self.out_channels}): input x must have shape "
                             f"(N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        oh, ow = self.output_size(int(x.shape[2]), int(x.shape[3]))
        if oh < 1 or ow < 1:
            raise ValueError(f"Conv2d: input x of spatial size {tuple(x.shape[2:])} is smaller than the kernel "
                             f"{self.kernel_size} (dilation {self.dilation}, padding {self._pads}) needs")
        weight, bias = self.weight, self.bias
        y, saved = backend.conv2d(x, weight.value, None if bias is None else bias.value, stride=self.stride,
                                  padding=self._pads, dilation=self.dilation, groups=self.groups)
        out_shape = tuple(y.shape)

        @input_grad_optional
        def backward(dy: Array, *, need_input_grad: bool = True) -> Array | None:
            check_grad_shape(self, dy, out_shape)
            dx, dw, db = backend.conv2d_backward(dy, saved, need_dx=need_input_grad, need_bias=bias is not None)
            weight.accumulate_grad(dw, backend)
            if bias is not None:
                bias.accumulate_grad(db, backend)
            return dx

        return y, backward
