"""A ``cupy.RawModule`` stand-in for any kernel source, on the CPU emulator (``emulator.h``).

:func:`build` compiles a ``kernels/*.cu`` with the host C++ compiler against the
emulator, together with a table of the template instances asked for
(``kernel_table.h``: each instance's name expression, parameter types and
``__launch_bounds__``). :class:`EmulatedRawModule` loads the library and answers
``get_function(name_expression)`` like ``cupy.RawModule``; the kernel it returns is
called like a ``cupy.RawKernel``, ``kernel(grid, block, args)``, with NumPy arrays
where CuPy takes device arrays. A host wrapper written against ``xp`` and
``get_function`` (``deepcore/backend/conv_kernels.py``) thus runs unchanged with
``xp=numpy``.

Stricter than CuPy on purpose, because CuPy passes whatever it gets as raw bytes:
each argument must have exactly the parameter's type (a pointer takes a
C-contiguous array of the pointed-to dtype, writeable unless ``const``; an ``int``
takes ``numpy.int32``, a ``long long`` ``numpy.int64``, a ``float``
``numpy.float32``), and an array a kernel writes must not overlap any other array
argument (the kernels declare their pointers ``__restrict__``). The softmax
cross-entropy kernels keep their own launcher (``emulated.py``, ``sce_launch.cpp``),
which also replays warp shuffles.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_HEADERS = (HERE / "emulator.h", HERE / "kernel_table.h", HERE / "include" / "cuda_fp16.h",
            HERE / "include" / "cuda_bf16.h", HERE / "include" / "cooperative_groups.h")
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}

# The pointed-to C type -> NumPy dtype name, and scalar C type -> (NumPy type, ctypes type).
_POINTEE_DTYPES = {"float": "float32", "double": "float64", "__half": "float16", "__nv_bfloat16": "bfloat16",
                   "int": "int32", "long long": "int64"}
_SCALARS = {"float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double),
            "int": (np.int32, ctypes.c_int), "long long": (np.int64, ctypes.c_longlong)}


def _emulated():
    """The sibling emulated.py (find_compiler, compile_library), where the tests have loaded it already."""
    module = sys.modules.get("emulated")
    if module is None:
        spec = importlib.util.spec_from_file_location("emulated", HERE / "emulated.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["emulated"] = module
        spec.loader.exec_module(module)
    return module


def unit_text(source: Path, instances: Mapping[str, str]) -> str:
    """The translation unit: ``source`` and a table of ``instances`` (name expression -> the C++
    expression of its largest block, normally the constant its ``__launch_bounds__`` names)."""
    if not instances:
        raise ValueError("instances must name at least one template instance")
    entries = ",\n".join(f"    EMU_KERNEL({bound}, {name})" for name, bound in instances.items())
    return "\n".join([
        '#include "emulator.h"',
        f'#include "{Path(source).resolve()}"',
        '#include "kernel_table.h"',
        "",
        "namespace {",
        "const emu_table::Entry kTable[] = {",
        entries,
        "};",
        "}  // namespace",
        "",
        "EMU_EXPORT_TABLE(kTable)",
        "",
    ])


def build(out_dir: Path, source: Path, instances: Mapping[str, str], *, compiler: str | None = None) -> Path:
    """Compile ``source`` with ``instances`` (see :func:`unit_text`) against the emulator into a
    shared library in ``out_dir``, reused while the sources and the instance list are unchanged."""
    text = unit_text(source, instances)
    key = text.encode() + b"".join(path.read_bytes() for path in (*_HEADERS, Path(source)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit = out_dir / f"{Path(source).stem}_table_{hashlib.sha256(key).hexdigest()[:16]}.cpp"
    if not unit.is_file():
        tmp = unit.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(unit)
    # -O0 (after compile_library's -O2, so it wins) halves the build, the bulk of a test run's time
    # here; the emulated kernels run small test shapes, where optimisation saves little.
    args = ["-O0", "-g", "-Wextra", "-Wno-unknown-pragmas", f"-I{HERE / 'include'}", f"-I{HERE}", str(unit)]
    return _emulated().compile_library(out_dir, f"{Path(source).stem}_emulated", key, args, compiler)


class EmulatedRawModule:
    """``cupy.RawModule`` stand-in over the library at ``lib`` (from :func:`build`).

    ``order`` ("forward", "reverse", or "shuffled" with ``seed``) is the order in
    which each block's threads run between switch points; ``blocks`` (a ``range``
    or ``(start, stop)``) runs only those blocks of each launch's grid, as in
    :class:`emulated.EmulatedModule`. ``launches`` logs ``(name, grid, block)``.
    """

    def __init__(self, lib: Path, *, order: str = "forward", seed: int = 0,
                 blocks: range | tuple[int, int] | None = None) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {tuple(ORDERS)}, got {order!r}")
        if blocks is not None:
            if isinstance(blocks, range) and blocks.step != 1:
                raise ValueError(f"blocks must be a contiguous range, got {blocks}")
            start, stop = (blocks.start, blocks.stop) if isinstance(blocks, range) else blocks
            if not 0 <= start <= stop:
                raise ValueError(f"blocks must satisfy 0 <= start <= stop, got {blocks}")
            blocks = (int(start), int(stop))
        lib_ = ctypes.CDLL(str(lib))
        lib_.emu_name.restype = ctypes.c_char_p
        lib_.emu_signature.restype = ctypes.c_char_p
        lib_.emu_last_error.restype = ctypes.c_char_p
        lib_.emu_max_threads.restype = ctypes.c_uint
        lib_.emu_launch.restype = ctypes.c_int
        lib_.emu_launch.argtypes = [ctypes.c_int, *([ctypes.c_uint] * 2), ctypes.c_int, *([ctypes.c_uint] * 3),
                                    ctypes.c_void_p]
        self._lib = lib_
        self._index = {lib_.emu_name(i).decode(): i for i in range(lib_.emu_count())}
        self.order = order
        self.seed = seed
        self.blocks = blocks
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    @property
    def name_expressions(self) -> tuple[str, ...]:
        return tuple(self._index)

    def max_threads(self, name_expression: str) -> int:
        """The instance's ``__launch_bounds__``, as its table entry states it."""
        return int(self._lib.emu_max_threads(self._index[name_expression]))

    def get_function(self, name_expression: str) -> EmulatedRawKernel:
        if name_expression not in self._index:
            raise KeyError(f"no emulated kernel {name_expression!r}; have {sorted(self._index)}")
        i = self._index[name_expression]
        return EmulatedRawKernel(self, name_expression, i, self._lib.emu_signature(i).decode().split(","))


