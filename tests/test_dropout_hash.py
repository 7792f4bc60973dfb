"""Dropout's counter-based masks (deepcore/backend/dropout_hash.py): the definition, its NumPy and
CUDA (on the CPU emulator) implementations bit for bit, the same mask on every backend, resume
across backends, and the statistics (keep rate, independence across elements, calls and seeds)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.backend import dropout_hash as dh
from deepcore.backend import elementwise_kernels as ek
from deepcore.backend.base import Backend
from tests.helpers import load_tool

emulated = load_tool("tools/cuda_emulator/emulated.py")
elementwise = load_tool("tools/cuda_emulator/elementwise.py")


def _backends() -> list[str]:
    names = ["numpy", "array_api_strict", "torch"]
    return [n for n in names if dc.backend.backend_status(n) is True]


def _to_np(backend, a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if emulated.find_compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    lib = elementwise.build(tmp_path_factory.mktemp("dropout"), ek.RANDOM)
    cache = {}
    return lambda spec: cache.setdefault(spec.name, elementwise.EmulatedElementwise(lib, spec))


# ------------------------------------------------------------------ the definition
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1 - 2.0**-33])
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_vectorised_hash_is_the_definition(p, n):
    s = dh.stream(12345, 6)
    got = dh.keep_mask(s, dh.threshold(p), n)
    assert got.dtype == np.bool_ and got.shape == (n,)
    assert got.tolist() == dh.keep_mask_scalar(s, dh.threshold(p), n)


def test_threshold_and_mask_value_are_exact():
    assert dh.threshold(0.0) == 0 and dh.threshold(0.5) == 2**31 and dh.threshold(0.25) == 2**30
    assert dh.threshold(1 - 2.0**-40) == 2**32  # keeps nothing: no 32-bit draw reaches it
    with pytest.raises(ValueError, match="p must be in"):
        dh.threshold(1.0)
    assert dh.mask_value(0.5, "float16") == 2.0
    v = dh.mask_value(0.1, "float32")
    assert v == float(np.float32(1 / 0.9))
    assert dh.mask_value(0.1, "float64") == 1 / 0.9
    assert float(np.float16(dh.mask_value(0.3, "float16"))) == dh.mask_value(0.3, "float16")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for p in (0.1, 0.3, 0.7, 0.123456):
        b = dh.mask_value(p, "bfloat16")
        assert float(ml_dtypes.bfloat16(np.float32(1 / (1 - p)))) == b  # ml_dtypes' own rounding


def test_streams_differ_by_seed_and_call_and_are_pure():
    assert dh.stream(3, 4) == dh.stream(3, 4)
    keys = {dh.stream(seed, call) for seed in range(20) for call in range(20)}
    assert len(keys) == 400
    assert all(s.gamma & 1 for s in keys)
    with pytest.raises(ValueError):
        dh.stream(-1, 0)


# --------------------------------------------------------------- CUDA body (emulated)
def test_cuda_body_uses_the_same_constants():
    body = ek.DROPOUT_MASK.body
    for c in (dh.MIX_1, dh.MIX_2):
        assert f"0x{c:X}ull" in body
    assert re.findall(r"z >> (\d+)", body) == ["30", "27", "31", "32"]
    assert ek.DROPOUT_MASK not in ek.ALL and ek.DROPOUT_MASK in ek.RANDOM


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "p"), [((128, 1024), 0.5), ((3, 5, 7), 0.1), ((1,), 0.9), ((2, 33), 0.3),
                                          ((0, 4), 0.5)])
def test_emulated_cuda_kernel_gives_the_numpy_mask_bit_for_bit(kernel, dtype, shape, p):
    s = dh.stream(2024, 17)
    got = ek.dropout_mask(np, kernel, s.key, s.gamma, dh.threshold(p), dh.mask_value(p, dtype), shape,
                          np.dtype(dtype))
    want = dh.numpy_mask(s, shape, p, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_emulated_cuda_kernel_at_a_threshold_of_two_to_the_32(kernel):
    s = dh.stream(1, 1)
    got = ek.dropout_mask(np, kernel, s.key, s.gamma, 2**32, 4.0, (64,), np.dtype("float32"))
    assert not got.any()


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((c for c in ("/usr/local/cuda/bin/nvcc",) if Path(c).exists()), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
def test_cuda_body_compiles_for_every_mask_dtype(tmp_path):
    """The body bound as CuPy binds it (uint64 scalars, ``i`` CuPy's ptrdiff_t index, ``T& m``), compiled
    by nvcc for sm_80/sm_90 with T = float, double, __half and __nv_bfloat16 (CuPy's own half classes
    construct from float as these do)."""
    params = ek.DROPOUT_MASK.params()
    assert [(t, out) for t, _, out in params] == [("uint64", False)] * 3 + [("T", False), ("T", True)]
    src = ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>", "#include <cstddef>",
           "template <typename T>",
           "__global__ void dropout_mask(long long _n, unsigned long long key, unsigned long long gamma,",
           "                             unsigned long long threshold, T scale, T* _m) {",
           "    const ptrdiff_t i = blockIdx.x * static_cast<ptrdiff_t>(blockDim.x) + threadIdx.x;",
           "    if (i >= _n) return;",
           "    T& m = _m[i];",
           "    {" + ek.DROPOUT_MASK.body + "}",
           "}"]
    for t in ("float", "double", "__half", "__nv_bfloat16"):
        src.append(f"template __global__ void dropout_mask<{t}>(long long, unsigned long long, unsigned long long, "
                   f"unsigned long long, {t}, {t}*);")
    cu = tmp_path / "dropout_mask.cu"
    cu.write_text("\n".join(src) + "\n")
    for arch in ("sm_80", "sm_90"):
        out = subprocess.run([_nvcc(), f"-arch={arch}", "-c", "-o", str(tmp_path / f"{arch}.o"), str(cu)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def _cuda_include_dirs() -> list[str]:
    """Where cuda_fp16.h / cuda_bf16.h are: $CUDA_HOME, /usr/local/cuda, or NVIDIA's wheels."""
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    nvidia = importlib.util.find_spec("nvidia")
    for base in (nvidia.submodule_search_locations if nvidia else []) or []:
        roots += [str(p.parent) for p in Path(base).glob("*/include/cuda_fp16.h")]
    return [str(Path(r) / "include") for r in roots if r and (Path(r) / "include" / "cuda_fp16.h").is_file()]


def test_cuda_body_compiles_through_cupys_nvrtc_with_cupys_half_types():
    """As CuPy compiles an ElementwiseKernel at run time: NVRTC, CuPy's headers and its float16 /
    bfloat16 classes for T, and the -ftz=true CuPy adds. Needs CuPy and libnvrtc, not a GPU."""
    try:
        import cupy
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or CUDA's library finder failing with its own error type
        pytest.skip(f"CuPy's NVRTC is not usable here: {type(exc).__name__}: {exc}")
    includes = [str(Path(cupy.__file__).parent / "_core" / "include"), *_cuda_include_dirs()]
    types = {"float": "", "double": ""}
    if len(includes) > 1:
        types.update({"float16": '#include "cupy/float16.cuh"', "bfloat16": '#include "cupy/bfloat16.cuh"'})
    for ctype, header in types.items():
        src = "\n".join([
            "#include <cupy/carray.cuh>", header,
            'extern "C" __global__ void deepcore_dropout_mask(long long _n, unsigned long long key,',
            f"        unsigned long long gamma, unsigned long long threshold, {ctype} scale, {ctype}* _m) {{",
            f"    typedef {ctype} T;",
            "    const ptrdiff_t i = blockIdx.x * static_cast<ptrdiff_t>(blockDim.x) + threadIdx.x;",
            "    if (i >= _n) return;",
            "    T& m = _m[i];",
            "    {" + ek.DROPOUT_MASK.body + "}",
            "}", ""])
        prog = nvrtc.createProgram(src, "dropout_mask.cu", (), ())
        try:
            options = ("-std=c++17", "-arch=sm_90", "-ftz=true", *(f"-I{d}" for d in includes))
            try:
                nvrtc.compileProgram(prog, options)
            except nvrtc.NVRTCError as exc:
                pytest.fail(f"T={ctype}: {exc}\n{nvrtc.getProgramLog(prog)}")
        finally:
            nvrtc.destroyProgram(prog)


# ------------------------------------------------------------------ every backend alike
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_same_mask_on_every_backend(dtype):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    s, shape, p = dh.stream(77, 3), (37, 19), 0.3
    reference = dh.numpy_mask(s, shape, p, dc.get_backend("numpy").dtype_from_name(dtype))
    seen = []
    for name in _backends():
        backend = dc.get_backend(name)
        try:
            dt = backend.dtype_from_name(dtype)
        except AttributeError:  # array_api_strict has no float16 / bfloat16
            continue
        mask = backend.dropout_mask(s, shape, p, dtype=dt)
        host = _to_np(backend, backend.astype(mask, backend.dtype_from_name("float64")))
        np.testing.assert_array_equal(host, reference.astype(np.float64), err_msg=name)
        seen.append(name)
    # the array-API reference itself, over NumPy arrays
    ref = Backend(np_compat, name="reference")
    if dtype in ("float32", "float64"):
        np.testing.assert_array_equal(ref.dropout_mask(s, shape, p, dtype=np.dtype(dtype)), reference)
    assert "numpy" in seen


def test_dropout_resumed_on_another_backend_draws_the_same_masks():
    others = [n for n in _backends() if n != "numpy"]
    if not others:
        pytest.skip("no second backend installed")
    x = np.ones((16, 40), dtype=np.float32)
    layer = nn.Dropout(0.4, seed=5)
    for _ in range(2):
        layer.forward(x, train=True)
    state = layer.get_extra_state()
    expected = layer.forward(x, train=True)[0]
    for name in others:
        backend = dc.get_backend(name)
        other = nn.Dropout(0.4, seed=999)
        other.set_extra_state(state)
        y = other.forward(backend.from_numpy(x), train=True)[0]
        np.testing.assert_array_equal(_to_np(backend, y), expected, err_msg=name)


def test_no_generator_is_built_per_forward_call(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a generator was built in Dropout.forward")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    monkeypatch.setattr(np.random, "Generator", refuse)
    layer = nn.Dropout(0.5, seed=1)
    x = np.ones((4, 8), dtype=np.float32)
    y, back = layer.forward(x, train=True, input_grad=True)
    assert layer.calls == 1 and y.shape == x.shape
    np.testing.assert_array_equal(back(np.ones_like(x)), y)  # dx = dy * mask, the same mask


# ------------------------------------------------------------------ statistics
def _sigmas(observed: float, expected: float, var: float, n: int) -> float:
    return abs(observed - expected) / math.sqrt(var / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_and_scale_over_a_large_draw(p):
    n = 1 << 21
    mask = dh.numpy_mask(dh.stream(9, 0), (n,), p, np.float64)
    keep = mask > 0
    assert set(np.unique(mask)) == {0.0, 1 / (1 - p)}
    assert _sigmas(keep.mean(), 1 - p, p * (1 - p), n) < 5
    assert _sigmas(mask.mean(), 1.0, p / (1 - p), n) < 5  # E[mask] = 1: inverted dropout keeps the mean
    # both 32-bit halves of each hash are fair on their own
    for half in (keep[0::2], keep[1::2]):
        assert _sigmas(half.mean(), 1 - p, p * (1 - p), n // 2) < 5


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def test_masks_are_independent_across_elements_calls_and_seeds():
    n, p = 1 << 20, 0.5
    thresh = dh.threshold(p)
    base = dh.keep_mask(dh.stream(1, 0), thresh, n)
    bound = 5 / math.sqrt(n)
    pairs = {
        "next call": dh.keep_mask(dh.stream(1, 1), thresh, n),
        "call far away": dh.keep_mask(dh.stream(1, 10**6), thresh, n),
        "next seed": dh.keep_mask(dh.stream(2, 0), thresh, n),
        "seed and call swapped": dh.keep_mask(dh.stream(0, 1), thresh, n),
    }
    for what, other in pairs.items():
        assert abs(_corr(base, other)) < bound, what
        assert (base != other).any(), what
    # neighbours: the two halves of one hash, and consecutive hashes
    assert abs(_corr(base[0::2], base[1::2])) < 5 / math.sqrt(n // 2)
    assert abs(_corr(base[:-1], base[1:])) < bound
    assert abs(_corr(base[:-1024], base[1024:])) < bound  # rows of a (., 1024) activation


def test_dropout_layer_statistics_and_gradient():
    x = np.full((256, 512), 3.0, dtype=np.float32)
    layer = nn.Dropout(0.25, seed=11)
    y, back = layer.forward(x, train=True, input_grad=True)
    kept = y != 0
    assert _sigmas(kept.mean(), 0.75, 0.75 * 0.25, y.size) < 5
    np.testing.assert_array_equal(y[kept], np.float32(3.0) * np.float32(1 / 0.75))
    dy = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(back(dy), dy * (y / np.float32(3.0)))
    y2 = layer.forward(x, train=True)[0]
    assert (y2 != y).any()  # the next call draws a new mask
    np.testing.assert_array_equal(layer.forward(x, train=False)[0], x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_cupy_kernel_gives_the_numpy_mask_bit_for_bit(dtype):
    """The real ElementwiseKernel on a GPU (the emulator covers float32/float64 everywhere else)."""
    status = dc.backend.backend_status("cupy")
    if status is not True:
        pytest.skip(f"backend cupy unavailable: {status}")
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    cupy_backend, numpy_backend = dc.get_backend("cupy"), dc.get_backend("numpy")
    dt = numpy_backend.dtype_from_name(dtype)
    for shape, p in (((128, 1024), 0.5), ((3, 5, 7), 0.1), ((1,), 0.9)):
        s = dh.stream(31, 4)
        got = cupy_backend.to_numpy(cupy_backend.dropout_mask(s, shape, p, dtype=dt))
        want = dh.numpy_mask(s, shape, p, dt)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
