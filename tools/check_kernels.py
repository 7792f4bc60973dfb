#!/usr/bin/env python3
"""Compile-check deepcore's CUDA kernels with nvcc and with CuPy's NVRTC, without a GPU.

For every ``kernels/*.cu`` this compiles every template instance that
``deepcore/backend/cuda_kernels.py`` lists in ``KERNEL_INSTANCES`` (the same
instances NVRTC builds at run time: the softmax cross-entropy's, and the
convolution and pooling kernels that ``conv_kernels.py`` launches), and the ElementwiseKernel bodies of
``deepcore/backend/elementwise_kernels.py`` (``ALL`` for float and double; ``RANDOM``, the dropout
mask with its uint64 scalars and CuPy's index ``i``, for every float type it is launched with), to a
cubin for each target architecture, with ``ptxas -v``. It prints one line per kernel and architecture
(registers, shared memory, stack frame, spill stores/loads) and exits 1 on any compile
error, any register spill, or a template kernel that no instance covers.
``--source NAME`` (repeatable) compiles only those units. An instance listed in
``INSTANCE_MIN_ARCH`` (sce_cluster's, which need sm_90's thread-block clusters) is compiled only
for the architectures at or above its minimum, in both passes.

``--nvrtc`` also compiles everything the way CuPy does at run time, through CuPy's own
path (``cupy._core.core.compile_with_cache`` into ``cupy.cuda.compiler``): each
``RawModule`` source with deepcore's options and its name expressions, and each
ElementwiseKernel as CuPy generates it (``cupy._core._kernel._get_elementwise_kernel_code``:
its typedefs, ``CArray`` parameters, ``CUPY_FOR`` loop and ``i``) for every dtype the backend
launches it with; CuPy adds its headers, include paths, ``--std=c++17``, ``-ftz=true`` and
``--device-as-default-execution-space``. No GPU is needed: only the two device queries on that
path (the architecture, and loading the cubin) are replaced, the first by ``--arch``, the
second by keeping the cubin. ``--nvrtc`` works without nvcc (the nvcc pass is then skipped);
``--no-nvcc`` skips it on purpose.

Without nvcc (and without ``--nvrtc``) it prints ``skipped: nvcc not found`` and exits 0, or
exits 2 with ``--require-nvcc``. ``main(argv)`` returns the exit code, for tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO / "kernels"
CUDA_KERNELS_PY = REPO / "deepcore" / "backend" / "cuda_kernels.py"
ELEMENTWISE_PY = REPO / "deepcore" / "backend" / "elementwise_kernels.py"
# Ampere (A100) and Hopper (H100): the GPUs deepcore targets. Register use and
# spills differ per architecture, so each is checked separately.
DEFAULT_ARCHS = ("sm_80", "sm_90")
# Same language level as the NVRTC options in cuda_kernels.py.
NVCC_FLAGS = ("-std=c++17", "-Xptxas", "-v", "-Werror", "all-warnings")
COMPILE_TIMEOUT_S = 300

_TEMPLATE_KERNEL = re.compile(
    r"template\s*<[^;{]*?>\s*__global__\s+void\s+(?:(?:__launch_bounds__|__cluster_dims__)\s*\([^)]*\)\s*)*(\w+)\s*\(",
    re.DOTALL,
)
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class FunctionReport:
    mangled: str
    arch: str
    entry: bool = False
    registers: int | None = None
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""


@dataclass
class CompileResult:
    source: Path
    arch: str
    ok: bool
    command: list[str]
    log: str
    functions: list[FunctionReport] = field(default_factory=list)


def find_nvcc(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _load_by_path(name: str, path: Path):
    """A module of deepcore loaded from its file, so that neither the deepcore package
    nor CuPy has to import on the CI machine."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def load_instances() -> dict[str, tuple[str, ...]]:
    """KERNEL_INSTANCES from cuda_kernels.py."""
    return dict(_load_by_path("_deepcore_cuda_kernels", CUDA_KERNELS_PY).KERNEL_INSTANCES)


def load_min_arch() -> dict[str, int]:
    """INSTANCE_MIN_ARCH from cuda_kernels.py: name expression -> the first sm_NN it exists for."""
    return dict(getattr(_load_by_path("_deepcore_cuda_kernels", CUDA_KERNELS_PY), "INSTANCE_MIN_ARCH", {}))


