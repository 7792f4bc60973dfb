"""The optimizer-side features of issue 15 against PyTorch: RMSprop and Adagrad, parameter groups
(and param_groups()), OneCycleLR, ReduceLROnPlateau, per-step warm-up, LossScaler against
torch.amp.GradScaler, gradient clipping, and the EMA against its formula."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import deepcore as dc
from deepcore import optim
from deepcore.checkpoint import load_checkpoint, save_checkpoint
from deepcore.nn import Param
from tests.helpers import arr, dtype_name, needs_torch, to_np

SHAPES = [(3, 4), (4,), (2,)]
NO_GRAD_STEPS = {2: (0, 5)}  # parameter 2 has no gradient on these steps: skipped, as torch skips it
# "to 1e-6": parameters of magnitude ~1 agree to 1e-6 after 25 steps (float32 rounds differently
# from torch's FMA kernels by an ulp or so per step); float64 far tighter.
TOL = {"float32": {"rtol": 1e-6, "atol": 1e-6}, "float64": {"rtol": 1e-12, "atol": 1e-13}}
STEPS = 25


def _values(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in SHAPES]


def _grads(steps: int, seed: int = 1) -> list[list[np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    return [[None if t in NO_GRAD_STEPS.get(i, ()) else rng.normal(size=s) for i, s in enumerate(SHAPES)]
            for t in range(steps)]


def _params(backend, values, dtype: str) -> list[Param]:
    return [Param(arr(backend, v, dtype), f"p{i}") for i, v in enumerate(values)]


def _set_grads(backend, params, grads, dtype: str) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else arr(backend, g, dtype)


def _torch_params(values, dtype: str):
    import torch

    return [torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True) for v in values]


def _set_torch_grads(tparams, grads, dtype: str) -> None:
    import torch

    for tp, g in zip(tparams, grads, strict=True):
        tp.grad = None if g is None else torch.tensor(g, dtype=getattr(torch, dtype))


def _compare(params, tparams, opt, topt, dtype: str, where: str) -> None:
    for i, (p, tp) in enumerate(zip(params, tparams, strict=True)):
        assert dtype_name(p.value) == dtype
        np.testing.assert_allclose(to_np(p.value), tp.detach().numpy(), **TOL[dtype], err_msg=f"{where} param {i}")
        tstate = topt.state.get(tp, {})
        for key, value in opt.state[i].items():
            if key == "step":
                assert value == int(tstate["step"]), where
            else:
                assert dtype_name(value) == dtype
                np.testing.assert_allclose(to_np(value), tstate[key].numpy(), **TOL[dtype], err_msg=f"{where} {key}")


# ================================================================ RMSprop, Adagrad
ADAPTIVE = [
    ("RMSprop", {}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9}),
    ("RMSprop", {"lr": 0.01, "centered": True}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.1, "momentum": 0.5, "centered": True}),
    ("RMSprop", {"lr": 0.005, "alpha": 0.3, "centered": True}),  # the other spelling of torch.lerp
    ("Adagrad", {}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.2, "eps": 1e-8}),
]
ADAPTIVE_IDS = [f"{n}-{'-'.join(map(str, kw))}" for n, kw in ADAPTIVE]


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, kw", ADAPTIVE, ids=ADAPTIVE_IDS)
def test_adaptive_optimizers_match_torch(backend, name, kw, dtype):
    import torch

    values, grads = _values(), _grads(STEPS)
    params = _params(backend, values, dtype)
    opt = getattr(optim, name)(params, **kw)
    tparams = _torch_params(values, dtype)
    topt = getattr(torch.optim, name)(tparams, foreach=False, **kw)
    for t, step_grads in enumerate(grads):
        _set_grads(backend, params, step_grads, dtype)
        _set_torch_grads(tparams, step_grads, dtype)
        opt.step()
        topt.step()
        _compare(params, tparams, opt, topt, dtype, f"step {t}")
    assert opt.state[2]["step"] == STEPS - 2


def test_adaptive_first_steps_by_hand():
    g, w = np.array([0.5, -2.0, 3.0]), np.array([1.0, -1.0, 0.25])
    p = Param(w.copy(), "w")
    opt = optim.RMSprop([p], lr=0.01, alpha=0.9, eps=0.0)
    p.grad = g.copy()
    opt.step()  # s = 0.1 g², so p -= 0.01 g / (sqrt(0.1)|g|)
    np.testing.assert_allclose(p.value, w - 0.01 * np.sign(g) / math.sqrt(0.1), rtol=1e-14)
    p = Param(w.copy(), "w")
    opt = optim.Adagrad([p], lr=0.1, lr_decay=0.5, eps=0.0)
    for _ in range(2):
        p.grad = g.copy()
        opt.step()  # step 1: -0.1 sign(g); step 2: clr = 0.1/1.5, sum = 2g², -clr g/(sqrt(2)|g|)
    np.testing.assert_allclose(p.value, w - 0.1 * np.sign(g) - 0.1 / 1.5 * np.sign(g) / math.sqrt(2), rtol=1e-14)


@pytest.mark.parametrize("name, kw", ADAPTIVE, ids=ADAPTIVE_IDS)
def test_adaptive_numpy_updates_in_place(name, kw):
    numpy = dc.get_backend("numpy")
    values, grads = _values(), _grads(4)
    params = [Param(v.astype(np.float32), f"p{i}") for i, v in enumerate(values)]
    opt = getattr(optim, name)(params, **kw)
    ids = [id(p.value) for p in params]
    _set_grads(numpy, params, grads[1], "float32")
    opt.step()
    state_ids = {(i, k): id(v) for i, s in enumerate(opt.state) for k, v in s.items() if hasattr(v, "shape")}
    for g in grads[2:]:
        _set_grads(numpy, params, g, "float32")
        opt.step()
    assert [id(p.value) for p in params] == ids
    assert {(i, k): id(v) for i, s in enumerate(opt.state) for k, v in s.items() if hasattr(v, "shape")} == state_ids
    assert all(v.dtype == np.float32 for s in opt.state for v in s.values() if hasattr(v, "shape"))


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_adaptive_zero_dim_and_read_only(name):
    kw = {"momentum": 0.9, "centered": True} if name == "RMSprop" else {}
    scalar = Param(np.array(1.5), "t")
    frozen_value = np.ones(3)
    frozen_value.setflags(write=False)
    frozen = Param(frozen_value, "frozen")
    ref = [Param(np.array([1.5]), "t"), Param(np.ones(3), "f")]
    opt, ref_opt = getattr(optim, name)([scalar, frozen], **kw), getattr(optim, name)(ref, **kw)
    for _ in range(3):
        scalar.grad, frozen.grad = np.array(0.7), np.full(3, 0.7)
        ref[0].grad, ref[1].grad = np.array([0.7]), np.full(3, 0.7)
        opt.step()
        ref_opt.step()
    assert scalar.value.shape == () and isinstance(scalar.value, np.ndarray)
    np.testing.assert_allclose(scalar.value, ref[0].value[0], rtol=1e-15)
    np.testing.assert_allclose(frozen.value, ref[1].value, rtol=1e-15)
    assert frozen_value.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name, kw", ADAPTIVE, ids=ADAPTIVE_IDS)
def test_adaptive_state_dict_round_trip(backend, name, kw):
    values, grads = _values(), _grads(8)
    straight = _params(backend, values, "float32")
    opt = getattr(optim, name)(straight, **kw)
    for g in grads[:4]:
        _set_grads(backend, straight, g, "float32")
        opt.step()
    saved = _host_tree(opt.state_dict())
    json.dumps({k: v for k, v in saved.items() if k != "state"})
    resumed = [Param(arr(backend, to_np(p.value), "float32"), p.name) for p in straight]
    opt2 = getattr(optim, name)(resumed, **{**kw, "lr": 0.5})
    opt2.load_state_dict(saved)
    for g in grads[4:]:
        for ps in (straight, resumed):
            _set_grads(backend, ps, g, "float32")
        opt.step()
        opt2.step()
    for a, b in zip(straight, resumed, strict=True):
        assert to_np(a.value).tobytes() == to_np(b.value).tobytes()


def _host_tree(obj):
    if isinstance(obj, dict):
        return {k: _host_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_host_tree(v) for v in obj]
    return to_np(obj) if hasattr(obj, "shape") else obj


def test_rmsprop_state_keys_follow_the_options():
    p = Param(np.ones(3), "w")
    opt = optim.RMSprop([p])
    p.grad = np.ones(3)
    opt.step()
    assert set(opt.state[0]) == {"step", "square_avg"}
    opt.momentum = 0.9  # turned on later: the buffer starts at zeros, as PyTorch's first step starts it
    opt.step()
    assert set(opt.state[0]) == {"step", "square_avg", "momentum_buffer"}
    state = opt.state_dict()
    del state["state"]["0"]["square_avg"]
    with pytest.raises(ValueError, match="must have keys"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("make, match", [
    (lambda ps: optim.RMSprop(ps, alpha=-0.1), "alpha"),
    (lambda ps: optim.RMSprop(ps, momentum=-1), "momentum"),
    (lambda ps: optim.RMSprop(ps, centered=1), "centered must be True or False"),
    (lambda ps: optim.Adagrad(ps, lr_decay=-1), "lr_decay"),
    (lambda ps: optim.Adagrad(ps, initial_accumulator_value=-1), "initial_accumulator_value"),
    (lambda ps: optim.Adagrad(ps, eps=float("inf")), "eps"),
])
def test_adaptive_arguments_are_checked(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make([Param(np.ones(2), "w")])


# ================================================================ parameter groups
def _group_spec(params, torch_side: bool = False):
    return [{"params": params[:1]},
            {"params": params[1:2], "lr": 0.03, "weight_decay": 0.0},
            {"params": params[2:], "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.2}]


@needs_torch
@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD", "RMSprop"])
def test_groups_follow_torch(backend, name):
    import torch

    dtype = "float32"
    kw = {"lr": 0.01, "weight_decay": 0.05}
    if name == "SGD":
        kw["momentum"] = 0.9
    values, grads = _values(), _grads(STEPS)
    params = _params(backend, values, dtype)
    tparams = _torch_params(values, dtype)
    spec, tspec = _group_spec(params), _group_spec(tparams)
    if name in ("SGD", "RMSprop"):  # no betas/eps override there
        for s in (spec, tspec):
            s[2] = {"params": s[2]["params"], "momentum": 0.5}
    opt = getattr(optim, name)(spec, **kw)
    topt = getattr(torch.optim, name)(tspec, foreach=False, **kw)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1]
    for g, tg in zip(opt.param_groups, topt.param_groups, strict=True):
        for key in opt.HYPERPARAMS:
            assert g[key] == (tuple(tg[key]) if key == "betas" else tg[key]), key
    for t, step_grads in enumerate(grads):
        _set_grads(backend, params, step_grads, dtype)
        _set_torch_grads(tparams, step_grads, dtype)
        opt.step()
        topt.step()
        _compare(params, tparams, opt, topt, dtype, f"step {t}")


def test_group_dicts_are_checked_and_lr_reads_the_first_group():
    a, b = Param(np.zeros(2), "a"), Param(np.zeros(3), "b")
    opt = optim.SGD([{"params": [a], "name": "weights"}, {"params": b, "lr": 0.5, "momentum": 0.9}], lr=0.1)
    g0, g1 = opt.param_groups
    assert isinstance(g0, optim.ParamGroup) and isinstance(g0, dict)
    assert g0["lr"] == 0.1 and g1["lr"] == 0.5 and g1["momentum"] == 0.9 and g0["momentum"] == 0.0
    assert g0["name"] == "weights" and g1["params"] == [b] and opt.params == [a, b]
    assert opt.lr == 0.1 and opt.momentum == 0.0
    g1["lr"] = 0.25
    assert g1["lr"] == 0.25 and opt.lr == 0.1
    for bad, exc in [(("lr", -1.0), ValueError), (("nesterov", True), ValueError), (("momentum", "x"), TypeError),
                     (("lr_", 0.1), KeyError), (("params", []), TypeError)]:
        with pytest.raises(exc):
            g0[bad[0]] = bad[1]
    with pytest.raises(TypeError):
        del g0["lr"]
    g0.update(lr=0.3, nesterov=True, momentum=0.8)  # checked together, in any order
    assert g0["lr"] == 0.3 and g0["momentum"] == 0.8 and g0["nesterov"]
    g0.update(nesterov=False)
    opt.lr = 0.05  # every group, and the default
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05] and opt.defaults["lr"] == 0.05
    opt.momentum = 0.7
    assert [g["momentum"] for g in opt.param_groups] == [0.7, 0.7]
    with pytest.raises(ValueError, match="momentum"):
        opt.momentum = -1  # checked for every group before any changes
    assert [g["momentum"] for g in opt.param_groups] == [0.7, 0.7]
    import copy

    assert type(copy.deepcopy(g0)) is dict and copy.deepcopy(g0)["lr"] == 0.05
    assert "2 groups" in repr(opt)


@pytest.mark.parametrize("spec, exc, match", [
    (lambda a, b: [{"params": [a]}, {"params": [a, b]}], ValueError,
     r"params\[1\]\['params'\]\[0\] \('a'\) is the same"),
    (lambda a, b: [{"params": [a], "lr_": 0.1}], ValueError, r"unknown keys \['lr_'\]"),
    (lambda a, b: [{"params": [a]}, b], TypeError, "must be a parameter group"),
    (lambda a, b: [{"lr": 0.1}], ValueError, "must have a 'params' key"),
    (lambda a, b: [{"params": []}], ValueError, "every parameter group is empty"),
    (lambda a, b: [{"params": [a], "lr": -1.0}], ValueError, r"params\[0\].*lr must be"),
    (lambda a, b: [{"params": [a], "name": 3}], TypeError, "'name' must be a string"),
    (lambda a, b: [{"params": [a], "momentum": 0.9}], ValueError, "unknown keys"),  # GD has no momentum
])
def test_bad_groups_are_refused(spec, exc, match):
    a, b = Param(np.zeros(2), "a"), Param(np.zeros(3), "b")
    with pytest.raises(exc, match=match):
        optim.GD(spec(a, b), lr=0.1)


def test_add_param_group():
    a, b = Param(np.zeros(2), "a"), Param(np.zeros(3), "b")
    opt = optim.Adam([a], lr=0.1, eps=0.0)
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert opt.params == [a, b] and opt.param_groups[1]["betas"] == (0.9, 0.999) and len(opt.state) == 2
    with pytest.raises(ValueError, match="already in a group"):
        opt.add_param_group({"params": [a]})
    a.grad, b.grad = np.ones(2), np.ones(3)
    opt.step()
    np.testing.assert_allclose(b.value, -0.01 * np.ones(3), rtol=1e-12)


def test_group_state_dict_round_trips_and_checks_the_layout(tmp_path):
    values, grads = _values(), _grads(6)
    params = _params(dc.get_backend("numpy"), values, "float32")
    opt = optim.AdamW(_group_spec(params), lr=0.01)
    opt.param_groups[0]["name"] = "first"
    for g in grads[:3]:
        _set_grads(dc.get_backend("numpy"), params, g, "float32")
        opt.step()
    state = opt.state_dict()
    assert [g["params"] for g in state["param_groups"]] == [[0], [1], [2]]
    assert state["param_groups"][1]["lr"] == 0.03 and state["param_groups"][2]["betas"] == [0.8, 0.95]
    json.dumps(state["param_groups"])
    model = dc.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "ck.safetensors", model, opt)

    fresh = [Param(p.value.copy(), p.name) for p in params]
    fresh_opt = optim.AdamW(_group_spec(fresh), lr=0.5)
    load_checkpoint(tmp_path / "ck.safetensors", optimizer=fresh_opt)
    assert [g.hyperparams() for g in fresh_opt.param_groups] == [g.hyperparams() for g in opt.param_groups]
    assert fresh_opt.param_groups[0]["name"] == "first" and fresh_opt.defaults == opt.defaults

    one_group = optim.AdamW(params, lr=0.01)
    with pytest.raises(ValueError, match="3 parameter groups, this optimizer has 1"):
        one_group.load_state_dict(state)
    regrouped = optim.AdamW([{"params": params[:2]}, {"params": params[2:]}, {"params": []}], lr=0.01)
    with pytest.raises(ValueError, match=r"param_groups\[0\] holds parameters \[0\]"):
        regrouped.load_state_dict(state)
    bad = dict(state, param_groups=[dict(g) for g in state["param_groups"]])
    bad["param_groups"][1]["lr"] = -1.0
    before = [dict(g) for g in fresh_opt.param_groups]
    with pytest.raises(ValueError, match="lr"):
        fresh_opt.load_state_dict(bad)
    assert [dict(g) for g in fresh_opt.param_groups] == before


def test_a_state_dict_from_before_groups_still_loads():
    values, grads = _values(), _grads(2)
    params = _params(dc.get_backend("numpy"), values, "float32")
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    for g in grads:
        _set_grads(dc.get_backend("numpy"), params, g, "float32")
        opt.step()
    old = opt.state_dict()
    del old["param_groups"]
    old["hyperparams"]["lr"] = 0.02  # a schedule had changed it: the old format held the current rate
    fresh = optim.SGD([Param(p.value.copy(), p.name) for p in params], lr=0.5, momentum=0.9)
    fresh.load_state_dict(old)
    assert fresh.lr == 0.02 and fresh.param_groups[0]["lr"] == 0.02 and fresh.step_count == 2
    grouped = optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="1 parameter groups, this optimizer has 2"):
        grouped.load_state_dict(old)


def _bn_model():
    return dc.nn.Sequential(dc.nn.Linear(4, 5, seed=0), dc.nn.BatchNorm1d(5), dc.nn.ReLU(), dc.nn.Linear(5, 2, seed=1))


def test_param_groups_keeps_biases_and_norms_from_decay():
    model = _bn_model()
    groups = optim.param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [["0.weight", "3.weight"],
                                                                     ["0.bias", "1.weight", "1.bias", "3.bias"]]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    opt = optim.AdamW(groups, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    default = optim.param_groups(model)  # the optimizer's own decay for the first group
    assert "weight_decay" not in default[0]
    assert optim.AdamW(default, lr=1e-3, weight_decay=0.3).param_groups[0]["weight_decay"] == 0.3
    assert len(optim.param_groups(model, no_decay=())) == 1
    only_bias = optim.param_groups(model, no_decay=("bias",))
    assert [len(g["params"]) for g in only_bias] == [3, 3]
    with pytest.raises(TypeError, match="Module"):
        optim.param_groups(model.parameters())
    with pytest.raises(ValueError, match="weight_decay"):
        optim.param_groups(model, weight_decay=-1)


# ================================================================ schedules
def _two_group_opts(name: str = "SGD", **kw):
    import torch

    a, b = Param(np.zeros(2), "a"), Param(np.zeros(3), "b")
    opt = getattr(optim, name)([{"params": [a]}, {"params": [b], "lr": 0.02}], lr=0.1, **kw)
    topt = getattr(torch.optim, name)([{"params": [torch.zeros(2, requires_grad=True)]},
                                       {"params": [torch.zeros(3, requires_grad=True)], "lr": 0.02}], lr=0.1, **kw)
    return opt, topt


def _lrs(opt) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


GROUP_SCHEDULES = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}, "StepLR", {"step_size": 3, "gamma": 0.5}),
    ("ExponentialLR", {"gamma": 0.9}, "ExponentialLR", {"gamma": 0.9}),
    ("CosineAnnealingLR", {"T_max": 8, "eta_min": 0.001}, "CosineAnnealingLR", {"T_max": 8, "eta_min": 0.001}),
    ("LinearWarmup", {"warmup_steps": 5, "start_factor": 0.2}, "LinearLR",
     {"start_factor": 0.2, "end_factor": 1.0, "total_iters": 5}),
]


@needs_torch
@pytest.mark.parametrize("name, kw, tname, tkw", GROUP_SCHEDULES, ids=[s[0] for s in GROUP_SCHEDULES])
def test_schedules_scale_each_groups_own_rate_as_torch(name, kw, tname, tkw):
    import torch

    opt, topt = _two_group_opts()
    sched = getattr(optim, name)(opt, **kw)
    tsched = getattr(torch.optim.lr_scheduler, tname)(topt, **tkw)
    assert sched.interval == "epoch" and sched.base_lrs == [0.1, 0.02]
    for epoch in range(20):
        np.testing.assert_allclose(_lrs(opt), _lrs(topt), rtol=1e-12, atol=1e-15, err_msg=str(epoch))
        assert sched.get_last_lrs() == _lrs(opt) and sched.get_last_lr() == opt.lr
        topt.step()
        tsched.step()
        sched.step()


@needs_torch
def test_per_step_warmup_then_cosine_over_batches_matches_torch():
    import torch

    steps_per_epoch, epochs, warm = 7, 3, 10
    opt, topt = _two_group_opts("AdamW")
    total = steps_per_epoch * epochs
    sched = optim.SequentialSchedule(opt, [optim.LinearWarmup(opt, warm, start_factor=0.01, interval="step"),
                                           optim.CosineAnnealingLR(opt, T_max=total - warm, interval="step")],
                                     milestones=[warm])
    tl = torch.optim.lr_scheduler
    tsched = tl.SequentialLR(topt, [tl.LinearLR(topt, start_factor=0.01, total_iters=warm),
                                    tl.CosineAnnealingLR(topt, T_max=total - warm)], milestones=[warm])
    assert sched.interval == "step"
    for t in range(total):
        np.testing.assert_allclose(_lrs(opt), _lrs(topt), rtol=1e-12, err_msg=str(t))
        topt.step()
        tsched.step()
        sched.step()
    with pytest.raises(ValueError, match="same interval"):
        optim.SequentialSchedule(opt, [optim.LinearWarmup(opt, 3, interval="step"), optim.StepLR(opt, 2)],
                                 milestones=[3])


def test_every_schedule_says_its_interval_and_keeps_it():
    def fresh():
        return optim.SGD([Param(np.zeros(2), "w")], lr=0.1, momentum=0.9)

    assert optim.StepLR(fresh(), 2).interval == "epoch"
    assert optim.ExponentialLR(fresh(), 0.9, interval="step").interval == "step"
    assert optim.OneCycleLR(fresh(), max_lr=0.1, total_steps=10).interval == "step"
    assert optim.ReduceLROnPlateau(fresh()).interval == "epoch"
    assert optim.LRSchedule.DEFAULT_INTERVAL == "epoch" and optim.INTERVALS == ("epoch", "step")
    with pytest.raises(ValueError, match="interval must be 'epoch'"):
        optim.StepLR(fresh(), 2, interval="batch")
    opt = fresh()
    per_step = optim.LinearWarmup(opt, 4, interval="step")
    per_step.step()
    state = json.loads(json.dumps(per_step.state_dict()))
    assert state["interval"] == "step" and state["base_lrs"] == [0.1]
    with pytest.raises(ValueError, match="stepped per 'step'"):
        optim.LinearWarmup(fresh(), 4).load_state_dict(state)
    # A state from before groups and intervals: one base_lr, no interval.
    old = {"type": "LinearWarmup", "base_lr": 0.1, "last_epoch": 2, "warmup_steps": 4, "start_factor": 0.1}
    sched = optim.LinearWarmup(fresh(), 4)
    sched.load_state_dict(old)
    assert sched.last_epoch == 2 and sched.optimizer.lr == pytest.approx(0.1 * (0.1 + 0.9 * 2 / 4))


ONE_CYCLE = [
    {"max_lr": 0.5, "total_steps": 37},
    {"max_lr": [0.5, 0.2], "epochs": 4, "steps_per_epoch": 9, "three_phase": True, "anneal_strategy": "linear"},
    {"max_lr": 1.0, "total_steps": 20, "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0,
     "base_momentum": 0.8, "max_momentum": [0.9, 0.95]},
    {"max_lr": 0.3, "total_steps": 15, "cycle_momentum": False},
]


@needs_torch
@pytest.mark.parametrize("name, okw", [("SGD", {"momentum": 0.9}), ("AdamW", {}), ("RMSprop", {"momentum": 0.5})])
@pytest.mark.parametrize("kw", ONE_CYCLE, ids=[str(i) for i in range(len(ONE_CYCLE))])
def test_one_cycle_matches_torch_with_momentum(name, okw, kw):
    import torch

    opt, topt = _two_group_opts(name, **okw)
    sched = optim.OneCycleLR(opt, **kw)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, **kw)
    key = "betas" if name == "AdamW" else "momentum"
    for t in range(sched.total_steps):
        assert _lrs(opt) == pytest.approx(_lrs(topt), rel=1e-12, abs=1e-15), t
        momenta = [g[key][0] if key == "betas" else g[key] for g in opt.param_groups]
        assert momenta == pytest.approx([g[key][0] if key == "betas" else g[key] for g in topt.param_groups],
                                        rel=1e-12), t
        if key == "betas":
            assert [g["betas"][1] for g in opt.param_groups] == [0.999, 0.999]
        if t < sched.total_steps - 1:
            topt.step()
            tsched.step()
            sched.step()
    sched.step()  # step total_steps is allowed, as in torch; one more is not
    with pytest.raises(ValueError, match="tried to step"):
        sched.step()
    assert sched.last_epoch == sched.total_steps


def test_one_cycle_checks_and_resumes():
    opt = optim.SGD([Param(np.zeros(2), "w")], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="total_steps, or both epochs and steps_per_epoch"):
        optim.OneCycleLR(opt, max_lr=0.1)
    with pytest.raises(ValueError, match="anneal_strategy"):
        optim.OneCycleLR(opt, max_lr=0.1, total_steps=5, anneal_strategy="exp")
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        optim.OneCycleLR(optim.GD([Param(np.zeros(2), "w")], lr=0.1), max_lr=0.1, total_steps=5)
    with pytest.raises(ValueError, match="max_lr has 2 values"):
        optim.OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=5)
    optim.OneCycleLR(optim.Adagrad([Param(np.zeros(2), "w")]), max_lr=0.1, total_steps=5, cycle_momentum=False)
    sched = optim.OneCycleLR(opt, max_lr=0.4, total_steps=30)
    for _ in range(11):
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = optim.SGD([Param(np.zeros(2), "w")], lr=0.7, momentum=0.1)
    sched2 = optim.OneCycleLR(opt2, max_lr=0.9, total_steps=30)
    sched2.load_state_dict(state)
    assert (opt2.lr, opt2.momentum) == (opt.lr, opt.momentum)
    for _ in range(5):
        sched.step()
        sched2.step()
    assert (opt2.lr, opt2.momentum) == (opt.lr, opt.momentum)


PLATEAU = [
    {},
    {"mode": "max", "factor": 0.5, "patience": 2, "threshold": 0.1, "threshold_mode": "abs", "cooldown": 2,
     "min_lr": [0.01, 0.002]},
    {"patience": 0, "cooldown": 1, "eps": 1e-3, "min_lr": 0.004},
    {"mode": "min", "threshold_mode": "abs", "threshold": 0.5, "patience": 3, "factor": 0.3},
]


def _metrics(n: int = 60) -> list[float]:
    rng = np.random.default_rng(0)
    return [float(rng.normal() + (0.0 if t < 8 else 2.0) - 0.05 * t) for t in range(n)]


@needs_torch
@pytest.mark.parametrize("kw", PLATEAU, ids=[str(i) for i in range(len(PLATEAU))])
def test_reduce_on_plateau_matches_torch(kw):
    import torch

    opt, topt = _two_group_opts()
    sched = optim.ReduceLROnPlateau(opt, **kw)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    assert sched.needs_metric and sched.monitor == "val_loss" and _lrs(opt) == [0.1, 0.02]
    for t, m in enumerate(_metrics()):
        sched.step(m if t % 2 else np.float32(m))
        tsched.step(m if t % 2 else np.float32(m))
        assert _lrs(opt) == _lrs(topt), t
        assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter) == (
            tsched.best, tsched.num_bad_epochs, tsched.cooldown_counter), t
    assert _lrs(opt) != [0.1, 0.02]


def test_reduce_on_plateau_resumes_and_checks():
    opt = optim.SGD([Param(np.zeros(2), "w")], lr=0.1)
    sched = optim.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    metrics = _metrics(30)
    for m in metrics[:12]:
        sched.step(m)
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = optim.SGD([Param(np.zeros(2), "w")], lr=0.9)  # the optimizer's own state not restored
    sched2 = optim.ReduceLROnPlateau(opt2, patience=1, factor=0.5)
    sched2.load_state_dict(state)
    assert opt2.lr == opt.lr and sched2.best == sched.best
    for m in metrics[12:]:
        sched.step(m)
        sched2.step(m)
        assert opt2.lr == opt.lr
    fresh = optim.ReduceLROnPlateau(optim.SGD([Param(np.zeros(2), "w")], lr=0.1))
    assert json.loads(json.dumps(fresh.state_dict()))["best"] == math.inf
    with pytest.raises(TypeError, match="needs the epoch's metric"):
        sched.step()
    with pytest.raises(ValueError, match="factor"):
        optim.ReduceLROnPlateau(opt, factor=1.0)
    with pytest.raises(ValueError, match="mode"):
        optim.ReduceLROnPlateau(opt, mode="lowest")
    with pytest.raises(ValueError, match="needs a metric|need a metric"):
        optim.SequentialSchedule(opt, [optim.LinearWarmup(opt, 2), optim.ReduceLROnPlateau(opt)], milestones=[2])


# ================================================================ loss scaling
# True marks a step whose gradient is inf/NaN.
PATTERN = [False, False, False, True, False, False, False, False, True, True] + [False] * 7 + [True] + [False] * 6
SCALER_CONFIGS = [
    {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3},
    {"init_scale": 1000.0, "growth_factor": 1.7, "backoff_factor": 0.3, "growth_interval": 2},
    {"init_scale": 3.3, "growth_factor": 3.1, "backoff_factor": 0.77, "growth_interval": 1},
    {},  # the defaults: 2**16, x2, x0.5, 2000
]


@needs_torch
@pytest.mark.parametrize("kw", SCALER_CONFIGS, ids=[str(i) for i in range(len(SCALER_CONFIGS))])
def test_loss_scaler_follows_grad_scaler(backend, kw):
    import torch

    tscaler = torch.amp.GradScaler("cpu", **kw)
    tp = torch.nn.Parameter(torch.ones(3))
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    scaler = optim.LossScaler(**kw)
    p = Param(arr(backend, np.ones(3), "float32"), "w")
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    scales, tscales = [scaler.get_scale()], [tscaler.scale(torch.tensor(1.0)).item()]
    for t, bad in enumerate(PATTERN):
        g = np.full(3, np.nan if t == 9 else np.inf, dtype=np.float32) if bad else np.full(3, 0.5 + t, np.float32)
        tp.grad = torch.tensor(g) * tscaler.get_scale()
        p.grad = scaler.scale(arr(backend, g, "float32"))
        before = (to_np(p.value).copy(), {k: to_np(v).copy() for k, v in opt.state[0].items()}, opt.step_count)
        took = scaler.step(opt)
        tscaler.step(topt)
        assert took is (not bad), t
        if bad:  # a skipped step changes no parameter and no optimizer state
            assert to_np(p.value).tobytes() == before[0].tobytes() and opt.step_count == before[2]
            assert {k: to_np(v).tobytes() for k, v in opt.state[0].items()} == {
                k: v.tobytes() for k, v in before[1].items()}
        scaler.update()
        tscaler.update()
        scales.append(scaler.get_scale())
        tscales.append(tscaler.get_scale())
        np.testing.assert_allclose(to_np(p.value), tp.detach().numpy(), rtol=1e-6, err_msg=str(t))
    assert scales == tscales
    assert scaler.state_dict()["growth_tracker"] == tscaler.state_dict()["_growth_tracker"]
    assert len(set(scales)) > 2  # the pattern both grew and backed off the scale


def test_loss_scaler_half_precision_unscale_once_and_state():
    scaler = optim.LossScaler(init_scale=2.0**16)
    dloss = np.full((2, 3), 0.25, dtype=np.float16)
    scaled = scaler.scale(dloss)
    assert scaled.dtype == np.float16 and np.isfinite(scaled).all() and scaled[0, 0] == 16384  # 65536 > f16 max
    master = Param(np.ones(3, dtype=np.float32), "w")
    master.grad = np.full(3, 2.0**-20 * 2.0**16, dtype=np.float16)  # 2**-20 underflows float16 when unscaled
    opt = optim.SGD([master], lr=1.0)
    scaler.unscale(opt)
    assert master.grad.dtype == np.float32 and master.grad[0] == 2.0**-20
    scaler.unscale([master])  # already unscaled in this step: left alone
    assert master.grad[0] == 2.0**-20
    assert scaler.step(opt) and master.value[0] == np.float32(1.0 - 2.0**-20)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(RuntimeError, match="call step"):
        scaler.update()
    state = json.loads(json.dumps(scaler.state_dict()))
    other = optim.LossScaler(init_scale=8.0)
    other.load_state_dict(state)
    assert other.get_scale() == scaler.get_scale() and other.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="growth_tracker"):
        other.load_state_dict(dict(state, growth_tracker=5000))
    with pytest.raises(ValueError, match="growth_factor"):
        optim.LossScaler(growth_factor=1.0)

    off = optim.LossScaler(enabled=False)
    assert off.scale(dloss) is dloss and off.get_scale() == 1.0
    master.grad = np.full(3, np.inf, dtype=np.float32)
    off.unscale(opt)
    assert off.step(opt) is True and np.isinf(master.value).all()  # disabled: a plain step
    off.update()


# ================================================================ clipping
@needs_torch
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(backend, norm_type, max_norm):
    import torch

    values, grads = _values(), _grads(1)[0]
    grads[2] = None
    params = _params(backend, values, "float32")
    _set_grads(backend, params, grads, "float32")
    tparams = _torch_params(values, "float32")
    _set_torch_grads(tparams, grads, "float32")
    total = optim.clip_grad_norm(params, max_norm, norm_type=norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type=float(norm_type), foreach=False)
    np.testing.assert_allclose(float(to_np(total)), ttotal.item(), rtol=1e-6)
    assert params[2].grad is None
    for p, tp in zip(params[:2], tparams[:2], strict=True):
        assert dtype_name(p.grad) == "float32"
        np.testing.assert_allclose(to_np(p.grad), tp.grad.numpy(), rtol=1e-6, atol=1e-7)


@needs_torch
def test_clip_grad_value_and_module_input():
    import torch

    model = _bn_model()
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    y, backward = model.forward(x, train=True)
    backward(np.ones_like(y) * 3)
    held = model.parameters()[0].grad
    held_copy = held.copy()
    grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    optim.clip_grad_value(model, 0.1)
    for name, p in model.named_parameters():
        tp = torch.nn.Parameter(torch.zeros(p.shape))
        tp.grad = torch.tensor(grads[name])
        torch.nn.utils.clip_grad_value_([tp], 0.1, foreach=False)
        np.testing.assert_array_equal(p.grad, tp.grad.numpy())
    assert np.array_equal(held, held_copy)  # new arrays: the caller's array untouched
    nan = Param(np.zeros(2, np.float32), "n")
    nan.grad = np.array([np.nan, 5.0], dtype=np.float32)
    optim.clip_grad_value([nan], 1.0)
    assert np.isnan(nan.grad[0]) and nan.grad[1] == 1.0
    assert optim.clip_grad_norm([Param(np.zeros(2), "w")], 1.0) == 0.0  # no gradients
    opt = optim.SGD(model.parameters(), lr=0.1)
    total = optim.clip_grad_norm(opt, 1e-3)
    after = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in model.parameters()))
    assert float(total) > 1e-3 and after == pytest.approx(1e-3, rel=1e-3)
    bad = Param(np.zeros(2, np.float32), "b")
    bad.grad = np.array([np.inf, 1.0], dtype=np.float32)
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        optim.clip_grad_norm([bad], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="norm_type"):
        optim.clip_grad_norm([bad], 1.0, norm_type=0)


# ================================================================ EMA
def _train_step(model, opt, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(8, 4)).astype(np.float32)
    opt.zero_grad()
    y, backward = model.forward(x, train=True)
    backward(np.ones_like(y) / y.size)
    opt.step()


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_formula(warmup):
    model = _bn_model()
    opt = optim.SGD(model.parameters(), lr=0.5)
    decay = 0.9
    ema = optim.EMA(model, decay, warmup=warmup)
    expected = {n: p.value.astype(np.float64) for n, p in model.named_parameters()}
    expected_bufs = {n: b.astype(np.float64) for n, b in model.named_buffers()}
    for t in range(6):
        _train_step(model, opt, t)
        ema.update()
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.value
        for n, b in model.named_buffers():
            expected_bufs[n] = d * expected_bufs[n] + (1 - d) * b if b.dtype.kind == "f" else b
    for n, avg in ema.params.items():
        assert avg.dtype == np.float32
        np.testing.assert_allclose(avg, expected[n], rtol=1e-5, atol=1e-6, err_msg=n)
    for n, avg in ema.buffers.items():
        np.testing.assert_allclose(avg, expected_bufs[n], rtol=1e-5, atol=1e-6, err_msg=n)
    assert int(ema.buffers["1.num_batches_tracked"]) == 6 and ema.num_updates == 6


def test_ema_applied_swaps_and_restores():
    model = _bn_model()
    opt = optim.Adam(model.parameters(), lr=0.1)
    ema = optim.EMA(model, 0.5)
    for t in range(3):
        _train_step(model, opt, t)
        ema.update()
    x = np.random.default_rng(9).normal(size=(5, 4)).astype(np.float32)
    weights = {n: p.value for n, p in model.named_parameters()}
    before = model(x)
    with ema.applied() as m:
        assert m is model
        for n, p in model.named_parameters():
            np.testing.assert_array_equal(p.value, ema.params[n])
            assert p.value is not ema.params[n]  # copies: the averages cannot be trained by accident
        averaged = model(x)
    assert all(p.value is weights[n] for n, p in model.named_parameters())
    np.testing.assert_array_equal(model(x), before)
    assert not np.allclose(averaged, before)
    with pytest.raises(KeyError), ema.applied():
        raise KeyError("restored even after an error")
    assert all(p.value is weights[n] for n, p in model.named_parameters())

    state = ema.state_dict()
    fresh_model = _bn_model()
    fresh = optim.EMA(fresh_model, 0.99, warmup=True)
    fresh.load_state_dict(_host_tree(state))
    assert fresh.decay == 0.5 and fresh.num_updates == 3 and not fresh.warmup
    for n in ema.params:
        np.testing.assert_array_equal(fresh.params[n], ema.params[n])
    fresh.copy_to()
    np.testing.assert_array_equal(fresh_model(x), averaged)
    with pytest.raises(ValueError, match="params"):
        fresh.load_state_dict(dict(state, params={}))
    with pytest.raises(ValueError, match="decay"):
        optim.EMA(model, 1.5)
