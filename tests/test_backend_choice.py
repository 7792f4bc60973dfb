"""Choosing the best backend costs nothing it does not need: no torch import, no CuPy import
without a driver, one line saying why CuPy was passed over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from deepcore.backend import registry
from tests.helpers import ROOT


def test_choosing_imports_neither_torch_nor_cupy_where_cupy_is_absent():
    code = ("import json, sys, importlib.util\n"
            "import deepcore.backend as b\n"
            "name, note = b.best_backend()\n"
            "print(json.dumps([name, note, 'torch' in sys.modules, 'cupy' in sys.modules,"
            " importlib.util.find_spec('cupy') is not None, b.registry._nvidia_driver_present()]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    name, note, torch_loaded, cupy_loaded, cupy_installed, driver = json.loads(out.stdout)
    assert torch_loaded is False
    if not cupy_installed:
        assert (name, note, cupy_loaded) == ("numpy", None, False)
    elif not driver:  # CuPy installed, no driver: NumPy, said in one line, and CuPy never imported
        assert name == "numpy" and "no NVIDIA driver" in note and cupy_loaded is False


def _pretend_cupy_is_installed(monkeypatch):
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda n, *a: SimpleNamespace(name=n) if n == "cupy" else real(n, *a))


def test_no_driver_means_numpy_without_importing_cupy(monkeypatch):
    _pretend_cupy_is_installed(monkeypatch)
    monkeypatch.setattr(registry, "_nvidia_driver_present", lambda: False)
    monkeypatch.setattr(registry, "backend_status", lambda name: pytest.fail("CuPy was probed"))
    name, note = registry.best_backend()
    assert name == "numpy" and "no NVIDIA driver" in note


@pytest.mark.parametrize("status, expected", [(True, ("cupy", None)),
                                              ("cudaErrorNoDevice: planted", ("numpy", "cudaErrorNoDevice"))])
def test_with_a_driver_cupy_alone_is_probed(monkeypatch, status, expected):
    _pretend_cupy_is_installed(monkeypatch)
    monkeypatch.setattr(registry, "_nvidia_driver_present", lambda: True)
    asked = []
    monkeypatch.setattr(registry, "backend_status", lambda name: asked.append(name) or status)
    name, note = registry.best_backend()
    assert asked == ["cupy"] and name == expected[0]
    assert note is None if expected[1] is None else expected[1] in note


def test_backend_status_of_one_backend():
    assert registry.backend_status("numpy") is True
    assert "no backend named 'nope'" in registry.backend_status("nope")


def test_a_numpy_run_imports_neither_array_api_compats_numpy_copy_nor_the_plugins():
    # array_api_compat.numpy clones NumPy by touching every lazy submodule (f2py, testing, ma, ...),
    # ~70 ms; NumPy >= 2.1 is itself the array-API namespace. The entry-point scan is ~25 ms more.
    import numpy as np

    code = ("import json, sys, numpy as np\n"
            "import deepcore as dc\n"
            "from deepcore import losses, nn, optim\n"
            "model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))\n"
            "opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)\n"
            "x = np.ones((5, 4), np.float32)\n"
            "y, back = model.forward(x, train=True)\n"
            "loss, g = losses.softmax_cross_entropy(y, np.array([0, 1, 0, 1, 1]))\n"
            "back(g); opt.step()\n"
            "b = dc.get_backend(x)\n"
            "print(json.dumps([b.name, b.xp.__name__, dc.get_backend('numpy') is b,\n"
            "    sorted(m for m in ('array_api_compat.numpy', 'numpy.f2py', 'numpy.testing', 'importlib.metadata')\n"
            "           if m in sys.modules)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "DEEPCORE_JIT"}  # (=1 would import numba, and all these)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    name, xp_name, same, loaded = json.loads(out.stdout)
    assert name == "numpy" and same
    if np.lib.NumpyVersion(np.__version__) >= "2.1.0":
        assert xp_name == "numpy" and loaded == []
    else:
        assert xp_name == "array_api_compat.numpy"
