"""The NumPy backend's allocator tuning: freed large blocks are reused instead of faulted in
anew each step, and DEEPCORE_MALLOC_TUNING=0 leaves glibc alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

_PROBE = r"""
import resource
from deepcore.backend import malloc_tuning
from deepcore.bench import make_workload
step = make_workload("mlp_step", "numpy", batch=2048).fn   # builds the NumPy backend: the tuning applies
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(malloc_tuning.tune().split()[0], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if k != "DEEPCORE_MALLOC_TUNING"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_without_page_faults():
    state, faults = _probe()
    if state != "on":
        pytest.skip(f"allocator not tuned here: {state}")
    off_state, off_faults = _probe(DEEPCORE_MALLOC_TUNING="0")
    assert off_state == "off"
    # glibc's defaults hand the step's freed temporaries back to the system, and the next step
    # faults them in again (about 2,000 pages a step at batch 2048 here); tuned, they are reused
    assert off_faults > 10 * 200
    assert faults < off_faults / 10
