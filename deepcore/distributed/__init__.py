"""Data-parallel training over several processes, machines and GPUs, on MPI and NCCL.

Every process (rank) holds the whole model and trains on its own share of each
batch; gradients are averaged over the ranks before each optimizer step, so all
ranks keep identical parameters. The messages travel over proven engines only:
MPI through mpi4py between CPU processes and machines, NCCL through CuPy between
GPUs. Both are optional (``pip install 'deepcore[mpi]'``; NCCL comes with CuPy)
and imported only when a communicator is built.

Launch with ``mpirun -n 4 deepcore train ...`` or ``mpirun -n 4 python script.py``;
:func:`deepcore.train.fit` then finds the communicator itself
(:func:`get_communicator`). See ``deepcore/train.py`` for what the fit loop does
with it (sharding, bucketed gradient averaging, rank-0 output).
"""

from .buckets import (
    DEFAULT_BUCKET_BYTES,
    GradientReducer,
    broadcast_arrays,
    broadcast_module,
    flatten,
    plan_buckets,
    unflatten,
)
from .comm import (
    Communicator,
    DistributedError,
    MPICommunicator,
    NCCLCommunicator,
    SingleProcess,
    abort_on_error,
    get_communicator,
    init,
    launched_world_size,
    mpi_cuda_aware,
    root_first,
)
from .sampler import ShardedBatches, pad_to_multiple, shard

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Communicator",
    "DistributedError",
    "GradientReducer",
    "MPICommunicator",
    "NCCLCommunicator",
    "ShardedBatches",
    "SingleProcess",
    "abort_on_error",
    "broadcast_arrays",
    "broadcast_module",
    "flatten",
    "get_communicator",
    "init",
    "launched_world_size",
    "mpi_cuda_aware",
    "pad_to_multiple",
    "plan_buckets",
    "root_first",
    "shard",
    "unflatten",
]
