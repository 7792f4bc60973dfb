"""The one place that decides which backend runs an op.

A backend is found by name (``"numpy"``), by array (its array-API namespace),
by module (``array_api_strict``, ``torch``), from the ``DEEPCORE_BACKEND``
environment variable, or from the innermost ``use_backend()`` context.
Backends are registered as factories and built on first use, so importing
deepcore never imports CuPy; a factory that fails stores its reason, which
``available_backends()`` reports and asking for that backend raises.

Third-party packages register a backend with :func:`register_backend`, or
through the ``deepcore.backends`` entry-point group, whose entries name a
zero-argument callable that calls :func:`register_backend`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .base import Array, Backend

ENV_VAR = "DEEPCORE_BACKEND"
ENTRY_POINT_GROUP = "deepcore.backends"


class BackendUnavailableError(RuntimeError):
    """A registered backend cannot run here (library missing, no device, ...)."""


class UnknownBackendError(ValueError):
    """A backend name that nothing registered."""


class BackendMismatchError(TypeError, ValueError):
    """Arrays from two backends, or two devices, meet in one call."""


@dataclass
class _Entry:
    name: str
    factory: Callable[[], Backend]
    namespaces: tuple[str, ...]
    instance: Backend | None = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_registry: dict[str, _Entry] = {}
_by_namespace: dict[str, str] = {}
_generic: dict[str, Backend] = {}
_by_type: dict[type, Backend] = {}
_current: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("deepcore_backend", default=None)
_entry_points_loaded = False


def register_backend(name: str, factory: Callable[[], Backend], *, namespaces: tuple[str, ...] = (),
                     replace: bool = False) -> None:
    """Register ``factory`` (called once, on first use) under ``name``.

    ``namespaces`` are the ``__name__`` of the array-API namespaces whose arrays
    this backend runs (as ``array_api_compat.array_namespace`` reports them).
    A factory signals "not available here" by raising; the message is kept.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_backend: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_backend: factory must be callable, got {type(factory).__name__}")
    if name in _registry and not replace:
        raise ValueError(f"register_backend: a backend named {name!r} is already registered; pass replace=True")
    _registry[name] = _Entry(name, factory, tuple(namespaces))
    for ns in namespaces:
        _by_namespace[ns] = name
    _by_type.clear()


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception as exc:  # a broken plug-in must not break deepcore
            register_backend(ep.name, _failing_factory(f"entry point {ep.value!r} failed: {exc!r}"), replace=True)


def _failing_factory(reason: str) -> Callable[[], Backend]:
    def factory() -> Backend:
        raise BackendUnavailableError(reason)

    return factory


def _instantiate(entry: _Entry) -> Backend:
    if entry.instance is not None:
        return entry.instance
    with entry.lock:
        if entry.instance is None and entry.error is None:
            try:
                entry.instance = entry.factory()
            except Exception as exc:
                entry.error = str(exc) or type(exc).__name__
        if entry.instance is None:
            raise BackendUnavailableError(f"backend {entry.name!r} is not available: {entry.error}")
        return entry.instance


def registered_backends() -> list[str]:
    _load_entry_points()
    return sorted(_registry)


def available_backends() -> dict[str, bool | str]:
    """``{name: True}`` for each backend that works here, ``{name: "why not"}`` otherwise.
    Every registered backend is built to find out (CuPy and torch imported): for choosing one,
    :func:`best_backend` asks far less."""
    return {name: backend_status(name) for name in registered_backends()}


def backend_status(name: str) -> bool | str:
    """True when the registered backend ``name`` works here, else the reason; builds only that one."""
    entry = _registered(name)
    if entry is None:
        return f"no backend named {name!r} is registered"
    try:
        _instantiate(entry)
        return True
    except BackendUnavailableError:
        return entry.error or "unavailable"


def _nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver shows itself without loading anything (Linux, WSL); elsewhere
    there is no such sign, so only CuPy can tell."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"))


def best_backend() -> tuple[str, str | None]:
    """``(name, note)``: ``"cupy"`` when CuPy works here (a device is visible and a test kernel compiles
    and runs on it: :func:`cuda_kernel_probe`), else ``"numpy"`` with a one-line note saying why not
    CuPy (None when CuPy is not installed at all). Imports CuPy only where a driver is present and
    nothing else: no torch, no probing of libraries that will not be used."""
    if importlib.util.find_spec("cupy") is None:
        return "numpy", None
    if not _nvidia_driver_present():
        return "numpy", "CuPy is installed but no NVIDIA driver is present; using NumPy"
    status = backend_status("cupy")
    if status is True:
        return "cupy", None
    return "numpy", f"CuPy is installed but not usable ({status}); using NumPy"


