"""NumPy on the CPU: the base backend with its hot paths rewritten for fewer temporaries.

Only what decides speed is overridden (matrix products, activations, softmax,
the fused softmax-cross-entropy, gradient accumulation, random masks); the
rest is the array-API reference in :mod:`deepcore.backend.base`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

if np.lib.NumpyVersion(np.__version__) >= "2.1.0":
    # NumPy's own namespace has followed the array API (2023.12) since 2.1; array-api-compat's copy
    # of it costs ~70 ms at import (its clone touches every lazy submodule: f2py, testing, ma, ...),
    # a tenth of `deepcore train`'s start, and adds a Python wrapper to each call it changes.
    _NAMESPACE = np
else:
    import array_api_compat.numpy as _NAMESPACE

from . import cpu_jit, dropout_hash, malloc_tuning, numpy_conv
from .base import Array, Backend, _adam_scalars
from .faster_form import FormChooser


class NumpyBackend(Backend):
    single_device = True

    def __init__(self) -> None:
        super().__init__(_NAMESPACE, name="numpy")
        malloc_tuning.tune()  # large temporaries reused step after step, not faulted in anew

    # ------------------------------------------------------------------ arrays
    def asarray(self, obj: Any, *, dtype: Any = None, device: Any = None) -> np.ndarray:
        self._check_device(device)
        return np.asarray(obj, dtype=dtype)

    def device(self, x: Array) -> str:
        return "cpu"

    def _check_device(self, device: Any) -> None:
        if device is not None and str(device) != "cpu":
            raise ValueError(f"device: the numpy backend has only 'cpu', got {device!r}")

    # dtype.kind answers what xp.isdtype answers for NumPy dtypes, at a tenth of the cost;
    # these run several times per layer call.
    def is_floating(self, x: Array) -> bool:
        # ml_dtypes' bfloat16 is a NumPy "V" (void) kind; its name says what it is.
        return x.dtype.kind == "f" or x.dtype.name == "bfloat16"

    def dtype_from_name(self, name: str) -> Any:
        if name == "bfloat16":
            return bfloat16()
        return super().dtype_from_name(name)

    def is_integer(self, x: Array) -> bool:
        return x.dtype.kind in "iu"

    def compute_dtype(self, dtype: Any) -> Any:
        # The base rule (float32/float64 keep theirs, the rest float32) without the namespace look-ups.
        return dtype if dtype == _FLOAT32 or dtype == _FLOAT64 else _FLOAT32

    def labels_in_range(self, labels: np.ndarray, num_classes: int) -> bool:
        """True when every label is in [0, num_classes): one reduction over the labels read as
        unsigned (a negative label becomes a huge one), instead of two comparisons and an ``any``."""
        if labels.size == 0:
            return True
        if labels.dtype.kind == "i":
            if num_classes >> (8 * labels.dtype.itemsize - 1):
                # Read as unsigned, -1 would be 2**bits - 1, not beyond so many classes:
                # here every non-negative label is in range, so only the sign matters.
                return bool(labels.min() >= 0)
            if not labels.dtype.isnative:  # the unsigned view below is in native byte order
                labels = labels.astype(labels.dtype.newbyteorder("="))
            labels = labels.view(_UNSIGNED[labels.dtype.itemsize])
        return int(_max_reduce(labels)) < num_classes  # the ufunc itself: ndarray.max adds a Python call

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.array(x, copy=True)

    def from_numpy(self, a: np.ndarray, *, dtype: Any = None, device: Any = None) -> np.ndarray:
        self._check_device(device)
        return np.array(a, dtype=dtype, copy=True, order="C")

    def add_into(self, acc: np.ndarray, value: np.ndarray) -> np.ndarray:
        np.add(acc, value, out=acc, casting="same_kind")
        return acc

    # ----------------------------------------------------------------- random
    def dropout_mask(self, rng: Any, shape: tuple[int, ...], p: float, *, dtype: Any,
                     device: Any = None) -> np.ndarray:
        self._check_device(device)
        # The counter-based hash, vectorised in uint64 (dropout_hash.py): no generator built per call.
        return dropout_hash.numpy_mask(rng, shape, p, dtype)

    # ---------------------------------------------------------- dense algebra
    def matmul(self, a: np.ndarray, b: np.ndarray, *, transpose_a: bool = False,
               transpose_b: bool = False) -> np.ndarray:
        if a.dtype.itemsize == 2 or b.dtype.itemsize == 2:
            return _half_product(a.T if transpose_a else a, b.T if transpose_b else b)
        # .T is a view; BLAS reads the transposed layout without a copy.
        return np.matmul(a.T if transpose_a else a, b.T if transpose_b else b)

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        if x.dtype.itemsize == 2:
            y32 = _half_product(x, weight.T, out_dtype=np.float32)
            if bias is not None:
                y32 += bias.astype(np.float32)
            return y32.astype(x.dtype)
        n = x.shape[0]
        if x.ndim == 2 and weight.ndim == 2 and n <= 64 and weight.shape[0] >= 4 * n:
            # A short batch against a wide layer: OpenBLAS forms W x^T (out x N) markedly faster than
            # x W^T (N x out), 0.5-0.67x the time at 16-32 rows of 784 -> 256, 0.87x at 64, and not
            # from 128 rows on. The transposed product comes back in (N, out) C order in the pass
            # that adds the bias, so nothing downstream sees another layout.
            yt = np.matmul(weight, x.T)
            if bias is None:
                return np.ascontiguousarray(yt.T)
            y = np.empty((n, yt.shape[0]), dtype=yt.dtype)
            np.add(yt.T, bias, out=y)
            return y
        y = np.matmul(x, weight.T)
        if bias is not None:
            y += bias
        return y

    def linear_backward(self, dy: np.ndarray, x: np.ndarray, weight: np.ndarray, *, need_dx: bool = True,
                        need_bias: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        if dy.dtype.itemsize == 2:
            dx = _half_product(dy, weight) if need_dx else None
            dw = _half_product(dy.T, x)
            db = dy.sum(axis=0, dtype=np.float32).astype(dy.dtype) if need_bias else None
            return dx, dw, db
        dx = np.matmul(dy, weight) if need_dx else None
        dw = np.matmul(dy.T, x)
        db = _column_sum(dy) if need_bias else None
        return dx, dw, db

    # ------------------------------------------------------------ activations
    def relu(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, _zero(x.dtype))

    def relu_inplace(self, x: np.ndarray) -> np.ndarray:
        if type(self).relu is not NumpyBackend.relu or "relu" in self.__dict__ or not x.flags.writeable:
            return self.relu(x)  # a subclass's (or a patched) relu is honoured; a read-only x is not written
        return np.maximum(x, _zero(x.dtype), out=x)

    def relu_backward(self, dy: np.ndarray, x: np.ndarray) -> np.ndarray:
        # The mask as dy's dtype, then a same-dtype product: float32 times bool is ~2x slower.
        dtype = dy.dtype if dy.dtype == x.dtype and dy.dtype.isnative else np.result_type(dy.dtype, x.dtype)
        out = np.empty(dy.shape, dtype=dtype)
        np.greater(x, _zero(x.dtype), out=out)
        out *= dy
        return out

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        # exp(-|x|) never overflows; the two branches of σ are recombined in place.
        e = np.exp(-np.abs(x))
        out = 1.0 / (1.0 + e)
        np.multiply(out, e, out=out, where=x < 0)
        return out

    def softmax(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        out = np.subtract(x, x.max(axis=axis, keepdims=True))
        np.exp(out, out=out)
        out /= out.sum(axis=axis, keepdims=True)
        return out

    def log_softmax(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        out = np.subtract(x, x.max(axis=axis, keepdims=True))
        if out.ndim == 2 and axis in (-1, 1) and out.shape[1] >= 64 and out.size > _BLOCK_ELEMS:
            # exp(out) is only summed: take it a block of rows at a time in a cache-sized scratch
            # instead of a whole (N, C) temporary (the same sums, row by row; 20-35% faster).
            n, c = out.shape
            rows = max(1, _BLOCK_ELEMS // c)
            scratch = np.empty((min(rows, n), c), dtype=out.dtype)
            lse = np.empty((n, 1), dtype=out.dtype)
            for i in range(0, n, rows):
                block = out[i:i + rows]
                m = block.shape[0]
                np.exp(block, out=scratch[:m])
                np.sum(scratch[:m], axis=1, keepdims=True, out=lse[i:i + m])
            np.log(lse, out=lse)
            out -= lse
            return out
        out -= np.log(np.exp(out).sum(axis=axis, keepdims=True))
        return out

    # ---------------------------------------------------- convolution, pooling
    # im2col with one GEMM per group, pooling over strided views: deepcore/backend/numpy_conv.py.
    def conv2d(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, *, stride: tuple[int, int],
               padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int) -> tuple[np.ndarray, Any]:
        return numpy_conv.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    def conv2d_backward(self, dy: np.ndarray, saved: Any, *, need_dx: bool = True, need_bias: bool = True,
                        ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        return numpy_conv.conv2d_backward(dy, saved, need_dx=need_dx, need_bias=need_bias)

    def max_pool2d(self, x: np.ndarray, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int]) -> tuple[np.ndarray, Any]:
        return numpy_conv.max_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding)

    def max_pool2d_backward(self, dy: np.ndarray, saved: Any) -> np.ndarray:
        return numpy_conv.max_pool2d_backward(dy, saved)

    def avg_pool2d(self, x: np.ndarray, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], count_include_pad: bool) -> tuple[np.ndarray, Any]:
        return numpy_conv.avg_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding,
                                     count_include_pad=count_include_pad)

    def avg_pool2d_backward(self, dy: np.ndarray, saved: Any) -> np.ndarray:
        return numpy_conv.avg_pool2d_backward(dy, saved)

    # ------------------------------------------------------------ loss cores
    def softmax_cross_entropy_fused(self, logits: np.ndarray, labels: np.ndarray,
                                    reduction: str) -> tuple[np.ndarray, np.ndarray] | None:
        """cpu_jit's fused loop (``DEEPCORE_JIT=1`` only: its results are not NumPy's bits) for
        ndarrays (no subclass) of float32 or float64 C-contiguous logits of up to
        ``_CE_FUSED_MAX_SIZE`` elements and integer labels (read as int64); None otherwise, for a
        bad label, or where ``softmax_cross_entropy`` is overridden or set on the instance (which
        then runs, as for every other call). One call instead of NumPy's dozen."""
        kernel = cpu_jit.softmax_cross_entropy()
        if (kernel is None or type(logits) is not np.ndarray or type(labels) is not np.ndarray
                or logits.dtype not in _CE_FUSED_DTYPES or logits.size > _CE_FUSED_MAX_SIZE
                or not logits.flags.c_contiguous
                or type(self).softmax_cross_entropy is not NumpyBackend.softmax_cross_entropy
                or "softmax_cross_entropy" in self.__dict__):
            return None
        if labels.dtype != _INT64:
            # (uint64 labels beyond int64 wrap to negative ones, which the loop declines)
            labels = labels.astype(_INT64, casting="unsafe")
        n = logits.shape[0]
        per_row = reduction == "none"
        grad = np.empty_like(logits)
        out = np.empty(n if per_row else 1, dtype=logits.dtype)
        if not kernel(logits, labels, grad, out, 1.0 / n if reduction == "mean" else 1.0, per_row):
            return None  # a label outside [0, C): the caller's checks say which
        return (out if per_row else out.reshape(())), grad

    def softmax_cross_entropy(self, logits: np.ndarray, labels: np.ndarray, *, reduction: str = "mean",
                              label_smoothing: float = 0.0, ignore_index: int | None = None,
                              class_weights: np.ndarray | None = None,
                              labels_in_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The reference formula (:meth:`Backend.softmax_cross_entropy`) in one buffer: the gradient
        array holds the shifted logits, then their exponentials, then ``dL/ds``, so no other (N, C)
        temporary is made. Per-row weights and masks are built only when weights, ignored rows or
        out-of-range labels call for them; in the common case (none of these, a training step's
        128 x 10) the fixed cost of each NumPy call is what counts, and a factor of exactly one is
        skipped rather than multiplied, which leaves every bit as it is."""
        eps = float(label_smoothing)
        out_dtype = logits.dtype
        dt = np.dtype(self.compute_dtype(logits.dtype))
        n, c = logits.shape
        valid = None if ignore_index is None else labels != ignore_index
        bad = None
        safe = labels
        if not (labels_in_range or self.labels_in_range(labels, c)):
            # Possible with validate=False: such labels must not index out of bounds or wrap
            # around; their rows become NaN below.
            bad = (labels < 0) | (labels >= c)
            if valid is not None:
                bad &= valid
            bad = bad if bad.any() else None
        keep = valid if bad is None else (~bad if valid is None else valid & ~bad)
        if keep is not None:
            safe = np.where(keep, labels, 0)

        grad = np.subtract(logits, _row_max(logits), dtype=dt, order="C")
        flat = grad.reshape(-1)  # a view: grad is C-contiguous
        # safe labels lie in [0, C); unsafe casting lets uint64 labels add to intp.
        target_idx = np.add(_row_starts(n, c), safe, dtype=np.intp, casting="unsafe")
        target = flat[target_idx]
        w = None if class_weights is None else np.asarray(class_weights, dtype=dt)
        if eps > 0.0:
            weighted_sum = grad.sum(axis=1) if w is None else grad @ w
        np.exp(grad, out=grad)
        sum_e = _row_sum(grad)
        log_z = np.log(sum_e)

        # w_y: the target's weight per row (None: all ones); w_sum: sum_k w_k.
        if w is None:
            w_y = None if valid is None else valid.astype(dt)
            w_sum = float(c)
        else:
            w_y = w[safe]
            if valid is not None:
                w_y *= valid
            if bad is not None:
                w_y[bad] = 0.0  # as the reference: a bad row weighs nothing in the mean's denominator
            w_sum = float(w.sum(dtype=np.float64))
        per_sample = log_z - target
        row_scale = None  # the gradient's per-row factor on p (None: all ones)
        if w_y is not None or eps > 0.0:
            row_scale = (1.0 - eps) * (np.ones(n, dtype=dt) if w_y is None else w_y)
            per_sample *= row_scale
        if eps > 0.0:
            smooth = w_sum * log_z - weighted_sum
            if valid is not None:
                smooth = np.where(valid, smooth, 0.0)
            per_sample += (eps / c) * smooth
            row_scale += (eps / c) * w_sum * (1.0 if valid is None else valid)

        if reduction == "mean":
            denom = n if w_y is None else float(w_y.sum(dtype=np.float64))
            scale = 1.0 / denom if denom != 0 else float("nan")
        else:
            scale = 1.0
        if row_scale is None:
            grad *= np.divide(dt.type(scale), sum_e)[:, None]
        else:
            grad *= (row_scale * scale / sum_e).astype(dt, copy=False)[:, None]
        target_step = (1.0 - eps) * scale
        flat[target_idx] -= dt.type(target_step) if w_y is None else (target_step * w_y).astype(dt, copy=False)
        if eps > 0.0:
            smooth_grad = (eps / c) * scale * (1.0 if w is None else w)
            if valid is None:
                grad -= smooth_grad
            else:
                grad[valid] -= smooth_grad
        if valid is not None:
            grad[~valid] = 0.0
            per_sample[~valid] = 0.0  # masked, not 0 * loss: an ignored row's -inf or NaN must not leak
        if bad is not None:
            grad[bad] = np.nan
            per_sample[bad] = np.nan

        if dt != out_dtype:
            grad = grad.astype(out_dtype)
        if reduction == "none":
            return per_sample.astype(out_dtype, copy=False), grad
        return np.array(_add_reduce(per_sample, dtype=np.float64) * scale, dtype=out_dtype), grad

    # ------------------------------------------------------ optimizer updates
    # Same rules as the reference, written into the existing arrays with out= so
    # the parameter and its state keep their identity. Python-float scalars keep
    # float32 arrays float32. A read-only parameter (a memory-mapped file) takes
    # the reference path, which never writes, rather than failing half-way.

    def sgd_update(self, value: np.ndarray, grad: np.ndarray, buf: np.ndarray | None, *, lr: float,
                   momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                   first_step: bool) -> tuple[np.ndarray, np.ndarray | None]:
        # A lone call flushes each buffer on its own phase (told apart by id); the optimizers go
        # through sgd_update_many, where the optimizer's step count says when.
        flush = buf is not None and momentum != 0.0 and not first_step and _flush_due(buf)
        return self._sgd(value, grad, buf, lr, momentum, dampening, nesterov, weight_decay, first_step, flush)

    def sgd_update_many(self, values: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                        bufs: Sequence[np.ndarray | None], *, lr: float, momentum: float, dampening: float,
                        nesterov: bool, weight_decay: float,
                        step: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        if type(self).sgd_update is not NumpyBackend.sgd_update or "sgd_update" in self.__dict__:
            # A subclass's (or a patched) per-parameter rule: honoured, one call per parameter.
            return super().sgd_update_many(values, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
                                           nesterov=nesterov, weight_decay=weight_decay, step=step)
        # Every _FLUSH_EVERY optimizer steps the buffers whose update underflowed lose their subnormals
        # (every buffer, every _FLUSH_ALWAYS_EVERY): see flush_subnormals.
        if step % _FLUSH_EVERY or step % _FLUSH_ALWAYS_EVERY == 0:
            return self._sgd_many(values, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                                  step % _FLUSH_EVERY == 0)
        watch = _Underflow()
        with np.errstate(under="call", call=watch):
            return self._sgd_many(values, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, watch)

    def _sgd_many(self, values: Sequence[np.ndarray], grads: Sequence[np.ndarray], bufs: Sequence[np.ndarray | None],
                  lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                  flush: _Flush) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        out_values, out_bufs = list(values), list(bufs)
        if momentum != 0.0 and dampening == 0.0 and not nesterov and weight_decay == 0.0:
            # The steady momentum step of every parameter in one loop: the hand-written loop's three
            # statements each (block by block for a large parameter where that was timed faster), none
            # of the per-call checks.
            # float(): a NumPy float64 lr would add a float64 step in the one-pass form but a float32
            # one in the blocked form; as Python floats both give the same bits.
            lr, momentum = float(lr), float(momentum)
            for i, (value, grad, buf) in enumerate(zip(values, grads, bufs, strict=True)):
                if buf is None or not value.ndim or not value.flags.writeable:
                    out_values[i], out_bufs[i] = self._sgd(value, grad, buf, lr, momentum, 0.0, False, 0.0,
                                                           buf is None, flush)
                elif value.size < _FUSED_MIN and value.size < _SGD_BLOCKED_MIN:  # (a bias, a small layer: one form)
                    _momentum_one_pass(value, grad, buf, lr, momentum, flush)
                else:
                    _steady_momentum(value, grad, buf, lr, momentum, flush)
            return out_values, out_bufs
        for i, value in enumerate(values):
            out_values[i], out_bufs[i] = self._sgd(value, grads[i], bufs[i], lr, momentum, dampening, nesterov,
                                                   weight_decay, bufs[i] is None, flush)
        return out_values, out_bufs

    def _sgd(self, value: np.ndarray, grad: np.ndarray, buf: np.ndarray | None, lr: float, momentum: float,
             dampening: float, nesterov: bool, weight_decay: float, first_step: bool,
             flush: _Flush) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`sgd_update`, the momentum buffer flushed of subnormals after its update as ``flush`` says."""
        if (momentum != 0.0 and buf is not None and not first_step and dampening == 0.0 and not nesterov
                and weight_decay == 0.0 and value.ndim and value.flags.writeable):
            # The steady momentum step, tested first (see sgd_update_many).
            _steady_momentum(value, grad, buf, float(lr), float(momentum), flush)
            return value, buf
        if value.ndim == 0:
            # ufuncs give scalars, not arrays, for 0-d operands: work on 1-element views.
            v1, b1 = self._sgd(value.reshape(1), grad.reshape(1), None if buf is None else buf.reshape(1),
                               lr, momentum, dampening, nesterov, weight_decay, first_step, flush)
            return _as_0d(v1, value), None if b1 is None else _as_0d(b1, buf)
        if not value.flags.writeable:
            return super().sgd_update(value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay, first_step=first_step)
        # Fused, but for the steps that watch for underflow (NumPy's flags see it; without momentum
        # there is no buffer to flush), the first with momentum (the buffer is made) and Nesterov with
        # dampening (which SGD refuses; NumPy's form would read the dampened term, the loop not).
        start = None
        if (value.size >= _FUSED_MIN and _python_numbers(lr, momentum, dampening, weight_decay)
                and (momentum == 0.0 or buf is not None and not first_step and type(flush) is not _Underflow
                     and not (nesterov and dampening != 0.0))):
            if momentum == 0.0:
                kernel, start = _fused_loop(cpu_jit.sgd_plain, value, grad)
            else:
                kernel, start = _fused_loop(cpu_jit.sgd, value, grad, buf)
            if kernel is not None:
                _run_fused_sgd(kernel, value, grad, buf if momentum != 0.0 else None, lr, momentum, dampening,
                               nesterov, weight_decay, flush is True)
                return value, buf
        d = grad
        if weight_decay != 0.0:
            d = np.multiply(value, weight_decay)
            d += grad
        if momentum != 0.0:
            if first_step or buf is None:
                # Adopt our own array; copy the caller's gradient, which may be accumulated into later.
                buf = np.array(d, copy=True) if d is grad else d
            else:
                if flush:
                    _watch(flush)
                buf *= momentum
                if dampening == 0.0:
                    buf += d
                elif d is grad:
                    buf += np.multiply(d, 1.0 - dampening)
                else:
                    d *= 1.0 - dampening  # our scratch; nesterov (which reads d again) forbids dampening
                    buf += d
                if flush:
                    _flush_if(buf, flush)
            if nesterov:
                step_dir = np.multiply(buf, momentum)
                step_dir += d
            else:
                step_dir = buf
        else:
            step_dir = d
        if step_dir is grad or step_dir is buf:
            value += np.multiply(step_dir, -lr)
        else:
            step_dir *= -lr
            value += step_dir
        _jit_charge(start)
        return value, buf

    def adam_update(self, value: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, *, step: int,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decoupled: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if value.ndim == 0:
            v1, m1, s1 = self.adam_update(value.reshape(1), grad.reshape(1), m.reshape(1), v.reshape(1), step=step,
                                          lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                          decoupled=decoupled)
            return _as_0d(v1, value), _as_0d(m1, m), _as_0d(s1, v)
        if not (value.flags.writeable and m.flags.writeable and v.flags.writeable):
            return super().adam_update(value, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, decoupled=decoupled)
        flush = step % _FLUSH_EVERY == 0  # the parameter's own step count paces its flush of m
        start = None
        if value.size >= _FUSED_MIN and _python_numbers(lr, beta1, beta2, eps, weight_decay):
            kernel, start = _fused_loop(cpu_jit.adam, value, grad, m, v)
            if kernel is not None:
                _fused_adam(kernel, value, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, flush)
                return value, m, v
        if weight_decay != 0.0:
            if decoupled:
                value *= 1.0 - lr * weight_decay
            else:
                wd_grad = np.multiply(value, weight_decay)
                wd_grad += grad
                grad = wd_grad
        scratch = np.subtract(grad, m)  # the one temporary every step needs
        scratch *= 1.0 - beta1
        m += scratch
        # (1-β2) g g in PyTorch's addcmul order
        np.multiply(grad, 1.0 - beta2, out=scratch)
        scratch *= grad
        v *= beta2
        v += scratch
        if flush:
            # m only: v (0.999^t, far slower to decay) flushed while m is not would leave m / (sqrt(0) + eps)
            flush_subnormals(m)
        step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
        np.sqrt(v, out=scratch)
        scratch /= bc2_sqrt
        scratch += eps
        np.divide(m, scratch, out=scratch)
        scratch *= -step_size
        value += scratch
        _jit_charge(start)
        return value, m, v

    def rmsprop_update(self, value: np.ndarray, grad: np.ndarray, square_avg: np.ndarray,
                       grad_avg: np.ndarray | None, buf: np.ndarray | None, *, lr: float, alpha: float, eps: float,
                       weight_decay: float, momentum: float,
                       centered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        ga = grad_avg if centered else None
        mb = buf if momentum > 0.0 else None
        arrays = [a for a in (value, square_avg, ga, mb) if a is not None]
        if value.ndim == 0 or not all(a.flags.writeable for a in arrays):
            # 0-d operands give NumPy scalars, a read-only array must not be written: the reference
            # (new arrays) for both, cheap at their sizes.
            out = super().rmsprop_update(value, grad, square_avg, grad_avg, buf, lr=lr, alpha=alpha, eps=eps,
                                         weight_decay=weight_decay, momentum=momentum, centered=centered)
            return tuple(np.asarray(a) if a is not None else None for a in out)  # type: ignore[return-value]
        start = None
        if value.size >= _FUSED_MIN and _python_numbers(lr, alpha, eps, weight_decay, momentum):
            kernel, start = _fused_loop(cpu_jit.rmsprop, value, grad,
                                        *(a for a in (square_avg, ga, mb) if a is not None))
            if kernel is not None:
                _run_fused_rmsprop(kernel, value, grad, square_avg, ga, mb, lr, alpha, eps, weight_decay, momentum)
                return value, square_avg, grad_avg, buf
        if weight_decay != 0.0:
            wd_grad = np.multiply(value, weight_decay)
            wd_grad += grad
            grad = wd_grad
        scratch = np.multiply(grad, 1.0 - alpha)  # (1-α) g g in PyTorch's addcmul order
        scratch *= grad
        square_avg *= alpha
        square_avg += scratch
        if ga is not None:
            w = 1.0 - alpha
            np.subtract(grad, ga, out=scratch)
            if abs(w) < 0.5:  # torch.lerp's two spellings
                scratch *= w
                ga += scratch
            else:
                scratch *= 1.0 - w
                np.subtract(grad, scratch, out=ga)
            np.multiply(ga, ga, out=scratch)
            np.subtract(square_avg, scratch, out=scratch)
            np.sqrt(scratch, out=scratch)
        else:
            np.sqrt(square_avg, out=scratch)
        scratch += eps
        np.divide(grad, scratch, out=scratch)
        if mb is not None:
            mb *= momentum
            mb += scratch
            np.multiply(mb, -lr, out=scratch)
        else:
            scratch *= -lr
        value += scratch
        _jit_charge(start)
        return value, square_avg, grad_avg, buf

    def adagrad_update(self, value: np.ndarray, grad: np.ndarray, state_sum: np.ndarray, *, step: int, lr: float,
                       lr_decay: float, eps: float, weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
        if value.ndim == 0 or not (value.flags.writeable and state_sum.flags.writeable):
            v, s = super().adagrad_update(value, grad, state_sum, step=step, lr=lr, lr_decay=lr_decay, eps=eps,
                                          weight_decay=weight_decay)
            return np.asarray(v), np.asarray(s)
        clr = lr / (1 + (step - 1) * lr_decay)
        start = None
        if value.size >= _FUSED_MIN and _python_numbers(clr, eps, weight_decay):
            kernel, start = _fused_loop(cpu_jit.adagrad, value, grad, state_sum)
            if kernel is not None:
                kind = value.dtype.type
                kernel(value.reshape(-1), grad.reshape(-1), state_sum.reshape(-1), kind(weight_decay), kind(eps),
                       kind(-clr), weight_decay != 0.0)
                return value, state_sum
        if weight_decay != 0.0:
            wd_grad = np.multiply(value, weight_decay)
            wd_grad += grad
            grad = wd_grad
        scratch = np.multiply(grad, grad)
        state_sum += scratch
        np.sqrt(state_sum, out=scratch)
        scratch += eps
        np.divide(grad, scratch, out=scratch)
        scratch *= -clr
        value += scratch
        _jit_charge(start)
        return value, state_sum


#: What the fused softmax cross-entropy loop takes (numpy_backend.softmax_cross_entropy_fused).
_CE_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = np.dtype(np.int64)
#: Up to this many logits the fused loop wins (its exp is the C library's, scalar; NumPy's is
#: vectorised but costs a dozen calls): on the EPYC of benchmarks/README.md, two runs of
#: benchmarks/fused_loss.py, 0.17x NumPy's time at 32 x 10, 0.24-0.30x at 128 x 10, 0.49-0.61x at
#: 512 x 10, 0.70-0.90x at 128 x 100; 0.83-1.04x at 2048 x 10 and 0.89-1.14x at 256 x 100 (past
#: the limit), 1.04-1.16x at 4096 x 10 and 1.6-1.9x at 256 x 1000.
_CE_FUSED_MAX_SIZE = 16384

#: Elements per block of the blocked momentum update (256 KiB of float32: the block of the
#: parameter, its gradient, its buffer and the scratch, 1 MiB, stay in a 2 MiB L2 cache).
_SGD_BLOCK = 65536
#: From this size on the momentum update may run block by block (below it, one pass per operation).
_SGD_BLOCKED_MIN = 98304
#: Per (size, dtype) of a parameter from _SGD_BLOCKED_MIN on, whether its momentum step runs block by
#: block: timed on the first steps, since which form is faster depends on the machine (faster_form.py).
_MOMENTUM_FORMS = FormChooser()


#: From this size on SGD's steps (but the one that makes a momentum buffer and those that watch for
#: underflow, one in 16), Adam's, RMSprop's and Adagrad's run as cpu_jit's one-pass loops where
#: numba is installed and loaded (once NumPy's updates of such parameters have taken
#: ``cpu_jit.LOAD_AFTER_S``): SGD momentum from 0.71x the NumPy form's time at this size to 0.41x
#: at 3.1M weights, Adam from 0.41x to 0.20x (benchmarks/fused_updates.py); smaller parameters'
#: updates gain less than the call costs.
_FUSED_MIN = 65536
#: The dtypes the fused loop takes, with the smallest normal number of each (its flush bound).
_FUSED_TINY = {np.dtype(np.float32): np.float32(np.finfo(np.float32).tiny),
               np.dtype(np.float64): np.float64(np.finfo(np.float64).tiny)}


def _steady_momentum(value: np.ndarray, grad: np.ndarray, buf: np.ndarray, lr: float, momentum: float,
                     flush: _Flush) -> None:
    """SGD's steady momentum step in place, ``buf = μ buf + g; value -= lr buf`` (``lr``, ``momentum``
    Python floats): for a large parameter cpu_jit's fused loop where numba is installed and loaded
    (``cpu_jit.wanted``), else the hand-written loop's three statements, block by block where that
    was timed faster here, charged to cpu_jit's load budget. Every form gives the same bits."""
    # A step that flushes where the update underflowed runs in NumPy's one pass: the underflow is
    # seen through NumPy's floating-point flags, and block by block it would flush only the blocks
    # that underflowed (a subnormal made exactly, which raises no underflow, in another block would
    # survive: other bits than the one-pass form's).
    start = None
    if value.size >= _FUSED_MIN and type(flush) is not _Underflow:
        kernel, start = _fused_loop(cpu_jit.sgd_momentum, value, grad, buf)
        if kernel is not None:
            tiny = _FUSED_TINY[value.dtype]
            kind = tiny.dtype.type  # μ and -lr rounded to the arrays' dtype, as NumPy rounds a Python float
            kernel(value.reshape(-1), grad.reshape(-1), buf.reshape(-1), kind(momentum), kind(-lr), tiny, bool(flush))
            return
    _momentum_numpy(value, grad, buf, lr, momentum, flush)
    _jit_charge(start)


def _momentum_numpy(value: np.ndarray, grad: np.ndarray, buf: np.ndarray, lr: float, momentum: float,
                    flush: _Flush) -> None:
    """The NumPy forms of :func:`_steady_momentum`: block by block where that was timed faster for
    this size, else one pass per operation."""
    if value.size >= _SGD_BLOCKED_MIN and type(flush) is not _Underflow:
        key = (value.size, value.dtype)
        blocked = _MOMENTUM_FORMS.get(key)
        if blocked is None and not flush and _blockable(value, grad, buf):
            _timed_momentum(key, value, grad, buf, lr, momentum)
            return
        if blocked and _sgd_momentum_blocked(value, grad, buf, lr, momentum, bool(flush)):
            return
    _momentum_one_pass(value, grad, buf, lr, momentum, flush)


def _timed_momentum(key: tuple[int, np.dtype], value: np.ndarray, grad: np.ndarray, buf: np.ndarray, lr: float,
                    momentum: float) -> None:
    """The momentum step (no flush) in the form that ``_MOMENTUM_FORMS`` times next for ``key``, timed."""
    blocked = _MOMENTUM_FORMS.trial(key)
    start = time.perf_counter()
    if blocked:
        _sgd_momentum_blocked(value, grad, buf, lr, momentum)
    else:
        _momentum_one_pass(value, grad, buf, lr, momentum, False)
    _MOMENTUM_FORMS.record(key, blocked, time.perf_counter() - start)


def _momentum_one_pass(value: np.ndarray, grad: np.ndarray, buf: np.ndarray, lr: float, momentum: float,
                       flush: _Flush) -> None:
    """``buf = μ buf + g; value -= lr buf``, one pass over the arrays per operation."""
    if flush:
        _watch(flush)
    buf *= momentum
    buf += grad
    if flush:
        _flush_if(buf, flush)
    value += np.multiply(buf, -lr)


def _one_layout(*arrays: np.ndarray) -> bool:
    """One dtype and one shape, each C-contiguous, no two overlapping (the order of a form's passes
    or writes would show): what both the blocked form and the fused loops need."""
    first = arrays[0]
    dtype, shape = first.dtype, first.shape
    owners = True
    for a in arrays:
        if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
            return False
        owners = owners and a.flags.owndata
    if owners:  # arrays that each own their memory overlap only if one is another (a step's usual case)
        return len({id(a) for a in arrays}) == len(arrays)
    return not any(np.may_share_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


def _blockable(value: np.ndarray, grad: np.ndarray, buf: np.ndarray) -> bool:
    """Whether the blocked momentum step can take these arrays: :func:`_one_layout`, a writeable buffer."""
    return buf.flags.writeable and _one_layout(value, grad, buf)


def _fused_adam(kernel: Any, value: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                flush: bool) -> None:
    """``adam_update``'s arithmetic as cpu_jit's one-pass loop: each Python-float scalar rounded to
    the arrays' dtype where NumPy's in-place operation would round it."""
    tiny = _FUSED_TINY[value.dtype]
    kind = tiny.dtype.type
    step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
    mode, decay = 0, 0.0
    if weight_decay != 0.0:
        mode, decay = (2, 1.0 - lr * weight_decay) if decoupled else (1, weight_decay)
    kernel(value.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), kind(1.0 - beta1), kind(1.0 - beta2),
           kind(beta2), kind(bc2_sqrt), kind(eps), kind(-step_size), kind(decay), tiny, mode, flush)


def _fused_loop(loop: Callable[[], Any], *arrays: np.ndarray) -> tuple[Any, float | None]:
    """How to run an update on ``arrays`` that one of cpu_jit's loops could take (the caller has
    checked its size and hyperparameters; ``loop`` is the cpu_jit function that returns that loop):
    ``(the loop, None)`` to run it fused; else ``(None, start)``, the NumPy form to run, with the
    time now to charge it from while numba waits to repay its load (``cpu_jit.LOAD_AFTER_S``), or
    None when nothing is charged (the loops unavailable, arrays no loop takes)."""
    if not cpu_jit.wanted():
        return None, None if cpu_jit.ruled_out() or not _fusable(*arrays) else time.perf_counter()
    return (loop() if _fusable(*arrays) else None), None


def _jit_charge(start: float | None) -> None:
    if start is not None:
        cpu_jit.charge(time.perf_counter() - start)


def _python_numbers(*scalars: Any) -> bool:
    """Whether every hyperparameter is a Python float or int: NumPy applies a NumPy float64 scalar
    to float32 arrays in float64, where the fused loops round each scalar to the arrays' dtype."""
    return all(type(x) in (float, int) for x in scalars)


def _run_fused_rmsprop(kernel: Any, value: np.ndarray, grad: np.ndarray, square_avg: np.ndarray,
                       grad_avg: np.ndarray | None, buf: np.ndarray | None, lr: float, alpha: float, eps: float,
                       weight_decay: float, momentum: float) -> None:
    """``rmsprop_update``'s arithmetic as cpu_jit's one-pass loop ``kernel`` (``grad_avg`` when
    centered, ``buf`` with momentum), each scalar rounded to the arrays' dtype."""
    kind = value.dtype.type
    none = np.empty(0, value.dtype)  # the loop reads grad_avg and buf only when told they are there
    w = 1.0 - alpha
    kernel(value.reshape(-1), grad.reshape(-1), square_avg.reshape(-1),
           none if grad_avg is None else grad_avg.reshape(-1), none if buf is None else buf.reshape(-1),
           kind(weight_decay), kind(alpha), kind(1.0 - alpha), kind(w), kind(1.0 - w), kind(eps), kind(momentum),
           kind(-lr), weight_decay != 0.0, grad_avg is not None, abs(w) < 0.5, buf is not None)


def _run_fused_sgd(kernel: Any, value: np.ndarray, grad: np.ndarray, buf: np.ndarray | None, lr: float,
                   momentum: float, dampening: float, nesterov: bool, weight_decay: float, flush: bool) -> None:
    """``_sgd``'s steady step as cpu_jit's one-pass loop ``kernel``: ``sgd`` with momentum (``buf``
    given: weight decay, dampening or Nesterov), ``sgd_plain`` without (``buf`` None); each scalar
    rounded to the arrays' dtype."""
    kind = value.dtype.type  # each scalar rounded to the arrays' dtype, as NumPy rounds it
    if buf is None:
        kernel(value.reshape(-1), grad.reshape(-1), kind(weight_decay), kind(-lr), weight_decay != 0.0)
    else:
        kernel(value.reshape(-1), grad.reshape(-1), buf.reshape(-1), kind(weight_decay), kind(momentum),
               kind(1.0 - dampening), kind(-lr), _FUSED_TINY[value.dtype], weight_decay != 0.0, dampening != 0.0,
               bool(nesterov), flush)


def _fusable(*arrays: np.ndarray) -> bool:
    """Whether the fused loops can take these arrays: :func:`_one_layout` in a dtype the loops
    compile for, each a plain ndarray (numba types no subclass, a matrix's reshape stays 2-D),
    writeable (numba's array type; the loops write only the parameter and its state) and aligned
    (numba types every array as aligned)."""
    return (arrays[0].dtype in _FUSED_TINY
            and all(type(a) is np.ndarray and a.flags.aligned and a.flags.writeable for a in arrays)
            and _one_layout(*arrays))


def _sgd_momentum_blocked(value: np.ndarray, grad: np.ndarray, buf: np.ndarray, lr: float, momentum: float,
                          flush: bool = False) -> bool:
    """SGD's steady momentum step (``buf = μ buf + g; value -= lr buf``) block by block, with the
    same four operations per element as the one-pass code (the same bits; with ``flush``, each
    block's buffer flushed of subnormals after its update, as the one-pass code flushes the whole):
    each operation over a whole large array would stream it from memory again, four times per step;
    over a block that stays in the cache, each array is read and written once. False (nothing
    written) when :func:`_blockable` says no."""
    if not _blockable(value, grad, buf):
        return False
    v, g, b = value.reshape(-1), grad.reshape(-1), buf.reshape(-1)
    n = v.shape[0]
    blocks = -(-n // _SGD_BLOCK)
    size = -(-n // blocks)
    scratch = np.empty(size, value.dtype)
    multiply, add = np.multiply, np.add
    neg_lr = -lr
    for i in range(0, n, size):
        j = i + size
        bb, vb = b[i:j], v[i:j]
        sb = scratch if j <= n else scratch[:n - i]
        multiply(bb, momentum, out=bb)
        add(bb, g[i:j], out=bb)
        if flush:
            flush_subnormals(bb)
        multiply(bb, neg_lr, out=sb)
        add(vb, sb, out=vb)
    return True


#: Optimizer steps between two flushes of a moment buffer's subnormal entries (see flush_subnormals).
_FLUSH_EVERY = 16
#: sgd_update_many flushes only the buffers whose update underflowed, except on every this many steps,
#: when it flushes every buffer: a product that is exact raises no underflow (a momentum with a short
#: significand, 0.5 or 0.75, times a subnormal with enough trailing zero bits; a subnormal gradient
#: added, which is always exact).
_FLUSH_ALWAYS_EVERY = 256


class _Underflow:
    """The flush mode "where the buffer's update underflowed": the ``np.errstate(under="call")``
    callback notes that a ufunc's result underflowed (IEEE: tiny and inexact, as a subnormal times a
    momentum such as 0.9 nearly always is), so a step that made or kept no subnormal (early in
    training, every step) skips the flush's three passes over the buffer. A product that happens to
    be exact goes unseen until the periodic flush of every buffer (_FLUSH_ALWAYS_EVERY)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, kind: str, flag: int) -> None:
        self.seen = True


#: How an update flushes its buffer: False never, True always, an _Underflow where it underflowed.
_Flush = bool | _Underflow


def _watch(flush: _Flush) -> None:
    """Before a buffer's update: forget the underflows seen so far."""
    if type(flush) is _Underflow:
        flush.seen = False


def _flush_if(buf: np.ndarray, flush: _Flush) -> None:
    """After a buffer's update: flush it if ``flush`` says so."""
    if flush is True or (type(flush) is _Underflow and flush.seen):
        flush_subnormals(buf)


#: Each buffer's phase for lone sgd_update calls (sgd_update_many is paced by the optimizer's step).
_flush_phase: dict[int, int] = {}
#: Per float itemsize: the integer view and the exponent's bits.
_EXPONENT_BITS = {2: (np.dtype(np.int16), 0x7C00), 4: (np.dtype(np.int32), 0x7F800000),
                  8: (np.dtype(np.int64), 0x7FF0000000000000)}


def _flush_due(buf: np.ndarray) -> bool:
    """True on one call in ``_FLUSH_EVERY`` for each buffer (told apart by ``id``; a reused id only
    shifts that buffer's phase)."""
    base = buf.base  # a 0-d buffer is updated through a fresh 1-element view each call: its base's phase
    key = id(buf if base is None else base)
    phase = _flush_phase.get(key, 0) + 1
    if phase >= _FLUSH_EVERY:
        phase = 0
    elif len(_flush_phase) > 1 << 16:  # buffers of optimizers long gone
        _flush_phase.clear()
    _flush_phase[key] = phase
    return phase == 0


def flush_subnormals(a: np.ndarray) -> None:
    """Set ``a``'s subnormal entries (0 < |a| < the smallest normal) to zero, in place.

    A moment buffer whose gradient is exactly zero (a dead ReLU unit's weights, an input pixel that
    is always 0) decays as ``mu^t buf`` into subnormals, and ``mu`` times the smallest one rounds back
    to it, so it stays there: every later step's floating-point operation on it takes a microcode
    assist on x86 (50x a normal one here: 1.1 ms for ``buf *= 0.9`` over 200k subnormals against
    21 us). Flushing them, as TensorFlow's and XLA's CPU threads do for every operation (FTZ/DAZ),
    changes nothing a parameter can see (``lr`` times a subnormal is below its resolution unless the
    parameter is itself below 1e-30). The test reads the exponent as integer bits, no float op."""
    spec = _EXPONENT_BITS.get(a.dtype.itemsize) if a.dtype.kind == "f" else None
    if spec is None or a.size == 0 or not a.dtype.isnative:  # the integer view reads native byte order
        return
    mask = np.bitwise_and(a.view(spec[0]), spec[1])
    np.copyto(a, 0, where=np.equal(mask, 0))  # (zeros rewritten as zeros)


_UNSIGNED = {k: np.dtype(f"u{k}") for k in (1, 2, 4, 8)}
_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
#: What ndarray.max / ndarray.sum call, without their Python wrappers (numpy/_core/_methods.py).
_max_reduce, _add_reduce = np.maximum.reduce, np.add.reduce


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, NumPy's only one (imported on first use: it is an optional dependency)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 on the numpy backend needs ml_dtypes: pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def _half_product(a: np.ndarray, b: np.ndarray, out_dtype: Any = None) -> np.ndarray:
    """``a @ b`` for float16/bfloat16 operands through float32 BLAS, rounded once to the half type
    (as a GPU's tensor cores accumulate); NumPy's own half products have no BLAS and run ~100x slower."""
    half = a.dtype if a.dtype.itemsize == 2 else b.dtype
    product = np.matmul(a.astype(np.float32), b.astype(np.float32))
    return product if out_dtype is not None else product.astype(half)
#: Elements per block of rows where a row-wise pass runs block by block (256 KiB of float32).
_BLOCK_ELEMS = 65536


def _row_max(a: np.ndarray) -> np.ndarray:
    """``a.max(axis=1, keepdims=True)`` for 2-D ``a``. NumPy reduces a short row (10 classes) one
    row at a time, at ~50 ns a row; over a transposed copy the reduction runs down long columns
    (faster from 16 rows on: 2.3 against 3.6 us at 32 x 10, 13 against 180 us at 2048 x 10)."""
    if a.shape[1] <= 32 and a.shape[0] >= 16:
        return _max_reduce(np.ascontiguousarray(a.T), axis=0)[:, None]
    return _max_reduce(a, axis=1, keepdims=True)


#: Read-only vectors of ones by (length, dtype), the operand of the GEMV that sums rows or columns.
_ONES: dict[tuple[int, np.dtype], np.ndarray] = {}
#: Read-only ``arange(0, n*c, c)`` by (n, c): the flat index of each row's first element.
_ROW_STARTS: dict[tuple[int, int], np.ndarray] = {}
_CACHE_LIMIT = 16


def _cached(cache: dict[Any, np.ndarray], key: Any, make: Any) -> np.ndarray:
    a = cache.get(key)
    if a is None:
        if len(cache) >= _CACHE_LIMIT:
            try:  # the oldest key (batch sizes change rarely); another thread may be evicting too
                cache.pop(next(iter(cache), None), None)
            except RuntimeError:  # the dict changed size under the iterator
                pass
        a = make()
        a.flags.writeable = False
        cache[key] = a
    return a


#: A read-only 0-d zero per dtype: a ufunc converts a Python 0 for every call (~0.5 us of a ReLU's 4).
_ZEROS: dict[np.dtype, np.ndarray] = {}


def _zero(dtype: np.dtype) -> np.ndarray:
    zero = _ZEROS.get(dtype)
    return zero if zero is not None else _cached(_ZEROS, dtype, lambda: np.zeros((), dtype))


def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    ones = _ONES.get((n, dtype))
    return ones if ones is not None else _cached(_ONES, (n, dtype), lambda: np.ones(n, dtype))


def _row_starts(n: int, c: int) -> np.ndarray:
    starts = _ROW_STARTS.get((n, c))
    return starts if starts is not None else _cached(_ROW_STARTS, (n, c), lambda: np.arange(0, n * c, c))


_ROW_SUM_GEMV_MAX = 1024


def _row_sum(a: np.ndarray) -> np.ndarray:
    """``a.sum(axis=1)`` for 2-D float32/float64 ``a`` as a GEMV with ones: NumPy's reduction along
    short rows costs ~20 ns a row (47 us at 2048 x 10), BLAS's product 6 us. Long rows keep NumPy's
    pairwise sum: BLAS accumulates in order, 5-8x the float32 error at 250k classes."""
    if a.shape[1] > _ROW_SUM_GEMV_MAX:
        return a.sum(axis=1)
    return np.matmul(a, _ones(a.shape[1], a.dtype))


def _column_sum(a: np.ndarray) -> np.ndarray:
    """``a.sum(axis=0)`` for 2-D float32/float64 ``a`` (a bias gradient) as a GEMV with ones:
    2-3x faster than NumPy's reduction at every batch (1 against 2.3 us at 32 x 256, 38 against
    113 us at 2048 x 256)."""
    return np.matmul(_ones(a.shape[0], a.dtype), a)


def _as_0d(result: np.ndarray, original: np.ndarray | None) -> np.ndarray:
    """``original`` itself when ``result`` was written into it through a view, else ``result`` as 0-d."""
    if original is not None and np.shares_memory(result, original):
        return original
    return result.reshape(())
