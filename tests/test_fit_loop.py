"""The fit loop's bookkeeping: callbacks, BatchNorm's last batch, refusals before training, the exact
epoch loss and accuracy, and EarlyStopping's state across a checkpoint and resume (issue 11, part C)."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.data import ArrayDataset
from deepcore.optim import SGD
from deepcore.regularizers import L2
from deepcore.train import Callback, EarlyStopping, fit
from tests.test_fit import _blobs, _mlp


def _state(model):
    return {k: np.array(v, copy=True) for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.seen, self.stop_at, self.ended = [], stop_at, False

    def on_epoch_end(self, epoch, logs, model):
        self.seen.append(epoch)
        return epoch == self.stop_at

    def on_train_end(self, model):
        self.ended = True


# ---------------------------------------------------------------- C1
def test_every_callback_sees_every_epoch_when_an_earlier_one_asks_to_stop():
    first, second, third = Recorder(stop_at=1), Recorder(), Recorder(stop_at=1)
    model = _mlp()
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), _blobs(60), epochs=5, batch_size=30,
                  callbacks=[first, second, third], verbose=False)
    assert len(history) == 2
    assert first.seen == second.seen == third.seen == [0, 1]
    assert first.ended and second.ended and third.ended


# ---------------------------------------------------------------- C2
def _bn_model():
    return nn.Sequential(nn.Linear(2, 6, seed=0), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, seed=1))


def test_batchnorm_drops_a_last_batch_of_one_sample_with_a_note():
    data = _blobs(10)  # 10 = 3 * 3 + 1
    model, lines = _bn_model(), []
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), data, epochs=2, batch_size=3,
                  log=lines.append, seed=4)
    assert len(history) == 2
    notes = [m for m in lines if m.startswith("note:")]
    assert len(notes) == 1 and "batch of 1 sample" in notes[0] and "BatchNorm1d (at '1')" in notes[0], lines
    assert "drop_last=True" in notes[0]
    # Exactly what drop_last=True trains on.
    ref = _bn_model()
    fit(ref, "softmax-ce", SGD(ref.parameters(), lr=0.1), data, epochs=2, batch_size=3, drop_last=True, seed=4,
        verbose=False)
    _assert_same_state(model, _state(ref))
    # A last batch of two samples is kept, and nothing is said.
    lines.clear()
    fit(_bn_model(), "softmax-ce", SGD(model.parameters(), lr=0.1), _blobs(11), epochs=1, batch_size=3,
        log=lines.append)
    assert not [m for m in lines if m.startswith("note:")]


@pytest.mark.parametrize("n, batch_size, match", [
    (10, 1, r"BatchNorm1d \(at '1'\) needs batches of at least 2 samples to train, got batch_size=1"),
    (1, 4, r"BatchNorm1d \(at '1'\) needs batches of at least 2 samples to train, got 1 training sample"),
])
def test_batchnorm_that_cannot_train_is_refused_before_training(n, batch_size, match):
    model = _bn_model()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), _blobs(n), epochs=1, batch_size=batch_size,
            verbose=False)
    _assert_same_state(model, before)


def test_batchnorm_last_batch_of_one_sample_per_rank_is_dropped_on_every_rank():
    from tests.test_distributed import _run_ranks

    data = _blobs(13)  # 2 ranks: 7 samples each (padded), batches of 3: 3 + 3 + 1
    logs = []

    def train(comm):
        model = _bn_model()
        history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), data, epochs=2, batch_size=3,
                      comm=comm, log=lambda m: logs.append((comm.rank, m)))
        return _state(model), len(history)

    (s0, n0), (s1, n1) = _run_ranks(2, train)
    assert n0 == n1 == 2
    for k in s0:
        np.testing.assert_array_equal(s0[k], s1[k], err_msg=k)
    notes = [(r, m) for r, m in logs if m.startswith("note:")]
    assert len(notes) == 1 and notes[0][0] == 0 and "7 training samples per rank" in notes[0][1], logs


# ---------------------------------------------------------------- C3
def test_early_stopping_on_a_val_metric_without_val_and_empty_data_are_refused_before_training():
    model = _mlp()
    before = _state(model)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"callbacks\[1\] is an EarlyStopping that monitors 'val_accuracy', which "
                                         r"needs validation data, but val is None"):
        fit(model, "softmax-ce", opt, _blobs(), epochs=2, callbacks=[Recorder(), EarlyStopping("val_accuracy")],
            verbose=False)
    empty = ArrayDataset(np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="train must hold at least one sample, got an empty data set"):
        fit(model, "softmax-ce", opt, empty, epochs=2, verbose=False)
    with pytest.raises(ValueError, match="val must hold at least one sample or be None"):
        fit(model, "softmax-ce", opt, _blobs(), empty, epochs=2, verbose=False)
    with pytest.raises(ValueError, match=r"drop_last=True with batch_size=64 leaves no batch of the 10 training"):
        fit(model, "softmax-ce", opt, _blobs(10), epochs=2, batch_size=64, drop_last=True, verbose=False)
    _assert_same_state(model, before)
    assert opt.state_dict() == SGD(_mlp().parameters(), lr=0.1, momentum=0.9).state_dict()
    # A training metric needs no validation data.
    history = fit(model, "softmax-ce", opt, _blobs(), epochs=2, callbacks=[EarlyStopping("loss")], verbose=False)
    assert len(history) == 2


# ---------------------------------------------------------------- C4: the epoch's metrics
@pytest.mark.parametrize("kwargs", [
    {},
    {"ignore_index": -1},
    {"ignore_index": -1, "class_weights": np.array([1.0, 5.0, 0.2])},
    {"class_weights": [0.5, 2.0, 1.0], "label_smoothing": 0.1},
])
@pytest.mark.parametrize("regularizer", [None, L2(0.3)])
def test_epoch_loss_and_accuracy_are_those_of_one_batch_of_the_whole_set(kwargs, regularizer):
    """lr 0 holds the model fixed, so the epoch's loss must be the loss of the whole set at once,
    batches of unequal (weighted, ignored) size notwithstanding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 2))
    y = np.array([0, -1, 2, -1, -1, 1, 2, -1, 0, 1]) if "ignore_index" in kwargs else rng.integers(0, 3, 10)
    model = _mlp()
    model.to(dtype="float64")
    history = fit(model, "softmax-ce", SGD(model.parameters(), lr=0.0), ArrayDataset(x, y), epochs=1,
                  batch_size=3, shuffle=False, regularizer=regularizer, loss_kwargs=kwargs, verbose=False)
    expected = float(dc.losses.softmax_cross_entropy(model(x), y, **kwargs)[0])
    if regularizer is not None:
        expected += float(regularizer(model.parameters()))
    assert history["loss"][0] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    kept = y != kwargs.get("ignore_index", -99)
    assert history["accuracy"][0] == pytest.approx(np.mean(model(x).argmax(1)[kept] == y[kept]))


