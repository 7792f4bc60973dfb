"""BLAS threads under a launcher: each rank takes its share of the cores, a user's setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytest.importorskip("threadpoolctl")

_PROBE = ("import deepcore.blas_threads as b; from threadpoolctl import threadpool_info\n"
          "n = b.configure()\n"
          "blas = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
          "print(n, blas[0] if blas else None)\n")


def _probe(env_extra: dict[str, str]) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_NUM_THREADS") and "LOCAL" not in k and not k.startswith("SLURM")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT)
    configured, blas = out.stdout.split()
    return configured, blas


def test_two_local_ranks_on_this_machine_share_its_cores():
    cores = len(os.sched_getaffinity(0))
    configured, blas = _probe({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert configured == blas == str(max(1, cores // 2))


def test_more_ranks_than_cores_get_one_thread_each():
    assert _probe({"MPI_LOCALNRANKS": "64"}) == ("1", "1")


def test_one_process_and_a_users_setting_are_left_alone():
    assert _probe({})[0] == "None"
    configured, blas = _probe({"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMP_NUM_THREADS": "1"})
    assert configured == "None" and blas == "1"
