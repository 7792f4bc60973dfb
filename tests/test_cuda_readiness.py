"""The CUDA path made ready without a GPU: the extras a driver-only machine needs, choosing CuPy only
when a kernel compiles and runs (fake CuPy modules), `deepcore info`'s CUDA lines, NCCL's advice,
bfloat16 by name (CuPy's is_floating, checkpoints' BF16, the public softmax-cross-entropy)."""

from __future__ import annotations

import ast
import importlib.machinery
import json
import re
import sys
import types
from typing import Any

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

import deepcore as dc
from deepcore import checkpoint, nn
from deepcore.backend import registry
from deepcore.backend.base import Backend
from deepcore.cli import info as info_cli
from tests.helpers import ROOT

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


# ====================================================================== install
def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_cuda_extras_bring_nvrtc_nccl_ml_dtypes_and_the_numpy_floor(cuda):
    reqs = {re.split(r"[<>=\[;]", r, maxsplit=1)[0]: r for r in _extras()[f"cuda{cuda}"]}
    assert reqs[f"cupy-cuda{cuda}x"] == f"cupy-cuda{cuda}x[ctk]>=14"  # ctk: NVRTC and the CUDA libraries
    assert reqs[f"nvidia-nccl-cu{cuda}"].startswith(f"nvidia-nccl-cu{cuda}>=")
    assert "ml_dtypes" in reqs
    assert reqs["numpy"] == "numpy>=2.1.2"


def test_readme_says_what_pyproject_installs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Optional extras"):text.index("`pip install torch`")]
    flat = " ".join(section.split())
    for word in ("`ctk`", "CuPy >= 14", "nvidia-nccl-cu12", "-cu13", "`ml_dtypes`", "NumPy >= 2.1.2", "NVRTC"):
        assert word in flat, word


def _fake_cupy_with_nccl(runtime_version: int | None) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.2.0"
    cuda = types.ModuleType("cupy.cuda")
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = False

    def version() -> int:
        if runtime_version is None:
            raise RuntimeError("no runtime")
        return runtime_version

    cuda.runtime = types.SimpleNamespace(runtimeGetVersion=version)
    cuda.nccl = nccl
    cupy.cuda = cuda
    return cupy


@pytest.mark.parametrize(("runtime", "wheel"), [(12080, "nvidia-nccl-cu12"), (13000, "nvidia-nccl-cu13"),
                                                (None, "nvidia-nccl-cu12 (CUDA 12) or nvidia-nccl-cu13")])
def test_nccl_advice_names_nvidias_wheel_not_a_cupy_wheel(monkeypatch, runtime, wheel):
    from deepcore.distributed import comm

    cupy = _fake_cupy_with_nccl(runtime)
    for name, module in (("cupy", cupy), ("cupy.cuda", cupy.cuda), ("cupy.cuda.nccl", cupy.cuda.nccl)):
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(comm.DistributedError) as info:
        comm.NCCLCommunicator()
    message = str(info.value)
    assert f"pip install {wheel}" in message and "cupy-cuda" not in message
    assert "\n" not in message


# ========================================================== choosing the backend
class _CompileException(Exception):
    pass


def _fake_cupy(kernel_call) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)  # find_spec finds it
    cupy.__version__ = "14.2.0"
    made = []

    class ElementwiseKernel:
        def __init__(self, in_params, out_params, body, name):
            made.append((in_params, out_params, body, name))

        def __call__(self, x):
            return kernel_call(x)

    cupy.ElementwiseKernel = ElementwiseKernel
    cupy.arange = np.arange
    cupy.float32 = np.float32
    cupy.asnumpy = np.asarray
    cupy.made = made
    return cupy


def _install(monkeypatch, cupy: types.ModuleType) -> None:
    """A driver, a device and CuPy as ``cupy``; the real factory, with the backend class a stand-in."""
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    backend_module = types.ModuleType("deepcore.backend.cupy_backend")
    backend_module.CupyBackend = lambda: Backend(np_compat, name="cupy")
    monkeypatch.setitem(sys.modules, "deepcore.backend.cupy_backend", backend_module)
    monkeypatch.setitem(registry._registry, "cupy", registry._Entry("cupy", registry._cupy, ("cupy",)))
    monkeypatch.setattr(registry, "_nvidia_driver_present", lambda: True)


def _fails_to_compile(x):
    raise _CompileException("nvrtc: error: failed to open libnvrtc-builtins.so.12.9.\n  Make sure that it is "
                            "installed")


