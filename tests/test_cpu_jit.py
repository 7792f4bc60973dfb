"""cpu_jit's fused loops (numba, optional), SGD's (plain momentum; weight decay, dampening, Nesterov),
Adam's, RMSprop's and Adagrad's: the same bits as the NumPy forms on every value and dtype they
take, the NumPy forms wherever they cannot take the arrays or numba is missing, and numba imported
only once a large parameter's NumPy updates would repay it (or at once when asked)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from deepcore import nn, optim
from deepcore.backend import cpu_jit, numpy_backend

from .helpers import count_fused_calls, force_momentum_form


def _kernel():
    kernel = cpu_jit.sgd_momentum()
    if kernel is None:
        pytest.skip(f"the fused momentum loop is unavailable: {cpu_jit.status()['reason']}")
    return kernel


def _awkward(rng, n: int, dtype) -> np.ndarray:
    """Normal values with every kind of special one mixed in: ±0, subnormals, the smallest normal,
    huge values (whose products overflow), ±inf and NaN."""
    info = np.finfo(dtype)
    a = rng.standard_normal(n).astype(dtype)
    special = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny, -info.tiny,
                        info.tiny * 1.05, info.tiny / 3, info.max, -info.max, np.inf, -np.inf, np.nan], dtype=dtype)
    a[rng.integers(0, n, 3 * special.size)] = np.tile(special, 3)
    return a


def _same_signs(a: np.ndarray, b: np.ndarray) -> None:
    """The signs agree wherever the values are numbers (``assert_array_equal`` takes -0.0 == 0.0)."""
    numbers = ~np.isnan(a)
    np.testing.assert_array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))


def _one_pass(value, grad, buf, lr, momentum, flush):
    """NumPy's one-pass form as the hand-written loop states it (flush: the subnormals zeroed)."""
    with np.errstate(all="ignore"):
        buf *= momentum
        buf += grad
        if flush:
            numpy_backend.flush_subnormals(buf)
        value += np.multiply(buf, -lr)


@pytest.mark.parametrize("flush", [False, True], ids=["no-flush", "flush"])
@pytest.mark.parametrize("n", [1, 7, 4099, 200_704])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_loop_gives_the_one_pass_forms_bits(n, dtype, flush):
    kernel = _kernel()
    rng = np.random.default_rng(n)
    value, grad, buf = (_awkward(rng, n, dtype) for _ in range(3))
    want_v, want_b = value.copy(), buf.copy()
    tiny = dtype(np.finfo(dtype).tiny)
    for lr, momentum in ((0.01, 0.9), (0.3, 0.5), (1e-5, 0.99)):
        kernel(value, grad, buf, dtype(momentum), dtype(-lr), tiny, flush)
        _one_pass(want_v, grad, want_b, lr, momentum, flush)
        # Same bits (NaN == NaN here, whatever its sign and payload), the signs of zeros included.
        np.testing.assert_array_equal(buf, want_b)
        np.testing.assert_array_equal(value, want_v)
        _same_signs(buf, want_b)
        _same_signs(value, want_v)
    if flush:
        assert not np.any((buf != 0) & (np.abs(buf) < tiny))


def test_sgd_runs_large_parameters_fused_except_on_steps_that_watch_for_underflow(monkeypatch):
    # 260 steps of one 300 x 400 weight and a small bias: the weight's steady steps run fused, but for
    # the steps that flush only where the update underflowed (every 16th, NumPy's flags see it) and
    # the first (the buffer is made); the bias never (too small). Every bit as the NumPy forms give.
    calls = count_fused_calls(monkeypatch)
    rng = np.random.default_rng(0)
    grads = [(rng.standard_normal((300, 400)).astype(np.float32) * 1e-3, rng.standard_normal(300).astype(np.float32))
             for _ in range(260)]
    every, always = numpy_backend._FLUSH_EVERY, numpy_backend._FLUSH_ALWAYS_EVERY
    for gw, _ in grads[always - 1:]:
        gw[0, :8] = 0.0  # from the flush-every-buffer step on, row 0's first 8 weights get no gradient

    def train(form: str) -> list[np.ndarray]:
        with pytest.MonkeyPatch.context() as mp:
            if form != "fused":
                force_momentum_form(mp, form)
            w, b = nn.Param(np.ones((300, 400), np.float32), "w"), nn.Param(np.zeros(300, np.float32), "b")
            opt = optim.SGD([w, b], lr=0.05, momentum=0.9)
            for s, (gw, gb) in enumerate(grads, 1):
                if s == always:  # subnormal buffer entries that step's update keeps subnormal (x 0.9, + 0)
                    opt.state[0]["momentum_buffer"][0, :8] = np.finfo(np.float32).tiny / 2
                w.grad, b.grad = gw.copy(), gb.copy()
                opt.step()
            return [w.value, b.value, opt.state[0]["momentum_buffer"], opt.state[1]["momentum_buffer"]]

    fused = train("fused")
    np.testing.assert_array_equal(fused[2][0, :8], 0.0)  # flushed by the fused loop on step 256, then 0.9 x 0
    watched = [s for s in range(2, 261) if s % every == 0 and s % always]
    assert len(calls) == 259 - len(watched) == 244 and set(calls) == {300 * 400}
    for form in ("one-pass", "blocked"):
        for a, b in zip(fused, train(form), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=form)


