#!/usr/bin/env python3
"""Compile-check deepcore's CUDA kernels with nvcc, without a GPU.

For every ``kernels/*.cu`` this compiles every template instance that
``deepcore/backend/cuda_kernels.py`` lists in ``KERNEL_INSTANCES`` (the same
instances NVRTC builds at run time: the softmax cross-entropy's, and the
convolution and pooling kernels that ``conv_kernels.py`` launches), and the ElementwiseKernel bodies of
``deepcore/backend/elementwise_kernels.py`` for float and double, to a cubin
for each target architecture, with ``ptxas -v``. It prints one line per kernel and architecture (registers,
shared memory, stack frame, spill stores/loads) and exits 1 on any compile
error, any register spill, or a template kernel that no instance covers.
``--source NAME`` (repeatable) compiles only those units.

Without nvcc it prints ``skipped: nvcc not found`` and exits 0, or exits 2
with ``--require-nvcc``. ``main(argv)`` returns the exit code, for tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

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
    r"template\s*<[^;{]*?>\s*__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", re.DOTALL
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


ELEMENTWISE_UNIT = "elementwise_kernels"  # how the generated unit is named in the report


def elementwise_unit() -> tuple[str, tuple[str, ...]]:
    """The CUDA backend's ElementwiseKernel bodies as __global__ templates over T (float and
    double, the types the backend launches them with), bound as CuPy binds them: inputs by
    value, outputs by reference. Returns the unit's text and its instances."""
    specs = _load_by_path("_deepcore_elementwise_kernels", ELEMENTWISE_PY).ALL
    fixed = {"int32": "int", "float32": "float", "float64": "double"}
    lines, instances = [], []
    for spec in specs:
        params = spec.params()
        args = ", ".join(f"{'' if out else 'const '}{fixed.get(t, t)}* {name}_p" for t, name, out in params)
        lines += ["template <typename T>", f"__global__ void {spec.name}(long long _n, {args}) {{",
                  "    const long long _i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;",
                  "    if (_i >= _n) return;"]
        for t, name, out in params:
            ctype = fixed.get(t, t)
            lines.append(f"    {ctype}& {name} = {name}_p[_i];" if out else f"    const {ctype} {name} = {name}_p[_i];")
        lines += ["    {" + spec.body + "}", "}", ""]
        instances += [f"{spec.name}<float>", f"{spec.name}<double>"]
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


def cuda_include_dir(nvcc: str) -> Path:
    """The toolkit's include folder (where cuda_fp16.h is); nvcc may be a wrapper script."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parents[1]),
             "/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return Path("/usr/local/cuda/include")


def nvrtc_check(source: Path, instances: tuple[str, ...], archs: tuple[str, ...], include_dir: Path) -> list[str]:
    """Compile ``source`` the way ``cupy.RawModule`` does at run time (NVRTC,
    name expressions), through CuPy's NVRTC bindings: needs CuPy and libnvrtc,
    not a GPU. ``-I`` stands in for the CUDA include path CuPy adds itself."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()  # loads libnvrtc, which CuPy looks for only now
    except Exception as exc:  # ImportError, or CUDA's library finder failing with its own error type
        return [f"--nvrtc needs CuPy's NVRTC bindings and libnvrtc: {type(exc).__name__}: {exc}"]
    errors = []
    text = source.read_text(encoding="utf-8")
    for arch in archs:
        prog = nvrtc.createProgram(text, source.name, (), ())
        try:
            for inst in instances:
                nvrtc.addNameExpression(prog, inst)
            try:
                nvrtc.compileProgram(prog, ("-std=c++17", f"-arch={arch}", f"-I{include_dir}"))
                for inst in instances:
                    nvrtc.getLoweredName(prog, inst)
            except nvrtc.NVRTCError as exc:  # the program log says why
                errors.append(f"{source.name} [{arch}]: NVRTC: {exc}\n{nvrtc.getProgramLog(prog).rstrip()}")
                continue
            print(f"{arch:6} NVRTC {source.name}: {len(instances)} instance(s) ok")
        finally:
            nvrtc.destroyProgram(prog)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-nvcc", action="store_true", help="exit 2 instead of skipping when nvcc is missing")
    parser.add_argument("--nvcc", help="nvcc to use (default: PATH, $CUDA_HOME, /usr/local/cuda)")
    parser.add_argument("--arch", action="append", help=f"target, repeatable (default: {' '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--kernels-dir", type=Path, default=KERNELS_DIR, help="folder of .cu files")
    parser.add_argument("--nvrtc", action="store_true",
                        help="also compile with NVRTC via CuPy, as at run time (needs CuPy + libnvrtc, no GPU)")
    parser.add_argument("--source", action="append", metavar="NAME",
                        help=f"check only this .cu file of --kernels-dir, or {ELEMENTWISE_UNIT} for the "
                             "ElementwiseKernel bodies; repeatable (default: all of them)")
    args = parser.parse_args(argv)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_kernels: skipped: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return 2 if args.require_nvcc else 0

    archs = tuple(args.arch or DEFAULT_ARCHS)
    sources = sorted(Path(args.kernels_dir).glob("*.cu"))
    if not sources:
        print(f"check_kernels: error: no .cu files in {args.kernels_dir}")
        return 1
    registry = load_instances()
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
        return compile_one(nvcc, source, registry.get(source.name, ()), arch, Path(tmp), text)

    with tempfile.TemporaryDirectory(prefix="check_kernels.") as tmp:
        jobs = [(s, a) for s in units for a in archs]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            results = list(pool.map(run, jobs))

    names = demangle(sorted({f.mangled for r in results for f in r.functions}))
    print(f"check_kernels: {nvcc}, archs {' '.join(archs)}")
    print(f"{'arch':6} {'kernel':44} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st':>8} {'spill ld':>8}")
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
        for inst in registry.get(rel, ()):
            if inst.replace(" ", "") not in seen:
                errors.append(f"{rel} [{res.arch}]: no ptxas report for instance {inst}")

    if args.nvrtc:
        include_dir = cuda_include_dir(nvcc)
        for source in sources:
            errors.extend(nvrtc_check(source, registry.get(source.name, ()), archs, include_dir))

    if errors:
        for e in errors:
            print(f"check_kernels: error: {e}")
        return 1
    what = f"{len(sources)} source(s)" + (" and the elementwise kernels" if ew_source in units else "")
    print(f"check_kernels: ok: {what} x {len(archs)} arch(s), no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
