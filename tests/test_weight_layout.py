"""NumPy's Linear weights in Fortran order (``Backend.linear_weight``, issue 12): the same values and
results as the C layout (against PyTorch and the formula), gradients and momentum buffers in the
weight's order so the blocked update still runs, ``state_dict`` handing out C-ordered arrays that
raw-memory libraries read correctly, and ``load_state_dict`` keeping the layout."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import losses, nn, optim
from deepcore.backend import numpy_backend

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _fortran_only(a: np.ndarray) -> bool:
    return a.flags.f_contiguous and not a.flags.c_contiguous


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_linear_weight_is_fortran_ordered_with_the_initializers_values(dtype):
    layer = nn.Linear(30, 7, seed=3, dtype=dtype)
    with dc.use_backend("torch"):
        ref = nn.Linear(30, 7, seed=3, dtype=dtype)  # the same initializer draw, on a library without orders
    w = layer.weight.value
    assert w.shape == (7, 30) and w.dtype == np.dtype(dtype) and _fortran_only(w)
    np.testing.assert_array_equal(w, ref.weight.value.numpy())
    assert layer.bias.value.flags.c_contiguous  # 1-D: both orders at once


def test_half_precision_and_other_backends_keep_their_layout():
    nb = dc.get_backend("numpy")
    h = np.ones((4, 3), np.float16)
    assert nb.linear_weight(h) is h
    t = torch.ones(4, 3)
    assert dc.get_backend("torch").linear_weight(t) is t


@pytest.mark.parametrize("n", [1, 16, 32, 64, 65, 128, 200])
@pytest.mark.parametrize("need_dx", [True, False])
def test_fortran_weight_products_match_torch(n, need_dx):
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 300)).astype(np.float32)
    w = np.asfortranarray(rng.standard_normal((256, 300)).astype(np.float32))
    b = rng.standard_normal(256).astype(np.float32)
    dy = rng.standard_normal((n, 256)).astype(np.float32)
    xt, wt, bt = (torch.from_numpy(np.ascontiguousarray(a)).requires_grad_() for a in (x, w, b))
    yt = F.linear(xt, wt, bt)
    yt.backward(torch.from_numpy(dy))
    y = nb.linear(x, w, b)
    assert y.shape == (n, 256) and y.flags.c_contiguous  # the short-batch path's layout too
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dx, dw, db = nb.linear_backward(dy, x, w, need_dx=need_dx)
    assert _fortran_only(dw)  # the weight's order, for a one-layout update
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)
    if need_dx:
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    else:
        assert dx is None
    # A C-ordered weight (one assigned by hand) gets a C-ordered gradient, as before.
    assert nb.linear_backward(dy, x, np.ascontiguousarray(w))[1].flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_momentum_step_on_fortran_arrays_is_bitwise_the_one_pass_formula(dtype):
    rng = np.random.default_rng(4)
    shape = (numpy_backend._SGD_BLOCKED_MIN // 300 + 1, 300)
    value, grad, buf = (np.asfortranarray(rng.standard_normal(shape).astype(dtype)) for _ in range(3))
    want_v, want_b = np.ascontiguousarray(value), np.ascontiguousarray(buf)
    want_b *= 0.9
    want_b += grad
    want_v += np.multiply(want_b, -0.01)
    assert numpy_backend._sgd_momentum_blocked(value, grad, buf, 0.01, 0.9)
    np.testing.assert_array_equal(buf, want_b)
    np.testing.assert_array_equal(value, want_v)


def test_mixed_layouts_take_the_one_pass_step_with_the_same_result():
    # A Fortran weight with C-ordered gradient and buffer (as data parallelism's unflattened gradients
    # come): not blocked, since the blocks of a flat view would not be the same elements.
    nb = dc.get_backend("numpy")
    rng = np.random.default_rng(5)
    shape = (numpy_backend._SGD_BLOCKED_MIN // 300 + 1, 300)
    value = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    grad, buf = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    assert not numpy_backend._sgd_momentum_blocked(value, grad, buf.copy(), 0.1, 0.9)
    want_b = buf * np.float32(0.9) + grad
    want_v = value + np.multiply(want_b, -0.1)
    v, b = nb.sgd_update(value, grad, buf, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                         first_step=False)
    assert v is value and b is buf
    np.testing.assert_array_equal(b, want_b)
    np.testing.assert_array_equal(v, want_v)


def test_training_keeps_one_layout_per_weight_and_runs_the_blocked_update(monkeypatch):
    # The README loop: gradients and the momentum buffer take the weight's order, so every step of
    # the large weight goes block by block; the result matches PyTorch.
    calls = []
    blocked = numpy_backend._sgd_momentum_blocked

    def spy(value, *args, **kwargs):
        done = blocked(value, *args, **kwargs)
        calls.append((value.shape, done))
        return done

    monkeypatch.setattr(numpy_backend, "_sgd_momentum_blocked", spy)
    model = nn.Sequential(nn.Linear(300, 400, seed=1), nn.ReLU(), nn.Linear(400, 10, seed=2))
    tmodel = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.ReLU(), torch.nn.Linear(400, 10))
    with torch.no_grad():
        for p, tp in zip(model.parameters(), tmodel.parameters(), strict=True):
            tp.copy_(torch.from_numpy(np.ascontiguousarray(p.value)))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(1)
    for _ in range(4):
        x = rng.standard_normal((32, 300)).astype(np.float32)
        y = rng.integers(0, 10, 32)
        logits, back = model.forward(x, train=True)
        back(losses.softmax_cross_entropy(logits, y)[1])
        opt.step()
        opt.zero_grad()
        topt.zero_grad()
        F.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        topt.step()
    w = model[0].weight.value
    assert _fortran_only(w) and _fortran_only(opt.state[0]["momentum_buffer"])
    assert calls.count(((400, 300), True)) == 3 and ((400, 300), False) not in calls  # steps 2-4
    for p, tp in zip(model.parameters(), tmodel.parameters(), strict=True):
        np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_state_dict_hands_out_c_ordered_arrays_that_raw_memory_readers_take_correctly(tmp_path):
    model = nn.Sequential(nn.Linear(5, 3, seed=0), nn.ReLU(), nn.Linear(3, 2, seed=1))
    state = model.state_dict()
    w = model[0].weight.value
    assert _fortran_only(w)
    assert state["0.weight"].flags.c_contiguous and state["0.weight"] is not w
    np.testing.assert_array_equal(state["0.weight"], w)
    assert state["0.bias"] is model[0].bias.value  # already C-ordered: the array itself
    # The raw bytes in C order are the values: what a reader of raw memory rebuilds.
    raw = np.frombuffer(memoryview(state["0.weight"]).tobytes(), np.float32).reshape(3, 5)
    np.testing.assert_array_equal(raw, w)
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(state, str(tmp_path / "w.safetensors"))
    back = st.load_file(str(tmp_path / "w.safetensors"))
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value)


def test_load_state_dict_keeps_the_fortran_layout_and_the_values():
    model = nn.Sequential(nn.Linear(6, 4, seed=0))
    rng = np.random.default_rng(2)
    new = {"0.weight": rng.standard_normal((4, 6)).astype(np.float32),
           "0.bias": rng.standard_normal(4).astype(np.float32)}
    model.load_state_dict(new)
    w = model[0].weight.value
    assert _fortran_only(w) and w is not new["0.weight"]
    np.testing.assert_array_equal(w, new["0.weight"])
    x = rng.standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(model.forward(x)[0], x @ new["0.weight"].T + new["0.bias"], rtol=1e-6)
    # A weight assigned by hand in C order keeps C order through a load.
    model[0].weight.value = np.zeros((4, 6), np.float32)
    model.load_state_dict(new)
    assert model[0].weight.value.flags.c_contiguous