@pytest.mark.parametrize("case", ["strided-grad", "read-only-grad", "unaligned", "float16", "big-endian",
                                  "overlapping", "overlapping-views", "subclass"])
def test_arrays_the_fused_loop_cannot_take_run_in_numpy(monkeypatch, case):
    calls = count_fused_calls(monkeypatch)
    nb = numpy_backend.NumpyBackend()
    rng = np.random.default_rng(1)
    n = numpy_backend._FUSED_MIN + 3
    dtype = {"float16": np.float16, "big-endian": np.dtype(">f4")}.get(case, np.float32)
    value, buf = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    grad = rng.standard_normal(n).astype(dtype)
    if case == "strided-grad":
        grad = rng.standard_normal(2 * n).astype(np.float32)[::2]
    elif case == "read-only-grad":
        grad.flags.writeable = False
    elif case == "unaligned":
        raw = np.zeros(4 * n + 1, np.uint8)[1:].view(np.float32)
        raw[:] = value
        value = raw
        assert not value.flags.aligned
    elif case == "overlapping":
        grad = value
    elif case == "overlapping-views":  # two views one element apart: neither owns its memory
        both = np.concatenate([value, value[-1:]])
        value, grad = both[:-1], both[1:]
    elif case == "subclass":  # numba types no ndarray subclass
        value = value.view(type("Sub", (np.ndarray,), {}))
    want_v, want_b, g = value.copy(), buf.copy(), grad.copy()
    with np.errstate(all="ignore"):
        v, b = nb.sgd_update(value, grad, buf, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                             weight_decay=0.0, first_step=False)
        _one_pass(want_v, g, want_b, 0.1, 0.9, False)
    assert calls == []
    np.testing.assert_array_equal(b, want_b)
    np.testing.assert_array_equal(v, want_v)


