"""The CUDA backend's fused elementwise kernels (deepcore/backend/elementwise_kernels.py), compiled
for the CPU by tools/cuda_emulator/elementwise.py, against the array-API reference Backend.

The kernel bodies and the host code that passes them their scalars are the ones the CUDA
backend runs; only the array module (NumPy for CuPy) and the compiler differ. The reference
Backend's optimizer rules are themselves checked against PyTorch in tests/test_optim.py.
"""

from __future__ import annotations

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

from deepcore.backend import elementwise_kernels as ek
from deepcore.backend.base import Backend
from tests.helpers import load_tool

emulated = load_tool("tools/cuda_emulator/emulated.py")
elementwise = load_tool("tools/cuda_emulator/elementwise.py")
REFERENCE = Backend(np_compat, name="reference")
TOL = {"float32": dict(rtol=2e-6, atol=1e-7), "float64": dict(rtol=1e-14, atol=1e-300)}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if emulated.find_compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    lib = elementwise.build(tmp_path_factory.mktemp("elementwise"), ek.ALL)
    cache = {}
    return lambda spec: cache.setdefault(spec.name, elementwise.EmulatedElementwise(lib, spec))


def test_every_spec_parses_and_names_are_unique():
    assert len({s.name for s in ek.ALL}) == len(ek.ALL)
    for spec in ek.ALL:
        params = spec.params()
        assert params and any(out for *_, out in params), spec.name
        assert not {"n", "i"} & {name for _, name, _ in params}, "names CuPy reserves"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-3),
], ids=["plain", "wd", "momentum", "dampening_wd", "nesterov_wd"])
def test_sgd_kernel_follows_the_reference(kernel, dtype, config):
    rng = np.random.default_rng(0)
    value = rng.standard_normal((7, 5)).astype(dtype)
    ref_value, ref_buf, buf = value.copy(), None, None
    for step in range(4):
        grad = rng.standard_normal(value.shape).astype(dtype)
        value, buf = ek.sgd_update(np, kernel, value, grad, buf, lr=0.1, first_step=step == 0, **config)
        ref_value, ref_buf = REFERENCE.sgd_update(ref_value, grad, ref_buf, lr=0.1, first_step=step == 0, **config)
        assert value.dtype == np.dtype(dtype)
        np.testing.assert_allclose(value, ref_value, **TOL[dtype])
        if config["momentum"]:
            np.testing.assert_allclose(buf, ref_buf, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.01, False), (0.01, True)],
                         ids=["adam", "adam_l2", "adamw"])
def test_adam_kernel_follows_the_reference(kernel, dtype, weight_decay, decoupled):
    rng = np.random.default_rng(1)
    value = rng.standard_normal(11).astype(dtype)
    m, v = np.zeros_like(value), np.zeros_like(value)
    ref = (value.copy(), m.copy(), v.copy())
    for step in range(1, 6):
        grad = rng.standard_normal(value.shape).astype(dtype)
        kw = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay,
                  decoupled=decoupled)
        value, m, v = ek.adam_update(kernel, value, grad, m, v, **kw)
        ref = REFERENCE.adam_update(ref[0], grad, ref[1], ref[2], **kw)
        for got, want in zip((value, m, v), ref, strict=True):
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_allclose(got, want, **TOL[dtype])


def test_updates_are_in_place(kernel):
    value, grad = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    out, buf = ek.sgd_update(np, kernel, value, grad, None, lr=1.0, momentum=0.9, dampening=0.0, nesterov=False,
                             weight_decay=0.0, first_step=True)
    assert out is value and (value == 0.5).all() and (buf == 0.5).all()


def _assert_same_zero_signs(got, want):
    """allclose calls -0.0 and +0.0 equal; a NaN's sign means nothing."""
    numbers = ~np.isnan(want)
    np.testing.assert_array_equal(np.signbit(got[numbers]), np.signbit(want[numbers]))


def _inputs(dtype):
    x = np.random.default_rng(2).standard_normal(64) * 4
    special = [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, 800.0, -800.0, np.inf, -np.inf, np.nan]
    return np.concatenate([x, special]).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid"])
def test_activation_kernels_match_the_reference(kernel, dtype, name):
    x = _inputs(dtype)
    with np.errstate(over="ignore"):
        if name == "leaky_relu":
            got, want = kernel(ek.LEAKY_RELU)(x, 0.01), REFERENCE.leaky_relu(x, 0.01)
        else:
            got = kernel(getattr(ek, name.upper()))(x)
            want = getattr(REFERENCE, name)(x)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(got, want, **TOL[dtype])  # NaN where the reference has NaN
    _assert_same_zero_signs(got, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["relu_backward", "leaky_relu_backward", "sigmoid_backward", "tanh_backward"])
def test_activation_backward_kernels_match_the_reference(kernel, dtype, name):
    x = _inputs(dtype)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    spec = getattr(ek, name.upper())
    if name.startswith(("sigmoid", "tanh")):
        y = REFERENCE.sigmoid(x) if name.startswith("sigmoid") else np.tanh(x)
        got, want = kernel(spec)(dy, y), getattr(REFERENCE, name)(dy, y)
    elif name == "leaky_relu_backward":
        got, want = kernel(spec)(dy, x, 0.2), REFERENCE.leaky_relu_backward(dy, x, 0.2)
    else:
        got, want = kernel(spec)(dy, x), REFERENCE.relu_backward(dy, x)
    np.testing.assert_allclose(got, want, **TOL[dtype])
    _assert_same_zero_signs(got, want)


def test_sigmoid_saturates_without_overflow(kernel):
    y = kernel(ek.SIGMOID)(np.array([-1e4, -800.0, 800.0, 1e4], np.float32))
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.0, 1.0])


def test_emulated_kernel_refuses_what_cupy_would_misread(kernel):
    with pytest.raises(TypeError, match="share one dtype"):
        kernel(ek.RELU_BACKWARD)(np.ones(3, np.float32), np.ones(3, np.float64))
    with pytest.raises(ValueError, match="one shape"):
        kernel(ek.RELU_BACKWARD)(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match="inputs"):
        kernel(ek.RELU)()
