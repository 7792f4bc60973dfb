"""The jax backend's compiled cores (deepcore/backend/jax_backend.py) against the array-API reference on the
same JAX arrays, and a training run equal to NumPy's. Skipped where jax is not installed."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend import Backend

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from deepcore.backend.jax_backend import JaxBackend  # noqa: E402

TOL = 1e-6
rng = np.random.default_rng(0)


@pytest.fixture(scope="module")
def jb() -> JaxBackend:
    return dc.get_backend("jax")


@pytest.fixture(scope="module")
def ref() -> Backend:
    return Backend(jnp, name="jax-reference")


def j(a, dtype=np.float32):
    return jnp.asarray(np.asarray(a, dtype=dtype))


def close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_found_by_name_module_and_array(jb):
    assert isinstance(jb, JaxBackend)
    assert dc.get_backend("jax.numpy") is jb and dc.get_backend(jax) is jb and dc.get_backend(jnp.zeros(2)) is jb


@pytest.mark.parametrize("bias", [True, False])
def test_linear(jb, ref, bias):
    x, w = j(rng.normal(size=(9, 6))), j(rng.normal(size=(4, 6)))
    b = j(rng.normal(size=(4,))) if bias else None
    close(jb.linear(x, w, b), ref.linear(x, w, b), 1e-5)
    dy = j(rng.normal(size=(9, 4)))
    for need_dx in (True, False):
        for g, r in zip(jb.linear_backward(dy, x, w, need_dx=need_dx, need_bias=bias),
                        ref.linear_backward(dy, x, w, need_dx=need_dx, need_bias=bias), strict=True):
            assert (g is None) == (r is None)
            if g is not None:
                close(g, r, 1e-5)


def test_relu(jb, ref):
    x, dy = j([[-1.0, 0.0, 2.0, -3.0]]), j([[1.0, 2.0, 3.0, 4.0]])
    close(jb.relu(x), ref.relu(x))
    close(jb.relu_backward(dy, x), ref.relu_backward(dy, x))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_cross_entropy(jb, ref, reduction):
    s, y = j(rng.normal(size=(12, 5)) * 4), jnp.asarray(rng.integers(0, 5, 12))
    for got, want in zip(jb.softmax_cross_entropy(s, y, reduction=reduction, labels_in_range=True),
                         ref.softmax_cross_entropy(s, y, reduction=reduction), strict=True):
        close(got, want, 1e-5)
    # the other cases (here: label smoothing) are the reference's
    for got, want in zip(jb.softmax_cross_entropy(s, y, reduction=reduction, label_smoothing=0.1),
                         ref.softmax_cross_entropy(s, y, reduction=reduction, label_smoothing=0.1), strict=True):
        close(got, want, 1e-5)


def test_labels_in_range(jb):
    assert jb.labels_in_range(jnp.asarray([0, 4]), 5)
    assert not jb.labels_in_range(jnp.asarray([0, 5]), 5) and not jb.labels_in_range(jnp.asarray([-1]), 5)


@pytest.mark.parametrize("kw", [
    {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.9, "dampening": 0.2, "nesterov": False, "weight_decay": 0.05},
    {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01},
])
def test_sgd_update(jb, ref, kw):
    value = want = j(rng.normal(size=(3, 4)))
    buf = want_buf = None
    for k in range(3):
        g = j(rng.normal(size=(3, 4)))
        value, buf = jb.sgd_update(value, g, buf, lr=0.1, first_step=k == 0, **kw)
        want, want_buf = ref.sgd_update(want, g, want_buf, lr=0.1, first_step=k == 0, **kw)
        close(value, want)
        if want_buf is not None:
            close(buf, want_buf)


@pytest.mark.parametrize("decoupled, wd", [(False, 0.0), (False, 0.1), (True, 0.01)])
def test_adam_update(jb, ref, decoupled, wd):
    value = want = j(rng.normal(size=(3, 4)))
    m = v = wm = wv = jnp.zeros((3, 4))
    for step in (1, 2, 3):
        g = j(rng.normal(size=(3, 4)))
        kw = {"step": step, "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": wd,
              "decoupled": decoupled}
        value, m, v = jb.adam_update(value, g, m, v, **kw)
        want, wm, wv = ref.adam_update(want, g, wm, wv, **kw)
        for a, b in ((value, want), (m, wm), (v, wv)):
            close(a, b)


def test_training_matches_numpy():
    from deepcore import losses, nn, optim

    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    results = []
    for name in ("numpy", "jax"):
        with dc.use_backend(name):
            model = nn.Sequential(nn.Linear(6, 8, seed=0), nn.ReLU(), nn.Dropout(0.1, seed=2), nn.Linear(8, 3, seed=1))
        opt = optim.Adam(model.parameters(), lr=0.01)
        backend = dc.get_backend(name)
        for i in range(0, 32, 8):
            logits, back = model.forward(dc.to_backend(x[i:i + 8], backend), train=True)
            _, grad = losses.softmax_cross_entropy(logits, dc.to_backend(y[i:i + 8], backend))
            back(grad)
            opt.step()
            opt.zero_grad()
        results.append([np.asarray(p.value) for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