# ---------------------------------------------------------------- C4: EarlyStopping across a resume
def test_early_stopping_state_is_checkpointed_so_resume_stops_where_the_straight_run_stops(tmp_path):
    train, val = _blobs(), _blobs(seed=1)
    ckpt = tmp_path / "ck.safetensors"

    def run(epochs, **kwargs):
        model, stopper = _mlp(), EarlyStopping("val_loss", patience=2, restore_best=True)
        history = fit(model, "softmax-ce", SGD(model.parameters(), lr=3.0), train, val, epochs=epochs,
                      batch_size=100, callbacks=[stopper], verbose=False, **kwargs)
        return model, stopper, history

    straight, s_stopper, s_history = run(12)
    assert len(s_history) == 9 and s_stopper.best_epoch == 6  # the best epoch, then two without improvement
    run(7, checkpoint=ckpt)  # the best epoch is the last one saved: a fresh stopper would wait longer
    resumed, r_stopper, r_history = run(12, resume=ckpt)
    assert len(r_history) == 9
    assert r_stopper.state_dict() == s_stopper.state_dict()
    _assert_same_state(resumed, _state(straight))  # the best weights came back from the checkpoint


def test_callback_states_refuse_a_mismatch_before_the_model_changes(tmp_path):
    ckpt = tmp_path / "ck.npz"
    model = _mlp()
    fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), _blobs(), _blobs(seed=1), epochs=1,
        callbacks=[Recorder(), EarlyStopping("val_loss")], checkpoint=ckpt, verbose=False)
    other = _mlp(seed=4)
    before = _state(other)
    with pytest.raises(ValueError, match=r"holds the state of a 'EarlyStopping' as callback 1, but callbacks\[1\] "
                                         r"is a Recorder"):
        fit(other, "softmax-ce", SGD(other.parameters(), lr=0.1), _blobs(), _blobs(seed=1), epochs=2,
            callbacks=[Recorder(), Recorder()], resume=ckpt, verbose=False)
    stopper = EarlyStopping("val_accuracy")
    with pytest.raises(ValueError, match=r"the state monitors 'val_loss' \(mode 'min'\), but this EarlyStopping "
                                         r"monitors 'val_accuracy' \(mode 'max'\)"):
        fit(other, "softmax-ce", SGD(other.parameters(), lr=0.1), _blobs(), _blobs(seed=1), epochs=2,
            callbacks=[Recorder(), stopper], resume=ckpt, verbose=False)
    assert stopper.best is None
    _assert_same_state(other, before)
    with pytest.raises(ValueError, match="this callback keeps no state"):
        Recorder().load_state_dict({"x": 1})


@pytest.mark.parametrize("bad", [[1, 2], {"epochs": {"loss": 1.0}}, {"epochs": [1.0]}, "x"])
def test_a_history_that_is_not_a_list_of_epochs_is_one_line_naming_its_source(bad):
    from deepcore.train import History

    with pytest.raises(ValueError, match=r"^'ckpt.safetensors': a history must be"):
        History.from_dict(bad, "'ckpt.safetensors'")
    assert History.from_dict({"epochs": [{"loss": 1.0}]}).epochs == [{"loss": 1.0}]
