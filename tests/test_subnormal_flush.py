"""The NumPy backend flushes subnormal numbers out of the optimizers' moment buffers.

Where a gradient entry is exactly zero for a long stretch (a dead ReLU unit, an input pixel that is
always 0), ``buf = mu * buf`` decays into the subnormals and sticks at the smallest one, and each
later float operation on it is a slow microcode assist on x86. The reference is PyTorch's SGD and
Adam, which keep those subnormals: the parameters must agree, the buffers must differ only there.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepcore import nn, optim
from deepcore.backend import cpu_jit, numpy_backend

from .helpers import force_momentum_form

TINY = {np.float16: np.finfo(np.float16).tiny, np.float32: np.finfo(np.float32).tiny,
        np.float64: np.finfo(np.float64).tiny}


#: Inputs per row of a 4-row weight large enough for the fused and blocked momentum forms.
_LARGE = max(numpy_backend._SGD_BLOCKED_MIN, numpy_backend._FUSED_MIN) // 4 + 5


def _subnormal_count(a: np.ndarray) -> int:
    a = np.asarray(a)
    return int(np.count_nonzero((a != 0) & (np.abs(a) < TINY[a.dtype.type])))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_flush_subnormals_zeroes_exactly_the_subnormals(dtype):
    tiny = TINY[dtype]
    smallest = np.nextafter(dtype(0), dtype(1))
    values = np.array([0.0, -0.0, smallest, -smallest, tiny / 2, -tiny / 3, tiny, -tiny, 1.0, -2.5,
                       np.inf, -np.inf, np.nan, np.finfo(dtype).max], dtype=dtype)
    a = values.copy()
    numpy_backend.flush_subnormals(a)
    want = values.copy()
    want[2:6] = 0.0
    np.testing.assert_array_equal(a, want)  # NaN compares equal to NaN here
    assert _subnormal_count(values) == 4 and _subnormal_count(a) == 0
    strided = np.stack([values, values])[:, ::2]  # a non-contiguous view is flushed in place too
    numpy_backend.flush_subnormals(strided)
    np.testing.assert_array_equal(strided[0], want[::2])


def test_flush_subnormals_leaves_other_dtypes_alone():
    ints = np.array([0, 1, 2**23], np.int32)
    numpy_backend.flush_subnormals(ints)
    np.testing.assert_array_equal(ints, [0, 1, 2**23])


def _force_form(monkeypatch, form: str | None) -> None:
    """The momentum step of a large parameter in ``form`` (see helpers.force_momentum_form); None: as it comes."""
    if form is not None:
        force_momentum_form(monkeypatch, form)


def _dead_unit_problem(n_in: int, steps: int, opt_name: str):
    """A linear layer whose gradient row 0 is zero after the first step (that unit is dead from then
    on): ``steps`` updates of deepcore and of torch from the same weights."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, n_in)).astype(np.float32)
    grads = rng.standard_normal((steps, 4, n_in)).astype(np.float32) * 1e-3
    grads[1:, 0] = 0.0
    p = nn.Param(w0.copy(), "w")
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    if opt_name == "sgd":
        opt, topt = optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    else:
        opt, topt = optim.Adam([p], lr=1e-3), torch.optim.Adam([tp], lr=1e-3)
    for g in grads:
        p.grad = g.copy()
        opt.step()
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    return p, tp, opt, topt


