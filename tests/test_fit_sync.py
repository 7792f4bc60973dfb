"""The fit loop on an asynchronous device reads nothing back inside a step (deepcore/fit_window.py).

CuPy's arrays are stood in for by array_api_strict's, on a backend marked asynchronous, with every way
an array's value reaches the host (``float``, ``int``, ``bool``, ``__index__``, ``__array__``,
``__dlpack__``, ``to_numpy``) counted: a host read inside a step, which on a GPU makes the host wait
for the device, shows as a count per step. The same runs on the synchronous path are the reference:
the deferred reads must not change a single bit of the history or the parameters, nor where a
divergence stops and what it leaves.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import deepcore as dc
from deepcore import fit_batches, fit_window
from deepcore.train import TrainingDiverged, fit

strict = pytest.importorskip("array_api_strict")
Array = type(strict.asarray(0.0))
READS = ("__float__", "__int__", "__bool__", "__index__", "__array__", "__dlpack__")


class HostReads:
    """Counts host reads of strict arrays (one per ``to_numpy``, whatever it does inside) and host-to-device
    moves (``from_numpy``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, backend) -> None:
        self.reads = self.moves = 0
        self._inside = False
        for name in READS:
            monkeypatch.setattr(Array, name, self._counted(getattr(Array, name)))
        to_numpy, from_numpy = backend.to_numpy, backend.from_numpy

        def counted_to_numpy(x):
            self.reads += not self._inside
            with self._quiet():
                return to_numpy(x)

        def counted_from_numpy(a, **kw):
            self.moves += not self._inside
            return from_numpy(a, **kw)

        monkeypatch.setattr(backend, "to_numpy", counted_to_numpy)
        monkeypatch.setattr(backend, "from_numpy", counted_from_numpy)

    def stop(self) -> None:
        self._inside = True

    def _counted(self, method):
        def wrapper(array, *args, **kwargs):
            if not self._inside:
                self.reads += 1
            return method(array, *args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def _quiet(self):
        was, self._inside = self._inside, True
        try:
            yield
        finally:
            self._inside = was


@pytest.fixture
def backend():
    return dc.get_backend("array_api_strict")


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5)
    return x, y


def _model(backend, dropout=True):
    dc.manual_seed(3)
    with dc.use_backend(backend):
        # (The reference backend makes dropout masks on the host and moves them: CuPy makes them on the device.)
        drop = [dc.nn.Dropout(0.2)] if dropout else []
        return dc.nn.Sequential(dc.nn.Linear(6, 16), dc.nn.BatchNorm1d(16), dc.nn.ReLU(), *drop, dc.nn.Linear(16, 3))


def _run(backend, asynchronous, monkeypatch, *, lr=0.1, epochs=2, counter=None, dropout=True, **kw):
    """fit's history (or its TrainingDiverged), the parameters on the host and the optimizer; ``counter``
    stops counting when fit returns."""
    monkeypatch.setattr(backend, "asynchronous", asynchronous, raising=False)
    model = _model(backend, dropout)
    opt = dc.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = dc.optim.OneCycleLR(opt, max_lr=lr, total_steps=epochs * 12)
    try:
        history = fit(model, "softmax-ce", opt, _data(), epochs=epochs, batch_size=8, scheduler=sched,
                      verbose=False, **kw)
        error = None
    except TrainingDiverged as exc:
        history, error = None, exc
    if counter is not None:
        counter.stop()
    params = [np.asarray(backend.to_numpy(p.value)) for p in model.parameters()]
    return history, error, params, opt


