"""Communicators: who am I, how many are we, and the collectives data parallelism needs.

A :class:`Communicator` has ``rank`` and ``size`` and four collectives over
contiguous buffers: :meth:`~Communicator.allreduce` (``"sum"`` or ``"mean"``),
:meth:`~Communicator.broadcast`, :meth:`~Communicator.barrier`, plus
:meth:`~Communicator.abort`, which ends every process of the job. Three
implementations:

* :class:`SingleProcess`: size 1, every collective a no-op.
* :class:`MPICommunicator`: mpi4py (imported when one is built, never by
  ``import deepcore``). NumPy buffers go to MPI directly; CuPy buffers directly
  when the MPI is CUDA-aware, otherwise through a host copy; any other array
  library's buffers through a host copy.
* :class:`NCCLCommunicator`: ``cupy.cuda.nccl`` for CuPy buffers, with the
  NCCL unique id created on rank 0 and broadcast over MPI; host buffers go
  through its MPI communicator.

:func:`get_communicator` picks one: :class:`SingleProcess` unless the process
was started by an MPI launcher (``mpirun``/``mpiexec``/``srun``, seen from the
environment variables they set), NCCL when the model's parameters are CuPy
arrays, MPI otherwise. :func:`init` makes that choice early, and under a
launcher also gives each rank its own GPU (local rank modulo the device count).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np

__all__ = [
    "Communicator",
    "DistributedError",
    "MPICommunicator",
    "NCCLCommunicator",
    "SingleProcess",
    "abort_on_error",
    "get_communicator",
    "init",
    "launched_world_size",
    "mpi_cuda_aware",
    "root_first",
]

#: Environment variables an MPI launcher sets; the first one present gives the world size.
#: Open MPI (mpirun/mpiexec), MPICH and Intel MPI (Hydra's PMI), MVAPICH2, PMIx launchers (srun --mpi=pmix).
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
#: Set without a size variable by some PMIx launchers; the size then comes from MPI itself.
RANK_ONLY_VARS = ("PMIX_RANK",)
OPS = ("sum", "mean")


class DistributedError(RuntimeError):
    """Distributed training cannot start here (mpi4py missing under mpirun, no NCCL, ...)."""


def _have_mpi4py() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def launched_world_size() -> int | None:
    """The world size an MPI launcher announced in the environment; None when not launched by one.

    A launcher that only sets ``PMIX_RANK`` gives 0 (launched, size unknown until MPI starts).
    """
    for var in SIZE_VARS:
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise DistributedError(f"{var}={value!r} is not an integer; is this an MPI launch?") from None
    if any(var in os.environ for var in RANK_ONLY_VARS):
        return 0
    return None


def _kind(buf: Any) -> str:
    """'numpy', 'cupy' or 'other' (any other array library), without importing CuPy."""
    if isinstance(buf, np.ndarray):
        return "numpy"
    if type(buf).__module__.split(".")[0] == "cupy":
        return "cupy"
    return "other"


def _check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"allreduce: op must be one of {OPS}, got {op!r}")
    return op


def _check_buffer(buf: Any, fn: str) -> None:
    kind = _kind(buf)
    if kind == "numpy" and not (buf.flags.c_contiguous and buf.flags.writeable):
        raise ValueError(f"{fn}: a NumPy buffer must be C-contiguous and writeable, got one that is "
                         f"{'not contiguous' if not buf.flags.c_contiguous else 'read-only'}")
    if kind == "cupy" and not buf.flags.c_contiguous:
        raise ValueError(f"{fn}: a CuPy buffer must be C-contiguous")


class Communicator:
    """The interface: ``rank``, ``size`` and the collectives; every rank must make the same calls in
    the same order with buffers of the same shape and dtype.

    ``allreduce`` and ``broadcast`` work in place on a contiguous buffer and return it; for array
    libraries whose arrays cannot be written through a host view (anything but NumPy and CuPy) they
    return a new array instead, so always use the return value.
    """

    name = "base"
    rank: int = 0
    size: int = 1

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that prints, writes checkpoints and whose parameters everyone starts from."""
        return self.rank == 0

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        raise NotImplementedError

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, message: str = "", code: int = 1) -> NoReturn:
        """Print ``message`` to stderr and end every process of the job with status ``code``."""
        raise NotImplementedError

    def allreduce_host(self, values: Any, op: str = "sum") -> np.ndarray:
        """A convenience for metrics: reduce a short list of numbers as float64 on the host."""
        buf = np.array(values, dtype=np.float64).reshape(-1)
        return np.asarray(self.allreduce(buf, op))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """One process: rank 0 of 1; the collectives return their input unchanged."""

    name = "single"

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        _check_op(op)
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"broadcast: root must be 0 in a single process, got {root!r}")
        return buf

    def barrier(self) -> None:
        return None

    def abort(self, message: str = "", code: int = 1) -> NoReturn:
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(code)


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(
            f"distributed training over MPI needs mpi4py, which is not importable ({exc}); "
            f"install it with: pip install 'deepcore[mpi]'"
        ) from None
    return MPI