def test_a_kernel_that_does_not_compile_means_numpy_with_the_reason(monkeypatch):
    cupy = _fake_cupy(_fails_to_compile)
    _install(monkeypatch, cupy)
    name, note = registry.best_backend()
    assert name == "numpy"
    assert "test kernel did not compile or run" in note and "_CompileException" in note and "ctk" in note
    assert "\n" not in note
    assert cupy.made and "y = x + (T)1" in cupy.made[0][2]
    # the same reason is what `deepcore info` and `get_backend("cupy")` report
    assert "libnvrtc-builtins" in registry.backend_status("cupy")
    with pytest.raises(registry.BackendUnavailableError, match="test kernel"):
        dc.get_backend("cupy")


def test_a_kernel_that_runs_means_cupy(monkeypatch):
    cupy = _fake_cupy(lambda x: x + 1)
    _install(monkeypatch, cupy)
    assert registry.best_backend() == ("cupy", None)
    assert len(cupy.made) == 1
    assert registry.best_backend() == ("cupy", None) and len(cupy.made) == 1  # probed once per process


def test_a_kernel_that_runs_wrong_means_numpy(monkeypatch):
    _install(monkeypatch, _fake_cupy(lambda x: x * 0))
    name, note = registry.best_backend()
    assert name == "numpy" and "gave [0.0, 0.0, 0.0, 0.0] instead of [1.0, 2.0, 3.0, 4.0]" in note


def test_the_cli_prints_the_reason_in_one_line(monkeypatch, capsys):
    from deepcore.cli import train as train_cli

    _install(monkeypatch, _fake_cupy(_fails_to_compile))
    assert train_cli.best_backend() == "numpy"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepcore: note: CuPy is installed but not usable (a 4-element")


def _cuda_runtime_fake() -> Any:
    props = [{"name": b"NVIDIA H200", "major": 9, "minor": 0, "totalGlobalMem": 150 * 2**30,
              "multiProcessorCount": 132},
             {"name": b"NVIDIA A100-SXM4-80GB", "major": 8, "minor": 0, "totalGlobalMem": 80 * 2**30,
              "multiProcessorCount": 108}]
    runtime = types.SimpleNamespace(driverGetVersion=lambda: 13000, runtimeGetVersion=lambda: 12090,
                                    getDeviceCount=lambda: 2, getDeviceProperties=lambda i: props[i])
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, nvrtc=types.SimpleNamespace(
        getVersion=lambda: (12, 9))))


def test_info_shows_driver_runtime_nvrtc_and_each_device(capsys):
    cuda = info_cli.cuda_info(_cuda_runtime_fake())
    assert (cuda["driver"], cuda["runtime"], cuda["nvrtc"]) == ("13.0", "12.9", "12.9")
    assert [d["name"] for d in cuda["devices"]] == ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    assert cuda["devices"][0]["compute_capability"] == "9.0" and cuda["devices"][1]["memory_gib"] == 80.0
    info_cli.print_cuda_info(cuda)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "CUDA: driver 13.0, runtime 12.9, NVRTC 12.9"
    assert out[1].startswith("  cuda:0 NVIDIA H200 (compute capability 9.0, 150.0 GiB, 132 SMs)")
    assert out[2].startswith("  cuda:1 NVIDIA A100")


def test_info_reports_an_unreadable_version_instead_of_failing():
    fake = _cuda_runtime_fake()

    def broken():
        raise RuntimeError("libnvrtc.so.12: cannot open shared object file")

    fake.cuda.nvrtc.getVersion = broken
    cuda = info_cli.cuda_info(fake)
    assert cuda["nvrtc"].startswith("unknown (RuntimeError: libnvrtc.so.12")


# ==================================================================== bfloat16
def test_cupy_backend_is_floating_goes_by_the_dtype_name():
    """CupyBackend.is_floating, compiled alone from the source (no CuPy here): array_api_compat's isdtype
    raises for ml_dtypes' bfloat16 on CuPy, so the method must not call it."""
    path = ROOT / "deepcore" / "backend" / "cupy_backend.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CupyBackend")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "is_floating")
    assert "isdtype" not in ast.unparse(fn)
    namespace: dict[str, Any] = {"Array": Any}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    is_floating = namespace["is_floating"]
    for dtype, want in ((BF16, True), (np.float16, True), (np.float32, True), (np.int64, False),
                        (np.bool_, False), (np.uint8, False)):
        assert is_floating(None, np.zeros(2, dtype=dtype)) is want, dtype