def _registered(name: str) -> _Entry | None:
    """The entry registered under ``name``, or for the namespace of that name ("jax.numpy",
    "array_api_compat.torch"). Plug-ins are loaded only for a name nothing registered yet: scanning
    every installed package's entry points costs ~25 ms, a tenth of `deepcore train`'s start."""
    entry = _registry.get(name) or _registry.get(_by_namespace.get(name, ""))
    if entry is None and not _entry_points_loaded:
        _load_entry_points()
        entry = _registry.get(name) or _registry.get(_by_namespace.get(name, ""))
    return entry


def _by_name(name: str) -> Backend:
    entry = _registered(name)
    if entry is None:
        if name in _generic:
            return _generic[name]
        raise UnknownBackendError(
            f"unknown backend {name!r}; registered backends: {', '.join(sorted(_registry))} "
            f"(or the import name of any array-API library, e.g. 'array_api_strict')"
        )
    return _instantiate(entry)


def _for_namespace(xp: ModuleType) -> Backend:
    ns_name = xp.__name__
    name = _by_namespace.get(ns_name)  # the namespace's own backend first, before one of its name
    if name is None and ns_name not in _generic and not _entry_points_loaded:  # perhaps a plug-in's
        _load_entry_points()
        name = _by_namespace.get(ns_name)
    if name is not None:
        return _instantiate(_registry[name])
    backend = _generic.get(ns_name)
    if backend is None:
        backend = _generic.setdefault(ns_name, Backend(xp, name=ns_name.removeprefix("array_api_compat.")))
    return backend


def _for_module(module: ModuleType) -> Backend:
    entry = _registered(module.__name__)
    if entry is not None:
        return _instantiate(entry)
    # A plain library module (``torch``) maps to its array-API wrapper when one exists.
    try:
        compat = importlib.import_module(f"array_api_compat.{module.__name__}")
    except ImportError:
        compat = module
    return _for_namespace(compat)


def known_backend(array_type: type) -> Backend | None:
    """The backend of arrays of ``array_type`` once one such array has been seen, else None: a
    dictionary look-up for hot paths that fall back to :func:`backend_of` when it says None."""
    return _by_type.get(array_type)


def _for_array(x: Any) -> Backend:
    backend = _by_type.get(type(x))
    if backend is not None:
        return backend
    if type(x) is np.ndarray:  # NumPy's own namespace: array_namespace would import array_api_compat.numpy
        backend = _by_type[np.ndarray] = _for_namespace(np)
        return backend
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError as exc:
        raise TypeError(f"expected an array, got {type(x).__module__}.{type(x).__qualname__}") from exc
    backend = _for_namespace(xp)
    _by_type[type(x)] = backend
    return backend


def _default() -> Backend:
    current = _current.get()
    if current is not None:
        return current
    name = os.environ.get(ENV_VAR)
    if name:
        try:
            return backend_for(name)
        except UnknownBackendError as exc:
            raise UnknownBackendError(f"{ENV_VAR}={name!r}: {exc}") from None
    return _by_name("numpy")


def backend_for(spec: Any) -> Backend:
    """A Backend from a name, a module, a Backend, or an array-API namespace."""
    if isinstance(spec, Backend):
        return spec
    if isinstance(spec, str):
        try:
            return _by_name(spec)
        except UnknownBackendError:
            try:
                module = importlib.import_module(spec)
            except ImportError:
                raise UnknownBackendError(
                    f"unknown backend {spec!r}; registered backends: {', '.join(sorted(_registry))}"
                ) from None
            return _for_module(module)
    if isinstance(spec, ModuleType):
        return _for_module(spec)
    raise TypeError(
        f"expected a backend name, module or Backend, got {type(spec).__name__} {spec!r}"
    )


def backend_or_none(x: Any) -> Backend | None:
    """The backend of the array ``x``, or None for anything else (None, a number, a list, a name)."""
    try:
        return _for_array(x)
    except (TypeError, ValueError):
        return None


def get_backend(obj: Any = None, *more: Array) -> Backend:
    """The backend for an array (or several, which must share backend and device), a name, a module,
    or, with no argument, the current default (``use_backend`` > ``$DEEPCORE_BACKEND`` > numpy)."""
    if obj is None:
        return _default()
    if isinstance(obj, (str, ModuleType, Backend)):
        return backend_for(obj)
    if more:
        return backend_of(obj, *more)
    return _for_array(obj)


