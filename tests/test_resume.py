"""Runs: ``--out`` and ``--overwrite``, resuming with the run's own settings, and where a diverged run's
last good parameters go. The CLI runs in-process on the embedded digits, small and fast."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import deepcore.data
import deepcore.plotting
import deepcore.train
from deepcore import nn
from deepcore.checkpoint import load_checkpoint, save_checkpoint
from deepcore.cli import main
from deepcore.data import ArrayDataset
from deepcore.optim import SGD
from deepcore.train import TrainingDiverged, fit

BASE = ["train", "--hidden", "8", "--batch-size", "128", "--quiet"]


@pytest.fixture(autouse=True)
def _no_curves(monkeypatch):
    monkeypatch.setattr(deepcore.plotting, "training_curves", lambda *args, **kwargs: None)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepcore: error: ") and len(err.splitlines()) == 1, err
    return err


def _no_data_loading(monkeypatch):
    """Refusals come before the data is read (or downloaded), let alone trained on."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded before the refusal")

    monkeypatch.setattr(deepcore.data, "load_dataset", refuse)


def _interrupt_after(monkeypatch, epochs_done: int):
    """Stop the run, as Ctrl-C would, right after the checkpoint of epoch ``epochs_done`` is written."""
    real = deepcore.train._save

    def save_then_stop(path, model, optimizer, scheduler, epoch, *args, **kwargs):
        real(path, model, optimizer, scheduler, epoch, *args, **kwargs)
        if epoch == epochs_done - 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(deepcore.train, "_save", save_then_stop)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A cosine run planned for 4 epochs, stopped after 2: its folder (copy it before changing it)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepcore.plotting, "training_curves", lambda *args, **kwargs: None)
        _interrupt_after(mp, 2)
        assert main(BASE + ["--epochs", "4", "--out", str(out)]) == 130
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


# ---------------------------------------------------------------- --out
def test_out_holding_a_run_is_replaced_only_with_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    out, other = tmp_path / "run", tmp_path / "other"
    assert main(BASE + ["--epochs", "1", "--schedule", "none", "--out", str(out)]) == 0
    assert main(BASE + ["--epochs", "1", "--schedule", "none", "--out", str(other)]) == 0
    capsys.readouterr()
    files = {name: (out / name).read_bytes() for name in ("checkpoint.safetensors", "history.json")}
    with monkeypatch.context() as mp:
        _no_data_loading(mp)
        for extra in (["--epochs", "1", "--seed", "1"], ["--resume", str(other / "checkpoint.safetensors"),
                                                         "--epochs", "2"]):
            assert main(BASE + ["--out", str(out), *extra]) == 2
            err = _one_line_error(capsys)
            assert f"--out {out} holds a previous run (checkpoint.safetensors, history.json)" in err, err
            assert f"--resume {out / 'checkpoint.safetensors'}" in err and "--overwrite" in err, err
    assert {name: (out / name).read_bytes() for name in files} == files
    assert main(BASE + ["--epochs", "1", "--seed", "1", "--schedule", "none", "--out", str(out), "--overwrite"]) == 0
    assert load_checkpoint(out / "checkpoint.safetensors").extra["settings"]["seed"] == 1


def test_out_that_cannot_hold_a_run_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    import deepcore._io

    _no_data_loading(monkeypatch)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(BASE + ["--out", str(a_file)]) == 2
    assert _one_line_error(capsys).endswith(f"--out {a_file} is a file, not a folder")
    assert main(BASE + ["--out", str(a_file / "run")]) == 2
    assert f"--out {a_file / 'run'} lies under {a_file}, which is a file" in _one_line_error(capsys)
    assert a_file.read_text() == "mine"
    # Root ignores permission bits, so an unwritable folder is simulated where the real probe looks.
    monkeypatch.setattr(deepcore._io, "writable_problem", lambda folder: "Read-only file system")
    assert main(BASE + ["--out", str(tmp_path / "ro")]) == 2
    assert _one_line_error(capsys).endswith(f"--out {tmp_path / 'ro'} is not writable (Read-only file system)")


def test_the_writability_probe_tries_for_real(tmp_path):
    import os

    from deepcore._io import writable_problem

    assert writable_problem(tmp_path) is None and os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    assert writable_problem(tmp_path / "f") is not None  # a path under a file
    if os.geteuid() != 0:  # root writes anyway: the reason the probe is not read from the mode bits
        (tmp_path / "ro").mkdir(mode=0o500)
        assert "denied" in writable_problem(tmp_path / "ro")