def test_deferred_reads_once_per_window_and_changes_nothing(backend, monkeypatch):
    monkeypatch.setattr(fit_window, "CHECK_EVERY", 5)
    reference, _, ref_params, _ = _run(backend, False, monkeypatch)
    counter = HostReads(monkeypatch, backend)
    history, error, params, _ = _run(backend, True, monkeypatch, counter=counter)
    assert error is None
    # 12 steps an epoch in windows of 5: 3 reads an epoch, none inside a step.
    assert counter.reads == 2 * 3
    assert [{k: v for k, v in e.items() if k != "time"} for e in history.epochs] == \
        [{k: v for k, v in e.items() if k != "time"} for e in reference.epochs]
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cnn_step_reads_nothing_either(backend, monkeypatch):
    # Convolution, pooling and BatchNorm2d on the device path, with a regularizer and gradient clipping.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=24)
    monkeypatch.setattr(backend, "asynchronous", True, raising=False)
    monkeypatch.setattr(fit_window, "CHECK_EVERY", 2)
    dc.manual_seed(0)
    with dc.use_backend(backend):
        model = dc.nn.Sequential(dc.nn.Conv2d(1, 4, 3, padding=1), dc.nn.BatchNorm2d(4), dc.nn.ReLU(),
                                 dc.nn.MaxPool2d(2), dc.nn.Flatten(), dc.nn.Linear(36, 3))
    counter = HostReads(monkeypatch, backend)
    fit(model, "softmax-ce", dc.optim.Adam(model.parameters(), lr=1e-2), (x, y), epochs=1, batch_size=4,
        regularizer=dc.regularizers.L2(1e-3), clip_grad_norm=1.0, verbose=False)
    assert counter.reads == 3  # 6 steps in windows of 2


def test_the_synchronous_path_reads_every_step(backend, monkeypatch):
    # The counter sees what the deferred path saves: the loss and the correct count of every step.
    counter = HostReads(monkeypatch, backend)
    _run(backend, False, monkeypatch, counter=counter)
    assert counter.reads >= 2 * 12 * 2


def test_data_set_kept_on_the_device_when_it_fits(backend, monkeypatch):
    reference, _, ref_params, _ = _run(backend, False, monkeypatch, dropout=False)
    monkeypatch.setattr(backend, "free_memory", lambda: 10**9, raising=False)
    counter = HostReads(monkeypatch, backend)
    history, _, params, _ = _run(backend, True, monkeypatch, counter=counter, dropout=False)
    # x and y once, then each epoch's order once: no copy to the device inside a step.
    assert counter.moves == 2 + 2
    assert [e["loss"] for e in history.epochs] == [e["loss"] for e in reference.epochs]
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_data_set_too_large_for_the_device_comes_from_the_host(backend, monkeypatch):
    monkeypatch.setattr(backend, "asynchronous", True, raising=False)
    x, y = _data()
    monkeypatch.setattr(backend, "free_memory", lambda: int((x.nbytes + y.nbytes) / fit_batches.DEVICE_SHARE) - 1,
                        raising=False)
    assert fit_batches.resident_data(dc.data.ArrayDataset(x, y), backend) is None
    monkeypatch.setattr(backend, "free_memory", lambda: int((x.nbytes + y.nbytes) / fit_batches.DEVICE_SHARE) + 8,
                        raising=False)
    assert fit_batches.resident_data(dc.data.ArrayDataset(x, y), backend) is not None


@pytest.mark.parametrize(("every", "resident"), [(1, False), (4, False), (50, False), (4, True)])
def test_divergence_stops_where_the_synchronous_loop_stops(backend, monkeypatch, every, resident):
    # A learning rate that makes the loss overflow part-way through an epoch: the deferred run must
    # raise for the same step and leave the parameters (and the optimizer's state) of the step before it,
    # its replay gathering the window's batches again from the host or from the data set on the device.
    monkeypatch.setattr(fit_window, "CHECK_EVERY", every)
    if resident:
        monkeypatch.setattr(backend, "free_memory", lambda: 10**9, raising=False)
    _, ref_error, ref_params, ref_opt = _run(backend, False, monkeypatch, lr=1e4, epochs=3)
    assert ref_error is not None and (ref_error.epoch, ref_error.step) != (1, 1)
    _, error, params, opt = _run(backend, True, monkeypatch, lr=1e4, epochs=3)
    assert (error.epoch, error.step) == (ref_error.epoch, ref_error.step)
    assert str(error) == str(ref_error)
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)
    assert opt.step_count == ref_opt.step_count
    assert opt.lr == ref_opt.lr
    for s, r in zip(opt.state, ref_opt.state, strict=True):
        assert s.keys() == r.keys()
        for k in s:
            np.testing.assert_array_equal(backend.to_numpy(s[k]), backend.to_numpy(r[k]))


