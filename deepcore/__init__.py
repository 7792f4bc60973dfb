"""deepcore: neural-network training written once against the Python array API.

Layers and losses run on whatever array library holds the data (NumPy, CuPy,
PyTorch tensors, array_api_strict); a backend registry sends the operations
that decide speed to NumPy/BLAS on the CPU or CuPy/cuBLAS and fused CUDA
kernels on NVIDIA GPUs.
"""

__version__ = "0.1.0"

from . import data, gradcheck, losses, nn, optim, regularizers
from .backend import (
    Backend,
    BackendMismatchError,
    BackendUnavailableError,
    UnknownBackendError,
    available_backends,
    get_backend,
    register_backend,
    to_backend,
    use_backend,
)
from .rng import manual_seed

__all__ = [
    "Backend",
    "BackendMismatchError",
    "BackendUnavailableError",
    "UnknownBackendError",
    "__version__",
    "available_backends",
    "get_backend",
    "gradcheck",
    "losses",
    "manual_seed",
    "nn",
    "optim",
    "regularizers",
    "data",
    "register_backend",
    "to_backend",
    "use_backend",
]