def _cupy_stream_sync() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def mpi_cuda_aware(mpi: Any = None) -> bool:
    """Whether the MPI library reads and writes GPU memory itself: ``$DEEPCORE_MPI_CUDA_AWARE`` (1/0)
    if set, else ``MPI.Query_cuda_support()`` where mpi4py offers it, else False (stage through host)."""
    env = os.environ.get("DEEPCORE_MPI_CUDA_AWARE")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    mpi = mpi or _import_mpi()
    query = getattr(mpi, "Query_cuda_support", None)
    if query is None:
        return False
    try:
        return bool(query())
    except Exception:
        return False


class MPICommunicator(Communicator):
    """Collectives through mpi4py on ``comm`` (default ``MPI.COMM_WORLD``).

    ``cuda_aware`` (default: :func:`mpi_cuda_aware`) says whether CuPy buffers may be handed to MPI
    directly; when False they are copied to the host, reduced there and copied back.
    """

    name = "mpi"

    def __init__(self, comm: Any = None, *, cuda_aware: bool | None = None) -> None:
        self.MPI = _import_mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self.cuda_aware = mpi_cuda_aware(self.MPI) if cuda_aware is None else bool(cuda_aware)

    def local_rank(self) -> int:
        """This process's rank among the ranks on the same machine (picks its GPU)."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return int(node.Get_rank())
        finally:
            node.Free()

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        _check_op(op)
        _check_buffer(buf, "allreduce")
        if self.size > 1:
            buf = self._through_mpi(buf, lambda b: self.comm.Allreduce(self.MPI.IN_PLACE, b, op=self.MPI.SUM))
        if op == "mean" and self.size > 1:
            buf = _scale(buf, 1.0 / self.size)
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        _check_buffer(buf, "broadcast")
        if self.size == 1:
            return buf
        return self._through_mpi(buf, lambda b: self.comm.Bcast(b, root=root))

    def _through_mpi(self, buf: Any, call: Any) -> Any:
        kind = _kind(buf)
        if kind == "numpy":
            call(buf)
            return buf
        if kind == "cupy":
            if self.cuda_aware:
                _cupy_stream_sync()  # MPI reads the memory outside CuPy's stream order
                call(buf)
                return buf
            import cupy

            host = cupy.asnumpy(buf)
            call(host)
            buf.set(host)
            return buf
        from ..backend import get_backend

        backend = get_backend(buf)
        host = np.array(backend.to_numpy(buf), copy=True, order="C")
        call(host)
        return backend.from_numpy(host, device=backend.device(buf))

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, message: str = "", code: int = 1) -> NoReturn:
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)
        os._exit(code)  # not reached: MPI_Abort ends the process


def _scale(buf: Any, factor: float) -> Any:
    if _kind(buf) in ("numpy", "cupy"):
        buf *= factor
        return buf
    return buf * factor


_NCCL_DTYPES = {
    "float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "bfloat16": "NCCL_BFLOAT16",
    "int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "uint32": "NCCL_UINT32",
    "int64": "NCCL_INT64", "uint64": "NCCL_UINT64",
}


def nccl_missing_advice(cupy: Any) -> str:
    """Why ``cupy.cuda.nccl.available`` is False and the fix: CuPy 14's wheels do not bundle NCCL;
    CuPy loads it (through cuda-pathfinder) from NVIDIA's ``nvidia-nccl-cu12`` / ``-cu13`` wheel."""
    try:
        major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # no runtime to ask: name both
        major = None
    if major in (12, 13):
        wheel, extra = f"nvidia-nccl-cu{major}", f"deepcore[cuda{major}]"
    else:
        wheel = "nvidia-nccl-cu12 (CUDA 12) or nvidia-nccl-cu13 (CUDA 13)"
        extra = "deepcore[cuda12] or deepcore[cuda13]"
    return (f"CuPy {getattr(cupy, '__version__', '?')} found no NCCL library (CuPy's wheels do not include it): "
            f"pip install {wheel}, which the {extra} extra installs")


