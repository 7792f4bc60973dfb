"""Run the CUDA backend's ElementwiseKernel bodies (deepcore/backend/elementwise_kernels.py) on the CPU.

:func:`build` writes one C++ function per kernel and type (float, double) with the kernel's
body pasted in verbatim, bound the way CuPy binds it: each input a by-value ``T`` (or
``int``) read from its array, or the same scalar for every element; each output a ``T&``
into its array, so a parameter that is both read and written updates in place; ``i`` is the
element's flat index, as in CuPy. The compiled library is called through
:class:`EmulatedElementwise`, which takes arguments the way ``cupy.ElementwiseKernel.__call__``
does (inputs, then optional outputs; Python scalars cast to ``T``) with NumPy arrays, and
returns the outputs.

Stricter than CuPy: every array must have the same shape (no broadcasting) and be
C-contiguous, and every ``T`` array the same dtype. Host ``exp``/``sqrt`` stand in for
CUDA's, and the build keeps the compiler from contracting ``a*b+c`` into FMAs, so results
follow C++'s evaluation order exactly (a GPU may fuse, so GPU results differ in the last bit).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_TYPES = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}
_FIXED = {"int32": ("int", np.dtype(np.int32)), "float32": ("float", np.dtype(np.float32)),
          "float64": ("double", np.dtype(np.float64)), "uint64": ("unsigned long long", np.dtype(np.uint64))}


def _emulated():
    """The sibling emulated.py (find_compiler, compile_library), where the tests have loaded it already."""
    module = sys.modules.get("emulated")
    if module is None:
        spec = importlib.util.spec_from_file_location("emulated", HERE / "emulated.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["emulated"] = module
        spec.loader.exec_module(module)
    return module


def _ctype(param_type: str, t: str) -> str:
    if param_type == "T":
        return t
    if param_type in _FIXED:
        return _FIXED[param_type][0]
    raise ValueError(f"emulator: unsupported ElementwiseKernel parameter type {param_type!r}")


def source(specs) -> str:
    """C++ for every spec, instantiated for float and double."""
    lines = ["#include <cmath>", "using std::exp; using std::fabs; using std::sqrt; using std::tanh;", ""]
    for spec in specs:
        params = spec.params()
        for t in _TYPES:
            signature = f"void {spec.name}_{t}(long long _n, void* const* _ptr, const long long* _step)"
            lines.append(f'extern "C" {signature} {{')
            lines.append(f"    using T = {t};")
            lines.append("    for (long long _i = 0; _i < _n; ++_i) {")
            lines.append("        const long long i = _i;  // CuPy's flat index of the element")
            for k, (ptype, name, is_output) in enumerate(params):
                ct = _ctype(ptype, t)
                if is_output:
                    lines.append(f"        {ct}& {name} = static_cast<{ct}*>(_ptr[{k}])[_i];")
                else:
                    read = f"static_cast<const {ct}*>(_ptr[{k}])[_i * _step[{k}]]"
                    lines.append(f"        const {ct} {name} = {read};")
            lines.append("        {" + spec.body + "}")
            lines.append("    }")
            lines.append("}")
            lines.append("")
    return "\n".join(lines)


def build(out_dir: Path, specs, compiler: str | None = None) -> Path:
    """Compile ``specs`` into a shared library in ``out_dir`` (reused while the source is unchanged)."""
    text = source(specs)
    cpp = Path(out_dir) / f"elementwise_{hashlib.sha256(text.encode()).hexdigest()[:16]}.cpp"
    cpp.parent.mkdir(parents=True, exist_ok=True)
    cpp.write_text(text)
    args = ["-ffp-contract=off", "-Wno-unused-variable", str(cpp)]
    return _emulated().compile_library(out_dir, "elementwise", text.encode(), args, compiler)


class EmulatedElementwise:
    """``cupy.ElementwiseKernel`` stand-in for one spec, over the library :func:`build` made."""

    def __init__(self, lib: Path, spec) -> None:
        self.spec = spec
        self._params = spec.params()
        cdll = ctypes.CDLL(str(lib))
        self._fns = {}
        for t, dtype in _TYPES.items():
            fn = getattr(cdll, f"{spec.name}_{t}")
            fn.restype = None
            fn.argtypes = [ctypes.c_longlong, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong)]
            self._fns[dtype] = fn

    def __call__(self, *args: Any) -> Any:
        params = self._params
        n_in = sum(not out for _, _, out in params)
        if len(args) not in (n_in, len(params)):
            raise TypeError(f"{self.spec.name} takes {n_in} inputs and optionally {len(params) - n_in} outputs, "
                            f"got {len(args)} arguments")
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        t_arrays = [a for a, (ptype, _, _) in zip(args, params, strict=False)
                    if isinstance(a, np.ndarray) and ptype == "T"]
        if not t_arrays:
            raise TypeError(f"{self.spec.name}: T is decided by an array argument, got none")
        dtype = t_arrays[0].dtype
        if dtype not in self._fns or any(a.dtype != dtype for a in t_arrays):
            raise TypeError(f"{self.spec.name}: T arrays must share one dtype of float32/float64, got "
                            f"{[str(a.dtype) for a in t_arrays]}")
        shape = arrays[0].shape
        for a in arrays:
            if a.shape != shape or not a.flags.c_contiguous:
                raise ValueError(f"{self.spec.name}: the emulator takes C-contiguous arrays of one shape, got "
                                 f"{a.shape} (contiguous={a.flags.c_contiguous}) next to {shape}")
        values = list(args) + [np.empty(shape, dtype) for _ in range(len(params) - len(args))]
        keep, ptrs, steps = [], [], []
        for value, (ptype, name, is_output) in zip(values, params, strict=True):
            want = dtype if ptype == "T" else _FIXED[ptype][1]
            if isinstance(value, np.ndarray):
                if value.dtype != want:
                    raise TypeError(f"{self.spec.name}: {name} must be {want}, got {value.dtype}")
                if is_output and not value.flags.writeable:
                    raise ValueError(f"{self.spec.name}: output {name} is read-only")
                arr, step = value, 1
            elif is_output:
                raise TypeError(f"{self.spec.name}: output {name} must be an array, got {type(value).__name__}")
            else:
                arr, step = np.array([value], dtype=want), 0  # a scalar: cast to the parameter's type, as CuPy does
            keep.append(arr)
            ptrs.append(arr.ctypes.data)
            steps.append(step)
        n = int(np.prod(shape))
        self._fns[dtype](n, (ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_longlong * len(steps))(*steps))
        outs = tuple(v for v, (_, _, is_output) in zip(values, params, strict=True) if is_output)
        return outs[0] if len(outs) == 1 else outs
