"""The CUDA path: kernels compile here (nvcc, no GPU needed); on a GPU, the CuPy backend
reaches the fused kernel, trains a model, and refuses mixed NumPy/CuPy inputs."""

from __future__ import annotations

import importlib.abc
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend import registry
from deepcore.backend.cuda_kernels import KERNEL_INSTANCES, kernel_source
from tests.helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


def _load_check_kernels():
    return load_tool("tools/check_kernels.py")


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
    assert "sm_90  deepcore_adam<float>" in out  # the ElementwiseKernel bodies are compiled too


def _nvrtc_loads() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()) or not _nvrtc_loads(),
                    reason="needs nvcc, and CuPy with libnvrtc")
def test_kernels_compile_through_nvrtc_as_at_run_time(capsys):
    """CuPy's NVRTC with the name expressions cuda_kernels.py hands it: no GPU needed."""
    assert _load_check_kernels().main(["--nvrtc"]) == 0
    out = capsys.readouterr().out
    assert "sm_90  NVRTC softmax_cross_entropy.cu: 12 instance(s) ok" in out


class _RefuseImport(importlib.abc.MetaPathFinder):
    """A meta-path finder that makes ``import <name>`` raise ImportError(message)."""

    def __init__(self, name: str, message: str) -> None:
        self.name, self.message = name, message

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError(self.message)
        return None


def _probe_cupy(monkeypatch, cupy_module=None, refuse: str | None = None) -> str | bool:
    """``available_backends()["cupy"]`` from a fresh registry entry (the registry keeps the first
    probe's result), with ``import cupy`` giving ``cupy_module`` or raising ImportError(``refuse``)."""
    hidden = [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]
    for name in (*hidden, "deepcore.backend.cupy_backend", "array_api_compat.cupy"):
        # setitem first, so that undoing also drops what the probe imports under these names.
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    if refuse is not None:
        monkeypatch.setattr(sys, "meta_path", [_RefuseImport("cupy", refuse), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "cupy", cupy_module)
        # array_api_compat.cupy needs a real CuPy; the backend only touches it once a device is found.
        monkeypatch.setitem(sys.modules, "array_api_compat.cupy", types.ModuleType("array_api_compat.cupy"))
    fresh = registry._Entry("cupy", registry._cupy, registry._registry["cupy"].namespaces)
    monkeypatch.setitem(registry._registry, "cupy", fresh)
    return dc.available_backends()["cupy"]


def _fake_cupy(get_device_count) -> types.ModuleType:
    fake = types.ModuleType("cupy")
    fake.__version__ = "99.1"
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return fake


def test_cupy_backend_unavailable_reason_names_the_import_error(monkeypatch):
    message = "libcudart.so.12: cannot open shared object file (planted by the test)"
    reason = _probe_cupy(monkeypatch, refuse=message)
    assert isinstance(reason, str) and message in reason
    assert "pip install 'deepcore[cuda12]' or 'deepcore[cuda13]'" in reason
    with pytest.raises(dc.BackendUnavailableError, match=r"backend 'cupy' is not available: .*planted by the test"):
        dc.get_backend("cupy")


def test_cupy_backend_unavailable_reason_names_the_cuda_error(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: planted by the test")

    reason = _probe_cupy(monkeypatch, _fake_cupy(no_driver))
    assert reason == ("CuPy 99.1 is installed but CUDA is not usable: "
                      "cudaErrorInsufficientDriver: planted by the test")
    reason = _probe_cupy(monkeypatch, _fake_cupy(lambda: 0))
    assert reason == "CuPy 99.1 is installed but no CUDA device is visible"


# --------------------------------------------------------------- on a GPU
cupy = pytest.importorskip("cupy") if dc.available_backends()["cupy"] is True else None
gpu = pytest.mark.skipif(cupy is None, reason="no usable CUDA device")

# The fused kernel's own correctness tests (on a GPU and on the CPU emulator) are in
# tests/test_sce_kernel.py; these check that the backend and the losses reach it.

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("c", [10, 4000])
def test_cupy_backend_and_losses_use_the_fused_kernel(c):
    s = np.random.default_rng(c).standard_normal((4, c)).astype(np.float32)
    s[0, 0] = 1e4
    y = np.array([1, 0, 2, 0])
    ref_loss, ref_grad = dc.get_backend("numpy").softmax_cross_entropy(s.astype(np.float64), y, reduction="none")
    loss, grad = dc.get_backend("cupy").softmax_cross_entropy(cupy.asarray(s), cupy.asarray(y), reduction="none")
    np.testing.assert_allclose(cupy.asnumpy(loss), ref_loss, rtol=1e-5)
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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_cupy_activations_and_updates_match_numpy(dtype):
    """The fused elementwise kernels (float32/float64) and the reference path (float16) on the GPU."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * 4).astype(dtype)
    dy = rng.standard_normal(1000).astype(dtype)
    ref, gpu_b = dc.get_backend("numpy"), dc.get_backend("cupy")
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == "float16" else dict(rtol=1e-5, atol=1e-6)
    for name, args in (("relu", (x,)), ("relu_backward", (dy, x)), ("leaky_relu", (x, 0.1)),
                       ("leaky_relu_backward", (dy, x, 0.1)), ("sigmoid", (x,)),
                       ("sigmoid_backward", (dy, ref.sigmoid(x))), ("tanh_backward", (dy, np.tanh(x)))):
        gargs = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
        got = getattr(gpu_b, name)(*gargs)
        assert got.dtype == x.dtype, name
        np.testing.assert_allclose(cupy.asnumpy(got), getattr(ref, name)(*args), err_msg=name, **tol)
    # Optimizer updates: the GPU may contract a*b+c into FMAs, so a tolerance, not bits.
    p, g = (rng.standard_normal(1000).astype(dtype) for _ in range(2))
    for update, kw in (("sgd_update", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-2,
                                           first_step=False)),
                       ("adam_update", dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                                            decoupled=True))):
        state = [np.abs(rng.standard_normal(1000)).astype(dtype) for _ in range(1 if update == "sgd_update" else 2)]
        want = getattr(ref, update)(p.copy(), g, *[s.copy() for s in state], **kw)
        got = getattr(gpu_b, update)(cupy.asarray(p), cupy.asarray(g), *[cupy.asarray(s) for s in state], **kw)
        for w, o in zip(want, got, strict=True):
            np.testing.assert_allclose(cupy.asnumpy(o), w, err_msg=update, **tol)