class NCCLCommunicator(Communicator):
    """Collectives between GPUs through ``cupy.cuda.nccl``; one GPU per rank.

    The NCCL unique id is made on rank 0 and broadcast over ``mpi`` (an :class:`MPICommunicator`,
    built on ``MPI.COMM_WORLD`` when omitted), which also carries host (NumPy) buffers and the
    barrier. Each rank uses CuPy's current device, which :func:`init` sets to the local rank
    modulo the device count. Operations are queued on CuPy's current stream, so later CuPy work on
    that stream sees their results.
    """

    name = "nccl"

    def __init__(self, mpi: MPICommunicator | None = None) -> None:
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise DistributedError(f"NCCL needs CuPy with NCCL support, which is not importable ({exc})") from None
        if not getattr(nccl, "available", True):
            raise DistributedError(nccl_missing_advice(cupy))
        self.cupy, self.nccl = cupy, nccl
        self.mpi = MPICommunicator() if mpi is None else mpi
        self.rank, self.size = self.mpi.rank, self.mpi.size
        self.device = int(cupy.cuda.Device().id)
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.mpi.comm.bcast(uid, root=0)
        self._comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _dtype(self, buf: Any) -> int:
        name = _NCCL_DTYPES.get(str(buf.dtype))
        code = None if name is None else getattr(self.nccl, name, None)
        if code is None:
            raise TypeError(f"NCCL cannot reduce dtype {buf.dtype}")
        return int(code)

    def _check_device(self, buf: Any, fn: str) -> None:
        if int(buf.device.id) != self.device:
            raise ValueError(f"{fn}: buffer is on GPU {buf.device.id} but this rank's NCCL communicator "
                             f"uses GPU {self.device}")

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        _check_op(op)
        if _kind(buf) != "cupy":
            return self.mpi.allreduce(buf, op)
        _check_buffer(buf, "allreduce")
        self._check_device(buf, "allreduce")
        if self.size > 1:
            stream = self.cupy.cuda.get_current_stream().ptr
            ptr = buf.data.ptr
            self._comm.allReduce(ptr, ptr, buf.size, self._dtype(buf), self.nccl.NCCL_SUM, stream)
            if op == "mean":
                buf = _scale(buf, 1.0 / self.size)
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        if _kind(buf) != "cupy":
            return self.mpi.broadcast(buf, root)
        _check_buffer(buf, "broadcast")
        self._check_device(buf, "broadcast")
        if self.size > 1:
            stream = self.cupy.cuda.get_current_stream().ptr
            self._comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, stream)
        return buf

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def abort(self, message: str = "", code: int = 1) -> NoReturn:
        # MPI_Abort ends every process, and their GPU contexts and NCCL resources with them;
        # ncclCommAbort first could itself wait on a peer that is gone.
        self.mpi.abort(message, code)


# --------------------------------------------------------------- selection
_single = SingleProcess()
_world: Communicator | None = None  # set by the first init(): SingleProcess or MPICommunicator
_nccl: NCCLCommunicator | None = None
_choice: str | None = None  # the backend the first init() was given (None: automatic)