def _sgd_both(value, grad, buf, **hyper):
    """``sgd_update_many`` of one parameter as it runs (fused where it can) and in NumPy (the loops
    off), on copies: ``(value, buf)`` of each."""
    nb = numpy_backend.NumpyBackend()
    fused = [value.copy(), None if buf is None else buf.copy()]
    numpy_ = [value.copy(), None if buf is None else buf.copy()]
    with np.errstate(all="ignore"):
        fused = [a[0] for a in nb.sgd_update_many([fused[0]], [grad], [fused[1]], **hyper)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
            numpy_ = [a[0] for a in nb.sgd_update_many([numpy_[0]], [grad], [numpy_[1]], **hyper)]
    return fused, numpy_


@pytest.mark.parametrize(("weight_decay", "dampening", "nesterov"),
                         [(5e-4, 0.0, False), (5e-4, 0.0, True), (0.0, 0.0, True), (0.0, 0.1, False),
                          (5e-4, 0.25, False)], ids=["decay", "nesterov-decay", "nesterov", "dampening",
                                                     "dampening-decay"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_sgd_gives_numpys_bits(monkeypatch, dtype, weight_decay, dampening, nesterov):
    # Awkward values everywhere; steady steps that flush nothing (3), flush every buffer (256), and
    # flush only where the update underflowed (16: NumPy's flags see that, so NumPy runs it).
    calls = count_fused_calls(monkeypatch, "sgd")
    rng = np.random.default_rng(11)
    n = numpy_backend._FUSED_MIN + 5
    value, grad, buf = (_awkward(rng, n, dtype) for _ in range(3))
    buf[:40] = np.finfo(dtype).tiny / 4  # subnormal entries that the update keeps subnormal
    grad[:40] = 0.0
    value[:20] = 0.0  # (with decay: wd * 0 + 0 adds nothing)
    for step, lr, momentum in ((3, 0.01, 0.9), (16, 0.1, 0.5), (256, 1e-3, 0.99), (257, 0.5, 0.9)):
        fused, numpy_ = _sgd_both(value, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                  nesterov=nesterov, weight_decay=weight_decay, step=step)
        for a, b in zip(fused, numpy_, strict=True):
            np.testing.assert_array_equal(a, b)
            _same_signs(a, b)
        if step == 256:
            assert not np.any((fused[1] != 0) & (np.abs(fused[1]) < np.finfo(dtype).tiny))
        value, buf = fused
    assert len(calls) == 3


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["plain", "decay"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_sgd_without_momentum_gives_numpys_bits(monkeypatch, dtype, weight_decay):
    calls = count_fused_calls(monkeypatch, "sgd_plain")
    rng = np.random.default_rng(12)
    n = numpy_backend._FUSED_MIN
    value, grad = _awkward(rng, n, dtype), _awkward(rng, n, dtype)
    for step in (1, 16, 256):  # no buffer: no flush on any step
        fused, numpy_ = _sgd_both(value, grad, None, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                                  weight_decay=weight_decay, step=step)
        np.testing.assert_array_equal(fused[0], numpy_[0])
        _same_signs(fused[0], numpy_[0])
        assert fused[1] is None and numpy_[1] is None
        value = fused[0]
    assert len(calls) == 3


@pytest.mark.parametrize("case", ["numpy-scalar", "small", "strided", "first-step", "plain-numpy-scalar",
                                  "nesterov-dampening"])
def test_sgd_runs_in_numpy_where_the_general_loop_would_round_otherwise_or_cannot_take_the_arrays(monkeypatch, case):
    calls = count_fused_calls(monkeypatch, "sgd")
    plain_calls = count_fused_calls(monkeypatch, "sgd_plain")
    rng = np.random.default_rng(13)
    n = 100 if case == "small" else numpy_backend._FUSED_MIN
    value, grad, buf = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    if case == "strided":
        grad = rng.standard_normal(2 * n).astype(np.float32)[::2]
    hyper = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 1e-3, "step": 3}
    if case == "numpy-scalar":  # NumPy applies a float64 scalar in float64
        hyper["weight_decay"] = np.float64(1e-3)
    if case == "first-step":
        buf = None
    if case == "plain-numpy-scalar":  # without momentum too
        hyper.update(momentum=0.0, nesterov=False, lr=np.float64(0.01))
        buf = None
    if case == "nesterov-dampening":  # (SGD refuses it; the backend's NumPy form reads the dampened term)
        hyper["dampening"] = 0.5
    fused, numpy_ = _sgd_both(value, grad, buf, **hyper)
    assert calls == [] and plain_calls == []
    for a, b in zip(fused, numpy_, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sgd_optimizer_with_nesterov_and_decay_steps_large_parameters_fused(monkeypatch):
    # The common recipe (Nesterov momentum 0.9, weight decay 5e-4) for 40 steps: the weight's steady
    # steps fused except the watched ones (16, 32: NumPy), the first (the buffer is made) and the
    # bias (small); every bit as with the loops off.
    calls = count_fused_calls(monkeypatch, "sgd")
    rng = np.random.default_rng(14)
    grads = [(rng.standard_normal((300, 400)).astype(np.float32), rng.standard_normal(300).astype(np.float32))
             for _ in range(40)]

    def train() -> list[np.ndarray]:
        w, b = nn.Param(np.ones((300, 400), np.float32), "w"), nn.Param(np.zeros(300, np.float32), "b")
        opt = optim.SGD([w, b], lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        for gw, gb in grads:
            w.grad, b.grad = gw.copy(), gb.copy()
            opt.step()
        return [w.value, b.value, opt.state[0]["momentum_buffer"]]

    fused = train()
    assert len(calls) == 37 and set(calls) == {300 * 400}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
        for a, b in zip(fused, train(), strict=True):
            np.testing.assert_array_equal(a, b)


def _adam_both(value, grad, m, v, calls, **hyper):
    """``adam_update`` as it runs (fused where it can) and in NumPy (the loop off), on copies."""
    nb = numpy_backend.NumpyBackend()
    fused = [a.copy() for a in (value, m, v)]
    numpy_ = [a.copy() for a in (value, m, v)]
    with np.errstate(all="ignore"):
        nb.adam_update(fused[0], grad, fused[1], fused[2], **hyper)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
            nb.adam_update(numpy_[0], grad, numpy_[1], numpy_[2], **hyper)
    return fused, numpy_


@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.01, False), (0.01, True)],
                         ids=["plain", "l2", "adamw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adam_gives_numpys_bits(monkeypatch, dtype, weight_decay, decoupled):
    # Awkward values everywhere (v's negatives and NaNs give NaN roots), eps 0 with v = 0 (division by
    # zero), the steps that flush m (every 16th) and those that do not.
    calls = count_fused_calls(monkeypatch, "adam")
    rng = np.random.default_rng(7)
    n = numpy_backend._FUSED_MIN + 11
    value, grad, m, v = (_awkward(rng, n, dtype) for _ in range(4))
    v[:50] = 0.0
    m[50:60] = grad[50:60] = np.finfo(dtype).tiny / 4  # first moments that stay subnormal (g - m = 0)
    for step, eps in ((1, 1e-8), (15, 0.0), (16, 1e-8), (32, 0.0), (1000, 1e-3)):
        fused, numpy_ = _adam_both(value, grad, m, v, calls, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=eps,
                                   weight_decay=weight_decay, decoupled=decoupled)
        for a, b in zip(fused, numpy_, strict=True):
            np.testing.assert_array_equal(a, b)
            _same_signs(a, b)
    assert len(calls) == 5


@pytest.mark.parametrize("case", ["numpy-scalar", "small", "strided"])
def test_adam_runs_in_numpy_where_the_loop_would_round_otherwise_or_cannot_take_the_arrays(monkeypatch, case):
    calls = count_fused_calls(monkeypatch, "adam")
    rng = np.random.default_rng(8)
    n = 100 if case == "small" else numpy_backend._FUSED_MIN
    value, grad, m, v = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    if case == "strided":
        grad = rng.standard_normal(2 * n).astype(np.float32)[::2]
    lr = np.float64(1e-3) if case == "numpy-scalar" else 1e-3  # NumPy computes a float64 scalar's step in float64
    fused, numpy_ = _adam_both(value, grad, m, v, calls, step=3, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=0.0, decoupled=False)
    assert calls == []
    for a, b in zip(fused, numpy_, strict=True):
        np.testing.assert_array_equal(a, b)


def test_adam_optimizer_steps_large_parameters_fused(monkeypatch):
    calls = count_fused_calls(monkeypatch, "adam")
    w, b = nn.Param(np.ones((300, 400), np.float32), "w"), nn.Param(np.zeros(300, np.float32), "b")
    opt = optim.AdamW([w, b], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        w.grad, b.grad = np.full((300, 400), 0.5, np.float32), np.full(300, 0.5, np.float32)
        opt.step()
    assert calls == [300 * 400] * 3
    # A constant gradient: m_t / sqrt(v_t) with both bias-corrected is 1, so each step moves by lr
    # (eps aside) after the decoupled decay: w_t = w_{t-1} (1 - lr wd) - lr.
    want = 1.0
    for _ in range(3):
        want = want * (1 - 1e-2 * 0.1) - 1e-2
    np.testing.assert_allclose(w.value, want, rtol=1e-5)


def _both(method: str, arrays: list, grad, **hyper):
    """``method`` of the NumPy backend as it runs (fused where it can) and in NumPy (the loops off),
    each on copies of ``arrays`` (None stays None), with ``grad`` after the first: both copies."""
    nb = numpy_backend.NumpyBackend()
    runs = []
    for fused in (True, False):
        copies = [None if a is None else a.copy() for a in arrays]
        with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as mp:
            if not fused:
                mp.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
            getattr(nb, method)(copies[0], grad, *copies[1:], **hyper)
        runs.append(copies)
    return runs


@pytest.mark.parametrize(("centered", "momentum", "weight_decay", "alpha"),
                         [(False, 0.0, 0.0, 0.99), (True, 0.0, 0.0, 0.99), (False, 0.9, 1e-2, 0.99),
                          (True, 0.5, 1e-2, 0.3)],
                         ids=["plain", "centered", "momentum-decay", "centered-momentum-decay-lerp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_rmsprop_gives_numpys_bits(monkeypatch, dtype, centered, momentum, weight_decay, alpha):
    # alpha 0.3: the centered average's lerp weight 1 - alpha >= 0.5, torch.lerp's other spelling.
    calls = count_fused_calls(monkeypatch, "rmsprop")
    rng = np.random.default_rng(15)
    n = numpy_backend._FUSED_MIN + 9
    value, grad, square_avg, grad_avg, buf = (_awkward(rng, n, dtype) for _ in range(5))
    square_avg[:30] = 0.0  # with eps 0 below: division by zero
    grad_avg = grad_avg if centered else None
    buf = buf if momentum else None
    for eps in (1e-8, 0.0):
        fused, numpy_ = _both("rmsprop_update", [value, square_avg, grad_avg, buf], grad, lr=1e-2, alpha=alpha,
                              eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
        for a, b in zip(fused, numpy_, strict=True):
            if a is None:
                assert b is None
                continue
            np.testing.assert_array_equal(a, b)
            _same_signs(a, b)
    assert len(calls) == 2


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["plain", "decay"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adagrad_gives_numpys_bits(monkeypatch, dtype, weight_decay):
    calls = count_fused_calls(monkeypatch, "adagrad")
    rng = np.random.default_rng(16)
    n = numpy_backend._FUSED_MIN + 2
    value, grad, state_sum = (_awkward(rng, n, dtype) for _ in range(3))
    state_sum[:30] = grad[:30] = 0.0  # with eps 0: 0 / 0
    for step, lr_decay, eps in ((1, 0.0, 1e-10), (7, 1e-2, 0.0)):
        fused, numpy_ = _both("adagrad_update", [value, state_sum], grad, step=step, lr=1e-2, lr_decay=lr_decay,
                              eps=eps, weight_decay=weight_decay)
        for a, b in zip(fused, numpy_, strict=True):
            np.testing.assert_array_equal(a, b)
            _same_signs(a, b)
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["numpy-scalar", "small", "strided"])
def test_rmsprop_and_adagrad_run_in_numpy_where_the_loops_would_round_otherwise_or_cannot_take_the_arrays(
        monkeypatch, case):
    calls = count_fused_calls(monkeypatch, "rmsprop")
    adagrad_calls = count_fused_calls(monkeypatch, "adagrad")
    rng = np.random.default_rng(17)
    n = 100 if case == "small" else numpy_backend._FUSED_MIN
    value, grad, state = (np.abs(rng.standard_normal(n)).astype(np.float32) for _ in range(3))
    if case == "strided":
        grad = rng.standard_normal(2 * n).astype(np.float32)[::2]
    lr = np.float64(1e-2) if case == "numpy-scalar" else 1e-2
    runs = [_both("rmsprop_update", [value, state, None, None], grad, lr=lr, alpha=0.99, eps=1e-8,
                  weight_decay=0.0, momentum=0.0, centered=False),
            _both("adagrad_update", [value, state], grad, step=2, lr=lr, lr_decay=0.0, eps=1e-10, weight_decay=0.0)]
    assert calls == [] and adagrad_calls == []
    for fused, numpy_ in runs:
        for a, b in zip(fused, numpy_, strict=True):
            if a is not None:
                np.testing.assert_array_equal(a, b)


def test_rmsprop_and_adagrad_optimizers_step_large_parameters_fused(monkeypatch):
    # Through the optimizers, the same bits as with the loops off; the small bias in NumPy.
    calls = {name: count_fused_calls(monkeypatch, name) for name in ("rmsprop", "adagrad")}
    rng = np.random.default_rng(18)
    grads = [(rng.standard_normal((300, 400)).astype(np.float32), rng.standard_normal(300).astype(np.float32))
             for _ in range(5)]

    def train(make) -> list[np.ndarray]:
        w, b = nn.Param(np.ones((300, 400), np.float32), "w"), nn.Param(np.zeros(300, np.float32), "b")
        opt = make([w, b])
        for gw, gb in grads:
            w.grad, b.grad = gw.copy(), gb.copy()
            opt.step()
        return [w.value, b.value]

    for name, make in (("rmsprop", lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True,
                                                           weight_decay=1e-3)),
                       ("adagrad", lambda p: optim.Adagrad(p, lr=1e-1, lr_decay=1e-3, weight_decay=1e-3))):
        fused = train(make)
        assert calls[name] == [300 * 400] * 5, name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
            for a, b in zip(fused, train(make), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)


TORCH_CONFIGS = [
    ("SGD", {"lr": 0.1}, "sgd_plain"),
    ("SGD", {"lr": 0.1, "weight_decay": 0.01}, "sgd_plain"),
    ("SGD", {"lr": 0.05, "momentum": 0.9}, "sgd_momentum"),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}, "sgd"),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01}, "sgd"),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.01}, "adam"),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}, "adam"),
    ("RMSprop", {"lr": 1e-2}, "rmsprop"),
    ("RMSprop", {"lr": 1e-2, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.1}, "rmsprop"),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1}, "adagrad"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("name", "kw", "loop"), TORCH_CONFIGS,
                         ids=[f"{n}-{'-'.join(kw)}" for n, kw, _ in TORCH_CONFIGS])