def backend_of(*arrays: Array, names: tuple[str, ...] | None = None) -> Backend:
    """The common backend of ``arrays``; a clear error when two backends or devices meet.

    ``names`` label the arrays in the message (``("x", "weight")``).
    """
    # The common case, arrays of one type on a one-device library, without building any list.
    first_type = type(arrays[0])
    backend = _by_type.get(first_type)
    if backend is not None and backend.single_device and all(type(a) is first_type or a is None for a in arrays):
        return backend
    present = [(i, a) for i, a in enumerate(arrays) if a is not None]
    backend = _for_array(present[0][1])
    first_type = type(present[0][1])
    for i, a in present[1:]:
        if type(a) is not first_type and _for_array(a) is not backend:
            raise BackendMismatchError(_mismatch_message(arrays, names, present[0][0], i, backend, _for_array(a)))
    if backend.single_device:
        return backend
    dev = backend.device(present[0][1])
    for i, a in present[1:]:
        other = backend.device(a)
        if other != dev:
            raise BackendMismatchError(
                f"{_label(names, present[0][0])} is on device {dev} but {_label(names, i)} is on device "
                f"{other}; move them to one device first (e.g. model.to(...) or the library's own transfer)"
            )
    return backend


def _label(names: tuple[str, ...] | None, i: int) -> str:
    return repr(names[i]) if names and i < len(names) else f"argument {i}"


def _mismatch_message(arrays: Any, names: Any, i: int, j: int, a: Backend, b: Backend) -> str:
    return (
        f"{_label(names, i)} is a {a.name} array but {_label(names, j)} is a {b.name} array; "
        f"deepcore never moves data behind your back: move the model with model.to({a.name!r}) "
        f"or the data with deepcore.to_backend(x, {b.name!r})"
    )


@contextlib.contextmanager
def use_backend(spec: Any) -> Iterator[Backend]:
    """Within the block, new parameters and ``get_backend()`` use ``spec``."""
    backend = backend_for(spec)
    token = _current.set(backend)
    try:
        yield backend
    finally:
        _current.reset(token)


def to_backend(x: Array, target: Any, *, device: Any = None, copy: bool | None = None) -> Array:
    """``x`` on the backend ``target`` (name, module or Backend), on ``device`` when one is given.

    Where the two libraries share ``x``'s device (NumPy and torch CPU tensors, CuPy and torch CUDA
    tensors) the result is ``x``'s own memory through DLPack, no copy: a write to one shows in the
    other, as with ``torch.from_numpy``. A copy is made where sharing is impossible or unsafe: ``x``
    read-only (the other library could write to it), not C-contiguous, on another device than the
    result's, a library deepcore cannot inspect (array_api_strict, JAX), or a dtype DLPack refuses.
    ``x`` already on ``target`` (and ``device``) comes back itself. ``copy=True`` always copies,
    ``copy=False`` raises BufferError where a copy would be needed (the array API's meaning).
    """
    dst = backend_for(target)
    src = _for_array(x)
    if src is dst and (device is None or src.device(x) == device):
        return dst.copy(x) if copy else x
    if not copy:
        shared, why = (None, f"it is on device {src.device(x)}") if src is dst else _shared(x, dst, device)
        if shared is not None:
            return shared
        if copy is False:
            where = f"{dst.name}" + ("" if device is None else f" (device {device})")
            raise BufferError(f"to_backend(copy=False): x, a {src.name} array of shape {tuple(x.shape)}, cannot move "
                              f"to {where} without a copy: {why}")
    if src is dst:
        return dst.xp.asarray(x, device=device, copy=True)
    return dst.from_numpy(src.to_numpy(x), device=device)


