"""How many BLAS threads a training process takes: all of its share of the cores, never more.

Under ``mpirun -n N`` every rank would otherwise start one BLAS thread per core, N times as many
threads as cores, and ranks that oversubscribe slow to a crawl. The launcher says how many ranks
share this machine; each takes ``cores // ranks`` threads. A thread count the user set in the
environment always wins, and without threadpoolctl nothing is changed (the environment variables
can only act before NumPy is imported).
"""

from __future__ import annotations

import os
from typing import Any

from .sysinfo import cpu_count

#: Set by the user: their choice is final.
USER_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
#: Ranks on this machine, as Open MPI, MPICH/Intel MPI, MVAPICH and Slurm say it.
LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE",
                        "SLURM_NTASKS_PER_NODE")

_limiter: Any = None  # kept alive: threadpoolctl's limit lasts as long as its object


def local_ranks() -> int:
    """Processes of this job on this machine (1 outside a launcher)."""
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def configure() -> int | None:
    """Give this process's BLAS ``cores // local ranks`` threads when it shares the machine with
    other ranks; returns the count set, or None when nothing was changed (one process, a user
    setting, or no threadpoolctl)."""
    global _limiter
    ranks = local_ranks()
    if ranks <= 1 or any(os.environ.get(v) for v in USER_VARIABLES):
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    threads = max(1, cpu_count() // ranks)
    _limiter = threadpool_limits(limits=threads, user_api="blas")
    return threads