def test_fused_steps_match_torch(monkeypatch, name, kw, loop, dtype):
    # An independent reference for every fused loop: PyTorch's single-tensor optimizers on a
    # parameter large enough to run fused, over six steps (the first makes the state).
    torch = pytest.importorskip("torch")
    calls = count_fused_calls(monkeypatch, loop)
    rng = np.random.default_rng(19)
    shape = (260, 256)
    value = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(6)]
    p = nn.Param(value.copy(), "w")
    opt = getattr(optim, name)([p], **kw)
    tp = torch.tensor(value.copy(), requires_grad=True)
    topt = getattr(torch.optim, name)([tp], foreach=False, **kw)
    for g in grads:
        p.grad, tp.grad = g.copy(), torch.tensor(g)
        opt.step()
        topt.step()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(p.value, tp.detach().numpy(), **tol)
    assert len(calls) >= 5 and set(calls) == {value.size}


def test_without_the_kernels_the_reason_is_kept_and_numpy_runs(monkeypatch):
    import deepcore.backend as backend_pkg

    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    monkeypatch.setattr(cpu_jit, "_kernels", None)
    monkeypatch.setattr(cpu_jit, "_tried", False)
    monkeypatch.setattr(cpu_jit, "_reason", "")
    monkeypatch.setitem(sys.modules, "deepcore.backend.cpu_jit_kernels", None)  # as if numba were missing
    monkeypatch.delattr(backend_pkg, "cpu_jit_kernels", raising=False)
    assert cpu_jit.sgd_momentum() is None and cpu_jit.adam() is None
    status = cpu_jit.status()
    assert status["tried"] and not status["loaded"] and status["reason"].startswith("numba unavailable: ")
    w = nn.Param(np.ones((300, 400), np.float32), "w")
    opt = optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(3):
        w.grad = np.full((300, 400), 0.5, np.float32)
        opt.step()
    # buf: 0.5, 0.95, 1.355; w: 1 - 0.1 * (0.5 + 0.95 + 1.355)
    np.testing.assert_allclose(w.value, 1 - 0.1 * (0.5 + 0.95 + 1.355), rtol=1e-6)

    monkeypatch.setenv("DEEPCORE_JIT", "0")
    cpu_jit.reset()
    assert cpu_jit.status() == {"tried": False, "loaded": False, "reason": "disabled by DEEPCORE_JIT=0"}
    assert not cpu_jit.ruled_out()
    assert cpu_jit.sgd_momentum() is None and cpu_jit.status()["reason"] == "disabled by DEEPCORE_JIT=0"
    assert cpu_jit.ruled_out()


