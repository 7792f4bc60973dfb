"""The backend registry and the core ops, against NumPy float64 references worked here."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import deepcore as dc
from deepcore.backend.base import Backend
from tests.helpers import arr, to_np


# ------------------------------------------------------------------ registry
def test_numpy_is_always_available():
    status = dc.available_backends()
    assert status["numpy"] is True
    assert status["array_api_strict"] is True
    assert set(status) >= {"numpy", "cupy", "array_api_strict", "torch"}


def test_unavailable_backend_reports_reason_and_raises_it():
    status = dc.available_backends()["cupy"]
    if status is True:
        pytest.skip("CuPy works here")
    assert isinstance(status, str) and status
    with pytest.raises(dc.BackendUnavailableError, match="cupy"):
        dc.get_backend("cupy")


def test_import_does_not_import_cupy():
    code = "import sys, deepcore; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_backend_by_array_name_and_module():
    import array_api_strict

    b = dc.get_backend(np.zeros(3))
    assert b.name == "numpy" and b is dc.get_backend("numpy")
    s = dc.get_backend(array_api_strict.asarray([1.0]))
    assert s.name == "array_api_strict"
    assert dc.get_backend(array_api_strict) is s
    assert dc.get_backend("array_api_strict") is s
    assert dc.get_backend(s) is s


def test_unknown_name_lists_registered_backends():
    with pytest.raises(dc.UnknownBackendError) as err:
        dc.get_backend("nupmy")
    msg = str(err.value)
    assert "'nupmy'" in msg and "numpy" in msg and "array_api_strict" in msg


def test_not_an_array_is_rejected():
    with pytest.raises(TypeError, match="expected an array"):
        dc.get_backend(3.5)


def test_default_backend_env_var_and_context(monkeypatch):
    monkeypatch.delenv("DEEPCORE_BACKEND", raising=False)
    assert dc.get_backend().name == "numpy"
    monkeypatch.setenv("DEEPCORE_BACKEND", "array_api_strict")
    assert dc.get_backend().name == "array_api_strict"
    with dc.use_backend("numpy"):
        assert dc.get_backend().name == "numpy"
        with dc.use_backend("array_api_strict"):
            assert dc.get_backend().name == "array_api_strict"
        assert dc.get_backend().name == "numpy"
    monkeypatch.setenv("DEEPCORE_BACKEND", "nope")
    with pytest.raises(dc.UnknownBackendError, match="DEEPCORE_BACKEND='nope'"):
        dc.get_backend()


def test_use_backend_places_new_parameters():
    with dc.use_backend("array_api_strict"):
        layer = dc.nn.Linear(3, 2)
    assert dc.get_backend(layer.weight.value).name == "array_api_strict"


def test_register_third_party_backend():
    import array_api_strict

    class Traced(Backend):
        calls = 0

        def matmul(self, a, b, **kw):
            Traced.calls += 1
            return super().matmul(a, b, **kw)

    dc.register_backend("traced_strict", lambda: Traced(array_api_strict, name="traced_strict"),
                        namespaces=("array_api_strict",))
    try:
        x = array_api_strict.asarray(np.ones((2, 3), dtype=np.float32))
        assert dc.get_backend(x).name == "traced_strict"
        with dc.use_backend("traced_strict"):
            layer = dc.nn.Linear(3, 4)
        layer(x)
        assert Traced.calls == 1
        with pytest.raises(ValueError, match="already registered"):
            dc.register_backend("traced_strict", lambda: Traced(array_api_strict))
    finally:
        dc.register_backend("array_api_strict", lambda: Backend(array_api_strict, name="array_api_strict"),
                            namespaces=("array_api_strict",), replace=True)
        from deepcore.backend import registry

        registry._registry.pop("traced_strict")


def test_failing_factory_reason_is_stored():
    def broken():
        raise ImportError("libfoo.so: cannot open shared object file")

    dc.register_backend("broken_for_test", broken)
    try:
        assert "libfoo.so" in dc.available_backends()["broken_for_test"]
        with pytest.raises(dc.BackendUnavailableError, match="libfoo.so"):
            dc.get_backend("broken_for_test")
    finally:
        from deepcore.backend import registry

        registry._registry.pop("broken_for_test")


def test_mixed_namespaces_raise_clear_error():
    import array_api_strict

    x = np.ones((2, 3), dtype=np.float32)
    y = array_api_strict.asarray(np.zeros(2, dtype=np.int64))
    with pytest.raises(dc.BackendMismatchError) as err:
        dc.losses.softmax_cross_entropy(x, y)
    msg = str(err.value)
    assert "'logits' is a numpy array" in msg and "'labels' is a array_api_strict array" in msg
    assert "to_backend" in msg or ".to(" in msg


def test_mixed_devices_raise_clear_error():
    import array_api_strict

    dev = array_api_strict.Device("device1")
    with dc.use_backend("array_api_strict"):
        layer = dc.nn.Linear(3, 2)
    x = array_api_strict.asarray(np.ones((4, 3), dtype=np.float32), device=dev)
    with pytest.raises(dc.BackendMismatchError, match="'x' is on device .*device1.* 'weight' is on device"):
        layer(x)


def test_to_backend_round_trip(other_backend):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    moved = dc.to_backend(a, other_backend)
    assert dc.get_backend(moved) is other_backend
    back = dc.to_backend(moved, "numpy")
    np.testing.assert_array_equal(back, a)
    assert back.dtype == np.float32


# ------------------------------------------------------------------ core ops
def test_matmul_transpose_flags(backend):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    A, B = arr(backend, a, "float64"), arr(backend, b, "float64")
    np.testing.assert_allclose(to_np(backend.matmul(A, B, transpose_b=True)), a @ b.T, rtol=1e-12)
    c = rng.standard_normal((5, 3))
    C = arr(backend, c, "float64")
    np.testing.assert_allclose(to_np(backend.matmul(A, C, transpose_a=True, transpose_b=True)), a.T @ c.T, rtol=1e-12)
    np.testing.assert_allclose(to_np(backend.matmul(C, A)), c @ a, rtol=1e-12)


def test_matmul_promotes_float32_with_float64(backend):
    a = arr(backend, np.ones((2, 2)), "float32")
    b = arr(backend, np.ones((2, 2)), "float64")
    assert backend.dtype_name(backend.matmul(a, b).dtype) == "float64"


def test_softmax_and_log_softmax_are_stable(backend):
    s = np.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0], [-1e4, -1e4, -1e4]])
    x = arr(backend, s, "float32")
    p = to_np(backend.softmax(x))
    lp = to_np(backend.log_softmax(x))
    assert np.isfinite(p).all() and np.isfinite(lp).all()
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[1], e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(lp[0], [0.0, -1e4, -2e4], rtol=1e-6)
    np.testing.assert_allclose(p[2], [1 / 3] * 3, rtol=1e-6)
    expected = np.exp(s[:, 1] - np.log(np.exp(s[:, 1] - 2).sum()) - 2)
    np.testing.assert_allclose(to_np(backend.softmax(x, axis=0))[:, 1], expected, rtol=1e-5)


def test_softmax_backward_is_the_jacobian(backend):
    """dx = J^T dy with the course's J_ab = p_a (δ_ab - p_b), built element by element."""
    rng = np.random.default_rng(1)
    s, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    expected = np.empty_like(s)
    for n in range(4):
        jac = np.array([[p[n, a] * ((a == b) - p[n, b]) for b in range(5)] for a in range(5)])
        expected[n] = jac.T @ dy[n]
    got = backend.softmax_backward(arr(backend, dy, "float64"), arr(backend, p, "float64"))
    np.testing.assert_allclose(to_np(got), expected, rtol=1e-10, atol=1e-12)