def arch_number(arch: str) -> int:
    """``sm_90`` / ``compute_90`` / ``90`` -> 90 (``sm_90a`` too)."""
    return int(re.sub(r"\D", "", arch.removeprefix("sm_").removeprefix("compute_")) or 0)


def for_arch(instances: tuple[str, ...], arch: str, min_arch: dict[str, int]) -> tuple[str, ...]:
    """The instances that exist for ``arch``."""
    return tuple(i for i in instances if arch_number(arch) >= min_arch.get(i, 0))


ELEMENTWISE_UNIT = "elementwise_kernels"  # how the generated unit is named in the report
#: CuPy's C types for the fixed-type parameters (``cupy._core._kernel._get_typename``).
ELEMENTWISE_CTYPES = {"int32": "int", "uint64": "unsigned long long", "float32": "float", "float64": "double"}
#: nvcc's types for T (CuPy has its own ``float16`` / ``bfloat16`` classes; the --nvrtc pass uses those).
NVCC_T = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
#: The dtypes the CUDA backend launches each group of bodies with: ``ALL`` only for float32/float64
#: (``cupy_backend._fusable``), the dropout mask (``RANDOM``) for every floating dtype.
ELEMENTWISE_DTYPES = {"ALL": ("float32", "float64"), "RANDOM": ("float16", "bfloat16", "float32", "float64")}
#: The inputs the host code passes as arrays; every other input is a scalar (``lr``, ``slope``,
#: ``nesterov``, the dropout mask's ``key``, ...). tests/test_cuda.py checks this against the host code.
ARRAY_INPUTS = frozenset({"g", "x", "dy", "y"})


def elementwise_specs() -> list[tuple[Any, tuple[str, ...]]]:
    """Every ElementwiseSpec with the dtypes it is launched with."""
    ek = _load_by_path("_deepcore_elementwise_kernels", ELEMENTWISE_PY)
    return [(spec, ELEMENTWISE_DTYPES[group]) for group in ("ALL", "RANDOM") for spec in getattr(ek, group)]


def elementwise_unit() -> tuple[str, tuple[str, ...]]:
    """The CUDA backend's ElementwiseKernel bodies as __global__ templates over T (the types the
    backend launches them with), bound as CuPy binds them: inputs by value, outputs by reference,
    uint64 as ``unsigned long long`` and CuPy's flat index ``i`` (a ``ptrdiff_t``, as ``CUPY_FOR``
    declares it) in scope. Returns the unit's text and its instances."""
    lines = ["#include <cstddef>", "#include <cuda_fp16.h>", "#include <cuda_bf16.h>", ""]
    instances = []
    for spec, dtypes in elementwise_specs():
        params = spec.params()
        args = ", ".join(f"{'' if out else 'const '}{ELEMENTWISE_CTYPES.get(t, t)}* {name}_p"
                         for t, name, out in params)
        lines += ["template <typename T>", f"__global__ void {spec.name}(long long _n, {args}) {{",
                  "    const long long _i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;",
                  "    if (_i >= _n) return;",
                  "    [[maybe_unused]] const ptrdiff_t i = _i;"]
        for t, name, out in params:
            ctype = ELEMENTWISE_CTYPES.get(t, t)
            lines.append(f"    {ctype}& {name} = {name}_p[_i];" if out else f"    const {ctype} {name} = {name}_p[_i];")
        lines += ["    {" + spec.body + "}", "}", ""]
        instances += [f"{spec.name}<{NVCC_T[d]}>" for d in dtypes]
    return "\n".join(lines), tuple(instances)


def template_kernels(source_text: str) -> set[str]:
    return set(_TEMPLATE_KERNEL.findall(source_text))


def instance_unit(source: Path | str, instances: tuple[str, ...]) -> str:
    """A translation unit with ``source`` (a file to include, or the text itself) that takes
    the address of each instance, which makes nvcc instantiate and emit exactly those kernels."""
    lines = [f'#include "{source.resolve()}"' if isinstance(source, Path) else source, ""]
    if instances:
        # extern: a used-looking definition, so no "declared but never referenced" warning.
        lines.append("extern void* const deepcore_check_instances[];")
        lines.append("void* const deepcore_check_instances[] = {")
        lines.extend(f"    (void*)&{inst}," for inst in instances)
        lines.append("};")
    return "\n".join(lines) + "\n"


