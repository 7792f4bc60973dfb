"""The reference convolution and pooling, written with the array API alone (a mixin of :class:`Backend`).

NCHW. The standard has no strided views and no scatter, so im2col stacks strided slices (one per
kernel offset) and col2im adds each offset's slice back, spread by the stride with zeros and padded
into place. Slow but exact, and it runs on every array-API library (torch, array_api_strict,
jax.numpy: nothing is written in place). ``NumpyBackend`` and ``CupyBackend`` override all six ops.
"""

from __future__ import annotations

from typing import Any

Array = Any


class ConvReference:
    """``conv2d``, ``max_pool2d``, ``avg_pool2d`` and their backwards for a backend with ``xp``,
    ``device``, ``astype`` and ``compute_dtype`` (:class:`~deepcore.backend.base.Backend`)."""

    xp: Any

    def conv2d(self, x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, int],
               padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int) -> tuple[Array, Any]:
        """``y[n,o,i,j] = b[o] + sum_{c,p,q} w[o,c,p,q] xpad[n, g(o) C/G + c, i s_h + p d_h, j s_w + q d_w]``
        with zero padding (top, bottom, left, right); returns ``(y, saved)`` for :meth:`conv2d_backward`."""
        xp = self.xp
        out_dtype = x.dtype
        dt = self.compute_dtype(x.dtype)
        n, c, h, w = (int(d) for d in x.shape)
        o, cg, kh, kw = (int(d) for d in weight.shape)
        top, bottom, left, right = padding
        oh, ow = _conv_out((h + top + bottom, w + left + right), (kh, kw), stride, dilation)
        xpad = self._pad2d(self.astype(x, dt), padding, 0.0)
        # (N, C, K, OH, OW) -> (N, G, C/G*K, OH*OW): channel-major then kernel offset, as weight's layout
        cols = xp.reshape(xp.stack(_windows(xpad, (kh, kw), stride, dilation, (oh, ow)), axis=2),
                          (n, groups, cg * kh * kw, oh * ow))
        w3 = xp.reshape(self.astype(weight, dt), (groups, o // groups, cg * kh * kw))
        y = xp.reshape(xp.matmul(w3, cols), (n, o, oh, ow))
        if bias is not None:
            y = y + xp.reshape(self.astype(bias, dt), (1, o, 1, 1))
        saved = (cols, w3, tuple(x.shape), tuple(weight.shape), weight.dtype, padding, stride, dilation, (oh, ow))
        return self.astype(y, out_dtype), saved

    def conv2d_backward(self, dy: Array, saved: Any, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[Array | None, Array, Array | None]:
        """``dW = sum_n dy cols^T``, ``db = sum_{n,i,j} dy``, ``dx = col2im(W^T dy)`` (skipped unless ``need_dx``)."""
        xp = self.xp
        cols, w3, x_shape, w_shape, w_dtype, padding, stride, dilation, (oh, ow) = saved
        n, c, h, w = x_shape
        o, cg, kh, kw = w_shape
        groups = w3.shape[0]
        out_dtype = dy.dtype
        d4 = xp.reshape(self.astype(dy, cols.dtype), (n, groups, o // groups, oh * ow))
        # Batch and positions side by side, so dW is one product per group.
        cols_g = xp.reshape(xp.permute_dims(cols, (1, 2, 0, 3)), (groups, cg * kh * kw, n * oh * ow))
        dy_g = xp.reshape(xp.permute_dims(d4, (1, 2, 0, 3)), (groups, o // groups, n * oh * ow))
        dw = xp.reshape(xp.matmul(dy_g, xp.matrix_transpose(cols_g)), w_shape)
        db = xp.sum(d4, axis=(0, 3)) if need_bias else None
        if db is not None:
            db = xp.reshape(db, (o,))
        dx = None
        if need_dx:
            dcols = xp.reshape(xp.matmul(xp.matrix_transpose(w3), d4), (n, c, kh * kw, oh, ow))
            dx = self.astype(self._fold(dcols, x_shape, (kh, kw), padding, stride, dilation), out_dtype)
        return dx, self.astype(dw, w_dtype), None if db is None else self.astype(db, w_dtype)

    def max_pool2d(self, x: Array, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int]) -> tuple[Array, Any]:
        """``y[n,c,i,j] = max`` over the window at ``(i s_h - p_h, j s_w - p_w)``, padding -inf;
        ``saved`` holds the index of the first maximum in row-major window order (PyTorch's)."""
        xp = self.xp
        n, c, h, w = (int(d) for d in x.shape)
        ph, pw = padding
        full = (ph, ph, pw, pw)
        oh, ow = _conv_out((h + 2 * ph, w + 2 * pw), kernel_size, stride, (1, 1))
        xpad = self._pad2d(x, full, -float("inf"))
        windows = xp.stack(_windows(xpad, kernel_size, stride, (1, 1), (oh, ow)), axis=2)
        y = xp.max(windows, axis=2)
        first = xp.argmax(windows, axis=2)
        return y, (first, tuple(x.shape), kernel_size, full, stride)

    def max_pool2d_backward(self, dy: Array, saved: Any) -> Array:
        """``dx`` receives each ``dy`` at its window's first maximum (summed where windows overlap)."""
        xp = self.xp
        first, x_shape, kernel_size, full, stride = saved
        k = kernel_size[0] * kernel_size[1]
        offsets = xp.reshape(xp.arange(k, dtype=first.dtype, device=self.device(first)), (1, 1, k, 1, 1))
        picked = xp.expand_dims(first, axis=2) == offsets
        dcols = xp.where(picked, xp.expand_dims(dy, axis=2), xp.zeros((), dtype=dy.dtype, device=self.device(dy)))
        return self._fold(dcols, x_shape, kernel_size, full, stride, (1, 1))

    def avg_pool2d(self, x: Array, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], count_include_pad: bool) -> tuple[Array, Any]:
        """``y = sum(window) / d``, zero padding; ``d = k_h k_w`` with ``count_include_pad``, else the
        number of the window's cells inside the image."""
        xp = self.xp
        n, c, h, w = (int(d) for d in x.shape)
        ph, pw = padding
        full = (ph, ph, pw, pw)
        oh, ow = _conv_out((h + 2 * ph, w + 2 * pw), kernel_size, stride, (1, 1))
        dt = self.compute_dtype(x.dtype)
        xpad = self._pad2d(self.astype(x, dt), full, 0.0)
        total = xp.sum(xp.stack(_windows(xpad, kernel_size, stride, (1, 1), (oh, ow)), axis=2), axis=2)
        if count_include_pad or (ph == 0 and pw == 0):
            divisor: Any = float(kernel_size[0] * kernel_size[1])
        else:
            ones = self._pad2d(xp.ones((1, 1, h, w), dtype=dt, device=self.device(x)), full, 0.0)
            divisor = xp.sum(xp.stack(_windows(ones, kernel_size, stride, (1, 1), (oh, ow)), axis=2), axis=2)
        return self.astype(total / divisor, x.dtype), (divisor, tuple(x.shape), kernel_size, full, stride)

    def avg_pool2d_backward(self, dy: Array, saved: Any) -> Array:
        """``dx`` receives ``dy / d`` at every cell of each window (summed where windows overlap)."""
        xp = self.xp
        divisor, x_shape, kernel_size, full, stride = saved
        share = self.astype(dy, self.compute_dtype(dy.dtype)) / divisor
        k = kernel_size[0] * kernel_size[1]
        dcols = xp.broadcast_to(xp.expand_dims(share, axis=2), (*share.shape[:2], k, *share.shape[2:]))
        return self.astype(self._fold(dcols, x_shape, kernel_size, full, stride, (1, 1)), dy.dtype)

    def _pad2d(self, x: Array, padding: tuple[int, int, int, int], value: float) -> Array:
        """``x`` (N, C, H, W) with (top, bottom, left, right) rows and columns of ``value`` around it."""
        xp = self.xp
        top, bottom, left, right = padding
        if not (top or bottom or left or right):
            return x
        n, c, h, w = (int(d) for d in x.shape)
        dev = self.device(x)

        def band(rows: int, cols: int) -> Array:
            return xp.full((n, c, rows, cols), value, dtype=x.dtype, device=dev)

        rows = [p for p in (band(top, w) if top else None, x, band(bottom, w) if bottom else None) if p is not None]
        x = xp.concat(rows, axis=2) if len(rows) > 1 else x
        hp = h + top + bottom
        cols = [p for p in (band(hp, left) if left else None, x, band(hp, right) if right else None) if p is not None]
        return xp.concat(cols, axis=3) if len(cols) > 1 else x

    def _fold(self, dcols: Array, x_shape: tuple[int, ...], kernel_size: tuple[int, int],
              padding: tuple[int, int, int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> Array:
        """col2im: ``dx`` (N, C, H, W) from ``dcols`` (N, C, KH*KW, OH, OW), each offset's slice spread
        by the stride, padded to its place in the padded image, summed, and the padding cut off."""
        n, c, h, w = x_shape
        top, bottom, left, right = padding
        hp, wp = h + top + bottom, w + left + right
        kh, kw = kernel_size
        total = None
        for p in range(kh):
            for q in range(kw):
                piece = dcols[:, :, p * kw + q, ...]
                piece = self._spread(piece, 2, stride[0])
                piece = self._spread(piece, 3, stride[1])
                r0, c0 = p * dilation[0], q * dilation[1]
                piece = self._pad2d(piece, (r0, hp - r0 - int(piece.shape[2]), c0, wp - c0 - int(piece.shape[3])),
                                    0.0)
                total = piece if total is None else total + piece
        return total[:, :, top:top + h, left:left + w]

    def _spread(self, a: Array, axis: int, step: int) -> Array:
        """``step - 1`` zeros between neighbours along ``axis``: length ``L`` becomes ``(L-1) step + 1``."""
        if step == 1:
            return a
        xp = self.xp
        length = int(a.shape[axis])
        zeros = xp.zeros_like(a)
        interleaved = xp.stack([a] + [zeros] * (step - 1), axis=axis + 1)
        shape = list(a.shape)
        shape[axis] = length * step
        spread = xp.reshape(interleaved, tuple(shape))
        index = [slice(None)] * a.ndim
        index[axis] = slice(0, (length - 1) * step + 1)
        return spread[tuple(index)]

def _conv_out(size: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int],
              dilation: tuple[int, int]) -> tuple[int, int]:
    """Output size of a window sliding over an already padded ``size``: ``(L - d (k-1) - 1) // s + 1``."""
    return tuple((size[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1 for i in (0, 1))  # type: ignore[return-value]


def _windows(xpad: Array, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
             out: tuple[int, int]) -> list[Array]:
    """One strided slice (N, C, OH, OW) of ``xpad`` per kernel offset, row-major over (p, q)."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel_size, stride, dilation, out
    return [xpad[:, :, p * dh:p * dh + sh * (oh - 1) + 1:sh, q * dw:q * dw + sw * (ow - 1) + 1:sw]
            for p in range(kh) for q in range(kw)]
