"""Convolution and pooling for the torch backend: im2col through ``Tensor.unfold`` views, one GEMM per group.

The same contract and layout as the reference and :mod:`deepcore.backend.numpy_conv`, in torch's own
tensor ops (no autograd, no ``torch.nn.functional``). ``xpad.unfold(2, .., sh).unfold(3, .., sw)`` is the
(N, C, OH, OW, KH, KW) window view (every ``d``-th row and column of a dilated window), copied once into
the channel-major buffer ``cols[(c,p,q), (n,i,j)]``; then ``Y = W cols + b`` per group and one transposed
copy to NCHW. Backward: ``dW = dY cols^T``, ``db = sum dY``, ``dcols = W^T dY`` added back into the padded
``dx`` one kernel offset at a time (an in-place add into a strided view); ``need_dx=False`` skips both.

Max pooling reduces each window's last axis with ``max(dim=-1)``, whose index is the first maximum in
row-major window order (PyTorch's rule, as the reference's); the backward scatters ``dy`` to those cells
with one ``scatter_add_`` over the flattened padded image. Average pooling sums the window view and
spreads ``dy / d`` back offset by offset. float16 and bfloat16 accumulate in float32.
"""

from __future__ import annotations

from typing import Any

import torch

Pair = tuple[int, int]
Pads = tuple[int, int, int, int]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pad(x: torch.Tensor, padding: Pads, value: float) -> torch.Tensor:
    """``x`` with (top, bottom, left, right) rows and columns of ``value`` around its last two axes."""
    top, bottom, left, right = padding
    if not (top or bottom or left or right):
        return x
    return torch.constant_pad_nd(x, (left, right, top, bottom), value)