def test_bad_label_anywhere_in_the_data_set_is_refused_at_the_first_step(backend, monkeypatch):
    x, y = _data()
    y[77] = 5  # in the last batches of the epoch
    model = _model(backend)
    before = [np.asarray(backend.to_numpy(p.value)) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^fit: train labels must be in \[0, 3\) for the model's 3 outputs, "
                                         r"got y\[77\] = 5$"):
        fit(model, "softmax-ce", dc.optim.SGD(model.parameters(), lr=0.1), (x, y), epochs=1, batch_size=8,
            verbose=False, shuffle=False)
    for p, b in zip(model.parameters(), before, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(p.value), b)


# --------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(dc.available_backends()["cupy"] is not True, reason="no usable CUDA device")
@pytest.mark.parametrize("lr", [0.1, 1e4])
def test_cupy_deferred_loop_equals_the_synchronous_one(monkeypatch, lr):
    cupy_backend = dc.get_backend("cupy")
    assert cupy_backend.asynchronous
    monkeypatch.setattr(fit_window, "CHECK_EVERY", 5)
    runs = [_run(cupy_backend, flag, monkeypatch, lr=lr, epochs=3) for flag in (False, True)]
    (ref_history, ref_error, ref_params, _), (history, error, params, _) = runs
    if lr > 1:
        assert error is not None and (error.epoch, error.step) == (ref_error.epoch, ref_error.step)
    else:
        assert [e["loss"] for e in history.epochs] == [e["loss"] for e in ref_history.epochs]
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_regularizer_bce_targets_and_cumulative_batchnorm_deferred_equal_synchronous(backend, monkeypatch):
    # The penalty is added on the host in float64 on both paths; BatchNorm's cumulative average
    # (momentum=None) keeps 1/t on the device.
    monkeypatch.setattr(fit_window, "CHECK_EVERY", 4)
    x, y = _data()
    results = []
    for flag in (False, True):
        monkeypatch.setattr(backend, "asynchronous", flag, raising=False)
        dc.manual_seed(5)
        with dc.use_backend(backend):
            model = dc.nn.Sequential(dc.nn.Linear(6, 8), dc.nn.BatchNorm1d(8, momentum=None), dc.nn.ReLU(),
                                     dc.nn.Linear(8, 3))
        counter = HostReads(monkeypatch, backend) if flag else None
        history = fit(model, "softmax-ce", dc.optim.Adam(model.parameters(), lr=1e-2), (x, y), epochs=2,
                      batch_size=8, accumulate=2, regularizer=dc.regularizers.L2(1e-2), verbose=False)
        if counter is not None:
            counter.stop()
            assert counter.reads == 2 * 2  # 6 steps an epoch in windows of 4
        results.append(([e["loss"] for e in history.epochs],
                        [backend.to_numpy(b) for _, b in model.named_buffers()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("targets", ["int-1d", "int-2d"])
def test_integer_targets_of_bce_are_still_checked(backend, targets):
    x, _ = _data()
    rng = np.random.default_rng(0)
    with dc.use_backend(backend):
        model = dc.nn.Linear(6, 1 if targets == "int-1d" else 3)
    y = rng.integers(0, 2, size=(96,) if targets == "int-1d" else (96, 3))
    y.reshape(-1)[4] = 2
    with pytest.raises(ValueError, match=r"targets must be in \[0, 1\]"):
        fit(model, "bce", dc.optim.SGD(model.parameters(), lr=0.1), (x, y.reshape(96, -1)), epochs=1,
            batch_size=8, verbose=False, shuffle=False)


def test_an_error_after_a_diverged_step_in_the_window_reports_the_divergence(backend, monkeypatch):
    # OneCycleLR stepped past its end raises after step 10; the loss became non-finite before that, so the
    # deferred loop must report the divergence and leave finite parameters, as the synchronous loop does.
    monkeypatch.setattr(fit_window, "CHECK_EVERY", 50)
    outcomes = []
    for flag in (False, True):
        monkeypatch.setattr(backend, "asynchronous", flag, raising=False)
        model = _model(backend)
        opt = dc.optim.SGD(model.parameters(), lr=1e4, momentum=0.9)
        with pytest.raises(TrainingDiverged) as info:
            fit(model, "softmax-ce", opt, _data(), epochs=1, batch_size=8, verbose=False,
                scheduler=dc.optim.OneCycleLR(opt, max_lr=1e4, total_steps=10))
        outcomes.append((info.value.step, [backend.to_numpy(p.value) for p in model.parameters()]))
    assert outcomes[0][0] == outcomes[1][0]
    for a, b in zip(outcomes[0][1], outcomes[1][1], strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
