"""Run deepcore's CUDA kernels on the CPU, through ``emulator.h``, for machines without a GPU.

:func:`build` compiles ``kernels/softmax_cross_entropy.cu`` with the host C++
compiler against the emulator (every CUDA thread a fiber; see emulator.h) into
a shared library. :class:`EmulatedModule` loads it and answers
``get_function(name_expression)`` like ``cupy.RawModule``, and the returned
kernel is called like a ``cupy.RawKernel``: ``kernel(grid, block, args)`` with
NumPy arrays where CuPy would take device arrays. So the host wrapper in
``deepcore/backend/cuda_kernels.py`` runs unchanged with ``xp=numpy``.

Stricter than CuPy on purpose: every argument's type and dtype must be the one
the template instance expects, and arrays must be C-contiguous, because CuPy
would pass a wrong one through as a raw pointer and the kernel would read
garbage. Dynamic shared memory above a kernel's ``max_dynamic_shared_size_bytes``
(48 KiB unless raised, as on a GPU) is refused as a GPU refuses it. Needs a
C++17 compiler with ``_Float16`` (GCC >= 12, Clang >= 15) and POSIX ``ucontext``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCE_SOURCE = REPO / "kernels" / "softmax_cross_entropy.cu"
_EMULATOR_SOURCES = (HERE / "emulator.h", HERE / "include" / "cuda_fp16.h", HERE / "include" / "cuda_bf16.h",
                     HERE / "include" / "cooperative_groups.h", HERE / "sce_launch.cpp")
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
#: CUDA's default limit of dynamic shared memory per block; more needs the kernel's opt-in attribute.
DEFAULT_DYNAMIC_SHARED_BYTES = 48 * 1024
SHUFFLES = {"meet": 0, "unordered": 1}

# CUDA type in a name expression -> NumPy dtype name of the array it points to.
_CTYPE_DTYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16",
                 "int": "int32", "long long": "int64"}


def find_compiler() -> str | None:
    """``$CXX``, else the first of g++, c++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((found for name in ("g++", "c++", "clang++") if (found := shutil.which(name))), None)


