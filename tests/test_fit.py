"""The fit loop: learning, metrics, regularisation, early stopping, divergence and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.data import ArrayDataset, load_digits
from deepcore.optim import SGD, Adam, CosineAnnealingLR
from deepcore.regularizers import L2, MaxNorm
from deepcore.train import EarlyStopping, TrainingDiverged, evaluate, fit, predict
from tests.helpers import to_np


def _blobs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.standard_normal((n, 2)) * 0.6).astype(np.float32)
    return ArrayDataset(x, y)


def _mlp(seed=0, dropout=0.0):
    layers = [nn.Linear(2, 16, seed=seed), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout, seed=seed))
    return nn.Sequential(*layers, nn.Linear(16, 3, seed=seed + 1))


def test_fit_learns_and_logs(backend):
    train, val = _blobs(), _blobs(seed=1)
    model = _mlp()
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.2, momentum=0.9), train, val,
                  epochs=8, batch_size=32, verbose=False)
    assert len(history) == 8
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] > 0.9
    assert set(history.epochs[0]) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "time"}
    result = evaluate(model, "softmax-ce", val)
    assert result["accuracy"] == pytest.approx(history["val_accuracy"][-1])
    out = predict(model, val.x)
    assert isinstance(out, np.ndarray) and out.shape == (len(val), 3)
    np.testing.assert_allclose(out, to_np(model(dc.to_backend(val.x, backend))), rtol=1e-6)


def test_digits_mlp_reaches_high_accuracy():
    splits = load_digits()
    model = nn.Sequential(nn.Linear(64, 128, init="he", seed=0), nn.ReLU(), nn.Linear(128, 10, seed=1))
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    fit(model, "softmax-ce", opt, splits.train, epochs=15, batch_size=64, scheduler=CosineAnnealingLR(opt, 15),
        verbose=False)
    assert evaluate(model, "softmax-ce", splits.test)["accuracy"] > 0.95


def test_regularizer_and_constraint_are_applied():
    train = _blobs()
    model = _mlp()
    history = fit(model, "hinge", Adam(model.parameters(), lr=0.05), train, epochs=3, batch_size=50,
                  regularizer=L2(0.5), constraint=MaxNorm(0.3), verbose=False)
    norms = np.linalg.norm(model[0].weight.value, axis=1)
    assert (norms <= 0.3 + 1e-6).all()
    # The logged loss includes λ R(W): it cannot be below the penalty of the final weights.
    assert history["loss"][-1] > 0.0


def test_nan_names_epoch_and_step_and_keeps_the_model():
    """Batches 1-2 are clean, batch 3 holds an inf: training stops there and the model (parameters,
    BatchNorm statistics, dropout stream) is exactly what two clean steps produce."""
    x = np.random.default_rng(0).standard_normal((12, 2)).astype(np.float32)
    x[9] = np.inf
    y = np.zeros(12, dtype=np.int64)

    def model_and_opt():
        model = nn.Sequential(nn.Linear(2, 4, seed=0), nn.BatchNorm1d(4), nn.Dropout(0.3, seed=1),
                              nn.Linear(4, 3, seed=2))
        return model, SGD(model.parameters(), lr=0.1, momentum=0.9)

    clean, clean_opt = model_and_opt()
    fit(clean, "softmax-ce", clean_opt, ArrayDataset(x[:8], y[:8]), epochs=1, batch_size=4, shuffle=False,
        verbose=False)
    model, opt = model_and_opt()
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1, step 3") as err:
        fit(model, "softmax-ce", opt, ArrayDataset(x, y), epochs=1, batch_size=4, shuffle=False, verbose=False)
    assert len(err.value.history) == 0
    for k, v in clean.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)
    assert model.extra_states() == clean.extra_states()
    assert all(p.grad is None for p in model.parameters())


def test_early_stopping_restores_best():
    train, val = _blobs(), _blobs(seed=1)
    model = _mlp()
    stopper = EarlyStopping("val_loss", patience=1, restore_best=True)
    # A learning rate this high oscillates, so validation loss stops improving quickly.
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=5.0), train, val, epochs=30, batch_size=300,
                  callbacks=[stopper], verbose=False)
    assert len(history) < 30
    assert evaluate(model, "softmax-ce", val)["loss"] == pytest.approx(stopper.best, rel=1e-5)
    with pytest.raises(ValueError, match="patience must be a non-negative integer"):
        EarlyStopping(patience=-1)


@pytest.mark.parametrize("fmt", [".safetensors", ".npz"])
def test_resume_matches_training_straight_through(backend, tmp_path, fmt):
    train = _blobs()

    def run(epochs, resume=None, ckpt=None):
        model = _mlp(dropout=0.2)
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = CosineAnnealingLR(opt, T_max=6)
        history = fit(model, "softmax-ce", opt, train, epochs=epochs, batch_size=32, scheduler=sched, seed=7,
                      verbose=False, checkpoint=ckpt, resume=resume)
        return model, history

    straight, h_straight = run(6)
    ckpt = tmp_path / f"ck{fmt}"
    run(3, ckpt=ckpt)
    resumed, h_resumed = run(6, resume=ckpt, ckpt=ckpt)
    for k, v in straight.state_dict().items():
        np.testing.assert_allclose(to_np(resumed.state_dict()[k]), to_np(v), rtol=1e-6, atol=1e-7, err_msg=k)
    assert [e["lr"] for e in h_resumed.epochs] == pytest.approx([e["lr"] for e in h_straight.epochs])
    assert len(h_resumed) == 6


def test_history_is_saved_as_json(tmp_path):
    model = _mlp()
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), _blobs(), epochs=2, verbose=False)
    path = history.save(tmp_path / "sub" / "history.json")
    assert json.loads(path.read_text())["epochs"][1]["epoch"] == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": -1}, "epochs must be a non-negative integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"loss": "mse"}, "loss must be a callable or one of"),
])
def test_fit_rejects_bad_arguments(kwargs, match):
    model = _mlp()
    args = {"loss": "softmax-ce", **kwargs}
    loss = args.pop("loss")
    with pytest.raises(ValueError, match=match):
        fit(model, loss, SGD(model.parameters(), lr=0.1), _blobs(), verbose=False, **args)
    with pytest.raises(TypeError, match="train must be an ArrayDataset or an"):
        fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), [1, 2, 3], verbose=False)


def test_evaluate_uses_the_losss_own_mean_and_skips_ignored_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 2)).astype(np.float32)
    y = np.array([0, 1, 2, -1, -1, -1, 1, 0])
    model = _mlp()
    for kwargs in ({"ignore_index": -1}, {"ignore_index": -1, "class_weights": np.array([1.0, 5.0, 0.2], "f4")}):
        expected, _ = dc.losses.softmax_cross_entropy(model(x), y, **kwargs)
        result = evaluate(model, "softmax-ce", ArrayDataset(x, y), batch_size=3, loss_kwargs=kwargs)
        assert result["loss"] == pytest.approx(float(expected), rel=1e-6)
        kept = y != -1
        assert result["accuracy"] == pytest.approx(np.mean(model(x).argmax(1)[kept] == y[kept]))
    with pytest.raises(ValueError, match="loss_kwargs must not set reduction"):
        evaluate(model, "softmax-ce", ArrayDataset(x, y), loss_kwargs={"reduction": "sum"})


def test_early_stopping_counts_patience_epochs():
    stopper = EarlyStopping("val_loss", patience=2, restore_best=False)
    model = _mlp()
    flags = [stopper.on_epoch_end(i, {"val_loss": v}, model) for i, v in enumerate([1.0, 2.0, 2.0, 2.0])]
    assert flags[:3] == [False, False, True]  # two epochs without improvement, then stop


def test_bad_checkpoint_arguments_fail_before_training(tmp_path):
    model = _mlp()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    opt = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"checkpoint must end in \.safetensors or \.npz"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=1, checkpoint=tmp_path / "run.ckpt", verbose=False)
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=1, checkpoint=tmp_path / "no" / "c.npz", verbose=False)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint file"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=1, resume=tmp_path / "missing.npz", verbose=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    ckpt = tmp_path / "c.npz"
    fit(model, "softmax-ce", opt, _blobs(), epochs=1, checkpoint=ckpt, scheduler=CosineAnnealingLR(opt, 5),
        verbose=False)
    from deepcore.optim import StepLR

    saved = {k: v.copy() for k, v in model.state_dict().items()}
    other = _mlp(seed=5)
    other_opt = SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds a 'CosineAnnealingLR' schedule"):
        fit(other, "softmax-ce", other_opt, _blobs(), epochs=2, resume=ckpt, scheduler=StepLR(other_opt, 2),
            verbose=False)
    assert not np.array_equal(other.state_dict()["0.weight"], saved["0.weight"])