def test_sigmoid_matches_formula_without_overflow(backend):
    x = np.array([-800.0, -30.0, -1.0, 0.0, 2.0, 30.0, 800.0])
    got = to_np(backend.sigmoid(arr(backend, x, "float64")))
    with np.errstate(over="ignore"):
        expected = 1.0 / (1.0 + np.exp(-x))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)


def test_reference_and_numpy_backends_agree_on_every_loss():
    """NumpyBackend's hand-tuned paths against the array-API reference in the base class."""
    import array_api_compat.numpy as xp

    ref = Backend(xp, name="reference")
    fast = dc.get_backend("numpy")
    rng = np.random.default_rng(2)
    s = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 6)
    y[2] = -1
    w = rng.uniform(0.5, 2.0, 4)
    for kw in [{}, {"label_smoothing": 0.2}, {"ignore_index": -1, "class_weights": w, "label_smoothing": 0.1}]:
        for reduction in ("mean", "sum", "none"):
            labels = y if "ignore_index" in kw else np.abs(y)
            a = ref.softmax_cross_entropy(s, labels, reduction=reduction, **kw)
            b = fast.softmax_cross_entropy(s, labels, reduction=reduction, **kw)
            np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
            np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-15)
    for name in ("relu", "sigmoid", "softmax", "log_softmax"):
        np.testing.assert_allclose(getattr(ref, name)(s), getattr(fast, name)(s), rtol=1e-12)
    np.testing.assert_allclose(ref.relu_backward(s, s[::-1]), fast.relu_backward(s, s[::-1]))
    np.testing.assert_allclose(ref.linear(s, s[:3], s[0, :3]), fast.linear(s, s[:3], s[0, :3]), rtol=1e-12)


def test_dropout_mask_values_and_rate(backend):
    rng = backend.make_rng(0)
    mask = to_np(backend.dropout_mask(rng, (200, 100), 0.25, dtype=backend.dtype_from_name("float32")))
    assert set(np.unique(mask)) <= {0.0, np.float32(1 / 0.75)}
    keep = (mask > 0).mean()
    assert abs(keep - 0.75) < 4 * np.sqrt(0.75 * 0.25 / mask.size)


