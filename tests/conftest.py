"""Fixtures that run a test once per backend available here.

``backend`` parametrizes over numpy, array_api_strict, torch (skipped when
PyTorch is not installed) and cupy (``gpu`` marker; skipped without a GPU),
and makes that backend the default for the test's duration, so layers built
inside the test put their parameters there.
"""

from __future__ import annotations

import pytest

import deepcore as dc
from deepcore.backend import numpy_backend
from deepcore.backend.faster_form import FormChooser

CPU_BACKENDS = ["numpy", "array_api_strict", "torch"]
ALL_BACKENDS = CPU_BACKENDS + ["cupy"]


@pytest.fixture(autouse=True)
def _fresh_momentum_forms(monkeypatch):
    """Every test times the NumPy SGD momentum forms afresh: which form a test's large parameters
    take must not depend on the tests that ran before it."""
    monkeypatch.setattr(numpy_backend, "_MOMENTUM_FORMS", FormChooser())


def _param(name: str):
    marks = [pytest.mark.gpu] if name == "cupy" else []
    return pytest.param(name, id=name, marks=marks)


def _require(name: str) -> dc.Backend:
    status = dc.available_backends().get(name)
    if status is not True:
        pytest.skip(f"backend {name} unavailable: {status}")
    return dc.get_backend(name)


@pytest.fixture(params=[_param(n) for n in ALL_BACKENDS])
def backend(request):
    b = _require(request.param)
    with dc.use_backend(b):
        yield b


@pytest.fixture(params=[_param(n) for n in CPU_BACKENDS if n != "numpy"] + [_param("cupy")])
def other_backend(request):
    """A backend other than numpy, for cross-backend moves."""
    return _require(request.param)