# ---------------------------------------------------------------- resume
def test_each_epochs_checkpoint_records_the_runs_settings(interrupted):
    ckpt = load_checkpoint(interrupted / "checkpoint.safetensors")
    assert ckpt.epoch == 1
    settings = ckpt.extra["settings"]
    assert settings["seed"] == 0 and settings["lr"] == 0.1 and settings["epochs"] == 4
    assert settings["hidden"] == "8" and settings["batch_size"] == 128 and settings["schedule"] == "cosine"
    assert settings["val_fraction"] == 0.1 and settings["optimizer"] == "momentum" and settings["dataset"] == "digits"
    assert set(settings["split"]) == {"train", "val", "test", "labels_sha256"}


def test_an_interrupted_run_resumed_ends_bit_identical_to_one_straight_through(interrupted, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(BASE + ["--epochs", "4", "--out", str(straight)]) == 0
    run = _copy(interrupted, tmp_path)
    assert main(["train", "--quiet", "--resume", str(run / "checkpoint.safetensors")]) == 0  # --out: its folder
    a, b = load_checkpoint(straight / "checkpoint.safetensors"), load_checkpoint(run / "checkpoint.safetensors")
    assert a.epoch == b.epoch == 3
    for name, value in a.model_state.items():
        np.testing.assert_array_equal(b.model_state[name], value, err_msg=name)
    for i, state in a.optimizer_state["state"].items():
        for key, value in state.items():
            np.testing.assert_array_equal(b.optimizer_state["state"][i][key], value, err_msg=f"{i}.{key}")
    ha, hb = (json.loads((d / "history.json").read_text())["epochs"] for d in (straight, run))
    assert [e["epoch"] for e in hb] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert [e[key] for e in hb] == [e[key] for e in ha], key
    assert a.extra["test"] == b.extra["test"]


def test_flags_repeating_the_runs_settings_are_accepted(interrupted, tmp_path):
    run = _copy(interrupted, tmp_path)
    assert main(BASE + ["--resume", str(run / "checkpoint.safetensors"), "--seed", "0", "--lr", "0.1", "--epochs",
                        "3", "--hidden", "8,", "--val-fraction", "0.10", "--schedule", "cosine"]) == 0
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    assert ckpt.epoch == 2 and ckpt.extra["settings"]["epochs"] == 4  # stopped early; the plan is kept


@pytest.mark.parametrize("flags, message", [
    (["--seed", "3"], r"--seed 3 contradicts .*checkpoint\.safetensors, whose run has --seed 0; leave --seed out"),
    (["--lr", "0.5"], r"--lr 0\.5 contradicts .*, whose run has --lr 0\.1"),
    (["--val-fraction", "0.2"], r"--val-fraction 0\.2 contradicts .*, whose run has --val-fraction 0\.1"),
    (["--hidden", "16"], r"--hidden 16 contradicts .*, whose run has --hidden 8"),
    (["--batchnorm"], r"--batchnorm contradicts .*, whose run has no --batchnorm"),
    (["--schedule", "step"], r"--schedule step contradicts .*, whose run has --schedule cosine"),
    (["--optimizer", "adam"], r"--optimizer adam contradicts .*, whose run has --optimizer momentum"),
    (["--batch-size", "64"], r"--batch-size 64 contradicts .*, whose run has --batch-size 128"),
    (["--max-norm", "3"], r"--max-norm 3\.0 contradicts .*, whose run has no --max-norm"),
    (["--dataset", "mnist"], r"--dataset mnist contradicts .*, whose run has --dataset digits"),
    (["--epochs", "2"], r"--epochs 2: .* has already trained 2 epochs \(--epochs counts the whole run"),
    (["--epochs", "1"], r"--epochs 1: .* has already trained 2 epochs.*give --epochs greater than 2"),
    (["--epochs", "6"], r"--epochs 6: the run in .* was planned for 4 epochs, and its cosine schedule .* would climb "
                        r"back after it; give --epochs up to 4"),
])
def test_resume_refuses_flags_that_contradict_the_run(interrupted, tmp_path, capsys, monkeypatch, flags, message):
    run = _copy(interrupted, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _no_data_loading(monkeypatch)
    assert main(["train", "--resume", str(run / "checkpoint.safetensors"), *flags]) == 2
    assert re.search(message, _one_line_error(capsys))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_finished_run_goes_on_only_where_its_schedule_allows(tmp_path, capsys):
    expo, cosine = tmp_path / "expo", tmp_path / "cosine"
    assert main(BASE + ["--epochs", "2", "--schedule", "exponential", "--out", str(expo)]) == 0
    assert main(BASE + ["--epochs", "2", "--out", str(cosine)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(expo / "checkpoint.safetensors")]) == 2
    assert _one_line_error(capsys).endswith("has trained all 2 epochs of its run; give --epochs greater than 2 to "
                                            "train on")
    assert main(["train", "--resume", str(cosine / "checkpoint.safetensors"), "--epochs", "3"]) == 2
    assert "all 2 are trained: start a new run" in _one_line_error(capsys)
    assert main(["train", "--resume", str(cosine / "checkpoint.safetensors")]) == 2
    assert "its cosine schedule cannot go on" in _one_line_error(capsys)
    assert main(["train", "--quiet", "--resume", str(expo / "checkpoint.safetensors"), "--epochs", "3"]) == 0
    history = json.loads((expo / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert [e["lr"] for e in history] == pytest.approx([0.1, 0.095, 0.09025])  # gamma 0.95 goes on, no restart
    assert load_checkpoint(expo / "checkpoint.safetensors").extra["settings"]["epochs"] == 3


def test_a_changed_data_file_is_refused_on_resume(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--dataset", str(tmp_path / "d.npz"), "--model", "linear", "--epochs", "1",
                 "--schedule", "none", "--out", str(out)]) == 0
    np.savez(tmp_path / "d.npz", x=x, y=1 - y)
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.safetensors"), "--epochs", "2"]) == 2
    assert re.search(r"d\.npz no longer splits as it did for .* \(train/val/test \d+/\d+/\d+ then, \d+/\d+/\d+ now, "
                     r"with other labels\)", _one_line_error(capsys))


def test_a_checkpoint_with_only_the_old_args_record_still_guards_its_settings(tmp_path, capsys):
    from deepcore.cli.train import build_model

    out = tmp_path / "run"
    assert main(BASE + ["--epochs", "1", "--schedule", "none", "--seed", "2", "--out", str(out)]) == 0
    path = out / "checkpoint.safetensors"
    old = load_checkpoint(path)
    model = build_model("mlp", 64, 10, [8])
    old.restore(model)
    extra = {k: v for k, v in old.extra.items() if k != "settings"}  # as deepcore wrote it before
    save_checkpoint(path, model, epoch=old.epoch, extra=extra)
    capsys.readouterr()
    assert main(["train", "--resume", str(path), "--seed", "0", "--epochs", "2"]) == 2
    assert "--seed 0 contradicts" in _one_line_error(capsys)


# ---------------------------------------------------------------- divergence
def test_a_diverged_cli_run_names_the_file_with_the_last_good_parameters(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(BASE + ["--optimizer", "sgd", "--lr", "1e30", "--schedule", "none", "--epochs", "2",
                        "--out", str(out)]) == 1
    err = _one_line_error(capsys)
    last_good = out / "diverged-last-good.safetensors"
    assert re.search(r"loss became (nan|inf) at epoch 1, step \d+; training stopped: the parameters from before that "
                     r"step are in '.*diverged-last-good\.safetensors'; no epoch of this run finished", err), err
    ckpt = load_checkpoint(last_good)
    assert ckpt.extra["diverged"]["epoch"] == 1 and ckpt.extra["settings"]["lr"] == 1e30
    assert all(np.isfinite(v).all() for v in ckpt.model_state.values())
    assert main(["train", "--resume", str(last_good), "--out", str(tmp_path / "next")]) == 2
    assert "written when training diverged, and cannot be resumed" in _one_line_error(capsys)


def _blobs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return ArrayDataset((rng.standard_normal((n, 2)) + y[:, None]).astype(np.float32), y)


def _mlp(seed=0):
    return nn.Sequential(nn.Linear(2, 8, seed=seed), nn.ReLU(), nn.Linear(8, 3, seed=seed + 1))


def test_fit_writes_the_parameters_from_before_a_diverged_step(tmp_path):
    calls = []

    def loss_nan_at_epoch_2_step_3(pred, y, **kwargs):
        value, grad = deepcore.losses.softmax_cross_entropy(pred, y, **kwargs)
        calls.append(1)
        return (value * float("nan"), grad) if len(calls) == 4 + 3 else (value, grad)

    model = _mlp()
    ckpt = tmp_path / "ck.safetensors"
    with pytest.raises(TrainingDiverged) as info:
        fit(model, loss_nan_at_epoch_2_step_3, SGD(model.parameters(), lr=0.1), _blobs(), epochs=3, batch_size=16,
            verbose=False, checkpoint=ckpt, run_settings={"note": "mine"})
    last_good = tmp_path / "diverged-last-good.safetensors"
    assert str(info.value) == (f"loss became nan at epoch 2, step 3; training stopped: the parameters from before "
                               f"that step are in {str(last_good)!r}; the end of epoch 1 is in {str(ckpt)!r} "
                               f"(try a smaller learning rate)")
    assert info.value.checkpoint == last_good and (info.value.epoch, info.value.step) == (2, 3)
    saved = load_checkpoint(last_good)
    for name, value in model.state_dict().items():  # the model in memory: from before that step, as the file
        np.testing.assert_array_equal(saved.model_state[name], value, err_msg=name)
    assert saved.extra["settings"] == {"note": "mine"} and len(saved.extra["history"]["epochs"]) == 1
    assert load_checkpoint(ckpt).epoch == 0
    with pytest.raises(ValueError, match="written when training diverged, and cannot be resumed"):
        fit(_mlp(), "softmax-ce", SGD(_mlp().parameters(), lr=0.1), _blobs(), epochs=3, resume=last_good,
            verbose=False)


# ---------------------------------------------------------------- fit's own checks
def test_fit_resumed_ends_bit_identical_to_straight_through(tmp_path):
    from deepcore.optim import Adam, CosineAnnealingLR

    def run(epochs, **kwargs):
        model = nn.Sequential(nn.Linear(2, 8, seed=0), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3, seed=1),
                              nn.Linear(8, 3, seed=2))
        opt = Adam(model.parameters(), lr=0.01)
        history = fit(model, "softmax-ce", opt, _blobs(), epochs=epochs, batch_size=10, seed=3, verbose=False,
                      scheduler=CosineAnnealingLR(opt, T_max=4), **kwargs)
        return model, opt, history

    straight, straight_opt, h1 = run(4)
    ckpt = tmp_path / "ck.safetensors"
    run(2, checkpoint=ckpt)
    resumed, resumed_opt, h2 = run(4, checkpoint=ckpt, resume=ckpt)
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    assert resumed.extra_states() == straight.extra_states() and resumed_opt.lr == straight_opt.lr
    assert [e["loss"] for e in h2.epochs] == [e["loss"] for e in h1.epochs]


def test_fit_resume_with_epochs_already_done_is_an_error(tmp_path):
    ckpt = tmp_path / "ck.npz"
    model = _mlp()
    fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), _blobs(), epochs=2, verbose=False, checkpoint=ckpt,
        run_settings={"seed": 0})
    assert load_checkpoint(ckpt).extra["settings"] == {"seed": 0}
    fresh = _mlp(5)
    before = {k: v.copy() for k, v in fresh.state_dict().items()}
    for epochs in (1, 2):
        with pytest.raises(ValueError, match=rf"epochs={epochs} counts the whole run, but .* has already trained 2 "
                                             rf"epochs; pass epochs > 2"):
            fit(fresh, "softmax-ce", SGD(fresh.parameters(), lr=0.1), _blobs(), epochs=epochs, resume=ckpt,
                checkpoint=ckpt, verbose=False)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert len(load_checkpoint(ckpt).extra["history"]["epochs"]) == 2


def test_fit_refuses_a_checkpoint_it_could_not_write_before_training(tmp_path, monkeypatch):
    import deepcore._io

    model = _mlp()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    opt = SGD(model.parameters(), lr=0.1)
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=1, checkpoint=tmp_path / "d.npz", verbose=False)
    with pytest.raises(TypeError, match="run_settings must be JSON-serialisable"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=1, run_settings={"f": object()}, verbose=False)
    monkeypatch.setattr(deepcore._io, "writable_problem", lambda folder: "Read-only file system")
    with pytest.raises(PermissionError, match=r"cannot write the checkpoint in .*: Read-only file system"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=1, checkpoint=tmp_path / "c.npz", verbose=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