def test_from_numpy_keeps_shape_and_dtype(backend):
    for value in (np.asarray(3, dtype=np.int64), np.zeros((0, 4), dtype=np.float32), np.ones((2, 3)).T):
        moved = backend.from_numpy(value)
        assert tuple(moved.shape) == value.shape
        np.testing.assert_array_equal(to_np(moved), value)


def test_entry_point_plugins_register_backends(monkeypatch):
    """A package lists ``name = module:function`` under the ``deepcore.backends`` group; the function registers."""
    from importlib.metadata import EntryPoint

    import array_api_strict

    from deepcore.backend import registry

    calls = []

    def plugin():
        calls.append(1)
        dc.register_backend("plugin_strict", lambda: Backend(array_api_strict, name="plugin_strict"))

    monkeypatch.setitem(sys.modules, "fake_plugin_module", type(sys)("fake_plugin_module"))
    sys.modules["fake_plugin_module"].plugin = plugin
    broken = EntryPoint("broken_plugin", "fake_plugin_module:missing", registry.ENTRY_POINT_GROUP)
    good = EntryPoint("plugin_strict", "fake_plugin_module:plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [good, broken] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert dc.get_backend("plugin_strict").name == "plugin_strict"
        status = dc.available_backends()
        assert status["plugin_strict"] is True
        assert "entry point 'fake_plugin_module:missing' failed" in status["broken_plugin"]
        assert calls == [1]
    finally:
        registry._registry.pop("plugin_strict", None)
        registry._registry.pop("broken_plugin", None)


def test_built_in_names_resolve_without_scanning_plugins(monkeypatch):
    # Scanning every installed package's entry points costs ~25 ms of a CLI start: only a name (or an
    # array namespace) that nothing registered yet loads the plug-ins.
    from deepcore.backend import registry

    scans = []
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: scans.append(group) or [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert dc.get_backend("numpy").name == "numpy"
    assert registry.backend_status("numpy") is True
    assert scans == []
    with pytest.raises(dc.backend.UnknownBackendError):
        dc.get_backend("no_such_backend_anywhere")
    assert scans == [registry.ENTRY_POINT_GROUP]


def test_an_array_of_an_unregistered_namespace_consults_the_plugins(monkeypatch):
    from types import SimpleNamespace

    from deepcore.backend import registry

    xp = SimpleNamespace(__name__="fake_plugin_xp")
    scans = []

    def entry_points(group):
        scans.append(group)
        dc.register_backend("fake_plugin", lambda: Backend(xp, name="fake_plugin"), namespaces=("fake_plugin_xp",))
        return []

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert registry._for_namespace(xp).name == "fake_plugin"
        assert scans == [registry.ENTRY_POINT_GROUP]
    finally:
        registry._registry.pop("fake_plugin", None)
        registry._by_namespace.pop("fake_plugin_xp", None)


def test_model_to_module_objects(other_backend):
    import importlib

    module = importlib.import_module(other_backend.name)
    model = dc.nn.Sequential(dc.nn.Linear(3, 2, seed=0))
    model.to(module)
    assert dc.get_backend(model[0].weight.value) is other_backend


def test_relu_inplace_writes_over_its_input_where_it_may_and_relu_backward_takes_either_side():
    nb = dc.get_backend("numpy")
    x = np.array([-2.0, -0.0, 0.0, 3.0, np.nan, -np.inf], np.float32)
    want = np.array([0.0, 0.0, 0.0, 3.0, np.nan, 0.0], np.float32)
    a = x.copy()
    out = nb.relu_inplace(a)
    assert out is a
    np.testing.assert_array_equal(out, want)
    frozen = x.copy()
    frozen.flags.writeable = False
    out = nb.relu_inplace(frozen)  # read-only: a new array, the input untouched
    assert out is not frozen
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(frozen, x)
    # The mask [x > 0] from the input or from the output max(0, x): the same, NaN and -0 included.
    dy = np.arange(1.0, 7.0, dtype=np.float32)
    np.testing.assert_array_equal(nb.relu_backward(dy, x), [0, 0, 0, 4, 0, 0])
    np.testing.assert_array_equal(nb.relu_backward(dy, want), nb.relu_backward(dy, x))

    class Doubling(type(nb)):
        def relu(self, x):
            return 2 * np.maximum(x, 0)

    a = x.copy()
    np.testing.assert_array_equal(Doubling().relu_inplace(a), 2 * want)  # a subclass's relu is honoured
    np.testing.assert_array_equal(a, x)


def test_torch_relu_inplace_writes_over_its_input():
    torch = pytest.importorskip("torch")
    tb = dc.get_backend("torch")
    x = torch.tensor([-1.0, 2.0, float("nan")])
    out = tb.relu_inplace(x)
    assert out is x
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0, float("nan")]), equal_nan=True)
    dy = torch.ones(3)
    torch.testing.assert_close(tb.relu_backward(dy, out), torch.tensor([0.0, 1.0, 1.0]))  # as PyTorch: NaN passes dy