def test_a_loop_that_fails_to_compile_leaves_numpy_running_and_the_other_loops_fused(monkeypatch):
    if cpu_jit.sgd_momentum() is None:
        pytest.skip(f"numba unavailable: {cpu_jit.status()['reason']}")
    from deepcore.backend import cpu_jit_kernels

    def broken(value, grad, square_avg, grad_avg, buf, *scalars):  # numba cannot type a string into a float array
        value[0] = "not a number"

    fn, signatures, options = cpu_jit_kernels._SOURCES["rmsprop"]
    monkeypatch.setitem(cpu_jit_kernels._SOURCES, "rmsprop", (broken, signatures, options))
    monkeypatch.delitem(cpu_jit_kernels._COMPILED, "rmsprop", raising=False)
    monkeypatch.setattr(cpu_jit, "_broken", set())
    monkeypatch.setattr(cpu_jit, "_reason", "")
    compiles = []
    real_loop = cpu_jit_kernels.loop
    monkeypatch.setattr(cpu_jit_kernels, "loop", lambda name: compiles.append(name) or real_loop(name))
    assert cpu_jit.rmsprop() is None and cpu_jit.rmsprop() is None
    assert compiles == ["rmsprop"]  # tried once, then remembered
    assert cpu_jit._broken == {"rmsprop"}
    assert cpu_jit.status()["reason"].startswith("numba failed to compile the rmsprop loop: ")
    assert cpu_jit.sgd_momentum() is not None and not cpu_jit.ruled_out()
    # RMSprop's step in NumPy: s = 0.01 g² after one step (alpha 0.99), so w -= lr g / (0.1 |g| + eps)
    w = nn.Param(np.ones((300, 400), np.float32), "w")
    opt = optim.RMSprop([w], lr=1e-2)
    w.grad = np.full((300, 400), 0.5, np.float32)
    opt.step()
    np.testing.assert_allclose(w.value, 1 - 1e-2 * 0.5 / (0.1 * 0.5 + 1e-8), rtol=1e-6)