def compile_library(out_dir: Path, stem: str, key: bytes, args: list[str], compiler: str | None = None) -> Path:
    """``compiler -shared -fPIC <args>`` into ``out_dir/lib<stem>_<hash>.so``, where the hash is of
    ``key`` (the sources) and the compiler: an unchanged build is reused, and the library is
    written atomically, so a concurrent build never loads a half-written one."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lib = Path(out_dir) / f"lib{stem}_{hashlib.sha256(compiler.encode() + key).hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Werror", *args, "-o", str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"building {stem} failed ({' '.join(command)}):\n{done.stderr}")
    os.replace(tmp, lib)
    return lib


def build(out_dir: Path, *, source: Path = SCE_SOURCE, compiler: str | None = None, optimize: bool = True) -> Path:
    """Compile ``source`` (the softmax cross-entropy kernels, or a modified copy of them) against
    the emulator into a shared library in ``out_dir``, reused while the sources are unchanged.
    ``optimize=False`` builds with -O0 instead of -O2: about half the build time, for a library
    that runs a few small launches (the tests' planted-bug copies)."""
    key = b"".join(path.read_bytes() for path in (*_EMULATOR_SOURCES, Path(source))) + bytes([optimize])
    args = ["-g", *(() if optimize else ("-O0",)), "-Wextra", "-Wno-unknown-pragmas", f"-I{HERE / 'include'}",
            f"-I{HERE}",
            f'-DSCE_KERNEL_SOURCE="{Path(source).resolve()}"', str(HERE / "sce_launch.cpp")]
    return compile_library(out_dir, "sce_emulated", key, args, compiler)


class _SceArgs(ctypes.Structure):
    """sce_launch.cpp's SceArgs."""

    _fields_ = [("logits", ctypes.c_void_p), ("labels", ctypes.c_void_p), ("class_weights", ctypes.c_void_p),
                ("grad", ctypes.c_void_p), ("loss", ctypes.c_void_p), ("partials", ctypes.c_void_p),
                ("ticket", ctypes.c_void_p), ("n_rows", ctypes.c_longlong), ("n_classes", ctypes.c_int),
                ("ignore_index", ctypes.c_longlong), ("label_smoothing", ctypes.c_float),
                ("scale", ctypes.c_float), ("reduction", ctypes.c_int), ("threads_per_row", ctypes.c_int)]


# The kernels' parameters in order: (name, kind) with kind a dtype for a pointer ("T" the logits' type,
# "L" the labels'; a trailing "?" where a 64-bit zero is a null pointer) or a scalar type.
_POINTERS = (("logits", "T"), ("labels", "L"), ("class_weights", "float32?"), ("grad", "T"), ("loss", "T"),
             ("partials", "float32?"), ("ticket", "uint32?"))
_SCALARS = (("n_rows", np.int64), ("n_classes", np.int32), ("ignore_index", np.int64),
            ("label_smoothing", np.float32), ("scale", np.float32), ("reduction", np.int32))
_ON_CHIP_SCALARS = (*_SCALARS, ("threads_per_row", np.int32))


class EmulatedModule:
    """``cupy.RawModule`` stand-in over the emulator library at ``lib``.

    ``order`` is the order in which each block's threads are run between
    switch points ("forward", "reverse", or "shuffled" with ``seed``): a kernel
    whose result changes with it reads or writes memory another thread touches
    without a barrier in between.

    ``shuffles`` says what a warp shuffle orders. "meet" (the default): the
    warp meets there, so it orders memory like ``__syncwarp()``. "unordered":
    nothing, as on a GPU; each thread runs from one barrier to the next in one
    go and its shuffles return what they returned in a first launch with
    "meet" on copies of the buffers the kernel writes (emulator.h,
    kShufflesReplay). Only then can a missing ``__syncwarp()`` between one
    lane's read and another lane's aliasing write show, in an ``order`` that
    runs the writing lane first.

    ``blocks`` (a ``range`` or ``(start, stop)``) runs only those blocks of each
    launch's grid, leaving the other blocks' rows unwritten; ``blockIdx`` and
    ``gridDim`` stay those of the whole grid. It reaches one block of a grid too
    big to emulate whole (rows past 2**31 elements, say).

    ``shared_memory_optin`` is the most dynamic shared memory the emulated device
    lets a kernel opt in to (``cudaDevAttrMaxSharedMemoryPerBlockOptin``: 227 KiB on
    H100); each kernel starts at CUDA's default of 48 KiB, and
    ``kernel.max_dynamic_shared_size_bytes = n`` raises it, as with CuPy.
    """

    def __init__(self, lib: Path, *, order: str = "forward", seed: int = 0, shuffles: str = "meet",
                 blocks: range | tuple[int, int] | None = None, shared_memory_optin: int = 227 * 1024) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {tuple(ORDERS)}, got {order!r}")
        if shuffles not in SHUFFLES:
            raise ValueError(f"shuffles must be one of {tuple(SHUFFLES)}, got {shuffles!r}")
        if blocks is not None:
            start, stop = (blocks.start, blocks.stop) if isinstance(blocks, range) else blocks
            if isinstance(blocks, range) and blocks.step != 1:
                raise ValueError(f"blocks must be a contiguous range, got {blocks}")
            if not 0 <= start <= stop:
                raise ValueError(f"blocks must satisfy 0 <= start <= stop, got {blocks}")
            blocks = (int(start), int(stop))
        self._lib = ctypes.CDLL(str(lib))
        self._lib.emu_sce_name.restype = ctypes.c_char_p
        self._lib.emu_last_error.restype = ctypes.c_char_p
        self._lib.emu_sce_launch.restype = ctypes.c_int
        self._lib.emu_sce_launch.argtypes = [
            ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_int, ctypes.POINTER(_SceArgs),
        ]
        self._names = {self._lib.emu_sce_name(i).decode(): i for i in range(self._lib.emu_sce_count())}
        self._on_chip = {name: bool(self._lib.emu_sce_on_chip(i)) for name, i in self._names.items()}
        self._cluster = {name: int(self._lib.emu_sce_cluster(i)) for name, i in self._names.items()}
        self.order = order
        self.seed = seed
        self.shuffles = shuffles
        self.blocks = blocks
        self.shared_memory_optin = int(shared_memory_optin)
        self._kernels: dict[str, EmulatedKernel] = {}
        # (name, grid, block, dynamic shared bytes) per launch
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...], int]] = []

    @property
    def name_expressions(self) -> tuple[str, ...]:
        return tuple(self._names)

    def get_function(self, name_expression: str) -> EmulatedKernel:
        """The kernel, one object per name as CuPy's module keeps (its attributes persist)."""
        if name_expression not in self._names:
            raise KeyError(f"no emulated kernel {name_expression!r}; have {sorted(self._names)}")
        kernel = self._kernels.get(name_expression)
        if kernel is None:
            kernel = self._kernels[name_expression] = EmulatedKernel(self, name_expression)
        return kernel


