"""cpu_jit's fused softmax cross-entropy (numba, DEEPCORE_JIT=1 only): loss and gradient against
the float64 reference on awkward shapes and values, the same errors and NaN rows as NumPy's form
for bad labels, NumPy's form for every input it does not take, and never part-way through a run
(its exp and log are not NumPy's, so its last bits differ)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from deepcore import losses, nn, optim, train
from deepcore.backend import cpu_jit, numpy_backend


@pytest.fixture
def jit_on(monkeypatch):
    """DEEPCORE_JIT=1 as read at the first use; the calls of the loss loop, counted (their sizes)."""
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", ""), ("_spent", 0.0), ("_mode", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    monkeypatch.setenv("DEEPCORE_JIT", "1")
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    # With numba installed the loop must load and compile: a failure is this test's, not a skip.
    assert cpu_jit.softmax_cross_entropy() is not None, cpu_jit.status()["reason"]
    from deepcore.backend import cpu_jit_kernels

    real = cpu_jit_kernels.loop("softmax_cross_entropy")
    calls: list[int] = []

    def counted(logits, *args):
        calls.append(logits.size)
        return real(logits, *args)

    monkeypatch.setitem(cpu_jit_kernels._COMPILED, "softmax_cross_entropy", counted)
    return calls


def _reference(logits: np.ndarray, labels: np.ndarray, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """Softmax cross-entropy in float64, written out: ``L = lse(s) - s_y``, ``dL/ds = p - onehot``
    (over N for "mean")."""
    s = logits.astype(np.float64)
    m = s.max(axis=1, keepdims=True)
    lse = np.log(np.exp(s - m).sum(axis=1)) + m[:, 0]
    rows = lse - s[np.arange(len(s)), labels]
    grad = np.exp(s - lse[:, None])
    grad[np.arange(len(s)), labels] -= 1.0
    if reduction == "mean":
        return rows.mean(), grad / len(s)
    return (rows.sum() if reduction == "sum" else rows), grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 10), (7, 3), (32, 10), (1500, 10), (3, 5000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_loss_matches_the_float64_reference(jit_on, shape, dtype, label_dtype, reduction):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    logits = (rng.standard_normal(shape) * 4).astype(dtype)
    logits[0, 0] = 80.0  # exp(80) overflows float32 unless shifted by the row's maximum
    if shape[1] > 2:
        logits[-1, 1] = -np.inf  # a class ruled out: probability 0, gradient 0
    labels = rng.integers(0, shape[1], shape[0]).astype(label_dtype)
    labels[-1] = 0 if shape[1] > 2 else labels[-1]
    loss, grad = losses.softmax_cross_entropy(logits, labels, reduction=reduction)
    assert jit_on == [logits.size]
    want_loss, want_grad = _reference(logits, labels, reduction)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == shape
    assert loss.shape == (() if reduction != "none" else (shape[0],))
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * (1 if reduction == "mean" else 4))
    # and no further from it than NumPy's own form (the loop's row sums and logs are float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_jit, "_mode", "auto")
        numpy_loss, numpy_grad = losses.softmax_cross_entropy(logits, labels, reduction=reduction)
    assert len(jit_on) == 1
    for got, numpy_, want in ((loss, numpy_loss, want_loss), (grad, numpy_grad, want_grad)):
        ulps = 16 * np.finfo(dtype).eps * np.abs(want).max()  # (summation orders apart)
        assert np.abs(got - want).max() <= 1.5 * np.abs(numpy_ - want).max() + ulps


def test_a_nan_logit_makes_its_row_nan_and_leaves_the_others(jit_on):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    logits[2, 3] = np.nan
    logits[4, 1] = np.inf  # inf - inf: NaN, as NumPy's form gives
    labels = np.array([0, 1, 2, 3, 0])
    rows, grad = losses.softmax_cross_entropy(logits, labels, reduction="none")
    assert len(jit_on) == 1
    assert np.isnan(rows[[2, 4]]).all() and np.isnan(grad[[2, 4]]).all()
    want_rows, want_grad = _reference(logits[[0, 1, 3]], labels[[0, 1, 3]], "none")
    np.testing.assert_allclose(rows[[0, 1, 3]], want_rows, rtol=2e-6)
    np.testing.assert_allclose(grad[[0, 1, 3]], want_grad, rtol=2e-6, atol=1e-7)
    assert np.isnan(losses.softmax_cross_entropy(logits, labels)[0])


@pytest.mark.parametrize("bad", [-1, 4, 2**40], ids=["negative", "C", "huge"])
def test_a_bad_label_raises_as_numpys_form_does_or_gives_its_nan_row(jit_on, bad):
    logits = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    labels = np.array([0, bad, 2])
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must be in \[0, 4\)"):
        losses.softmax_cross_entropy(logits, labels)
    loss, grad = losses.softmax_cross_entropy(logits, labels, validate=False)
    assert np.isnan(loss) and np.isnan(grad[1]).all() and not np.isnan(grad[[0, 2]]).any()
    # NumPy's form ran both calls (the loop looked at the labels, wrote nothing and declined)
    assert jit_on == [12, 12]
    want = _reference(logits[[0, 2]], labels[[0, 2]], "none")[1]
    np.testing.assert_allclose(grad[[0, 2]], want / 3, rtol=2e-6, atol=1e-8)


def test_row_sums_and_logs_are_float64(jit_on):
    # One class at 0 and 4,999 at -20: Z = 1 + 4999 exp(-20) = 1.0000103, where a float32 sum stays
    # at exactly 1 (each term is below half an ulp of 1) and the loss would be 0.
    logits = np.full((2, 5000), -20.0, np.float32)
    logits[:, 0] = 0.0
    rows, _ = losses.softmax_cross_entropy(logits, np.zeros(2, np.int64), reduction="none")
    assert len(jit_on) == 1
    np.testing.assert_allclose(rows, np.log1p(4999 * np.exp(np.float64(np.float32(-20.0)))), rtol=1e-6)


@pytest.mark.parametrize("case", ["logits", "labels", "both"])
def test_read_only_batches_are_taken(jit_on, case):
    # (a batch sliced from a memory-mapped file or np.broadcast_to is read-only)
    rng = np.random.default_rng(6)
    logits, labels = rng.standard_normal((6, 4)).astype(np.float32), rng.integers(0, 4, 6)
    want = losses.softmax_cross_entropy(logits, labels)
    for a, name in ((logits, "logits"), (labels, "labels")):
        if case in (name, "both"):
            a.setflags(write=False)
    got = losses.softmax_cross_entropy(logits, labels)
    assert len(jit_on) == 2
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_overflowing_float32_sum_gives_inf_and_no_floating_point_error(jit_on):
    # Each row's loss is 2e38 (finite in float64), their sum beyond float32's range: inf, as
    # NumPy's form gives under the loss's silent_fp, with np.seterr set to raise.
    logits = np.array([[1e38, -1e38]] * 2, np.float32)
    labels = np.array([1, 1])
    with np.errstate(all="raise"):
        loss, grad = losses.softmax_cross_entropy(logits, labels, reduction="sum")
    assert len(jit_on) == 1 and loss == np.inf and loss.dtype == np.float32
    np.testing.assert_array_equal(grad, [[1.0, -1.0]] * 2)


def test_a_process_first_call_runs_the_loop_too(jit_on, monkeypatch):
    # The first loss call of a process finds no backend in the type table and takes the checked
    # path: it must run the same form as every later call, or a resumed run's first step would differ.
    monkeypatch.setattr(losses, "_BACKEND_BY_TYPE", {})
    logits = np.random.default_rng(7).standard_normal((5, 3)).astype(np.float32)
    losses.softmax_cross_entropy(logits, np.array([0, 1, 2, 1, 0]))
    assert jit_on == [15]


def test_the_size_limit(jit_on, monkeypatch):
    monkeypatch.setattr(numpy_backend, "_CE_FUSED_MAX_SIZE", 12)
    rng = np.random.default_rng(8)
    for n in (4, 5):  # 12 logits, then 15
        losses.softmax_cross_entropy(rng.standard_normal((n, 3)).astype(np.float32), np.zeros(n, np.int64))
    assert jit_on == [12]


def test_a_subclass_or_patched_softmax_cross_entropy_and_array_subclasses_run_numpys_path(jit_on, monkeypatch):
    from deepcore.backend import get_backend

    nb = get_backend("numpy")
    rng = np.random.default_rng(9)
    logits, labels = rng.standard_normal((4, 3)).astype(np.float32), np.array([0, 1, 2, 0])
    called = []
    real = nb.softmax_cross_entropy

    def patched(*args, **kwargs):
        called.append(True)
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(nb, "softmax_cross_entropy", patched)
        losses.softmax_cross_entropy(logits, labels)
    assert called == [True]

    class Sub(numpy_backend.NumpyBackend):
        def softmax_cross_entropy(self, *args, **kwargs):
            called.append(True)
            return super().softmax_cross_entropy(*args, **kwargs)

    assert Sub().softmax_cross_entropy_fused(logits, labels, "mean") is None

    class Marked(np.ndarray):
        pass

    assert nb.softmax_cross_entropy_fused(logits.view(Marked), labels, "mean") is None
    assert nb.softmax_cross_entropy_fused(logits, labels.view(Marked), "mean") is None
    assert jit_on == []


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int16, np.uint64])
def test_other_integer_labels_give_the_bits_of_int64_ones(jit_on, label_dtype):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((9, 6)).astype(np.float32)
    labels = rng.integers(0, 6, 9)
    got = losses.softmax_cross_entropy(logits, labels.astype(label_dtype))
    want = losses.softmax_cross_entropy(logits, labels)
    assert len(jit_on) == 2
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    if label_dtype == np.uint64:  # 2**63 read as int64 is negative: declined, and NumPy's form says why
        labels = labels.astype(np.uint64)
        labels[3] = 2**63
        with pytest.raises(ValueError, match=r"labels\[3\] = 9223372036854775808"):
            losses.softmax_cross_entropy(logits, labels)


@pytest.mark.parametrize("case", ["float16", "transposed", "too large", "weights", "smoothing", "ignore_index",
                                  "empty"])
def test_what_the_loop_does_not_take_runs_numpys_form(jit_on, case):
    rng = np.random.default_rng(3)
    n, c = (3000, 10) if case == "too large" else (0, 10) if case == "empty" else (6, 5)
    logits = rng.standard_normal((n, c)).astype(np.float16 if case == "float16" else np.float32)
    if case == "transposed":
        logits = np.ascontiguousarray(logits.T).T
    labels = rng.integers(0, c, n)
    kw = {"weights": {"class_weights": np.ones(c, np.float32)}, "smoothing": {"label_smoothing": 0.1},
          "ignore_index": {"ignore_index": 1}}.get(case, {})
    got = losses.softmax_cross_entropy(logits, labels, **kw)
    assert jit_on == []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_jit, "_mode", "auto")
        want = losses.softmax_cross_entropy(logits, labels, **kw)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_loop_runs_only_under_deepcore_jit_1_even_once_numba_is_loaded(monkeypatch):
    # The load budget may bring numba in part-way through a run (the optimizers' loops give NumPy's
    # bits); the loss loop, whose bits are not NumPy's, must not follow it there.
    for name, value in (("_kernels", None), ("_tried", False), ("_reason", ""), ("_spent", 0.0), ("_mode", "")):
        monkeypatch.setattr(cpu_jit, name, value)
    monkeypatch.delenv("DEEPCORE_JIT", raising=False)
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    from deepcore.backend import cpu_jit_kernels

    monkeypatch.setattr(cpu_jit_kernels, "_COMPILED", {})
    assert cpu_jit.preload()
    # preload compiles the loops that can run: not this one, here
    assert set(cpu_jit_kernels._COMPILED) == set(cpu_jit_kernels._SOURCES) - {"softmax_cross_entropy"}
    assert cpu_jit.wanted() and cpu_jit.softmax_cross_entropy() is None
    logits = np.ones((4, 3), np.float32)
    assert numpy_backend.NumpyBackend().softmax_cross_entropy_fused(logits, np.zeros(4, np.int64), "mean") is None
    monkeypatch.setenv("DEEPCORE_JIT", "0")
    monkeypatch.setattr(cpu_jit, "_mode", "")
    assert cpu_jit.softmax_cross_entropy() is None


def test_fit_with_the_loop_trains_as_with_numpys_loss_and_repeats_its_bits(jit_on):
    # Two runs under DEEPCORE_JIT=1 give the same bits (the form never changes mid-run), and the
    # trained weights stay close to a run with NumPy's loss (a few float32 ulps a step apart).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 20)).astype(np.float32)
    y = (x[:, :3].sum(axis=1) > 0).astype(np.int64) + 2 * (x[:, 3] > 0)

    def run() -> tuple[list[np.ndarray], float]:
        model = nn.Sequential(nn.Linear(20, 32, seed=1), nn.ReLU(), nn.Linear(32, 4, seed=2))
        history = train.fit(model, "softmax-ce", optim.SGD(list(model.parameters()), lr=0.1, momentum=0.9),
                            (x, y), epochs=5, batch_size=32, verbose=False)
        return [p.value.copy() for p in model.parameters()], history["loss"][-1]

    fused, loss = run()
    assert len(jit_on) == 40
    again, loss_again = run()
    assert loss == loss_again
    for a, b in zip(fused, again, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_jit, "_mode", "auto")
        numpy_run, numpy_loss = run()
    assert len(jit_on) == 80
    assert loss == pytest.approx(numpy_loss, rel=1e-3) and loss < 0.6
    for a, b in zip(fused, numpy_run, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