# (1000 steps: the one-pass form at the large size is the small case's code, left to the cheaper tests; the
# fused loop runs the watched flush steps in NumPy, and its flush of every buffer is test_cpu_jit's)
@pytest.mark.parametrize(("n_in", "form"), [(8, None), (_LARGE, "blocked")], ids=["small", "large-blocked"])
def test_sgd_momentum_buffer_of_a_dead_unit_is_flushed_and_the_weights_match_torch(monkeypatch, n_in, form):
    _force_form(monkeypatch, form)
    # 0.9^t from ~1e-3 reaches the subnormals near t = 790 and the smallest one by t = 950
    p, tp, opt, topt = _dead_unit_problem(n_in, 1000, "sgd")
    theirs = topt.state[tp]["momentum_buffer"].numpy()
    ours = opt.state[0]["momentum_buffer"]
    assert _subnormal_count(theirs[0]) == n_in  # torch keeps them: the test's premise
    assert _subnormal_count(ours) == 0
    np.testing.assert_array_equal(ours[0], 0.0)
    np.testing.assert_allclose(ours[1:], theirs[1:], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_moments_of_a_dead_unit_are_flushed_and_the_weights_match_torch():
    p, tp, opt, topt = _dead_unit_problem(16, 1000, "adam")
    theirs = topt.state[tp]["exp_avg"].numpy()
    assert _subnormal_count(theirs[0]) > 0
    assert _subnormal_count(opt.state[0]["exp_avg"]) == 0
    np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_without_eps_survives_a_flush():
    # flushing v alone (m still normal) would divide by sqrt(0) + 0
    p = nn.Param(np.ones(3, np.float32), "w")
    opt = optim.Adam([p], lr=1e-3, eps=0.0)
    for _ in range(40):
        p.grad = np.full(3, 1e-20, np.float32)
        opt.step()
    assert np.all(np.isfinite(p.value)) and np.all(p.value < 1.0)


def test_big_endian_and_0d_buffers():
    a = np.array([1.0, 0.5, 1e-40, 3.0], ">f4")
    numpy_backend.flush_subnormals(a)  # left alone: never normal values zeroed
    np.testing.assert_array_equal(a, np.array([1.0, 0.5, 1e-40, 3.0], ">f4"))
    p = nn.Param(np.array(1.0, np.float32), "s")
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    before = len(numpy_backend._flush_phase)
    for _ in range(1200):
        p.grad = np.array(0.0 if opt.step_count else 1e-3, np.float32)
        opt.step()
    assert _subnormal_count(opt.state[0]["momentum_buffer"]) == 0
    # A lone sgd_update call (no optimizer step count) paces each buffer's flush by its own phase:
    # one phase for a 0-d buffer, not one per call through its fresh 1-element views.
    nb = numpy_backend.NumpyBackend()
    value, buf = np.array(1.0, np.float32), np.array(1e-3, np.float32)
    for _ in range(1200):
        value, buf = nb.sgd_update(value, np.array(0.0, np.float32), buf, lr=0.1, momentum=0.9, dampening=0.0,
                                   nesterov=False, weight_decay=0.0, first_step=False)
    assert len(numpy_backend._flush_phase) <= before + 1
    assert buf.shape == () and _subnormal_count(buf) == 0 and float(buf) == 0.0


def _flush_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = numpy_backend.flush_subnormals

    def spy(a):
        calls.append(a.size)
        real(a)

    monkeypatch.setattr(numpy_backend, "flush_subnormals", spy)
    return calls


@pytest.mark.parametrize(("n_in", "form"), [(8, None), (_LARGE, "blocked"), (_LARGE, "one-pass")],
                         ids=["small", "large-blocked", "large-one-pass"])
def test_sgd_skips_the_flush_while_no_update_underflows(monkeypatch, n_in, form):
    _force_form(monkeypatch, form)
    # Early in training nothing underflows: the flush steps pass no buffer to flush_subnormals.
    calls = _flush_calls(monkeypatch)
    rng = np.random.default_rng(5)
    p = nn.Param(rng.standard_normal((4, n_in)).astype(np.float32), "w")
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    for _ in range(3 * numpy_backend._FLUSH_EVERY):
        p.grad = rng.standard_normal((4, n_in)).astype(np.float32)
        opt.step()
    assert calls == []


# large-fused: the steady steps before step 16 run fused, and step 16 (in NumPy) still sees the underflow
@pytest.mark.parametrize(("n_in", "form"), [(8, None), (_LARGE, "blocked"), (_LARGE, "one-pass"),
                                          (_LARGE, "fused")],
                         ids=["small", "large-blocked", "large-one-pass", "large-fused"])
def test_sgd_flushes_a_buffer_at_the_first_flush_step_after_it_underflows(monkeypatch, n_in, form):
    _force_form(monkeypatch, form)
    calls = _flush_calls(monkeypatch)
    every = numpy_backend._FLUSH_EVERY
    p = nn.Param(np.ones((4, n_in), np.float32), "w")
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = np.ones((4, n_in), np.float32)
    opt.step()
    opt.state[0]["momentum_buffer"][0] = 2e-38  # x 0.9 per step: subnormal after six of them
    while opt.step_count < every - 1:
        p.grad = np.zeros((4, n_in), np.float32)
        opt.step()
    buf = opt.state[0]["momentum_buffer"]
    assert _subnormal_count(buf) == n_in and calls == []
    p.grad = np.zeros((4, n_in), np.float32)
    opt.step()  # step `every`: its update underflows, the buffer is flushed (in one pass in either form)
    assert calls == [buf.size]
    assert _subnormal_count(buf) == 0
    np.testing.assert_array_equal(buf[0], 0.0)
    np.testing.assert_allclose(buf[1:], 0.9 ** (every - 1), rtol=1e-5)


def test_sgd_flushes_an_exact_power_of_two_decay_on_the_periodic_full_flush():
    # momentum 0.5 halves 2**-127 (subnormal) exactly down to 2**-149: no underflow is raised, so the
    # watched flush steps miss it and only the periodic flush of every buffer catches it.
    always = numpy_backend._FLUSH_ALWAYS_EVERY
    p = nn.Param(np.ones(4, np.float32), "w")
    opt = optim.SGD([p], lr=0.1, momentum=0.5)
    p.grad = np.zeros(4, np.float32)
    opt.step()
    buf = opt.state[0]["momentum_buffer"]
    while opt.step_count < always - 1:
        buf[:] = np.float32(2.0**-127)  # one exact halving per step, never down to the rounding point
        opt.step()
        assert _subnormal_count(buf) == 4, opt.step_count  # the watched steps (every 16th) let it be
    buf[:] = np.float32(2.0**-127)
    opt.step()  # step `always`: every buffer flushed
    assert opt.step_count == always and _subnormal_count(buf) == 0


@pytest.mark.parametrize("step", [numpy_backend._FLUSH_EVERY, numpy_backend._FLUSH_ALWAYS_EVERY, 3])
def test_every_momentum_form_flushes_the_same_entries(monkeypatch, step):
    # Two blocks' worth: in block 0 an update underflows (inexact); in block 1 a subnormal is made
    # exactly (a subnormal gradient added to 0: no underflow raised). The forced blocked form, the
    # fused loop and the one-pass form give the same bits on a flush step that watches for underflow
    # (the fused form runs that step in NumPy), on a flush step of every buffer, and on a step with
    # no flush.
    n = 2 * numpy_backend._SGD_BLOCK
    nb = numpy_backend.NumpyBackend()
    results = {}
    for form in ("one-pass", "blocked") + (("fused",) if cpu_jit.sgd_momentum() else ()):
        with pytest.MonkeyPatch.context() as mp:
            force_momentum_form(mp, form)
            results[form] = _flush_probe(nb, n, step)
    v_one, b_one = results["one-pass"]
    for form, (v, b) in results.items():
        np.testing.assert_array_equal(b, b_one, err_msg=form)
        np.testing.assert_array_equal(v, v_one, err_msg=form)
    if step == numpy_backend._FLUSH_EVERY:  # an underflow was seen: the whole buffer flushed
        assert b_one[10] == 0.0 and b_one[n - 10] == 0.0
    elif step == 3:  # no flush step: both subnormals kept
        assert _subnormal_count(b_one) == 2


def _flush_probe(nb, n: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameter and buffer after one sgd_update_many step, at optimizer step ``step``, of the
    buffer the test above describes."""
    value = np.ones(n, np.float32)
    buf = np.full(n, 0.5, np.float32)
    grad = np.zeros(n, np.float32)
    buf[10] = 1.2e-38  # x 0.9: an inexact subnormal, which raises the underflow
    buf[n - 10] = 0.0
    grad[n - 10] = 1e-45  # 0 + the smallest subnormal: exact
    (v,), (b,) = nb.sgd_update_many([value], [grad], [buf], lr=0.1, momentum=0.9, dampening=0.0,
                                    nesterov=False, weight_decay=0.0, step=step)
    return v.copy(), b.copy()