def init(backend: str | None = None) -> Communicator:
    """Start distributed training for this process and return its communicator.

    ``backend``: None or ``"auto"`` (MPI when started by an MPI launcher, else a single process;
    :func:`get_communicator` then upgrades to NCCL for a model on CuPy), ``"single"``, ``"mpi"`` or
    ``"nccl"`` (without a launcher these two start a one-rank MPI job). Under a launcher with more
    than one rank and a working CuPy, it also makes GPU ``local_rank % device_count`` CuPy's current
    device, so call it before building a model on the GPU. The first call decides: later calls
    return the same communicator, and asking for another backend then is an error.
    """
    global _world, _choice
    if backend == "auto":
        backend = None
    if backend not in (None, "single", "mpi", "nccl"):
        raise ValueError(f"init: backend must be None, 'auto', 'single', 'mpi' or 'nccl', got {backend!r}")
    if _world is None:
        launched = launched_world_size()
        alone = launched is None or (launched <= 1 and not _have_mpi4py())
        if backend == "single" or (backend is None and alone):
            # One process under a launcher (srun with a PMI plug-in, say) has nothing to share.
            world: Communicator = _single
        else:
            try:
                world = MPICommunicator()
            except DistributedError as exc:
                if launched is not None:
                    raise DistributedError(f"this process was started by an MPI launcher "
                                           f"({_launcher_hint()}), but {exc}") from None
                raise
            if world.size > 1:
                _select_gpu(world)
        _world, _choice = world, backend
    elif backend is not None and backend != _choice:
        raise DistributedError(f"init: this process already runs with backend {_choice or 'auto'!r}; "
                               f"it cannot switch to {backend!r}")
    return _get_nccl() if _choice == "nccl" else _world


def _launcher_hint() -> str:
    for var in SIZE_VARS + RANK_ONLY_VARS:
        if var in os.environ:
            return f"{var}={os.environ[var]}"
    return "no launcher variables"


def _select_gpu(world: MPICommunicator) -> None:
    """Make GPU ``local_rank % count`` CuPy's current device, when CuPy works here; else nothing."""
    from ..backend import BackendUnavailableError, get_backend

    try:
        get_backend("cupy")
    except BackendUnavailableError:
        return
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if count:
        cupy.cuda.Device(world.local_rank() % count).use()


def _get_nccl() -> NCCLCommunicator:
    global _nccl
    if _nccl is None:
        world = _world if isinstance(_world, MPICommunicator) else MPICommunicator()
        _nccl = NCCLCommunicator(world)
    return _nccl


def _uses_cupy(model: Any) -> bool:
    if model is None:
        return False
    params = model.parameters()
    return bool(params) and _kind(params[0].value) == "cupy"


def get_communicator(model: Any = None) -> Communicator:
    """The communicator for training ``model``: :func:`init`'s choice, upgraded to NCCL when the
    model's parameters are CuPy arrays and there is more than one rank (or NCCL was asked for)."""
    world = init() if _world is None else _world
    if _choice == "nccl" or (_choice is None and world.size > 1 and _uses_cupy(model)):
        return _get_nccl()
    return world


@contextlib.contextmanager
def root_first(comm: Communicator) -> Iterator[None]:
    """Rank 0 runs the block first (a download, say), the others after it has finished."""
    if comm.is_root:
        yield
        comm.barrier()
    else:
        comm.barrier()
        yield


# ----------------------------------------------------------- fault handling
_guarded: contextvars.ContextVar[bool] = contextvars.ContextVar("deepcore_abort_guard", default=False)


@contextlib.contextmanager
def abort_on_error(comm: Communicator, *, passthrough: tuple[type[BaseException], ...] = (),
                   show_traceback: bool = True, prefix: str = "deepcore") -> Iterator[None]:
    """With more than one rank, an exception escaping the block ends the whole job.

    A rank that raises while the others wait in a collective would leave them waiting forever (and
    its own exit would wait in ``MPI_Finalize``). Instead this prints the traceback (unless
    ``show_traceback`` is False) and ``"<prefix>: rank R of N failed: Type: message"`` to stderr, then
    calls ``comm.abort()`` (``MPI_Abort``), which stops every rank; ``mpirun`` exits non-zero.
    ``passthrough`` exceptions are raised on every rank at once by design (a diverged loss) and
    propagate normally, as do ``SystemExit(0)`` and any exception in a single process. Nested
    guards defer to the outermost one.
    """
    if comm.size <= 1 or _guarded.get():
        yield
        return
    token = _guarded.set(True)
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, passthrough) or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            raise
        if show_traceback:
            traceback.print_exc(file=sys.stderr)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        comm.abort(f"{prefix}: rank {comm.rank} of {comm.size} failed: {detail}; stopping all ranks", 1)
    finally:
        _guarded.reset(token)
