"""The CUDA path: kernels compile here (nvcc, no GPU needed); on a GPU, the CuPy backend
reaches the fused kernel, trains a model, and refuses mixed NumPy/CuPy inputs."""

from __future__ import annotations

import importlib.abc
import re
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
    for t in ("float", "double", "__half", "__nv_bfloat16"):  # and the dropout mask, for every mask dtype
        assert f"sm_90  deepcore_dropout_mask<{t}>" in out


def _nvrtc_loads() -> bool:
    try:
        import cupy  # noqa: F401
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


needs_nvrtc = pytest.mark.skipif(not _nvrtc_loads(), reason="needs CuPy with libnvrtc (no GPU needed)")


def test_elementwise_unit_binds_uint64_and_cupys_index():
    """The nvcc harness binds the dropout mask as CuPy does: uint64 scalars as unsigned long long and
    CuPy's flat index ``i`` (CUPY_FOR's ptrdiff_t) in scope, for every dtype the mask is drawn in."""
    ck = _load_check_kernels()
    text, instances = ck.elementwise_unit()
    assert "const unsigned long long* key_p" in text and "[[maybe_unused]] const ptrdiff_t i = _i;" in text
    assert "uint64" not in text.split("{", 1)[1].replace("uint64 key", "")  # no CuPy type name left for nvcc
    assert {f"deepcore_dropout_mask<{t}>" for t in ("float", "double", "__half", "__nv_bfloat16")} <= set(instances)
    assert "deepcore_relu<float>" in instances and "deepcore_relu<__half>" not in instances
    assert {spec.name for spec, _ in ck.elementwise_specs()} >= {"deepcore_dropout_mask", "deepcore_adam"}


def test_array_inputs_match_what_the_host_code_passes():
    """The --nvrtc pass binds inputs named in ARRAY_INPUTS as arrays and the rest as scalars, as
    CuPy's generated code differs for the two; the host code (optimizers and the mask here, the CuPy
    backend's activation launches by their annotations) must pass exactly that."""
    import ast

    from deepcore.backend import elementwise_kernels as ek

    ck = _load_check_kernels()
    seen: dict[str, list[bool]] = {}

    def record(spec):
        def launch(*args):
            n_in = sum(not out for *_, out in spec.params())
            seen[spec.name] = [isinstance(a, np.ndarray) for a in args[:n_in]]
        return launch

    v = np.zeros(4, np.float32)
    ek.sgd_update(np, record, v, v, None, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                  first_step=True)
    ek.sgd_update(np, record, v, v, None, lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0,
                  first_step=True)
    ek.adam_update(record, v, v, v.copy(), v.copy(), step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, decoupled=True)
    ek.dropout_mask(np, record, 1, 3, 5, 2.0, (4,), np.float32)
    tree = ast.parse((ROOT / "deepcore" / "backend" / "cupy_backend.py").read_text(encoding="utf-8"))
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        kinds = {a.arg: ast.unparse(a.annotation) == "Array" for a in fn.args.args if a.annotation is not None}
        for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call) and ast.unparse(c.func) == "_launch"):
            name = getattr(ek, call.args[0].attr).name
            seen[name] = [kinds[ast.unparse(a)] for a in call.args[1:]]
    specs = {spec.name: spec for spec, _ in ck.elementwise_specs()}
    assert set(seen) == set(specs)
    for name, is_array in seen.items():
        inputs = [param for _, param, out in specs[name].params() if not out]
        assert is_array == [param in ck.ARRAY_INPUTS for param in inputs], name


def test_rawmodule_options_are_the_ones_the_backend_compiles_with():
    import ast

    ck = _load_check_kernels()
    text = (ROOT / "deepcore" / "backend" / "cuda_kernels.py").read_text(encoding="utf-8")
    found = re.findall(r"RawModule\(.{0,200}?options=(\([^)]*\))", text, re.DOTALL)
    assert [ast.literal_eval(o) for o in found] == [ck.RAWMODULE_OPTIONS]


@needs_nvrtc
def test_kernels_compile_through_cupys_own_nvrtc_path_as_at_run_time(capsys):
    """Every RawModule instance and every ElementwiseKernel as CuPy generates it, through CuPy's
    compile_with_cache with the options it adds at run time (-ftz=true among them): no GPU, no nvcc."""
    assert _load_check_kernels().main(["--nvrtc", "--no-nvcc"]) == 0
    out = capsys.readouterr().out
    assert "sm_90  NVRTC softmax_cross_entropy.cu: 12 instance(s) ok" in out
    assert "sm_90  NVRTC conv2d.cu: 24 instance(s) ok" in out
    assert "sm_90  NVRTC elementwise_kernels: 24 ElementwiseKernel(s) ok" in out
    assert "-ftz=true" in out and "--device-as-default-execution-space" in out


@needs_nvrtc
def test_cupys_generated_code_for_the_dropout_mask():
    from deepcore.backend import elementwise_kernels as ek

    cc = _load_check_kernels().CupyCompiler()
    code = cc.elementwise_code(ek.DROPOUT_MASK, "bfloat16")
    assert "typedef bfloat16 T;" in code and "CUPY_FOR(i, _ind.size())" in code
    assert "const unsigned long long key" in code  # a scalar parameter, as the host passes it
    res = cc.elementwise(ek.DROPOUT_MASK, "float16", "90")
    assert res.cubin.startswith(b"\x7fELF") and b"deepcore_dropout_mask" in res.cubin
    assert "-ftz=true" in res.options and "-arch=sm_90" in res.options


@needs_nvrtc
def test_cupys_nvrtc_pass_fails_on_a_compile_error(tmp_path, monkeypatch, capsys):
    ck = _load_check_kernels()
    broken = tmp_path / "elementwise_kernels.py"
    text = (ROOT / "deepcore" / "backend" / "elementwise_kernels.py").read_text(encoding="utf-8")
    broken.write_text(text.replace("m = word >= threshold ? scale : (T)0.0f;", "m = word >= threshhold;"))
    monkeypatch.setattr(ck, "ELEMENTWISE_PY", broken)
    assert ck.main(["--nvrtc", "--no-nvcc", "--arch", "sm_90", "--source", "elementwise_kernels"]) == 1
    out = capsys.readouterr().out
    assert "deepcore_dropout_mask T=float32 [sm_90]: CuPy NVRTC: CompileException" in out
    assert "threshhold" in out and "deepcore_relu" not in out.split("check_kernels: error", 1)[1]
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    for src in (ROOT / "kernels").glob("*.cu"):
        (kernels / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    sce = kernels / "softmax_cross_entropy.cu"
    sce.write_text(sce.read_text(encoding="utf-8") + "\nstatic_assert(false, \"planted by the test\");\n")
    assert ck.main(["--nvrtc", "--no-nvcc", "--arch", "sm_90", "--kernels-dir", str(kernels),
                    "--source", "softmax_cross_entropy.cu"]) == 1
    assert "softmax_cross_entropy.cu [sm_90]: CuPy NVRTC: CompileException" in capsys.readouterr().out


def test_nvrtc_pass_without_cupy_is_an_error_not_a_skip(monkeypatch, capsys):
    ck = _load_check_kernels()
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert ck.main(["--nvrtc", "--no-nvcc", "--arch", "sm_90", "--source", "elementwise_kernels"]) == 1
    assert "--nvrtc needs CuPy and libnvrtc: ModuleNotFoundError" in capsys.readouterr().out
    assert ck.main(["--no-nvcc"]) == 1


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