def test_an_interrupted_load_is_tried_again(monkeypatch):
    monkeypatch.setattr(cpu_jit, "_kernels", None)
    monkeypatch.setattr(cpu_jit, "_tried", False)
    monkeypatch.setattr(cpu_jit, "_reason", "")

    def interrupted() -> str:
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(cpu_jit, "_disabled", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cpu_jit.sgd_momentum()
    assert cpu_jit.status()["tried"] is False  # no outcome recorded: the next call loads
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    if importlib.util.find_spec("numba") is not None:
        assert cpu_jit.sgd_momentum() is not None and cpu_jit.status() == {"tried": True, "loaded": True,
                                                                             "reason": ""}


def _fresh(code: str, **env: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if k != "DEEPCORE_JIT"}, **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=True)
    return out.stdout.strip()


_IMPORT_CHECK = """
import sys
import numpy as np
import deepcore as dc
from deepcore import nn, optim, losses
from deepcore.backend import cpu_jit
seen = ["numba" in sys.modules]
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # the digits MLP's size
opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = np.ones((8, 64), np.float32), np.arange(8) % 10
for _ in range(3):
    logits, back = model.forward(x, train=True)
    back(losses.softmax_cross_entropy(logits, y)[1])
    opt.step()
    opt.zero_grad()
seen.append("numba" in sys.modules)
h = nn.Param(np.ones(100_000, np.float16), "h")  # large, but no dtype the loops take
opt = optim.SGD([h], lr=0.1, momentum=0.9)
for _ in range(2):
    h.grad = np.ones(100_000, np.float16); opt.step()
seen.append("numba" in sys.modules)
w = nn.Param(np.ones(100_000, np.float32), "w")
opt = optim.SGD([w], lr=0.1, momentum=0.9)
for _ in range(2):
    w.grad = np.ones(100_000, np.float32); opt.step()
seen.append("numba" in sys.modules)
spent = cpu_jit._spent
cpu_jit._spent = cpu_jit.LOAD_AFTER_S  # as after a second of such NumPy updates
w.grad = np.ones(100_000, np.float32); opt.step()
seen.append("numba" in sys.modules)
print(seen, spent > 0, cpu_jit.status()["loaded"])
"""


