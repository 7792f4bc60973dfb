"""Dask arrays through array-api-compat's dask namespace (deepcore/backend/dask_backend.py): found by
name, module and array; the device asked of the namespace; training steps equal to NumPy's, with each
parameter's graph kept one step deep."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import losses, nn, optim

da = pytest.importorskip("dask.array")
pytest.importorskip("array_api_compat.dask.array")

X = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 3, 12)


def test_dask_backend_is_found_by_name_module_and_array():
    b = dc.get_backend("dask")
    assert b.name == "dask"
    assert dc.get_backend(da) is b and dc.get_backend("dask.array") is b
    x = da.from_array(X, chunks=4)
    assert dc.get_backend(x) is b
    assert dc.get_backend(x, da.zeros(3)) is b  # two Dask arrays: no '.device' attribute needed
    assert str(b.device(x)) == "cpu"


def _model(backend: str) -> nn.Module:
    with dc.use_backend(backend):
        return nn.Sequential(nn.Linear(5, 8, seed=0), nn.ReLU(), nn.Dropout(0.2, seed=3), nn.Linear(8, 3, seed=1))


@pytest.mark.parametrize("make_opt", [lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                                      lambda p: optim.Adam(p, lr=0.01)], ids=["sgd", "adam"])
def test_training_steps_match_numpy(make_opt):
    ours, ref = _model("dask"), _model("numpy")
    assert isinstance(ours[0].weight.value, da.Array)
    opts = make_opt(ours.parameters()), make_opt(ref.parameters())
    x, y = da.from_array(X, chunks=4), da.from_array(Y, chunks=4)
    for _ in range(4):
        for model, opt, xb, yb in ((ours, opts[0], x, y), (ref, opts[1], X, Y)):
            logits, back = model.forward(xb, train=True)
            loss, grad = losses.softmax_cross_entropy(logits, yb)
            back(grad)
            opt.step()
            opt.zero_grad()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        # persisted after each update: the graph holds the computed chunks, not the steps that led there
        assert len(p.value.__dask_graph__()) == p.value.npartitions
        np.testing.assert_allclose(dc.to_backend(p.value, "numpy"), q.value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours(x)), ref(X), rtol=1e-5, atol=1e-6)


def test_moves_between_numpy_and_dask():
    x = dc.to_backend(X, "dask")
    assert isinstance(x, da.Array)
    back = dc.to_backend(x, "numpy")
    np.testing.assert_array_equal(back, X)
    assert not np.shares_memory(back, X)