def _shared(x: Array, dst: Backend, device: Any) -> tuple[Array | None, str]:
    """``x``'s memory as an array of ``dst`` through DLPack, or None and why not."""
    problem = _unshareable(x)
    if problem is not None:
        return None, problem
    from_dlpack = getattr(dst.xp, "from_dlpack", None)
    if from_dlpack is None:
        return None, f"{dst.name} has no from_dlpack"
    try:
        y = from_dlpack(x)
    except (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        return None, f"DLPack refused it ({exc})"  # another device, a dtype DLPack lacks, a tensor needing grad
    if device is not None and str(dst.device(y)) != str(device):
        return None, f"it is on device {dst.device(y)}, not {device}"
    return y, ""


def _unshareable(x: Array) -> str | None:
    """Why ``x``'s memory must not be handed to another library as it is; None when it may.

    Only C-contiguous, writable NumPy / CuPy arrays and contiguous torch tensors are shared: torch takes
    a read-only NumPy array's memory as writable, and aborts the process on negative strides."""
    flags = getattr(x, "flags", None)  # NumPy, CuPy
    if flags is not None and hasattr(flags, "c_contiguous"):
        if not getattr(flags, "writeable", True):
            return "it is read-only"
        return None if flags.c_contiguous else "it is not C-contiguous"
    is_contiguous = getattr(x, "is_contiguous", None)  # torch
    if callable(is_contiguous):
        return None if is_contiguous() else "it is not contiguous"
    return f"deepcore cannot tell whether a {type(x).__module__}.{type(x).__qualname__}'s memory is contiguous"


# ------------------------------------------------------------- built-ins
def _numpy() -> Backend:
    from .numpy_backend import NumpyBackend

    return NumpyBackend()


def _cupy() -> Backend:
    try:
        from .cupy_backend import CupyBackend
    except ImportError as exc:
        raise BackendUnavailableError(f"CuPy cannot be imported ({exc}); install it with "
                                      f"pip install 'deepcore[cuda12]' or 'deepcore[cuda13]' to match "
                                      f"the CUDA driver") from exc
    backend = CupyBackend()
    # Imported already by cupy_backend; a device that shows but cannot compile or run kernels
    # (no NVRTC: CuPy >= 14 takes it from its `ctk` extra) fails here, once, with the reason kept.
    failure = cuda_kernel_probe(importlib.import_module("cupy"))
    if failure is not None:
        raise BackendUnavailableError(failure)
    return backend


def cuda_kernel_probe(cupy: ModuleType) -> str | None:
    """None when a tiny ``ElementwiseKernel`` (adding 1 to a 4-element array) compiles through NVRTC,
    runs on the current device and gives the right answer; else one line saying why not."""
    want = [1.0, 2.0, 3.0, 4.0]
    try:
        kernel = cupy.ElementwiseKernel("T x", "T y", "y = x + (T)1", "deepcore_probe")
        got = [float(v) for v in cupy.asnumpy(kernel(cupy.arange(4, dtype=cupy.float32)))]
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        return (f"a 4-element test kernel did not compile or run ({detail}); CuPy >= 14 compiles with the "
                f"NVRTC of its ctk extra: pip install 'deepcore[cuda12]' or 'deepcore[cuda13]'")
    if got != want:
        return f"a 4-element test kernel ran but gave {got} instead of {want}"
    return None


def _generic_factory(module: str, compat: str | None = None) -> Callable[[], Backend]:
    def factory() -> Backend:
        try:
            importlib.import_module(module)
            xp = importlib.import_module(compat or module)
        except ImportError as exc:
            raise BackendUnavailableError(f"{module} is not installed ({exc}); pip install {module}") from exc
        return Backend(xp, name=module)

    return factory


register_backend("numpy", _numpy, namespaces=("array_api_compat.numpy", "numpy"))
register_backend("cupy", _cupy, namespaces=("array_api_compat.cupy", "cupy"))
register_backend("array_api_strict", _generic_factory("array_api_strict"), namespaces=("array_api_strict",))
def _optional_factory(module: str, cls: str, library: str, install: str) -> Callable[[], Backend]:
    """A factory for a backend class in ``deepcore.backend.<module>`` that imports ``library``: a missing
    library is kept as the reason, with the command that installs it."""

    def factory() -> Backend:
        try:
            backend_cls = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
        except ImportError as exc:
            raise BackendUnavailableError(f"{library} is not installed ({exc}); {install}") from exc
        return backend_cls()

    return factory


register_backend("torch", _optional_factory("torch_backend", "TorchBackend", "torch", "pip install torch"),
                 namespaces=("array_api_compat.torch",))
# JAX by its plain name too: jax.numpy is its array-API namespace (the module ``jax`` itself has no dtypes).
register_backend("jax", _optional_factory("jax_backend", "JaxBackend", "jax", "pip install jax"),
                 namespaces=("jax.numpy",))
register_backend("dask", _optional_factory("dask_backend", "DaskBackend", "dask", "pip install 'dask[array]'"),
                 namespaces=("array_api_compat.dask.array", "dask.array"))