def test_numba_is_imported_only_once_a_large_parameters_numpy_updates_would_repay_it():
    # By default (DEEPCORE_JIT unset) numba waits until the NumPy forms have spent LOAD_AFTER_S on
    # updates a loop could take (the float32 weight's second step is the first, and is charged);
    # with DEEPCORE_JIT=1 it loads at the first call that wants it (here the small MLP's loss).
    # Never for small parameters or float16.
    if cpu_jit.sgd_momentum() is None:
        pytest.skip(f"numba unavailable: {cpu_jit.status()['reason']}")
    assert _fresh(_IMPORT_CHECK) == "[False, False, False, False, True] True True"
    assert _fresh(_IMPORT_CHECK, DEEPCORE_JIT="1") == "[False, True, True, True, True] False True"
    assert _fresh(_IMPORT_CHECK, DEEPCORE_JIT="0") == "[False, False, False, False, False] False False"


def test_the_loops_are_wanted_once_numpy_has_spent_what_loading_them_costs(monkeypatch):
    # The ski-rental rule in one process: nothing loaded until the NumPy forms' charged time reaches
    # LOAD_AFTER_S; DEEPCORE_JIT=1 wants them at once; preload() compiles every loop.
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", ""), ("_spent", 0.0), ("_mode", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    assert not cpu_jit.wanted()
    cpu_jit.charge(cpu_jit.LOAD_AFTER_S / 2)
    assert not cpu_jit.wanted() and not cpu_jit.status()["tried"]
    cpu_jit.charge(cpu_jit.LOAD_AFTER_S / 2)
    assert cpu_jit.wanted()
    monkeypatch.setattr(cpu_jit, "_spent", 0.0)
    monkeypatch.setattr(cpu_jit, "_mode", "")
    monkeypatch.setenv("DEEPCORE_JIT", "1")
    assert cpu_jit.wanted()
    if importlib.util.find_spec("numba") is not None:
        from deepcore.backend import cpu_jit_kernels

        assert cpu_jit.preload() and set(cpu_jit_kernels._COMPILED) >= set(cpu_jit_kernels._SOURCES)
        assert cpu_jit.wanted()


def test_every_optimizers_numpy_update_of_a_large_parameter_is_charged_until_the_loops_load(monkeypatch):
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", ""), ("_spent", 0.0), ("_mode", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    nb = numpy_backend.NumpyBackend()
    rng = np.random.default_rng(20)
    n = numpy_backend._FUSED_MIN
    value, grad, a, b = (np.abs(rng.standard_normal(n)).astype(np.float32) for _ in range(4))
    updates = {
        "sgd momentum": lambda: nb.sgd_update_many([value], [grad], [a], lr=0.1, momentum=0.9, dampening=0.0,
                                                   nesterov=False, weight_decay=0.0, step=3),
        "sgd nesterov decay": lambda: nb.sgd_update_many([value], [grad], [a], lr=0.1, momentum=0.9, dampening=0.0,
                                                         nesterov=True, weight_decay=1e-3, step=3),
        "sgd plain": lambda: nb.sgd_update_many([value], [grad], [None], lr=0.1, momentum=0.0, dampening=0.0,
                                                nesterov=False, weight_decay=0.0, step=3),
        "adam": lambda: nb.adam_update(value, grad, a, b, step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                       weight_decay=0.0, decoupled=False),
        "rmsprop": lambda: nb.rmsprop_update(value, grad, a, None, None, lr=1e-3, alpha=0.99, eps=1e-8,
                                             weight_decay=0.0, momentum=0.0, centered=False),
        "adagrad": lambda: nb.adagrad_update(value, grad, a, step=3, lr=1e-2, lr_decay=0.0, eps=1e-10,
                                             weight_decay=0.0),
    }
    for name, update in updates.items():
        before = cpu_jit._spent
        update()
        assert cpu_jit._spent > before, name
    small = np.ones(100, np.float32)  # nothing a loop would take: not charged
    before = cpu_jit._spent
    nb.adam_update(small, small.copy(), small.copy(), small.copy(), step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.0, decoupled=False)
    assert cpu_jit._spent == before and not cpu_jit.status()["tried"]


@pytest.mark.parametrize(("make", "loop"), [
    (lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), "sgd"),
    (lambda p: optim.AdamW(p, lr=1e-3, weight_decay=1e-2), "adam")], ids=["sgd-nesterov", "adamw"])