def parse_ptxas(log: str) -> list[FunctionReport]:
    reports: dict[tuple[str, str], FunctionReport] = {}
    entry: FunctionReport | None = None
    props: FunctionReport | None = None
    arch = ""
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            arch = m.group(2)
            entry = reports.setdefault((m.group(1), arch), FunctionReport(m.group(1), arch))
            entry.entry = True
        elif m := _PROPS.search(line):
            # Non-entry device functions (not inlined) get their own properties; a spill there counts too.
            props = reports.setdefault((m.group(1), arch), FunctionReport(m.group(1), arch))
        elif (m := _FRAME.search(line)) and props is not None:
            props.stack, props.spill_stores, props.spill_loads = (int(g) for g in m.groups())
            props = None
        elif (m := _USED.search(line)) and entry is not None:
            entry.registers = int(m.group(1))
            if s := _SMEM.search(line):
                entry.smem = int(s.group(1))
            entry = None
    return list(reports.values())


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines, strict=True))


def short_name(demangled: str) -> str:
    """``void k<float, int>(float const*, ...)`` -> ``k<float, int>``."""
    name = demangled.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return name[:i]
    return name


def compile_one(nvcc: str, source: Path, instances: tuple[str, ...], arch: str, workdir: Path,
                text: str | None = None) -> CompileResult:
    """Compile the instances of ``source`` (or of ``text``, reported under ``source``'s name)."""
    unit = workdir / f"{source.stem}.{arch}.check.cu"
    unit.write_text(instance_unit(source if text is None else text, instances), encoding="utf-8")
    cubin = workdir / f"{source.stem}.{arch}.cubin"
    cmd = [nvcc, *NVCC_FLAGS, "-cubin", f"-arch={arch}", "-o", str(cubin), str(unit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return CompileResult(source, arch, False, cmd, f"timed out after {COMPILE_TIMEOUT_S} s")
    log = proc.stdout + proc.stderr
    return CompileResult(source, arch, proc.returncode == 0, cmd, log, parse_ptxas(log))


#: The options deepcore's RawModules are built with (cuda_kernels.compiled_function; tests/test_cuda.py
#: checks that the two agree).
RAWMODULE_OPTIONS = ("-std=c++17",)


@dataclass
class CupyCompiled:
    cubin: bytes
    options: tuple[str, ...]  # what NVRTC was handed, CuPy's additions included
    mapping: dict[str, str] | None  # name expression -> lowered name (RawModule)


class CupyCompiler:
    """CuPy's run-time compile path (``cupy._core.core.compile_with_cache`` -> ``cupy.cuda.compiler``)
    with no device: the architecture comes from the caller instead of the current device, and the
    cubin is kept instead of loaded. Everything else (headers, include paths, options, NVRTC) is
    CuPy's own. Needs CuPy and libnvrtc, not a GPU or a driver."""

    def __init__(self) -> None:
        import cupy
        from cupy._core import _carray, _kernel, core
        from cupy.cuda import compiler, function

        self.cupy, self.core, self.compiler, self.kernel, self.carray = cupy, core, compiler, _kernel, _carray
        self.function = function
        self.nvrtc_version = compiler._get_nvrtc_version()  # loads libnvrtc: fails here if it is missing

    @contextlib.contextmanager
    def _without_device(self, seen: dict[str, Any]) -> Iterator[None]:
        compiler, function = self.compiler, self.function

        def arch_options(arch: str | None = None) -> tuple[str, str]:
            # compiler._get_arch_for_options_for_nvrtc without its per-device memo (which asks the driver).
            if not compiler._use_ptx and int(arch) <= int(compiler._get_max_compute_capability()):
                return f"-arch=sm_{arch}", "cubin"
            return f"-arch=compute_{arch}", "ptx"

        class KeptModule(function.Module):
            def load(self, cubin: bytes) -> None:  # instead of cuModuleLoadData, which needs a driver
                seen["cubin"] = bytes(cubin)

        class Program(compiler._NVRTCProgram):
            def compile(self, options: tuple[str, ...] = (), log_stream: Any = None) -> Any:
                if self.src:  # not CuPy's empty-file preprocess
                    seen["options"] = tuple(options)
                obj, mapping = super().compile(options, log_stream)
                if self.src:
                    seen["mapping"] = dict(mapping) if mapping else None
                return obj, mapping

        saved = {name: getattr(compiler, name) for name in ("_get_arch_for_options_for_nvrtc", "function",
                                                             "_NVRTCProgram")}
        saved_env = os.environ.get("CUPY_CACHE_IN_MEMORY")
        compiler._get_arch_for_options_for_nvrtc = arch_options
        compiler.function = type(function)("cupy.cuda.function")
        compiler.function.Module, compiler.function.LinkState = KeptModule, function.LinkState
        compiler._NVRTCProgram = Program
        os.environ["CUPY_CACHE_IN_MEMORY"] = "1"  # compile every time; never read or write ~/.cupy
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(compiler, name, value)
            if saved_env is None:
                os.environ.pop("CUPY_CACHE_IN_MEMORY", None)
            else:
                os.environ["CUPY_CACHE_IN_MEMORY"] = saved_env

    def raw_module(self, text: str, name_expressions: tuple[str, ...], arch: str) -> CupyCompiled:
        """As ``cupy.RawModule(code=text, options=RAWMODULE_OPTIONS, name_expressions=...)`` compiles."""
        seen: dict[str, Any] = {}
        with self._without_device(seen):
            self.core.compile_with_cache(text, RAWMODULE_OPTIONS, arch, prepend_cupy_headers=False,
                                         name_expressions=list(name_expressions))
        return CupyCompiled(seen["cubin"], seen["options"], seen.get("mapping"))

    def elementwise_code(self, spec: Any, dtype: str) -> str:
        """The source CuPy generates for ``ElementwiseKernel(spec...)`` called with 1-D contiguous
        arrays of ``dtype`` for T (and for the array inputs) and scalars for the other inputs."""
        import numpy

        cupy, kernel = self.cupy, self.kernel
        k = cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.body, spec.name)
        t = _numpy_dtype(dtype)
        ins = [(ty, name) for ty, name, out in spec.params() if not out]
        outs = [(ty, name) for ty, name, out in spec.params() if out]

        def dt(ty: str) -> Any:
            return t if ty == "T" else numpy.dtype(ty)

        in_dtypes = tuple(dt(ty) if name in ARRAY_INPUTS or ty != "T" else None for ty, name in ins)
        _, _, type_map = k._decide_params_type(in_dtypes, tuple(dt(ty) for ty, _ in outs))
        # CuPy's _ArgInfo kinds: 1 ndarray, 2 indexer, 3 scalar (cupy/_core/_kernel.pxd).
        arginfos = [kernel._ArgInfo(1, cupy.ndarray, dt(ty), 1, True, True) if name in ARRAY_INPUTS
                    else kernel._ArgInfo(3, dt(ty).type, dt(ty), 0, True, True) for ty, name in ins]
        arginfos += [kernel._ArgInfo(1, cupy.ndarray, dt(ty), 1, True, True) for ty, _ in outs]
        arginfos.append(kernel._ArgInfo(2, self.carray.Indexer, None, 1, True, True))
        return kernel._get_elementwise_kernel_code(tuple(arginfos), type_map, k.params, k.operation, k.name,
                                                   k.preamble, "", "", ())

    def elementwise(self, spec: Any, dtype: str, arch: str) -> CupyCompiled:
        """As CuPy compiles that kernel on its first call (``compile_with_cache(code, options=())``)."""
        code = self.elementwise_code(spec, dtype)
        seen: dict[str, Any] = {}
        with self._without_device(seen):
            self.core.compile_with_cache(code, (), arch)
        return CupyCompiled(seen["cubin"], seen["options"], None)


def _numpy_dtype(name: str) -> Any:
    import numpy

    if name == "bfloat16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(name)


def nvrtc_checks(sources: list[Path], registry: dict[str, tuple[str, ...]], archs: tuple[str, ...],
                 elementwise: bool, min_arch: dict[str, int] | None = None) -> list[str]:
    """Every RawModule source and (``elementwise``) every ElementwiseKernel through CuPy's own NVRTC
    path, per architecture; returns the errors."""
    try:
        cc = CupyCompiler()
    except Exception as exc:  # ImportError, or CUDA's library finder failing with its own error type
        return [f"--nvrtc needs CuPy and libnvrtc: {type(exc).__name__}: {exc}"]
    errors: list[str] = []
    shown = False
    for arch in archs:
        num = arch.removeprefix("sm_").removeprefix("compute_")
        for source in sources:
            instances = for_arch(registry.get(source.name, ()), arch, min_arch or {})
            try:
                res = cc.raw_module(source.read_text(encoding="utf-8"), instances, num)
            except Exception as exc:  # CompileException carries NVRTC's log
                errors.append(f"{source.name} [{arch}]: CuPy NVRTC: {type(exc).__name__}: {exc}")
                continue
            missing = [i for i in instances if not (res.mapping or {}).get(i)]
            if missing or not res.cubin:
                errors.append(f"{source.name} [{arch}]: CuPy NVRTC lowered no name for {', '.join(missing)}")
                continue
            if not shown:
                print(f"NVRTC {'.'.join(map(str, cc.nvrtc_version))} through CuPy {cc.cupy.__version__}'s compile "
                      f"path; RawModule options as at run time: {' '.join(res.options)}")
                shown = True
            print(f"{arch:6} NVRTC {source.name}: {len(instances)} instance(s) ok")
        if not elementwise:
            continue
        count = 0
        for spec, dtypes in elementwise_specs():
            for dtype in dtypes:
                try:
                    res = cc.elementwise(spec, dtype, num)
                except Exception as exc:
                    errors.append(f"{ELEMENTWISE_UNIT} {spec.name} T={dtype} [{arch}]: CuPy NVRTC: "
                                  f"{type(exc).__name__}: {exc}")
                    continue
                if spec.name.encode() not in res.cubin:
                    errors.append(f"{ELEMENTWISE_UNIT} {spec.name} T={dtype} [{arch}]: no {spec.name} in the cubin")
                    continue
                if "-ftz=true" not in res.options:
                    errors.append(f"{spec.name} [{arch}]: CuPy no longer adds -ftz=true: {' '.join(res.options)}")
                count += 1
                last = res
        if count:
            print(f"{arch:6} NVRTC {ELEMENTWISE_UNIT}: {count} ElementwiseKernel(s) ok, as CuPy generates them "
                  f"(options: {' '.join(o for o in last.options if not o.startswith('-I'))})")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-nvcc", action="store_true", help="exit 2 instead of skipping when nvcc is missing")
    parser.add_argument("--nvcc", help="nvcc to use (default: PATH, $CUDA_HOME, /usr/local/cuda)")
    parser.add_argument("--arch", action="append", help=f"target, repeatable (default: {' '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--kernels-dir", type=Path, default=KERNELS_DIR, help="folder of .cu files")
    parser.add_argument("--nvrtc", action="store_true",
                        help="also compile through CuPy's own NVRTC path, as at run time (needs CuPy + libnvrtc, "
                             "no GPU, no nvcc)")
    parser.add_argument("--no-nvcc", action="store_true", help="skip the nvcc pass (with --nvrtc: NVRTC only)")
    parser.add_argument("--source", action="append", metavar="NAME",
                        help=f"check only this .cu file of --kernels-dir, or {ELEMENTWISE_UNIT} for the "
                             "ElementwiseKernel bodies; repeatable (default: all of them)")
    args = parser.parse_args(argv)

    nvcc = None if args.no_nvcc else find_nvcc(args.nvcc)
    if nvcc is None and not args.no_nvcc:
        if args.require_nvcc or not args.nvrtc:
            print("check_kernels: skipped: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
            return 2 if args.require_nvcc else 0
        print("check_kernels: nvcc not found: the NVRTC pass only")
    if args.no_nvcc and not args.nvrtc:
        print("check_kernels: error: --no-nvcc without --nvrtc checks nothing")
        return 1

    archs = tuple(args.arch or DEFAULT_ARCHS)
    sources = sorted(Path(args.kernels_dir).glob("*.cu"))
    if not sources:
        print(f"check_kernels: error: no .cu files in {args.kernels_dir}")
        return 1
    registry = load_instances()
    min_arch = load_min_arch()
    errors: list[str] = []

    # The registry is checked against every source even when --source narrows what is compiled.
    for source in sources:
        listed = registry.get(source.name, ())
        covered = {inst.split("<", 1)[0].strip() for inst in listed}
        for kernel in sorted(template_kernels(source.read_text(encoding="utf-8")) - covered):
            errors.append(f"{source.name}: template kernel {kernel} has no instance in KERNEL_INSTANCES")
    for name in sorted(set(registry) - {s.name for s in sources}):
        errors.append(f"KERNEL_INSTANCES lists {name}, which is not in {args.kernels_dir}")

    # The ElementwiseKernel bodies are checked as one more unit: CuPy compiles them at run
    # time inside its own wrapper, so a typo there would otherwise first show on a GPU.
    ew_text, ew_instances = elementwise_unit()
    ew_source = Path(f"{ELEMENTWISE_UNIT}.cu")
    registry[ew_source.name] = ew_instances
    units = [*sources, ew_source]
    if args.source:
        known = {u.name: u for u in units} | {ew_source.stem: ew_source}
        unknown = sorted(set(args.source) - set(known))
        if unknown:
            print(f"check_kernels: error: --source {', '.join(unknown)}: not among {', '.join(sorted(known))}")
            return 1
        units = [u for u in units if u.name in args.source or u.stem in args.source]
        sources = [u for u in units if u != ew_source]

    def run(job: tuple[Path, str]) -> CompileResult:
        source, arch = job
        text = ew_text if source == ew_source else None
        return compile_one(nvcc, source, for_arch(registry.get(source.name, ()), arch, min_arch), arch, Path(tmp),
                           text)

    results: list[CompileResult] = []
    if nvcc is not None:
        with tempfile.TemporaryDirectory(prefix="check_kernels.") as tmp:
            jobs = [(s, a) for s in units for a in archs]
            workers = max(1, min(len(jobs), os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(run, jobs))
        print(f"check_kernels: {nvcc}, archs {' '.join(archs)}")
        print(f"{'arch':6} {'kernel':44} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st':>8} {'spill ld':>8}")

    names = demangle(sorted({f.mangled for r in results for f in r.functions}))
    for res in results:
        rel = res.source.name
        if not res.ok:
            errors.append(f"{rel} [{res.arch}]: compile failed: {' '.join(res.command)}\n{res.log.rstrip()}")
            continue
        seen = set()
        for f in sorted(res.functions, key=lambda f: (not f.entry, names.get(f.mangled, f.mangled))):
            f.name = short_name(names.get(f.mangled, f.mangled))
            seen.add(f.name.replace(" ", ""))
            regs = "-" if f.registers is None else str(f.registers)
            label = f.name if f.entry else f"{f.name} (device fn)"
            print(f"{res.arch:6} {label:44} {regs:>4} {f.smem:>5}B {f.stack:>4}B "
                  f"{f.spill_stores:>7}B {f.spill_loads:>7}B")
            if f.spill_stores or f.spill_loads:
                errors.append(f"{rel} [{res.arch}] {f.name}: spills {f.spill_stores} B stores / "
                              f"{f.spill_loads} B loads")
        for inst in for_arch(registry.get(rel, ()), res.arch, min_arch):
            if inst.replace(" ", "") not in seen:
                errors.append(f"{rel} [{res.arch}]: no ptxas report for instance {inst}")

    if args.nvrtc:
        errors.extend(nvrtc_checks(sources, registry, archs, elementwise=ew_source in units, min_arch=min_arch))

    if errors:
        for e in errors:
            print(f"check_kernels: error: {e}")
        return 1
    what = f"{len(sources)} source(s)" + (" and the elementwise kernels" if ew_source in units else "")
    passes = " + ".join(p for p, on in (("nvcc", nvcc is not None), ("CuPy NVRTC", args.nvrtc)) if on)
    print(f"check_kernels: ok: {what} x {len(archs)} arch(s) ({passes})" + (", no spills" if nvcc else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
