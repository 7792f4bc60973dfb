"""The plain training step's fast paths keep behaviour (issue 12): a large parameter's momentum
update in either form (and the timing that picks one), the bias and row sums as products with
ones, the loss's quick argument checks, containers calling their children's ``forward`` without
the entry wrapper, and the optimizer's inline checks, each against PyTorch or the hand-written
formula."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import deepcore as dc
from deepcore import losses, nn, optim
from deepcore.backend import numpy_backend
from deepcore.backend.faster_form import FormChooser
from deepcore.nn import module as module_mod

from .helpers import count_fused_calls, force_momentum_form

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _pair(sizes, seed=0):
    """A deepcore MLP (Linear, ReLU, ...) and a torch copy with the same weights."""
    layers, tlayers = [], []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b, seed=seed + i))
        tlayers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            tlayers.append(torch.nn.ReLU())
    model, tmodel = nn.Sequential(*layers), torch.nn.Sequential(*tlayers)
    with torch.no_grad():
        for p, tp in zip(model.parameters(), tmodel.parameters(), strict=True):
            tp.copy_(torch.from_numpy(np.asarray(p.value)))
    return model, tmodel


@pytest.mark.parametrize("form", ["fused", "blocked", "one-pass", "as-timed"])
@pytest.mark.parametrize("batch", [3, 32, 200])
def test_readme_loop_with_a_large_momentum_update_matches_torch(monkeypatch, batch, form):
    # 400 x 300 = 120,000 weights: above the size from which the momentum step may run fused, or
    # block by block; each form forced, and the NumPy forms as timed on the first steps (a fresh
    # chooser: the forms alternate).
    sizes = (300, 400, 10)
    assert 300 * 400 >= max(numpy_backend._SGD_BLOCKED_MIN, numpy_backend._FUSED_MIN)
    chooser = force_momentum_form(monkeypatch, form, rounds=1)
    calls = count_fused_calls(monkeypatch) if form == "fused" else None
    model, tmodel = _pair(sizes)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(1)
    for _ in range(6):
        x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], batch)
        logits, back = model.forward(x, train=True)
        loss, g = losses.softmax_cross_entropy(logits, y)
        back(g)
        opt.step()
        opt.zero_grad()
        topt.zero_grad()
        tloss = F.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        np.testing.assert_allclose(float(loss), float(tloss.detach()), rtol=1e-5)
    for p, tp in zip(model.parameters(), tmodel.parameters(), strict=True):
        np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-4, atol=1e-6)
    for state, tp in zip(opt.state, tmodel.parameters(), strict=True):
        np.testing.assert_allclose(state["momentum_buffer"], topt.state[tp]["momentum_buffer"].numpy(),
                                   rtol=1e-4, atol=1e-6)
    # Five steady steps: each form's warm-up call and one timing, then the choice (none when fused).
    assert list(chooser.chosen()) == ([(400 * 300, np.dtype(np.float32))] if form == "as-timed" else [])
    assert calls is None or calls == [400 * 300] * 5  # fused: the weight's five steady steps


def test_form_chooser_keeps_the_form_with_the_lower_median_leaving_out_each_first_call():
    chooser = FormChooser(rounds=1)
    assert chooser.get("k") is None
    # Counted, the first form's slow first call (memory touched the first time) would flip the choice.
    timings = {False: [9.0, 1.0], True: [1.5, 1.4]}
    seen = []
    while chooser.get("k") is None:
        form = chooser.trial("k")
        seen.append(form)
        chooser.record("k", form, timings[form][seen.count(form) - 1])
    assert seen == [False, True] * 2  # alternating, the first form first
    assert chooser.get("k") is False and chooser.trial("k") is False and chooser.chosen() == {"k": False}
    chooser.record("k", True, 0.0)  # late timings (another thread's) change nothing
    assert chooser.get("k") is False and chooser.get("other") is None
    for form in (True, False) * 2:  # the second form faster for another key
        chooser.record("other", form, 1.0 if form else 2.0)
    assert chooser.get("other") is True
    assert FormChooser(fixed=True).get("k") is True and FormChooser(fixed=False).get("k") is False
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        FormChooser(rounds=0)


def test_form_chooser_times_at_most_max_keys_at_once():
    chooser = FormChooser(rounds=1, max_keys=2)
    for key in ("a", "b", "c"):
        chooser.record(key, chooser.trial(key), 1.0)
    # "c" came when two keys were being timed: its calls run the first form, nothing kept for it.
    assert chooser.trial("c") is False and chooser._times.keys() == {"a", "b"}
    for form in (True, False, True):
        chooser.record("a", form, 1.0 if form else 2.0)
    assert chooser.get("a") is True and chooser._times.keys() == {"b"}
    chooser.record("c", chooser.trial("c"), 1.0)  # room again: "c" is timed now
    assert chooser._times.keys() == {"b", "c"}


@pytest.mark.parametrize("slow", ["blocked", "one-pass"])
def test_momentum_step_of_a_large_parameter_takes_the_form_that_runs_faster_here(monkeypatch, slow):
    # One form made slower by 5 ms a call: the timed first calls must choose the other; every call,
    # of either form, gives the one-pass formula's bits.
    import time

    chooser = force_momentum_form(monkeypatch, "as-timed", rounds=3)
    name = "_sgd_momentum_blocked" if slow == "blocked" else "_momentum_one_pass"
    real = getattr(numpy_backend, name)
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(4)
    n = numpy_backend._SGD_BLOCKED_MIN + 17
    value, buf = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    want_v, want_b = value.copy(), buf.copy()
    calls = []

    def slowed(*args):
        calls.append(1)
        time.sleep(0.005)
        return real(*args)

    monkeypatch.setattr(numpy_backend, name, slowed)
    chosen_at = None
    for step in range(30):
        grad = rng.standard_normal(n).astype(np.float32)
        want_b *= 0.9
        want_b += grad
        want_v += np.multiply(want_b, -0.01)
        nb.sgd_update(value, grad, buf, lr=0.01, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                      first_step=False)
        np.testing.assert_array_equal(buf, want_b)
        np.testing.assert_array_equal(value, want_v)
        if chosen_at is None and chooser.chosen():
            chosen_at, calls_then = step, len(calls)
    # Each form's warm-up call and three timings (a lone call's flush step, one in 16, is not timed).
    assert chosen_at in (7, 8)
    assert chooser.chosen() == {(n, np.dtype(np.float32)): slow == "one-pass"}
    assert len(calls) == calls_then  # the slow form never ran again


@pytest.mark.parametrize("lr_type", [float, np.float64], ids=["float", "np.float64"])
@pytest.mark.parametrize("n", [numpy_backend._SGD_BLOCKED_MIN, 300_001, 65536 * 3 + 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["fused", "blocked"])
def test_large_momentum_step_is_bitwise_the_one_pass_formula(monkeypatch, n, dtype, lr_type, form):
    force_momentum_form(monkeypatch, form)
    calls = count_fused_calls(monkeypatch) if form == "fused" else None
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(2)
    value, grad, buf = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    want_v, want_b = value.copy(), buf.copy()
    want_b *= 0.9
    want_b += grad
    want_v += np.multiply(want_b, -0.01)
    v, b = nb.sgd_update(value, grad, buf, lr=lr_type(0.01), momentum=lr_type(0.9), dampening=0.0, nesterov=False,
                         weight_decay=0.0, first_step=False)
    assert v is value and b is buf  # in place, identities kept
    assert calls is None or calls == [n]  # the fused form did run
    np.testing.assert_array_equal(b, want_b)
    np.testing.assert_array_equal(v, want_v)


@pytest.mark.parametrize("form", ["fused", "blocked", "as-timed"])
def test_large_momentum_step_refuses_overlapping_or_strided_arrays(monkeypatch, form):
    # Forced fused or blocked, the step falls back to one pass; timed, such arrays are never timed.
    chooser = force_momentum_form(monkeypatch, form, rounds=1)
    calls = count_fused_calls(monkeypatch) if form == "fused" else None
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(3)
    n = numpy_backend._SGD_BLOCKED_MIN
    base = rng.standard_normal(2 * n).astype(np.float32)
    grad = rng.standard_normal(n).astype(np.float32)
    # a strided parameter (a view with step 2) and its buffer: one pass per operation, same rule
    value = base[::2]
    buf = rng.standard_normal(n).astype(np.float32)
    for _ in range(5):
        want_v, want_b = value.copy(), buf * np.float32(0.9) + grad
        want_v += np.multiply(want_b, -0.1)
        nb.sgd_update(value, grad, buf, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                      first_step=False)
        np.testing.assert_array_equal(buf, want_b)
        np.testing.assert_array_equal(value, want_v)
    assert chooser.chosen() == {} and not chooser._times  # no timing taken of a form that could not run
    assert calls is None or calls == []  # nor a fused call
    assert not numpy_backend._sgd_momentum_blocked(value, grad, buf, 0.1, 0.9)
    whole = rng.standard_normal(n).astype(np.float32)
    assert not numpy_backend._sgd_momentum_blocked(whole, whole, whole.copy(), 0.1, 0.9)


@pytest.mark.parametrize("shape", [(1, 5), (32, 256), (2048, 10), (0, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_gradient_and_row_sums_are_the_sums(shape, dtype):
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(4)
    dy = rng.standard_normal(shape).astype(dtype)
    x = rng.standard_normal((shape[0], 3)).astype(dtype)
    w = rng.standard_normal((shape[1], 3)).astype(dtype)
    _, _, db = nb.linear_backward(dy, x, w, need_dx=False)
    assert db.dtype == dtype and db.shape == (shape[1],)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=0), rtol=tol, atol=tol)
    np.testing.assert_allclose(numpy_backend._row_sum(dy), dy.astype(np.float64).sum(axis=1), rtol=tol, atol=tol)
    # a transposed (non-contiguous) gradient too
    _, _, db_t = nb.linear_backward(np.ascontiguousarray(dy.T).T, x, w, need_dx=False)
    np.testing.assert_allclose(db_t, db, rtol=tol, atol=tol)


def test_long_row_sums_keep_pairwise_accuracy():
    # OpenBLAS's GEMV over a million-class row: 4e-7 relative error here, NumPy's pairwise sum 3e-8
    a = np.random.default_rng(5).uniform(0.5, 1.5, (2, 1_000_000)).astype(np.float32)
    exact = a.astype(np.float64).sum(axis=1)
    assert np.max(np.abs(numpy_backend._row_sum(a) / exact - 1)) < 1e-7


def test_big_endian_labels_are_checked_as_their_values():
    logits = np.zeros((2, 200), np.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 200\), got labels\[0\] = -9223372036854775808"):
        losses.softmax_cross_entropy(logits, np.array([-2**63, 0], ">i8"))
    loss, _ = losses.softmax_cross_entropy(logits, np.array([199, 3], ">i4"))
    assert float(loss) == pytest.approx(np.log(200), rel=1e-6)


def test_the_cached_ones_cannot_be_written():
    ones = numpy_backend._ones(7, np.dtype(np.float32))
    assert not ones.flags.writeable
    with pytest.raises(ValueError):
        ones[0] = 2.0
    assert numpy_backend._row_starts(3, 4).tolist() == [0, 4, 8]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, c", [(16, 10), (33, 7), (64, 32), (5, 100)])
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8, np.uint64])
def test_softmax_ce_quick_path_matches_torch(reduction, n, c, label_dtype):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    labels = rng.integers(0, c, n).astype(label_dtype)
    loss, grad = losses.softmax_cross_entropy(logits, labels, reduction=reduction)
    t = torch.from_numpy(logits).requires_grad_()
    tloss = F.cross_entropy(t, torch.from_numpy(labels.astype(np.int64)), reduction=reduction)
    tloss.sum().backward()
    assert loss.dtype == np.float32 and grad.dtype == np.float32 and grad.shape == (n, c)
    np.testing.assert_allclose(loss, tloss.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_softmax_ce_quick_path_keeps_every_check_and_message():
    logits = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels\[2\] = 3"):
        losses.softmax_cross_entropy(logits, np.array([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        losses.softmax_cross_entropy(logits, np.array([0, -1, 2, 2]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.softmax_cross_entropy(logits, np.array([0, 1, 2, 2]), reduction="avg")
    with pytest.raises(TypeError, match="label_smoothing must be a number"):
        losses.softmax_cross_entropy(logits, np.array([0, 1, 2, 2]), label_smoothing=False)
    with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
        losses.softmax_cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer array of class indices"):
        losses.softmax_cross_entropy(logits, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="floating-point array"):
        losses.softmax_cross_entropy(logits.astype(np.int64), np.array([0, 1, 2, 2]))
    # validate=False: the bad row is NaN, the rest as torch gives them
    labels = np.array([0, 5, 2, 1])
    loss, grad = losses.softmax_cross_entropy(logits, labels, reduction="none", validate=False)
    assert np.isnan(loss[1]) and np.isnan(grad[1]).all()
    np.testing.assert_allclose(loss[[0, 2, 3]], np.log(3.0), rtol=1e-6)
    # an integer 0 smoothing is the plain loss
    a = losses.softmax_cross_entropy(logits, np.array([0, 1, 2, 2]), label_smoothing=0)
    b = losses.softmax_cross_entropy(logits, np.array([0, 1, 2, 2]))
    np.testing.assert_array_equal(a[1], b[1])


class _Double(nn.Module):
    def forward(self, x, train=False):
        def backward(dy):
            return 2 * dy

        return 2 * x, backward


def test_a_container_honours_a_forward_overridden_on_the_instance_or_the_class(monkeypatch):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    layer = _Double()
    model = nn.Sequential(layer, nn.ReLU())
    np.testing.assert_array_equal(model(x), 2 * x)

    def triple(x, train=False, *, input_grad=None):
        return 3 * x, lambda dy: 3 * dy

    layer.forward = triple  # an instance attribute wins, as before
    np.testing.assert_array_equal(model(x), 3 * x)
    del layer.forward
    calls = []
    original = nn.ReLU.forward

    def spy(self, x, train=False, *, input_grad=None):
        calls.append(train)
        return original(self, x, train, input_grad=input_grad)

    monkeypatch.setattr(nn.ReLU, "forward", spy)  # a class-level patch is seen too
    y, back = model.forward(x, train=True, input_grad=True)
    np.testing.assert_array_equal(y, 2 * x)
    assert calls == [True]
    np.testing.assert_array_equal(back(np.ones_like(y)), np.where(x > 0, 2.0, 0.0))


def test_a_forward_decorated_with_functools_wraps_of_a_builtin_one_is_still_called(monkeypatch):
    # wraps() copies the wrapped function's attributes: a container must not mistake the user's
    # function for the built-in one it copied them from
    import functools

    class Tenfold(nn.ReLU):
        @functools.wraps(nn.ReLU.forward)
        def forward(self, x, train=False, *, input_grad=None):
            y, back = super().forward(x, train, input_grad=input_grad)
            return 10 * y, lambda dy: back(10 * dy)

    x = np.array([[1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(Tenfold()(x), [[10.0, 0.0]])
    model = nn.Sequential(nn.Linear(2, 2), Tenfold())
    lin = model[0] if hasattr(model, "__getitem__") else next(iter(model.children()))
    w, b = np.asarray(lin.weight.value), np.asarray(lin.bias.value)
    np.testing.assert_allclose(model(x), 10 * np.maximum(x @ w.T + b, 0), rtol=1e-6)
    original = nn.ReLU.forward
    seen = []

    @functools.wraps(original)
    def spy(self, x, train=False, *, input_grad=None):
        seen.append(type(self).__name__)
        return original(self, x, train, input_grad=input_grad)

    monkeypatch.setattr(nn.ReLU, "forward", spy)
    nn.Sequential(nn.Linear(2, 2), nn.ReLU())(x)
    assert seen == ["ReLU"]


def test_outputs_of_outermost_calls_are_forgotten_when_they_die():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    x = np.ones((4, 3), np.float32)
    before = len(module_mod._OUTPUTS)
    for _ in range(50):
        y, _ = model.forward(x, train=True)
        del y
    gc.collect()
    assert len(module_mod._OUTPUTS) <= before + 1
    # an output fed back in is still an activation: its backward gives dL/dx
    h, _ = model.forward(x, train=True)
    head = nn.Linear(2, 2)
    out, back = head.forward(h, train=True)
    w = np.asarray(head.weight.value)
    np.testing.assert_allclose(back(np.ones_like(out)), np.ones((4, 2), np.float32) @ w, rtol=1e-6)


def test_optimizer_quick_checks_still_send_odd_state_through_the_full_path():
    p = nn.Param(np.ones(3, np.float32), "w")
    opt = optim.SGD([p], lr=0.5, momentum=0.9)
    p.grad = np.ones(3, np.float32)
    opt.step()
    # a float64 buffer (as a state dict from elsewhere might hold) is converted, not used as is
    opt.state[0]["momentum_buffer"] = np.full(3, 2.0)
    p.grad = np.ones(3, np.float32)
    opt.step()
    buf = opt.state[0]["momentum_buffer"]
    assert buf.dtype == np.float32
    np.testing.assert_allclose(buf, 0.9 * 2.0 + 1.0)
    np.testing.assert_allclose(p.value, 1.0 - 0.5 * 1.0 - 0.5 * 2.8, rtol=1e-6)
    assert opt.step_count == 2
    before, buf_before = p.value.copy(), buf.copy()
    q = nn.Param(np.ones(2, np.float32), "q")  # a second parameter, before the bad one in the group
    opt = optim.SGD([q, p], lr=0.5, momentum=0.9)
    opt.load_state_dict(opt.state_dict())
    q.grad = np.ones(2, np.float32)
    p.grad = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"the gradient of parameter 1 \('w'\) must have the parameter's shape"):
        opt.step()
    assert opt.step_count == 0  # nothing moved: not the good parameter before the bad one either
    np.testing.assert_array_equal(p.value, before)
    np.testing.assert_array_equal(q.value, np.ones(2, np.float32))
    assert opt.state[0] == {} or "momentum_buffer" not in opt.state[0]
    np.testing.assert_array_equal(buf, buf_before)


@pytest.mark.parametrize("n", [1, 16, 32, 64, 65])
@pytest.mark.parametrize("bias", [True, False])
def test_short_batch_linear_product_matches_torch_in_c_order(n, bias):
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((n, 300)).astype(np.float32)
    w = rng.standard_normal((256, 300)).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32) if bias else None
    y = nb.linear(x, w, b)
    want = F.linear(torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b)).numpy()
    assert y.shape == (n, 256) and y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


_SGD_CONFIGS = [dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
                dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2),
                dict(momentum=0.8, dampening=0.3, nesterov=False, weight_decay=0.0),
                dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-2)]


@pytest.mark.parametrize("config", _SGD_CONFIGS, ids=["steady", "nesterov+wd", "dampening", "no-momentum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_update_many_is_bitwise_the_per_parameter_update(config, dtype):
    # One group's parameters in one call, as SGD.step makes it: a matrix of the size from which the
    # momentum step may run blocked, a vector, a 0-d scalar, a read-only parameter and a parameter
    # on its first step (no buffer yet), for 20 steps that cross a flush step; the reference is
    # sgd_update called per parameter.
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(7)
    shapes = [(numpy_backend._SGD_BLOCKED_MIN // 100 + 1, 100), (13,), (), (5, 3), (4,)]
    values = [rng.standard_normal(s).astype(dtype) for s in shapes]
    values[3].flags.writeable = False
    ref = [v.copy() for v in values]
    ref[3].flags.writeable = False
    bufs: list = [None] * len(shapes)
    ref_bufs: list = [None] * len(shapes)
    for step in range(1, 21):
        values[3].flags.writeable = ref[3].flags.writeable = False  # (the reference's result is a new array)
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        live = range(len(shapes)) if step > 2 else range(len(shapes) - 1)  # the last joins at step 3
        out_v, out_b = nb.sgd_update_many([values[i] for i in live], [grads[i] for i in live],
                                          [bufs[i] for i in live], lr=0.05, step=step, **config)
        for k, i in enumerate(live):
            values[i], bufs[i] = out_v[k], out_b[k]
            ref[i], ref_bufs[i] = nb.sgd_update(ref[i], grads[i].copy(), ref_bufs[i], lr=0.05,
                                                first_step=ref_bufs[i] is None, **config)
        for i in live:
            np.testing.assert_array_equal(values[i], ref[i], err_msg=f"step {step}, parameter {i}")
            if config["momentum"]:
                np.testing.assert_array_equal(bufs[i], ref_bufs[i])
            else:
                assert bufs[i] is None
    assert values[2].shape == () and isinstance(values[2], np.ndarray)


def test_sgd_update_many_of_the_reference_backend_loops_its_sgd_update():
    import array_api_compat.numpy as np_compat

    from deepcore.backend import Backend

    ref = Backend(np_compat, name="reference")  # the array-API code, no NumPy override
    rng = np.random.default_rng(8)
    values = [rng.standard_normal(s) for s in ((3, 2), (4,))]
    grads = [rng.standard_normal(s) for s in ((3, 2), (4,))]
    bufs = [None, rng.standard_normal(4)]
    out_v, out_b = ref.sgd_update_many(values, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0,
                                       nesterov=False, weight_decay=0.0, step=1)
    np.testing.assert_allclose(out_v[0], values[0] - 0.1 * grads[0], rtol=1e-15)
    np.testing.assert_allclose(out_b[0], grads[0], rtol=1e-15)
    np.testing.assert_allclose(out_b[1], 0.9 * bufs[1] + grads[1], rtol=1e-15)
    np.testing.assert_allclose(out_v[1], values[1] - 0.1 * out_b[1], rtol=1e-15)


def test_an_sgd_subclass_with_its_own_update_rule_is_still_called_per_parameter():
    class SignSGD(optim.SGD):
        def _update(self, p, backend, grad, state, group):
            p.value = p.value - group["lr"] * np.sign(grad)

    params = [nn.Param(np.zeros(3, np.float32), "a"), nn.Param(np.zeros(2, np.float32), "b")]
    opt = SignSGD(params, lr=0.5, momentum=0.9)
    params[0].grad = np.array([2.0, -3.0, 0.0], np.float32)
    params[1].grad = np.array([-1e-9, 7.0], np.float32)
    opt.step()
    np.testing.assert_array_equal(params[0].value, [-0.5, 0.5, 0.0])
    np.testing.assert_array_equal(params[1].value, [0.5, -0.5])


def test_a_step_failing_in_a_later_group_keeps_the_earlier_groups_state():
    # The first group's parameter is moved before the second group's update raises: its new momentum
    # buffer must be kept with it, or the next step would restart its momentum from the gradient.
    a, b = nn.Param(np.ones(3, np.float32), "a"), nn.Param(np.ones(3, np.float32), "b")
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1, momentum=0.9)
    a.grad = np.ones(3, np.float32)
    b.grad = np.full(3, np.finfo(np.float32).max, np.float32)
    b.value = np.full(3, -np.finfo(np.float32).max, np.float32)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        opt.step()
    np.testing.assert_allclose(a.value, 0.9)
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], 1.0)


def test_a_numpy_backend_subclass_with_its_own_sgd_rule_is_honoured():
    from deepcore.backend.numpy_backend import NumpyBackend

    class Halving(NumpyBackend):
        def sgd_update(self, value, grad, buf, **kw):
            return value / 2, buf

    values, out = [np.ones(2), np.full(3, 4.0)], None
    out, bufs = Halving().sgd_update_many(values, [np.ones(2), np.ones(3)], [None, None], lr=0.1, momentum=0.9,
                                          dampening=0.0, nesterov=False, weight_decay=0.0, step=1)
    np.testing.assert_array_equal(out[0], 0.5)
    np.testing.assert_array_equal(out[1], 2.0)
    assert bufs == [None, None]