class EmulatedKernel:
    """One template instance; called as ``kernel(grid, block, args, shared_mem=0)`` like ``cupy.RawKernel``.

    ``cluster_blocks``: the kernel's ``__cluster_dims__`` (1 without); the grid must be a multiple of it,
    as a GPU requires, and each cluster's blocks run together (emulator.h)."""

    def __init__(self, module: EmulatedModule, name: str) -> None:
        self._module = module
        self.name = name
        template_args = name[name.index("<") + 1:-1].split(", ")
        self._logit_dtype, self._label_dtype = (_CTYPE_DTYPES[t] for t in template_args)
        self.on_chip = module._on_chip[name]
        self.cluster_blocks = module._cluster[name]
        self._scalars = _ON_CHIP_SCALARS if self.on_chip else _SCALARS
        self._max_dynamic = DEFAULT_DYNAMIC_SHARED_BYTES

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        if not 0 <= int(value) <= self._module.shared_memory_optin:
            raise RuntimeError(f"{self.name}: max_dynamic_shared_size_bytes {value} exceeds the device's opt-in "
                               f"limit of {self._module.shared_memory_optin} bytes")
        self._max_dynamic = int(value)

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], *,
                 shared_mem: int = 0) -> None:
        if len(grid) != 1 or len(block) != 1:
            raise ValueError(f"only 1-D launches are emulated, got grid={grid} block={block}")
        n_args = len(_POINTERS) + len(self._scalars)
        if len(args) != n_args:
            raise TypeError(f"{self.name} takes {n_args} arguments, got {len(args)}")
        if int(grid[0]) % self.cluster_blocks != 0:
            raise RuntimeError(f"{self.name}: a grid of {int(grid[0])} blocks is not a multiple of the kernel's "
                               f"cluster size {self.cluster_blocks} (a GPU refuses this launch)")
        if not 0 <= int(shared_mem) <= self._max_dynamic:
            raise RuntimeError(f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the kernel's "
                               f"max_dynamic_shared_size_bytes of {self._max_dynamic} (a GPU refuses this launch)")
        dtypes = {"T": self._logit_dtype, "L": self._label_dtype}
        values = {}
        for (label, kind), value in zip(_POINTERS, args[:len(_POINTERS)], strict=True):
            nullable = kind.endswith("?")
            kind = kind.removesuffix("?")
            if nullable and isinstance(value, np.uint64) and value == 0:
                values[label] = None
            else:
                values[label] = _pointer(label, value, dtypes.get(kind, kind))
        for (label, kind), value in zip(self._scalars, args[len(_POINTERS):], strict=True):
            if type(value) is not kind:
                raise TypeError(f"{label} must be a {kind.__name__} scalar (CuPy passes Python numbers as "
                                f"64-bit), got {type(value).__name__}")
            values[label] = value.item()
        if not self.on_chip:
            values["threads_per_row"] = 0
        module = self._module
        first, last = (0, int(grid[0])) if module.blocks is None else module.blocks
        if last > int(grid[0]):
            raise ValueError(f"blocks {module.blocks} reach past the grid of {int(grid[0])} block(s)")
        module.launches.append((self.name, tuple(grid), tuple(block), int(shared_mem)))
        packed = _SceArgs(**values)
        rc = module._lib.emu_sce_launch(module._names[self.name], int(grid[0]), int(block[0]), int(shared_mem),
                                        ORDERS[module.order], module.seed, first, last, SHUFFLES[module.shuffles],
                                        ctypes.byref(packed))
        if rc != 0:
            raise RuntimeError(f"{self.name}: {module._lib.emu_last_error().decode()}")


def _pointer(label: str, a: Any, dtype: str) -> int:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{label} must be an array, got {type(a).__name__}")
    if a.dtype.name != dtype:
        raise TypeError(f"{label} must be {dtype} for this instance, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{label} must be C-contiguous: the kernel indexes it as a dense buffer")
    return a.ctypes.data
