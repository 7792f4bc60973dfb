"""Backend registry and implementations; see :mod:`deepcore.backend.registry`."""

from .base import Backend
from .registry import (
    BackendMismatchError,
    BackendUnavailableError,
    UnknownBackendError,
    available_backends,
    backend_of,
    backend_status,
    best_backend,
    get_backend,
    register_backend,
    registered_backends,
    to_backend,
    use_backend,
)

__all__ = [
    "Backend",
    "BackendMismatchError",
    "BackendUnavailableError",
    "UnknownBackendError",
    "available_backends",
    "backend_of",
    "backend_status",
    "best_backend",
    "get_backend",
    "register_backend",
    "registered_backends",
    "to_backend",
    "use_backend",
]
