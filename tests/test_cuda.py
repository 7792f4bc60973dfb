"""The CUDA path: kernels compile here (nvcc, no GPU needed); on a GPU, the fused kernel
matches the NumPy backend in float64 on awkward shapes, dtypes and options."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend.cuda_kernels import KERNEL_INSTANCES, kernel_source

ROOT = Path(__file__).resolve().parents[1]


def _load_check_kernels():
    spec = importlib.util.spec_from_file_location("check_kernels", ROOT / "tools" / "check_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_kernels"] = module
    spec.loader.exec_module(module)
    return module


def test_every_kernel_source_is_found_and_listed():
    for name in KERNEL_INSTANCES:
        assert "__global__" in kernel_source(name)
    assert {p.name for p in (ROOT / "kernels").glob("*.cu")} == set(KERNEL_INSTANCES)
    with pytest.raises(ValueError, match="bare file name"):
        kernel_source("../pyproject.toml")


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not installed")
def test_kernels_compile_for_sm80_and_sm90_without_spills(capsys):
    assert _load_check_kernels().main([]) == 0
    out = capsys.readouterr().out
    assert "no spills" in out and "sm_80" in out and "sm_90" in out


def test_cupy_backend_unavailable_reason_is_clear():
    status = dc.available_backends()["cupy"]
    if status is True:
        pytest.skip("CUDA works here")
    assert "cupy" in status.lower() or "cuda" in status.lower()


# --------------------------------------------------------------- on a GPU
cupy = pytest.importorskip("cupy") if dc.available_backends()["cupy"] is True else None
gpu = pytest.mark.skipif(cupy is None, reason="no usable CUDA device")

SHAPES = [(1, 10), (3, 7), (257, 1000), (64, 1025)]
# Vocabulary-sized rows: the NumPy float64 reference takes seconds each, so fewer combinations.
BIG_SHAPES = [(4096, 32000), (1000, 128256)]


def _reference(s, y, **kw):
    return dc.get_backend("numpy").softmax_cross_entropy(s.astype(np.float64), y, **kw)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.1}, {"ignore_index": -100}, {"class_weights": True, "label_smoothing": 0.05},
], ids=["plain", "smooth", "ignore", "weights_smooth"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_kernel_matches_numpy_float64(shape, dtype, options, reduction):
    _compare_fused(shape, dtype, options, reduction)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("options", [{}, {"ignore_index": -100, "label_smoothing": 0.1}], ids=["plain", "ignore_smooth"])
def test_fused_kernel_matches_numpy_float64_large(shape, dtype, options):
    _compare_fused(shape, dtype, options, "mean")


def _compare_fused(shape, dtype, options, reduction):
    from deepcore.backend.cuda_kernels import fused_softmax_cross_entropy

    n, c = shape
    rng = np.random.default_rng(n * 7 + c)
    s = (rng.standard_normal((n, c)) * 3).astype(dtype)
    y = rng.integers(0, c, n)
    kw = dict(options)
    if kw.get("ignore_index") is not None:
        y[::3] = -100
    if kw.pop("class_weights", None):
        kw["class_weights"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    ref_loss, ref_grad = _reference(s, y, reduction=reduction, **kw)
    gkw = dict(kw)
    if "class_weights" in gkw:
        gkw["class_weights"] = cupy.asarray(gkw["class_weights"])
    # Poison the pool so an unwritten gradient element shows up as NaN.
    poison = cupy.full(s.shape, np.nan, dtype=dtype)
    del poison
    loss, grad = fused_softmax_cross_entropy(cupy.asarray(s), cupy.asarray(y), reduction=reduction, **gkw)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(cupy.asnumpy(loss).astype(np.float64), ref_loss, rtol=tol, atol=tol)
    scale = np.abs(ref_grad).max() or 1.0
    np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), ref_grad, rtol=0, atol=tol * scale)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("c", [10, 5000])
def test_fused_kernel_inplace_writes_every_element(c):
    from deepcore.backend.cuda_kernels import fused_softmax_cross_entropy

    rng = np.random.default_rng(c)
    s = (rng.standard_normal((33, c)) * 5 + 50).astype(np.float32)  # logits far from any gradient value
    y = rng.integers(0, c, 33)
    ref_loss, ref_grad = _reference(s, y)
    buf = cupy.asarray(s)
    loss, grad = fused_softmax_cross_entropy(buf, cupy.asarray(y), inplace=True)
    assert grad.data.ptr == buf.data.ptr
    np.testing.assert_allclose(cupy.asnumpy(grad), ref_grad, atol=1e-6)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("c", [10, 4000])
def test_fused_kernel_extreme_logits_and_bad_labels(c):
    s = np.zeros((4, c), dtype=np.float32)
    s[0, 0], s[1, 1], s[2, :] = 1e4, -1e4, -1e4
    s[3, 1:] = -np.inf
    y = np.array([1, 0, 2, 0])
    ref_loss, ref_grad = _reference(s, y, reduction="none")
    loss, grad = dc.get_backend("cupy").softmax_cross_entropy(cupy.asarray(s), cupy.asarray(y), reduction="none")
    np.testing.assert_allclose(cupy.asnumpy(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(cupy.asnumpy(grad), ref_grad, atol=1e-6)
    loss, grad = dc.losses.softmax_cross_entropy(cupy.asarray(s), cupy.asarray(np.array([1, c, -1, 0])),
                                                 reduction="none", validate=False)
    loss = cupy.asnumpy(loss)
    assert np.isfinite(loss[[0, 3]]).all() and np.isnan(loss[[1, 2]]).all()


@pytest.mark.gpu
@gpu
def test_mlp_trains_on_cupy_and_moves_back():
    from tests.test_training import _spirals

    x, y = _spirals()
    with dc.use_backend("cupy"):
        model = dc.nn.Sequential(dc.nn.Linear(2, 64, init="he", seed=0), dc.nn.ReLU(), dc.nn.Linear(64, 3, seed=1))
    xg, yg = cupy.asarray(x), cupy.asarray(y)
    for _ in range(300):
        logits, back = model.forward(xg, train=True)
        back(dc.losses.softmax_cross_entropy(logits, yg)[1])
        for p in model.parameters():
            p.value -= 1.0 * p.grad
        model.zero_grad()
    model.to("numpy")
    assert np.mean(model(x).argmax(axis=1) == y) > 0.9
    with pytest.raises(dc.BackendMismatchError, match="model.to"):
        dc.losses.softmax_cross_entropy(xg, np.zeros(len(y), dtype=np.int64))