def test_numba_loading_in_the_middle_of_fit_changes_no_bit(monkeypatch, make, loop):
    # fit on a 300-256-10 MLP (its 76,800-weight first layer one the loops take) with a load budget
    # the first charged NumPy update spends: numba loads after the first steps, the rest run fused,
    # and every parameter ends as with the loops off.
    from deepcore import train

    calls = count_fused_calls(monkeypatch, loop)  # (the loop compiled and counted; cpu_jit reset below)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((256, 300)).astype(np.float32)
    y = rng.integers(0, 10, 256)

    def run() -> list[np.ndarray]:
        model = nn.Sequential(nn.Linear(300, 256, seed=1), nn.ReLU(), nn.Linear(256, 10, seed=2))
        train.fit(model, "softmax-ce", make(list(model.parameters())), (x, y), epochs=2, batch_size=32,
                  verbose=False)
        return [p.value for p in model.parameters()]

    for name, value in (("_kernels", None), ("_tried", False), ("_reason", ""), ("_spent", 0.0), ("_mode", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    monkeypatch.setattr(cpu_jit, "LOAD_AFTER_S", 1e-9)  # spent by the first charged NumPy update
    fused = run()
    assert cpu_jit.status()["loaded"] and cpu_jit._spent > 0
    assert 0 < len(calls) < 16 and set(calls) == {300 * 256}  # 16 steps, the first ones NumPy's
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numpy_backend, "_FUSED_MIN", sys.maxsize)
        for a, b in zip(fused, run(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_benchmarks_load_the_loops_for_deepcores_numpy_optimizer_steps_only(monkeypatch):
    from deepcore import bench
    from deepcore.bench.cases import steps_numpy_optimizer

    assert steps_numpy_optimizer("mlp_step", "numpy") and steps_numpy_optimizer("mlp_step", "numpy-dx")
    assert steps_numpy_optimizer("epoch", "numpy-fit") and steps_numpy_optimizer("cnn_step", "numpy")
    assert not steps_numpy_optimizer("mlp_step", "numpy-plain") and not steps_numpy_optimizer("mlp_step", "torch")
    assert not steps_numpy_optimizer("matmul", "numpy") and not steps_numpy_optimizer("softmax_ce", "numpy-unfused")
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", ""), ("_spent", 0.0), ("_mode", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    bench.make_workload("mlp_step", "numpy-plain", batch=4, sizes=(8, 4, 2))
    assert not cpu_jit.status()["tried"]
    bench.make_workload("mlp_step", "numpy-dx", batch=4, sizes=(8, 4, 2))
    assert cpu_jit.status()["tried"]
    assert cpu_jit.status()["loaded"] == (importlib.util.find_spec("numba") is not None)


def test_deepcore_info_says_whether_the_momentum_step_runs_fused(monkeypatch, capsys):
    from deepcore.cli import main
    from deepcore.cli.info import cpu_jit_line
    from deepcore.sysinfo import optional_integrations

    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    assert cpu_jit_line(None).startswith("off: numba not installed (pip install 'deepcore[jit]'")
    version = optional_integrations()["numba"]
    want = (f"numba {version}: SGD's, Adam's, RMSprop's and Adagrad's steps fused for parameters of >= "
            f"{numpy_backend._FUSED_MIN} weights, once NumPy has spent 1 s on those updates (DEEPCORE_JIT=1: "
            "from the first step, softmax cross-entropy too)"
            if cpu_jit.sgd_momentum() is not None
            else f"off: {cpu_jit.status()['reason']}")
    assert cpu_jit_line(version) == want
    if cpu_jit.sgd_momentum() is not None:
        monkeypatch.setenv("DEEPCORE_JIT", "1")
        monkeypatch.setattr(cpu_jit, "_mode", "")
        assert cpu_jit_line(version) == (
            f"numba {version}: SGD's, Adam's, RMSprop's and Adagrad's steps fused for parameters of >= "
            f"{numpy_backend._FUSED_MIN} weights and softmax cross-entropy of <= "
            f"{numpy_backend._CE_FUSED_MAX_SIZE} logits, from the first step (DEEPCORE_JIT=1)")
        monkeypatch.setattr(cpu_jit, "_broken", {"softmax_cross_entropy"})  # as after its compile failed
        from deepcore.backend import cpu_jit_kernels

        monkeypatch.delitem(cpu_jit_kernels._COMPILED, "softmax_cross_entropy", raising=False)
        assert cpu_jit_line(version).endswith(" weights, from the first step (DEEPCORE_JIT=1)")
    monkeypatch.setenv("DEEPCORE_JIT", "off")
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    assert main(["info"]) == 0
    assert "cpu jit: off: disabled by DEEPCORE_JIT=off" in capsys.readouterr().out.splitlines()
