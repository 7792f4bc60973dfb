"""Module's public state API: named_modules, named_buffers, register_buffer, set_buffers,
snapshot/restore, the names PyTorch gives the same things."""

from __future__ import annotations

import numpy as np
import pytest

from deepcore import nn


def _model():
    return nn.Sequential(nn.Linear(3, 4, seed=0), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.Sequential(nn.Linear(4, 2, seed=1), nn.Dropout(0.5, seed=2)))


def test_names_follow_pytorch():
    torch = pytest.importorskip("torch")
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.5)))
    model = _model()
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert [n for n, _ in model.named_parameters("net")] == [n for n, _ in ref.named_parameters("net")]


def test_named_modules_without_torch():
    model = _model()
    names = [n for n, _ in model.named_modules()]
    assert names == ["", "0", "1", "2", "3", "3.0", "3.1"]
    assert dict(model.named_modules())["3.1"] is model[3][1]


def test_assigning_to_a_buffer_name_replaces_the_buffer():
    bn = nn.BatchNorm1d(2)
    bn.running_mean = np.array([5.0, 6.0], np.float32)
    np.testing.assert_array_equal(dict(bn.named_buffers())["running_mean"], [5.0, 6.0])
    np.testing.assert_array_equal(bn.state_dict()["running_mean"], [5.0, 6.0])


def test_register_buffer_refuses_a_parameter_name():
    lin = nn.Linear(2, 2)
    with pytest.raises(KeyError, match="'weight' is already a parameter"):
        lin.register_buffer("weight", np.zeros(2))


def test_set_buffers_checks_every_name_before_changing_any():
    model = _model()
    before = dict(model.named_buffers())
    with pytest.raises(KeyError, match=r"no buffer named \['1.nope'\]"):
        model.set_buffers({"1.running_mean": np.ones(4, np.float32), "1.nope": np.ones(4)})
    assert all(b is before[n] for n, b in model.named_buffers())
    new = np.full(4, 3.0, np.float32)
    model.set_buffers({"1.running_mean": new})
    assert model[1].running_mean is new and dict(model.named_buffers())["1.running_mean"] is new


def test_snapshot_restore_undoes_a_training_forward_and_a_load():
    model = _model()
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    y0 = model(x)
    snap = model.snapshot()
    weight = model[0].weight.value
    model.forward(x, train=True)          # moves BatchNorm's statistics and the dropout stream
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    assert not np.allclose(model(x), y0)
    model.restore(snap)
    assert model[0].weight.value is weight
    np.testing.assert_array_equal(model(x), y0)
    assert model.extra_states() == snap.extra_states
    # the dropout stream is back where it was: the same mask again
    a = model.forward(x, train=True)[0]
    model.restore(snap)
    np.testing.assert_array_equal(model.forward(x, train=True)[0], a)


def test_assigning_none_to_a_buffer_name_unregisters_it():
    bn = nn.BatchNorm1d(2)
    bn.running_mean = None
    assert "running_mean" not in dict(bn.named_buffers()) and "running_mean" not in bn.state_dict()
    bn.to(dtype="float64")  # every remaining buffer still moves