def _bf16_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 4, seed=0), nn.ReLU(), nn.Linear(4, 3, seed=1))
    for _, p in model.named_parameters():
        p.value = p.value.astype(BF16)
    return model


def test_bf16_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = _bf16_model()
    path = checkpoint.save_checkpoint(tmp_path / "m.safetensors", model)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    loaded = checkpoint.load_checkpoint(path)
    for name, value in model.state_dict().items():
        got = loaded.model_state[name]
        assert got.dtype == BF16
        np.testing.assert_array_equal(got.view(np.uint16), np.asarray(value).view(np.uint16))
    other = _bf16_model()
    for _, p in other.named_parameters():
        p.value = p.value * 0
    checkpoint.load_checkpoint(path, other)
    for (_, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert b.value.dtype == BF16
        np.testing.assert_array_equal(a.value.view(np.uint16), b.value.view(np.uint16))


def test_bf16_checkpoint_reads_in_the_safetensors_library_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    model = _bf16_model()
    path = checkpoint.save_checkpoint(tmp_path / "m.safetensors", model)
    tensors = st.load_file(str(path))
    w = tensors["model.0.weight"]
    assert w.dtype == torch.bfloat16
    np.testing.assert_array_equal(w.float().numpy(), model.state_dict()["0.weight"].astype(np.float32))
    st.save_file({"w": torch.linspace(-3, 3, 12).reshape(3, 4).to(torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    got = checkpoint.load_checkpoint(tmp_path / "t.safetensors").model_state["w"]
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.astype(np.float32), np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
                                  .astype(BF16).astype(np.float32))


def test_npz_refuses_bf16_and_points_to_safetensors(tmp_path):
    with pytest.raises(TypeError, match=r"bfloat16.*\.safetensors"):
        checkpoint.save_checkpoint(tmp_path / "m.npz", _bf16_model())
    assert not (tmp_path / "m.npz").exists()


def test_reading_bf16_without_ml_dtypes_is_a_clear_error(tmp_path, monkeypatch):
    path = checkpoint.save_checkpoint(tmp_path / "m.safetensors", _bf16_model())
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    with pytest.raises(checkpoint.CheckpointError, match=r"BF16.*pip install ml_dtypes"):
        checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="sum"), dict(reduction="none"),
                                    dict(label_smoothing=0.1), dict(ignore_index=2),
                                    dict(class_weights="weights")])
def test_bf16_logits_through_the_public_softmax_cross_entropy(kwargs):
    rng = np.random.default_rng(0)
    logits32 = (rng.standard_normal((64, 10)) * 3).astype(np.float32)
    logits = logits32.astype(BF16)
    labels = rng.integers(0, 10, 64)
    if kwargs.get("class_weights") == "weights":
        weights = rng.uniform(0.5, 2.0, 10).astype(np.float32)
        kwargs = dict(class_weights=weights.astype(BF16))
        ref_kwargs = dict(class_weights=weights.astype(BF16).astype(np.float32))
    else:
        ref_kwargs = kwargs
    loss, grad = dc.losses.softmax_cross_entropy(logits, labels, **kwargs)
    assert loss.dtype == BF16 and grad.dtype == BF16 and grad.shape == logits.shape
    # the float32 reference on the very same (bf16-rounded) logits; bf16 keeps 8 significant bits
    ref_loss, ref_grad = dc.losses.softmax_cross_entropy(logits.astype(np.float32), labels, **ref_kwargs)
    np.testing.assert_allclose(np.asarray(loss, dtype=np.float32), ref_loss, rtol=2**-7, atol=1e-6)
    scale = float(np.abs(ref_grad).max())
    np.testing.assert_allclose(grad.astype(np.float32), ref_grad, rtol=2**-7, atol=scale * 2**-8)


def test_bf16_dropout_and_training_step_on_numpy():
    model = nn.Sequential(nn.Linear(6, 8, seed=0), nn.ReLU(), nn.Dropout(0.25, seed=1), nn.Linear(8, 3, seed=2))
    for _, p in model.named_parameters():
        p.value = p.value.astype(BF16)
    x = np.random.default_rng(0).standard_normal((16, 6)).astype(BF16)
    y = np.arange(16) % 3
    pred, back = model.forward(x, train=True)
    loss, grad = dc.losses.softmax_cross_entropy(pred, y)
    back(grad)
    assert pred.dtype == BF16 and np.isfinite(float(loss))
    assert all(p.grad is not None and p.grad.dtype == BF16 for _, p in model.named_parameters())

