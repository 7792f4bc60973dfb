"""Optimizers and learning-rate schedules: PyTorch's trajectories, hand-worked steps, the course's
four-point regression, state dicts, atomic failed steps, in-place NumPy updates."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deepcore as dc
from deepcore import optim
from deepcore.nn import Param
from tests.helpers import arr, dtype_name, needs_torch, to_np

SHAPES = [(3, 4), (4,), (2,)]
# Parameter 2 has no gradient on these steps: it must be skipped, as PyTorch skips it.
NO_GRAD_STEPS = {2: (0, 3)}

CONFIGS = [
    ("GD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.02, "betas": (0.85, 0.995), "weight_decay": 0.3}),
]
TOL = {"float32": {"rtol": 1e-6, "atol": 1e-7}, "float64": {"rtol": 1e-12, "atol": 1e-14}}


def _values(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in SHAPES]


def _grads(steps: int, seed: int = 1) -> list[list[np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        out.append([None if t in NO_GRAD_STEPS.get(i, ()) else rng.normal(size=s) for i, s in enumerate(SHAPES)])
    return out


def _params(backend, values, dtype: str) -> list[Param]:
    return [Param(arr(backend, v, dtype), f"p{i}") for i, v in enumerate(values)]


def _make(name: str, params, **kw) -> optim.Optimizer:
    return getattr(optim, name)(params, **kw)


def _set_grads(backend, params, grads, dtype: str) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else arr(backend, g, dtype)


def _snapshot(opt: optim.Optimizer) -> tuple[list[np.ndarray], dict]:
    state = {(i, k): to_np(v) if hasattr(v, "shape") else v for i, s in enumerate(opt.state) for k, v in s.items()}
    return [to_np(p.value) for p in opt.params], state


def _assert_same(before, after) -> None:
    (v0, s0), (v1, s1) = before, after
    for a, b in zip(v0, v1, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert s0.keys() == s1.keys()
    for k in s0:
        if isinstance(s0[k], np.ndarray):
            assert s0[k].dtype == s1[k].dtype and s0[k].tobytes() == s1[k].tobytes(), k
        else:
            assert s0[k] == s1[k], k


# ------------------------------------------------------------ against PyTorch
@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, kw", CONFIGS, ids=[f"{n}-{'-'.join(map(str, kw))}" for n, kw in CONFIGS])
def test_trajectory_matches_torch(backend, name, kw, dtype):
    import torch

    values, grads = _values(), _grads(6)
    params = _params(backend, values, dtype)
    opt = _make(name, params, **kw)
    tdt = getattr(torch, dtype)
    tparams = [torch.tensor(v, dtype=tdt, requires_grad=True) for v in values]
    tname = "SGD" if name == "GD" else name
    topt = getattr(torch.optim, tname)(tparams, foreach=False, **kw)
    for step_grads in grads:
        _set_grads(backend, params, step_grads, dtype)
        for tp, g in zip(tparams, step_grads, strict=True):
            tp.grad = None if g is None else torch.tensor(g, dtype=tdt)
        opt.step()
        topt.step()
        for i, (p, tp) in enumerate(zip(params, tparams, strict=True)):
            assert dtype_name(p.value) == dtype
            np.testing.assert_allclose(to_np(p.value), tp.detach().numpy(), **TOL[dtype], err_msg=f"param {i}")
            tstate = topt.state.get(tp, {})
            for key, value in opt.state[i].items():
                if key == "step":
                    assert value == int(tstate["step"])
                else:
                    assert dtype_name(value) == dtype
                    np.testing.assert_allclose(to_np(value), tstate[key].numpy(), **TOL[dtype], err_msg=key)
    assert opt.state[2].get("step", 4) == 4  # two of six steps had no gradient for parameter 2


# ------------------------------------------------------------ worked by hand
def test_first_steps_by_hand(backend):
    g = np.array([0.5, -2.0, 3.0, -1e-3])
    w = np.array([1.0, -1.0, 0.25, 2.0])

    def one_step(name, steps=1, **kw):
        p = Param(arr(backend, w, "float64"), "w")
        opt = _make(name, [p], **kw)
        for _ in range(steps):
            p.grad = arr(backend, g, "float64")
            opt.step()
        return to_np(p.value)

    lr = 1e-2
    # Adam's first step: m̂ = g and v̂ = g², so every weight moves by lr·sign(g).
    np.testing.assert_allclose(one_step("Adam", lr=lr), w - lr * np.sign(g), rtol=0, atol=1e-7)
    np.testing.assert_allclose(one_step("AdamW", lr=lr, weight_decay=0.5), w * (1 - lr * 0.5) - lr * np.sign(g),
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(one_step("Adam", lr=lr, weight_decay=0.5), w - lr * np.sign(g + 0.5 * w),
                               rtol=0, atol=1e-7)
    # SGD: the momentum buffer starts as the first gradient (no dampening on step 1).
    np.testing.assert_allclose(one_step("GD", lr=0.1), w - 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(one_step("SGD", lr=0.1, momentum=0.9, dampening=0.5), w - 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(one_step("SGD", steps=2, lr=0.1, momentum=0.9, dampening=0.5),
                               w - 0.1 * g - 0.1 * (0.9 * g + 0.5 * g), rtol=1e-14)
    np.testing.assert_allclose(one_step("SGD", lr=0.1, momentum=0.9, nesterov=True), w - 0.1 * 1.9 * g, rtol=1e-14)
    np.testing.assert_allclose(one_step("SGD", lr=0.1, weight_decay=0.2), w - 0.1 * (g + 0.2 * w), rtol=1e-14)


def test_gd_solves_the_four_point_regression(backend):
    """x = 2, 4, 6, 8 and y = 3, 4, 5, 6: full-batch GD on the L2 loss reaches w = 0.5, b = 2.0."""
    x = arr(backend, [[2.0], [4.0], [6.0], [8.0]], "float64")
    y = arr(backend, [[3.0], [4.0], [5.0], [6.0]], "float64")
    model = dc.nn.Linear(1, 1, init="zeros", dtype="float64")
    opt = optim.GD(model.parameters(), lr=0.03)
    for _ in range(2500):
        opt.zero_grad()
        pred, backward = model.forward(x, train=True)
        loss, dpred = dc.losses.l2_loss(pred, y)
        backward(dpred)
        opt.step()
    assert float(to_np(model.weight.value)[0, 0]) == pytest.approx(0.5, abs=1e-7)
    assert float(to_np(model.bias.value)[0]) == pytest.approx(2.0, abs=1e-6)
    assert float(loss) < 1e-12


# ------------------------------------------------------------- state dicts
ROUND_TRIP = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
]


def _to_numpy_tree(obj):
    if isinstance(obj, dict):
        return {k: _to_numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, int) and not isinstance(obj, bool):
        return np.int64(obj)  # as a file reader would hand it back
    return to_np(obj) if hasattr(obj, "shape") else obj


@pytest.mark.parametrize("name, kw", ROUND_TRIP, ids=[n for n, _ in ROUND_TRIP])
def test_state_dict_round_trip_equals_straight_run(backend, name, kw):
    values, grads = _values(), _grads(6)
    straight = _params(backend, values, "float32")
    opt = _make(name, straight, **kw)
    for t in range(3):
        _set_grads(backend, straight, grads[t], "float32")
        opt.step()
    saved = _to_numpy_tree(opt.state_dict())
    json.dumps(saved["hyperparams"])
    at_three = [to_np(p.value) for p in straight]
    for t in range(3, 6):
        _set_grads(backend, straight, grads[t], "float32")
        opt.step()

    resumed = [Param(arr(backend, v, "float32"), f"p{i}") for i, v in enumerate(at_three)]
    other_kw = {**kw, "lr": 0.5}  # the loaded state restores lr
    opt2 = _make(name, resumed, **other_kw)
    opt2.load_state_dict(saved)
    assert opt2.lr == kw["lr"] and opt2.step_count == 3
    for t in range(3, 6):
        _set_grads(backend, resumed, grads[t], "float32")
        opt2.step()
    for a, b in zip(straight, resumed, strict=True):
        assert to_np(a.value).tobytes() == to_np(b.value).tobytes()
    _assert_same(_snapshot(opt), _snapshot(opt2))


def test_load_state_dict_rejects_bad_state_and_changes_nothing(backend):
    values, grads = _values(), _grads(2)
    params = _params(backend, values, "float32")
    opt = optim.Adam(params, lr=0.01)
    for g in grads:
        _set_grads(backend, params, g, "float32")
        opt.step()
    good = _to_numpy_tree(opt.state_dict())
    before = _snapshot(opt)

    def broken(**changes):
        d = json.loads(json.dumps({k: v for k, v in good.items() if k != "state"}, default=int))
        d["state"] = {k: dict(v) for k, v in good["state"].items()}
        d["hyperparams"]["lr"] = 0.5  # would change lr if anything were applied
        for path, value in changes.items():
            keys = path.split("/")
            target = d
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
        return d

    cases = [
        (broken(type="SGD"), ValueError, "'SGD' optimizer"),
        (broken(**{"state/1/exp_avg": np.zeros(5)}), ValueError, r"state\['1'\]\['exp_avg'\] has shape \(5,\)"),
        (broken(**{"state/0/exp_avg_sq": np.zeros((4, 3))}), ValueError, "shape"),
        (broken(**{"state/7": {}}), ValueError, "parameter '7'.*3 parameters"),
        (broken(**{"state/0/step": -1}), ValueError, "step"),
        (broken(**{"hyperparams/betas": [0.9, 1.0]}), ValueError, r"betas\[1\]"),
        (broken(**{"hyperparams/momentum": 0.9}), ValueError, "unknown hyperparameters"),
    ]
    del_key = broken()
    del del_key["state"]["2"]["exp_avg"]
    cases.append((del_key, ValueError, "keys"))
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            opt.load_state_dict(bad)
        assert opt.lr == 0.01 and opt.step_count == 2
        _assert_same(before, _snapshot(opt))


# ---------------------------------------------------------------- atomicity
def _foreign(backend, a):
    """``a`` as an array of a backend other than ``backend``."""
    if backend.name != "numpy":
        return np.asarray(a, dtype=np.float32)
    return arr(dc.get_backend("array_api_strict"), a, "float32")


@pytest.mark.parametrize("case", ["shape", "backend", "integer", "not_an_array"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_bad_gradient_raises_before_anything_changes(backend, name, case):
    values, grads = _values(), _grads(3)
    params = _params(backend, values, "float32")
    opt = _make(name, params, lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
    for g in grads[:2]:
        _set_grads(backend, params, g, "float32")
        opt.step()
    _set_grads(backend, params, grads[2], "float32")
    bad = {
        "shape": (arr(backend, np.ones(5), "float32"), ValueError, r"parameter 1 \('p1'\).*shape \(4,\), got \(5,\)"),
        "backend": (_foreign(backend, np.ones(4)), TypeError, r"parameter 1 \('p1'\)"),
        "integer": (arr(backend, np.ones(4, dtype=np.int64), "int64"), TypeError, r"parameter 1 \('p1'\).*floating"),
        "not_an_array": ([1.0, 2.0, 3.0, 4.0], TypeError, r"parameter 1 \('p1'\).*must be an array"),
    }[case]
    params[1].grad = bad[0]
    before = _snapshot(opt)
    with pytest.raises(bad[1], match=bad[2]):
        opt.step()
    _assert_same(before, _snapshot(opt))
    assert opt.step_count == 2


# ------------------------------------------------------------------ NumPy speed path
@pytest.mark.parametrize("name, kw", CONFIGS, ids=[f"{n}-{'-'.join(map(str, kw))}" for n, kw in CONFIGS])
def test_numpy_updates_in_place(name, kw):
    values, grads = _values(), _grads(4)
    params = [Param(v.astype(np.float32), f"p{i}") for i, v in enumerate(values)]
    opt = _make(name, params, **kw)
    ids = [id(p.value) for p in params]
    _set_grads(dc.get_backend("numpy"), params, grads[1], "float32")
    opt.step()  # creates the state
    state_ids = {(i, k): id(v) for i, s in enumerate(opt.state) for k, v in s.items() if hasattr(v, "shape")}
    for g in grads[2:]:
        _set_grads(dc.get_backend("numpy"), params, g, "float32")
        opt.step()
    assert [id(p.value) for p in params] == ids
    assert all(p.value.dtype == np.float32 for p in params)
    assert {(i, k): id(v) for i, s in enumerate(opt.state) for k, v in s.items() if hasattr(v, "shape")} == state_ids
    assert all(v.dtype == np.float32 for s in opt.state for v in s.values() if hasattr(v, "shape"))


def test_numpy_zero_dim_and_read_only_parameters():
    scalar = Param(np.array(1.5, dtype=np.float32), "temperature")
    frozen_value = np.ones(3)
    frozen_value.setflags(write=False)
    frozen = Param(frozen_value, "frozen")
    opt = optim.SGD([scalar, frozen], lr=0.1, momentum=0.9)
    for _ in range(2):
        scalar.grad, frozen.grad = np.array(1.0, dtype=np.float32), np.ones(3)
        value = scalar.value
        opt.step()
    assert scalar.value is value and scalar.value.shape == () and scalar.value.dtype == np.float32
    assert opt.state[0]["momentum_buffer"].shape == ()
    np.testing.assert_allclose(scalar.value, 1.5 - 0.1 - 0.1 * 1.9, rtol=1e-6)
    np.testing.assert_allclose(frozen.value, 1 - 0.1 - 0.1 * 1.9)  # a new array: the read-only one is untouched
    assert frozen_value.tolist() == [1.0, 1.0, 1.0]


def test_state_follows_the_model_to_another_backend():
    model = dc.nn.Linear(3, 2, seed=0)
    opt = optim.Adam(model.parameters(), lr=0.1)
    x = np.ones((4, 3), dtype=np.float32)
    for _ in range(2):
        opt.zero_grad()
        y, backward = model.forward(x, train=True)
        backward(np.ones_like(y))
        opt.step()
    model.to("array_api_strict", dtype="float64")
    strict = dc.get_backend("array_api_strict")
    opt.zero_grad()
    y, backward = model.forward(strict.from_numpy(x, dtype=strict.xp.float64), train=True)
    backward(strict.xp.ones_like(y))
    opt.step()
    assert all(dc.get_backend(v) is strict and dtype_name(v) == "float64"
               for s in opt.state for k, v in s.items() if k != "step")


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("make, exc, match", [
    (lambda ps: optim.SGD(ps, lr=-0.1), ValueError, r"SGD: lr must be .*>= 0, got -0.1"),
    (lambda ps: optim.SGD(ps, lr=float("nan")), ValueError, "lr"),
    (lambda ps: optim.SGD(ps, lr="0.1"), TypeError, "lr must be a number"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=-1), ValueError, "momentum"),
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening == 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay"),
    (lambda ps: optim.Adam(ps, betas=(0.9, 1.0)), ValueError, r"Adam: betas\[1\] must be .*\[0, 1\), got 1.0"),
    (lambda ps: optim.Adam(ps, betas=(-0.1, 0.9)), ValueError, r"betas\[0\]"),
    (lambda ps: optim.Adam(ps, betas=0.9), ValueError, "betas must be a pair"),
    (lambda ps: optim.AdamW(ps, eps=-1e-8), ValueError, "AdamW: eps"),
    (lambda ps: optim.Adam([], lr=0.1), ValueError, "params must not be empty"),
    (lambda ps: optim.Adam(ps + ps[:1], lr=0.1), ValueError, r"params\[3\] \('p0'\) is the same Param as params\[0\]"),
    (lambda ps: optim.Adam([ps[0], np.zeros(3)]), TypeError, r"params\[1\] must be a deepcore.nn.Param .*got ndarray"),
    (lambda ps: optim.Adam(ps[0]), TypeError, "single Param"),
])
def test_arguments_are_checked(make, exc, match):
    with pytest.raises(exc, match=match):
        make(_params(dc.get_backend("numpy"), _values(), "float32"))


def test_zero_grad_lr_and_generators():
    model = dc.nn.Linear(2, 2)
    opt = optim.SGD(iter(model.parameters()), lr=0.1)
    for p in model.parameters():
        p.grad = np.ones(p.shape, dtype=np.float32)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # nothing has a gradient: nothing changes
    assert opt.state == [{}, {}]
    opt.lr = 0.25
    assert opt.lr == 0.25 and opt.state_dict()["hyperparams"]["lr"] == 0.25
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    assert optim.GD(model.parameters(), lr=0.1).state_dict()["hyperparams"] == {"lr": 0.1}


# ---------------------------------------------------------------- schedules
SCHEDULES = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}, "StepLR", {"step_size": 3, "gamma": 0.5}),
    ("ExponentialLR", {"gamma": 0.9}, "ExponentialLR", {"gamma": 0.9}),
    ("CosineAnnealingLR", {"T_max": 8, "eta_min": 0.001}, "CosineAnnealingLR", {"T_max": 8, "eta_min": 0.001}),
    ("CosineAnnealingLR", {"T_max": 20}, "CosineAnnealingLR", {"T_max": 20}),
    ("LinearWarmup", {"warmup_steps": 5, "start_factor": 0.2}, "LinearLR",
     {"start_factor": 0.2, "end_factor": 1.0, "total_iters": 5}),
]


@needs_torch
@pytest.mark.parametrize("name, kw, tname, tkw", SCHEDULES, ids=[s[0] + str(len(s[1])) for s in SCHEDULES])
def test_schedules_match_torch(name, kw, tname, tkw):
    import warnings

    import torch

    opt = optim.SGD([Param(np.zeros(2), "w")], lr=0.1)
    sched = getattr(optim, name)(opt, **kw)
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    tsched = getattr(torch.optim.lr_scheduler, tname)(topt, **tkw)
    for epoch in range(20):
        assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr()[0], rel=1e-12, abs=1e-15), epoch
        assert opt.lr == sched.get_last_lr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns when no optimizer step ran
            tsched.step()
        sched.step()


def test_schedule_state_dict_is_json_and_resumes():
    opt = optim.Adam([Param(np.zeros(2), "w")], lr=0.1)
    sched = optim.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    for _ in range(4):
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict()))
    opt2 = optim.Adam([Param(np.zeros(2), "w")], lr=0.7)
    sched2 = optim.CosineAnnealingLR(opt2, T_max=3)
    sched2.load_state_dict(saved)
    assert opt2.lr == opt.lr == sched2.get_last_lr()
    sched.step()
    sched2.step()
    assert opt2.lr == opt.lr
    with pytest.raises(ValueError, match="'CosineAnnealingLR' schedule"):
        optim.StepLR(opt2, step_size=2).load_state_dict(saved)
    with pytest.raises(ValueError, match="T_max must be a positive integer, got 0"):
        optim.CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(ValueError, match=r"start_factor must be .*\(0, 1\]"):
        optim.LinearWarmup(opt, warmup_steps=3, start_factor=0.0)
    with pytest.raises(TypeError, match="optimizer must be a deepcore.optim optimizer"):
        optim.StepLR(object(), step_size=1)


@needs_torch
def test_sequential_schedule_matches_torch_sequential_lr():
    import torch

    from deepcore.optim import CosineAnnealingLR, LinearWarmup, SequentialSchedule

    opt = dc.optim.SGD([dc.nn.Param(np.zeros(2))], lr=0.1)
    sched = SequentialSchedule(opt, [LinearWarmup(opt, 3, start_factor=0.2), CosineAnnealingLR(opt, T_max=7)],
                               milestones=[3])
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    tl = torch.optim.lr_scheduler
    tsched = tl.SequentialLR(topt, [tl.LinearLR(topt, start_factor=0.2, total_iters=3),
                                    tl.CosineAnnealingLR(topt, T_max=7)], milestones=[3])
    got, expected = [opt.lr], [topt.param_groups[0]["lr"]]
    for _ in range(12):
        sched.step()
        topt.step()
        tsched.step()
        got.append(opt.lr)
        expected.append(topt.param_groups[0]["lr"])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    state = sched.state_dict()
    fresh_opt = dc.optim.SGD([dc.nn.Param(np.zeros(2))], lr=0.1)
    fresh = SequentialSchedule(fresh_opt, [LinearWarmup(fresh_opt, 3, start_factor=0.2),
                                           CosineAnnealingLR(fresh_opt, T_max=7)], milestones=[3])
    fresh.load_state_dict(state)
    assert fresh_opt.lr == opt.lr
    with pytest.raises(ValueError, match="one milestone fewer"):
        SequentialSchedule(opt, [LinearWarmup(opt, 3)], milestones=[3])