class EmulatedRawKernel:
    """One template instance; called as ``kernel(grid, block, args)`` like ``cupy.RawKernel``."""

    def __init__(self, module: EmulatedRawModule, name: str, index: int, params: list[str]) -> None:
        self._module = module
        self.name = name
        self._index = index
        self.params = tuple(p for p in params if p)

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        if len(grid) != 1 or len(block) != 1:
            raise ValueError(f"only 1-D launches are emulated, got grid={grid} block={block}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments ({', '.join(self.params)}), "
                            f"got {len(args)}")
        values = [self._value(k, param, arg) for k, (param, arg) in enumerate(zip(self.params, args, strict=True))]
        arrays = [(k, arg) for k, arg in enumerate(args) if isinstance(arg, np.ndarray)]
        for k, a in arrays:
            if self.params[k].startswith("const "):
                continue
            for m, b in arrays:
                if m != k and a.size and b.size and np.shares_memory(a, b):
                    raise ValueError(f"{self.name}: argument {k} ({self.params[k]}) overlaps argument {m}; the "
                                     f"kernel's pointers are __restrict__")
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        module = self._module
        first, last = (0, int(grid[0])) if module.blocks is None else module.blocks
        if last > int(grid[0]):
            raise ValueError(f"blocks {module.blocks} reach past the grid of {int(grid[0])} block(s)")
        module.launches.append((self.name, tuple(int(g) for g in grid), tuple(int(b) for b in block)))
        rc = module._lib.emu_launch(self._index, int(grid[0]), int(block[0]), ORDERS[module.order], module.seed,
                                    first, last, ctypes.cast(argv, ctypes.c_void_p))
        if rc != 0:
            raise RuntimeError(f"{self.name}: {module._lib.emu_last_error().decode()}")

    def _value(self, k: int, param: str, arg: Any) -> Any:
        label = f"{self.name} argument {k} ({param})"
        if param.endswith("*"):
            pointee = param.removeprefix("const ").removesuffix("*")
            dtype = _POINTEE_DTYPES[pointee]
            if not isinstance(arg, np.ndarray):
                raise TypeError(f"{label} must be an array, got {type(arg).__name__}")
            if arg.dtype.name != dtype:
                raise TypeError(f"{label} must be {dtype}, got {arg.dtype}")
            if not arg.flags.c_contiguous:
                raise ValueError(f"{label} must be C-contiguous: the kernel indexes it as a dense buffer")
            if not param.startswith("const ") and not arg.flags.writeable:
                raise ValueError(f"{label} is written by the kernel but the array is read-only")
            return ctypes.c_void_p(arg.ctypes.data)
        kind, ctype = _SCALARS[param]
        if type(arg) is not kind:
            raise TypeError(f"{label} must be a {kind.__name__} scalar (CuPy passes Python numbers as 64-bit), "
                            f"got {type(arg).__name__}")
        return ctype(arg.item())
