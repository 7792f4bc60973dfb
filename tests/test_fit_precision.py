"""fit's step options: gradient accumulation, mixed precision with float32 masters and loss scaling,
gradient-norm clipping, per-step schedules; each against an independent reference (the same run
with one big batch, a hand-written step, PyTorch)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.data import ArrayDataset, load_dataset
from deepcore.mixed_precision import HalfWeights
from deepcore.optim import SGD, Adam
from deepcore.train import evaluate, fit

pytest.importorskip("ml_dtypes")


def _mlp(seed=0, width=16, classes=3, features=5):
    return nn.Sequential(nn.Linear(features, width, seed=seed), nn.Tanh(), nn.Linear(width, classes, seed=seed + 1))


def _state(model):
    return {k: np.array(v, copy=True) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs", [{}, {"ignore_index": -1}, {"class_weights": [0.5, 2.0, 1.0]}],
                         ids=["plain", "ignore_index", "class_weights"])
def test_accumulating_k_batches_is_one_batch_k_times_as_large(kwargs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5))
    y = rng.integers(0, 3, 50)
    if "ignore_index" in kwargs:
        y[rng.random(50) < 0.3] = -1
    runs = []
    for batch_size, accumulate in ((12, 1), (4, 3)):
        model = _mlp()
        model.to(dtype="float64")
        opt = SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
        history = fit(model, "softmax-ce", opt, ArrayDataset(x, y), epochs=3, batch_size=batch_size,
                      accumulate=accumulate, loss_kwargs=kwargs, regularizer=dc.regularizers.L2(1e-3),
                      verbose=False)
        runs.append((_state(model), history))
    (big, h_big), (acc, h_acc) = runs
    for name in big:
        np.testing.assert_allclose(acc[name], big[name], rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(h_acc["loss"], h_big["loss"], rtol=1e-6)


def test_half_weights_keep_float32_masters_and_give_float32_gradients():
    model = _mlp()
    backend = model.backend
    half = HalfWeights(model, "float16", backend)
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    with half.applied():
        assert all(p.value.dtype == np.float16 for p in model.parameters())
        y, back = model.forward(half.cast_input(x), train=True)
        assert y.dtype == np.float16
        back(np.ones_like(y))
    assert all(p.value.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())
    # The gradient is the half-precision computation's, to half precision.
    ref = _mlp()
    y32, back32 = ref.forward(x, train=True)
    back32(np.ones_like(y32))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.grad, q.grad, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="float32 master weights, but parameter 'weight' is float64"):
        HalfWeights(_mlp().to(dtype="float64"), "float16", backend)


def _digits():
    splits = load_dataset("digits")
    return splits.train, splits.test


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_on_digits_reaches_96_percent(precision):
    train, test = _digits()
    model = nn.Sequential(nn.Linear(64, 128, seed=0), nn.ReLU(), nn.Linear(128, 10, seed=1))
    history = fit(model, "softmax-ce", Adam(model.parameters(), lr=3e-3), train, epochs=15, batch_size=32,
                  precision=precision, verbose=False)
    assert all(p.value.dtype == np.float32 for p in model.parameters())
    assert evaluate(model, "softmax-ce", test)["accuracy"] >= 0.96
    if precision == "fp16":
        assert history["loss_scale"][-1] >= 1.0 and "skipped_steps" in history.epochs[-1]
    else:
        assert "loss_scale" not in history.epochs[-1]


def test_fit_refuses_bad_step_options_before_training():
    model = _mlp()
    before = _state(model)
    data = (np.zeros((4, 5)), np.zeros(4, dtype=np.int64))
    for kwargs, match in [({"precision": "fp8"}, "precision must be one of fp32, fp16, bf16, got 'fp8'"),
                          ({"accumulate": 0}, "fit: accumulate must be a positive integer, got 0"),
                          ({"clip_grad_norm": -1.0}, "fit: clip_grad_norm must be a positive number or None, got -1.0"),
                          ({"loss_scaler": object()}, "loss_scaler is for precision='fp16'")]:
        with pytest.raises(ValueError, match=match):
            fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), data, epochs=1, verbose=False, **kwargs)
    for name, value in _state(model).items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepcore_train_in_half_precision_reaches_96_percent(tmp_path, capsys, precision):
    from deepcore.checkpoint import load_checkpoint
    from deepcore.cli import main

    out = tmp_path / precision
    assert main(["train", "--precision", precision, "--quiet", "--out", str(out)]) == 0
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", capsys.readouterr().out).group(1))
    assert accuracy >= 96.0
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.extra["settings"]["precision"] == precision
    assert all(v.dtype == np.float32 for k, v in ckpt.model_state.items() if "num_batches" not in k)
    assert main(["train", "--resume", str(out / "checkpoint.safetensors"), "--precision", "fp32",
                 "--epochs", "40"]) == 2
    assert "--precision fp32 contradicts" in capsys.readouterr().err


def _blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 5)) + 2.0 * np.eye(3, 5)[y]
    return ArrayDataset(x.astype(np.float32), y)


def test_clip_grad_norm_in_fit_is_the_hand_written_clipped_step():
    data = _blobs()
    model, ref = _mlp(), _mlp()
    fit(model, "softmax-ce", SGD(model.parameters(), lr=0.5), data, epochs=1, batch_size=60, shuffle=False,
        clip_grad_norm=0.05, verbose=False)
    logits, back = ref.forward(data.x, train=True)
    back(dc.losses.softmax_cross_entropy(logits, data.y)[1])
    norm = np.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in ref.parameters()))
    assert norm > 0.05  # the clip is active
    for p in ref.parameters():
        p.value -= 0.5 * p.grad * (0.05 / (norm + 1e-6))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-5, atol=1e-7)


def test_per_step_and_plateau_schedules_follow_torch_through_fit():
    import torch

    data = _blobs(64)
    model = _mlp()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = dc.optim.OneCycleLR(opt, max_lr=0.5, epochs=3, steps_per_epoch=4)
    history = fit(model, "softmax-ce", opt, data, epochs=3, batch_size=16, scheduler=sched, verbose=False)
    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    t_sched = torch.optim.lr_scheduler.OneCycleLR(t_opt, max_lr=0.5, epochs=3, steps_per_epoch=4)
    lrs = []
    for _ in range(3):
        lrs.append(t_opt.param_groups[0]["lr"])  # the rate an epoch starts with, which fit logs
        for _ in range(4):
            t_opt.step()
            t_sched.step()
    np.testing.assert_allclose(history["lr"], lrs, rtol=1e-12)
    assert opt.lr == pytest.approx(t_opt.param_groups[0]["lr"], rel=1e-12)

    model = _mlp()
    opt = SGD(model.parameters(), lr=1e-5)  # the loss barely moves: a plateau
    plateau = dc.optim.ReduceLROnPlateau(opt, factor=0.5, patience=1, monitor="loss")
    history = fit(model, "softmax-ce", opt, data, epochs=6, batch_size=64, scheduler=plateau, verbose=False)
    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-5)
    t_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(t_opt, factor=0.5, patience=1)
    for loss in history["loss"]:
        t_plateau.step(loss)
    assert opt.lr == pytest.approx(t_opt.param_groups[0]["lr"], rel=1e-12) and opt.lr < 1e-5
    with pytest.raises(ValueError, match="monitors 'val_loss', which needs validation data"):
        fit(model, "softmax-ce", opt, data, epochs=1, verbose=False,
            scheduler=dc.optim.ReduceLROnPlateau(opt))


def test_fp16_overflowing_scale_skips_steps_then_trains():
    data = _blobs(96)
    model = _mlp()
    before = _state(model)
    scaler = dc.optim.LossScaler(init_scale=2.0**40)
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.5), data, epochs=1, batch_size=96,
                  precision="fp16", loss_scaler=scaler, verbose=False)
    assert history["skipped_steps"] == [1] and history["loss_scale"] == [2.0**39]
    for name, value in _state(model).items():  # a skipped step changes nothing
        np.testing.assert_array_equal(value, before[name])
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.5), data, epochs=40, batch_size=96,
                  precision="fp16", loss_scaler=scaler, verbose=False)
    # Each skipped step halved the scale once (no growth within 2000 clean steps), and the rest trained.
    assert sum(history["skipped_steps"]) == round(math.log2(2.0**39 / scaler.get_scale())) < 40
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def test_fp16_run_resumes_exactly_with_the_scaler_state(tmp_path):
    data = _blobs(96)

    def run(epochs, **kwargs):
        model = _mlp()
        opt = Adam(model.parameters(), lr=1e-2)
        scaler = dc.optim.LossScaler(init_scale=2.0**20, growth_interval=3)
        history = fit(model, "softmax-ce", opt, data, epochs=epochs, batch_size=16, precision="fp16",
                      loss_scaler=scaler, accumulate=2, verbose=False, **kwargs)
        return _state(model), scaler.state_dict(), history

    straight, s_scaler, s_history = run(5)
    run(2, checkpoint=tmp_path / "ck.safetensors")
    resumed, r_scaler, r_history = run(5, resume=tmp_path / "ck.safetensors")
    assert r_scaler == s_scaler and r_history["loss_scale"] == s_history["loss_scale"]
    assert len(set(s_history["loss_scale"])) > 1  # the scale moved during the run
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value)


def test_a_micro_batch_of_ignored_rows_counts_for_nothing_and_a_failed_step_leaves_nothing():
    x = np.random.default_rng(1).standard_normal((8, 5))
    y = np.array([0, 1, 2, 1, -1, -1, -1, -1])
    runs = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        model = _mlp()
        model.to(dtype="float64")
        history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), (x, y), epochs=2, batch_size=batch_size,
                      shuffle=False, accumulate=accumulate, loss_kwargs={"ignore_index": -1}, verbose=False)
        runs.append((_state(model), history["loss"]))
    (big, big_loss), (acc, acc_loss) = runs
    np.testing.assert_allclose(acc_loss, big_loss, rtol=1e-9)
    for name in big:
        np.testing.assert_allclose(acc[name], big[name], rtol=1e-9, atol=1e-12)

    model = nn.Sequential(nn.Linear(5, 3, seed=0), nn.BatchNorm1d(3))
    before = _state(model)
    bad = np.array([0, 1, 2, 1, 2, 9])  # the second micro-batch holds a label out of range
    with pytest.raises(ValueError, match="labels must be in"):
        fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), (x[:6].astype(np.float32), bad), epochs=1,
            batch_size=3, accumulate=2, shuffle=False, verbose=False)
    assert all(p.grad is None for p in model.parameters())
    for name, value in _state(model).items():
        np.testing.assert_array_equal(value, before[name])