def _windows(xpad: torch.Tensor, kernel: Pair, stride: Pair, dilation: Pair) -> torch.Tensor:
    """The (N, C, OH, OW, KH, KW) view of every window of the padded ``xpad`` (no copy)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    v = xpad.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    return v[..., ::dh, ::dw] if dh > 1 or dw > 1 else v


def _offset_view(a: torch.Tensor, p: int, q: int, dilation: Pair, stride: Pair, out_hw: Pair) -> torch.Tensor:
    """The cells of the padded image ``a`` that kernel offset (p, q) reads, as an (N, C, OH, OW) view."""
    (dh, dw), (sh, sw), (oh, ow) = dilation, stride, out_hw
    r0, c0 = p * dh, q * dw
    return a[:, :, r0:r0 + sh * (oh - 1) + 1:sh, c0:c0 + sw * (ow - 1) + 1:sw]


# ---------------------------------------------------------------------------------------------- convolution
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, stride: Pair, padding: Pads,
           dilation: Pair, groups: int) -> tuple[torch.Tensor, Any]:
    """``y = W cols + b`` per group on the channel-major im2col buffer (see the module docstring)."""
    n, c, h, w = (int(d) for d in x.shape)
    o, cg, kh, kw = (int(d) for d in weight.shape)
    dt = _compute_dtype(x.dtype)
    v = _windows(_pad(x.to(dt), padding, 0.0), (kh, kw), stride, dilation)
    oh, ow = int(v.shape[2]), int(v.shape[3])
    nl = n * oh * ow
    cols = v.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, nl)
    g, og, kg = groups, o // groups, cg * kh * kw
    w3 = weight.to(dt).reshape(g, og, kg)
    b = None if bias is None else bias.to(dt)
    if g == 1:
        prod = torch.mm(w3[0], cols) if b is None else torch.addmm(b.unsqueeze(1), w3[0], cols)
    else:
        prod = torch.bmm(w3, cols.view(g, kg, nl)).view(o, nl)
        if b is not None:
            prod.add_(b.unsqueeze(1))
    y = prod.view(o, n, oh, ow).permute(1, 0, 2, 3).contiguous()
    saved = (cols, w3, (n, c, h, w), weight.dtype, padding, stride, dilation, (kh, kw), (oh, ow))
    return y.to(x.dtype), saved


def conv2d_backward(dy: torch.Tensor, saved: Any, *, need_dx: bool = True,
                    need_bias: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``dW = dY cols^T``, ``db = sum_{n,i,j} dY``, ``dx = col2im(W^T dY)`` (skipped unless ``need_dx``)."""
    cols, w3, (n, c, h, w), w_dtype, padding, stride, dilation, (kh, kw), (oh, ow) = saved
    g, og, kg = (int(d) for d in w3.shape)
    o, nl = g * og, n * oh * ow
    dt = cols.dtype
    dy2 = dy.to(dt).permute(1, 0, 2, 3).reshape(o, nl)
    db = dy2.sum(1).to(w_dtype) if need_bias else None
    if g == 1:
        dw = torch.mm(dy2, cols.t())
    else:
        dw = torch.bmm(dy2.view(g, og, nl), cols.view(g, kg, nl).transpose(1, 2))
    dw = dw.reshape(o, kg // (kh * kw), kh, kw).to(w_dtype)
    if not need_dx:
        return None, dw, db
    if g == 1:
        dcols = torch.mm(w3[0].t(), dy2)
    else:
        dcols = torch.bmm(w3.transpose(1, 2), dy2.view(g, og, nl)).view(c * kh * kw, nl)
    d6 = dcols.view(c, kh, kw, n, oh, ow)
    top, bottom, left, right = padding
    dxpad = torch.zeros((n, c, h + top + bottom, w + left + right), dtype=dt, device=dy.device)
    for p in range(kh):
        for q in range(kw):
            _offset_view(dxpad, p, q, dilation, stride, (oh, ow)).add_(d6[:, p, q].permute(1, 0, 2, 3))
    dx = dxpad[:, :, top:top + h, left:left + w]
    return dx.to(dy.dtype).contiguous(), dw, db


# -------------------------------------------------------------------------------------------------- pooling
def max_pool2d(x: torch.Tensor, *, kernel_size: Pair, stride: Pair, padding: Pair) -> tuple[torch.Tensor, Any]:
    """``y = max`` over each window, padding -inf; ``saved`` holds each window's first maximum."""
    (kh, kw), (ph, pw) = kernel_size, padding
    v = _windows(_pad(x, (ph, ph, pw, pw), float("-inf")), kernel_size, stride, (1, 1))
    n, c, oh, ow = (int(d) for d in v.shape[:4])
    y, first = v.reshape(n, c, oh, ow, kh * kw).max(dim=-1)
    return y, (first, tuple(int(d) for d in x.shape), kernel_size, padding, stride)


def max_pool2d_backward(dy: torch.Tensor, saved: Any) -> torch.Tensor:
    """``dx`` receives each ``dy`` at its window's first maximum (summed where windows overlap)."""
    first, (n, c, h, w), (kh, kw), (ph, pw), (sh, sw) = saved
    oh, ow = int(first.shape[2]), int(first.shape[3])
    hp, wp = h + 2 * ph, w + 2 * pw
    dev = first.device
    corner = (torch.arange(oh, device=dev) * (sh * wp)).unsqueeze(1) + torch.arange(ow, device=dev) * sw
    where = corner + torch.div(first, kw, rounding_mode="floor") * wp + first % kw
    dt = _compute_dtype(dy.dtype)
    dxpad = torch.zeros((n, c, hp * wp), dtype=dt, device=dy.device)
    dxpad.scatter_add_(2, where.reshape(n, c, oh * ow), dy.to(dt).reshape(n, c, oh * ow))
    return dxpad.view(n, c, hp, wp)[:, :, ph:ph + h, pw:pw + w].to(dy.dtype).contiguous()


def avg_pool2d(x: torch.Tensor, *, kernel_size: Pair, stride: Pair, padding: Pair,
               count_include_pad: bool) -> tuple[torch.Tensor, Any]:
    """``y = sum(window) / d``, zero padding; ``d = kh kw`` with ``count_include_pad``, else the number of
    the window's cells inside the image."""
    (kh, kw), (ph, pw) = kernel_size, padding
    full = (ph, ph, pw, pw)
    dt = _compute_dtype(x.dtype)
    total = _windows(_pad(x.to(dt), full, 0.0), kernel_size, stride, (1, 1)).sum(dim=(-2, -1))
    if count_include_pad or (ph == 0 and pw == 0):
        divisor: Any = float(kh * kw)
    else:
        ones = _pad(torch.ones((1, 1, *x.shape[2:]), dtype=dt, device=x.device), full, 0.0)
        divisor = _windows(ones, kernel_size, stride, (1, 1)).sum(dim=(-2, -1))
    saved = (divisor, tuple(int(d) for d in x.shape), kernel_size, padding, stride)
    return (total / divisor).to(x.dtype), saved


def avg_pool2d_backward(dy: torch.Tensor, saved: Any) -> torch.Tensor:
    """``dx`` receives ``dy / d`` at every cell of each window (summed where windows overlap)."""
    divisor, (n, c, h, w), (kh, kw), (ph, pw), stride = saved
    dt = _compute_dtype(dy.dtype)
    share = dy.to(dt) / divisor
    out_hw = (int(dy.shape[2]), int(dy.shape[3]))
    dxpad = torch.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dt, device=dy.device)
    for p in range(kh):
        for q in range(kw):
            _offset_view(dxpad, p, q, (1, 1), stride, out_hw).add_(share)
    return dxpad[:, :, ph:ph + h, pw:pw + w].to(dy.dtype).contiguous()
