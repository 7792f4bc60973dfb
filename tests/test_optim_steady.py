"""SGD's steady plan (deepcore/optim/steady.py): the same bits as the full step through every
change a training loop can make between steps, and nothing written when the full step refuses."""

from __future__ import annotations

import numpy as np
import pytest

from deepcore import optim
from deepcore.nn import Param
from tests.helpers import needs_torch


class _FullStepSGD(optim.SGD):
    """SGD that never keeps a plan (an own ``_apply``): every step checked in full, the reference."""

    def _apply(self, plan):
        return super()._apply(plan)


def _params(seed: int) -> list[Param]:
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (300, 400), ()]  # one past the size from which the momentum step may run blocked, one 0-d
    return [Param(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def _grads(rng, params, dtype=np.float32):
    return [rng.standard_normal(p.shape).astype(dtype) for p in params]


def _events(step: int, opt, params, grads, rng):
    """What a training loop does between steps, one thing at a time."""
    if step == 5:
        opt.lr = 0.05  # a schedule
    elif step == 8:
        grads[1] = None  # a parameter without a gradient this step
    elif step == 11:
        params[0].value = params[0].value.copy()  # a replaced parameter array
    elif step == 14:
        opt.state[2] = {}  # momentum reset by hand
    elif step == 17:
        opt.load_state_dict(opt.state_dict())
    elif step == 20:
        grads[2] = rng.standard_normal(params[2].shape)  # float64, more bits than float32: cast first
    elif step == 23:
        opt.param_groups[0]["momentum"] = 0.5
    elif step == 26:
        params[1].value.flags.writeable = False  # read-only: updated out of place
    elif step == 29:
        opt.state[0]["momentum_buffer"] = opt.state[0]["momentum_buffer"] * 0.5
    elif step == 32:
        new = Param(np.ones((2, 2), np.float32))
        params.append(new)
        grads.append(np.ones((2, 2), np.float32))
        opt.add_param_group({"params": [new], "lr": 0.01})


def _train(cls, steps: int = 40):
    params = _params(0)
    opt = cls(params, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(1)
    for step in range(steps):
        grads = _grads(rng, params)
        _events(step, opt, params, grads, rng)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return params, opt


def test_the_steady_plan_gives_the_bits_of_the_full_step(monkeypatch):
    taken = []
    real = optim.steady.SteadyPlan.step

    def counting(self, opt):
        ok = real(self, opt)
        taken.append(ok)
        return ok

    monkeypatch.setattr(optim.steady.SteadyPlan, "step", counting)
    params, opt = _train(optim.SGD)
    ref_params, ref_opt = _train(_FullStepSGD)
    assert sum(taken) >= 20 and not all(taken)  # the plan ran, and declined where things changed
    for p, q in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(p.value, q.value)
    for s, t in zip(opt.state, ref_opt.state, strict=True):
        assert s.keys() == t.keys()
        for k in s:
            np.testing.assert_array_equal(s[k], t[k])
    assert opt.step_count == ref_opt.step_count == 40


def test_a_refused_step_after_steady_ones_writes_nothing():
    params = _params(2)
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(3)
    for _ in range(3):
        for p, g in zip(params, _grads(rng, params), strict=True):
            p.grad = g
        opt.step()
    values = [p.value.copy() for p in params]
    bufs = [s["momentum_buffer"].copy() for s in opt.state]
    for p, g in zip(params, _grads(rng, params), strict=True):
        p.grad = g
    params[-1].grad = np.ones((2,), np.float32)  # the last parameter is 0-d
    with pytest.raises(ValueError, match=r"must have the parameter's shape \(\), got \(2,\)"):
        opt.step()
    for p, v in zip(params, values, strict=True):
        np.testing.assert_array_equal(p.value, v)
    for s, b in zip(opt.state, bufs, strict=True):
        np.testing.assert_array_equal(s["momentum_buffer"], b)
    assert opt.step_count == 3


def test_a_subclass_update_rule_is_never_bypassed():
    calls = []

    class Counted(optim.SGD):
        def _update(self, p, backend, grad, state, group):
            calls.append(1)
            super()._update(p, backend, grad, state, group)

    params = _params(4)
    opt = Counted(params, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(5)
    for _ in range(4):
        for p, g in zip(params, _grads(rng, params), strict=True):
            p.grad = g
        opt.step()
    assert len(calls) == 4 * len(params)


def _stepped(n: int = 2, **kw):
    params = _params(6)
    opt = optim.SGD(params, lr=0.1, momentum=0.9, **kw)
    rng = np.random.default_rng(7)
    for _ in range(n):
        for p, g in zip(params, _grads(rng, params), strict=True):
            p.grad = g
        opt.step()
    return params, opt, rng


def test_an_optimizer_with_a_plan_copies_and_pickles_as_before():
    import copy
    import pickle

    params, opt, rng = _stepped()
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    grads = _grads(rng, params)
    for o in (opt, *clones):
        assert o.step_count == 2
        for p, g in zip(o.params, grads, strict=True):
            p.grad = g.copy()
        o.step()
    for clone in clones:
        assert clone.__dict__.get("_steady") is not None  # built afresh by the clone's own full step
        for p, q in zip(params, clone.params, strict=True):
            np.testing.assert_array_equal(p.value, q.value)


def test_an_update_rule_set_on_the_instance_after_steady_steps_is_called():
    params, opt, rng = _stepped()
    calls = []
    opt._update = lambda p, backend, grad, state, group: calls.append(p)
    for p, g in zip(params, _grads(rng, params), strict=True):
        p.grad = g
    before = [p.value.copy() for p in params]
    opt.step()
    assert calls == params
    for p, b in zip(params, before, strict=True):
        np.testing.assert_array_equal(p.value, b)


def test_a_parameter_replaced_in_the_list_or_reshaped_in_place_is_seen():
    params, opt, rng = _stepped()
    new = Param(params[0].value.copy())
    opt.params[0] = new
    for p, g in zip([new, *params[1:]], _grads(rng, params), strict=True):
        p.grad = g
    old = params[0].value.copy()
    opt.step()
    np.testing.assert_array_equal(params[0].value, old)  # no longer the optimizer's
    assert not np.array_equal(new.value, old)
    params, opt, rng = _stepped()
    params[0].value.shape = (4, 3)  # the same array, another shape: the full step's error, nothing written
    for p, g in zip(params, _grads(rng, params), strict=True):
        p.grad = g
    params[0].grad = params[0].grad.reshape(3, 4)
    values = [p.value.copy() for p in params]
    with pytest.raises(ValueError, match=r"must have the parameter's shape \(4, 3\), got \(3, 4\)"):
        opt.step()
    for p, v in zip(params, values, strict=True):
        np.testing.assert_array_equal(p.value, v)


@needs_torch
def test_runs_of_two_libraries_in_one_group_give_the_bits_of_the_full_step():
    import torch

    def train(cls):
        rng = np.random.default_rng(8)
        values = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,), (2, 2)]]
        params = [Param(values[0]), Param(torch.from_numpy(values[1].copy())), Param(values[2])]
        opt = cls(params, lr=0.1, momentum=0.9, nesterov=True)
        for _ in range(6):
            for p in params:
                g = rng.standard_normal(tuple(p.value.shape)).astype(np.float32)
                p.grad = torch.from_numpy(g) if isinstance(p.value, torch.Tensor) else g
            opt.step()
        return [np.asarray(p.value) for p in params], opt

    values, opt = train(optim.SGD)
    ref, _ = train(_FullStepSGD)
    assert [r[2] for r in opt._steady.runs] == [np.ndarray, torch.Tensor, np.ndarray]
    for v, r in zip(values, ref, strict=True):
        np.testing.assert_array_equal(v, r)


def test_a_backend_that_returns_too_few_updated_arrays_is_an_error_not_an_in_place_step(monkeypatch):
    # The plan's quick in-place test compares the run's arrays pairwise: a backend returning one array
    # short must not read as "all in place" (the full step's strict zip raises for it too).
    from deepcore.optim import steady

    params = _params(0)
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(1)
    for _ in range(2):
        for p, g in zip(params, _grads(rng, params), strict=True):
            p.grad = g
        opt.step()
    assert opt._steady is not None
    real = steady.update_run

    def one_short(*args):
        values, bufs = real(*args)
        return values[:-1], bufs[:-1]

    monkeypatch.setattr(steady, "update_run", one_short)
    for p, g in zip(params, _grads(rng, params), strict=True):
        p.grad = g
    with pytest.raises(ValueError):
        opt.step()
