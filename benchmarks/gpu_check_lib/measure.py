"""Stages c to e: copy bandwidth, the bf16 probe and one timed, checked and measured case."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .common import COPY_BYTES, Recorder, case_bytes, err, fmt_num, log, row_slack
from .gpu import Gpu


def measure_copy_bandwidth(g: Gpu, quick: bool) -> dict[str, Any]:
    """Stage c: the device's copy ceiling, the faster of cudaMemcpy D2D and a CuPy copy kernel on 2 GiB."""
    res = _time_copies(g, quick)
    g.free()  # the 2 x 2 GiB buffers died with _time_copies' frame; give the pool blocks back
    return res


def _time_copies(g: Gpu, quick: bool) -> dict[str, Any]:
    # The buffers are locals here, captured by the closures below, and are released when this returns
    # (not by `del`: deleting a name that a closure captures leaves the closure with an unbound name).
    cp = g.cp
    n = COPY_BYTES // 4
    src = cp.random.RandomState(7).standard_normal(n, dtype=cp.float32)  # never time on zeros
    dst = cp.empty_like(src)
    stream = cp.cuda.get_current_stream()
    d2d = cp.cuda.runtime.memcpyDeviceToDevice

    def memcpy(_: int) -> None:
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, COPY_BYTES, d2d, stream.ptr)

    # 16-byte elements (complex128 views) so the copy kernel moves 16 bytes per load and store.
    copy16 = cp.ElementwiseKernel("T x", "T y", "y = x", "gpu_check_copy16")
    src16, dst16 = src.view(cp.complex128), dst.view(cp.complex128)

    def kernel(_: int) -> None:
        copy16(src16, dst16)

    reps = 5 if quick else 30
    res: dict[str, Any] = {"bytes_per_copy": 2 * COPY_BYTES, "buffer_bytes": COPY_BYTES}
    for name, fn in (("memcpy", memcpy), ("kernel_copy", kernel)):
        for _ in range(3):
            fn(0)
        g.sync()
        st = g.time_cupy(fn, 1, reps)
        if not bool((dst[:: 1 << 16] == src[:: 1 << 16]).all()):
            raise RuntimeError(f"{name}: the copy is wrong")
        dst.fill(0)
        res[name] = st
        res[f"{'memcpy' if name == 'memcpy' else 'kernel'}_gbps"] = 2 * COPY_BYTES / st["median_ms"] / 1e6
    res["gbps"] = max(res["memcpy_gbps"], res["kernel_gbps"])
    log(f"copy bandwidth: cudaMemcpy D2D {res['memcpy_gbps']:.0f} GB/s, copy kernel {res['kernel_gbps']:.0f} GB/s"
        f" ({2 * COPY_BYTES / 2**30:.2f} GiB moved per copy, median of {reps})")
    return res


def probe_bf16(g: Gpu) -> dict[str, Any]:
    """Can a bfloat16 CuPy array be made and passed through deepcore's public loss correctly? The probe
    goes through ``dc.losses.softmax_cross_entropy`` (argument checks, the backend found from the array,
    then the fused kernel), so it fails where a user's bfloat16 logits would."""
    cp = g.cp
    if g.dc is None:
        return {"reachable": False, "reason": "deepcore did not import"}
    n, c = 64, 1000
    try:
        if g.torch is not None:
            t = (g.torch.randn(n, c, device="cuda") * 3).to(g.torch.bfloat16)
            a = cp.from_dlpack(t)
        else:
            import ml_dtypes
            import numpy

            a = cp.asarray((numpy.random.default_rng(0).standard_normal((n, c)) * 3).astype(ml_dtypes.bfloat16))
    except Exception as exc:
        return {"reachable": False, "reason": f"no bfloat16 CuPy array: {err(exc)}"}
    if getattr(a.dtype, "name", str(a.dtype)) != "bfloat16":
        return {"reachable": False, "reason": f"CuPy made dtype {a.dtype!r}, not bfloat16"}
    labels = cp.random.RandomState(3).randint(0, c, size=n).astype(cp.int64)
    try:
        backend = g.dc.get_backend(a).name
        loss, grad = g.dc.losses.softmax_cross_entropy(a, labels)
        g.sync()
    except Exception as exc:
        return {"reachable": False, "reason": f"dc.losses.softmax_cross_entropy refused bfloat16: {err(exc)}"}
    check = g.compare(a, labels, {"probe": (loss, grad)}, "bfloat16")["probe"]
    return {"reachable": True, "reason": f"bfloat16 CuPy array accepted by dc.losses.softmax_cross_entropy "
                                         f"(backend {backend!r})", "probe_check": check}


def run_case(g: Gpu, rec: Recorder, shape: tuple[int, int], dtype: str) -> dict[str, Any]:
    """Stage e for one shape and dtype: fused, unfused and torch on the same data; checked, timed, measured."""
    cp, torch = g.cp, g.torch
    n, c = shape
    label = f"{n}x{c} {dtype}"
    case: dict[str, Any] = {"shape": [n, c], "dtype": dtype, "timings": {}, "memory": {}, "correctness": {},
                            "errors": []}
    fused_here = g.fsce is not None and (dtype == "float32" or g.bf16_reachable)
    if dtype == "bfloat16" and not g.bf16_reachable:
        log("  bf16: not reachable through CuPy -- timing torch bf16 only")
        case["note"] = "bf16: not reachable through CuPy"
    if not fused_here and torch is None:
        raise RuntimeError("nothing to time: no fused kernel for this dtype and no torch with CUDA")
    if dtype == "bfloat16" and torch is None:
        raise RuntimeError("bfloat16 inputs are made through torch, which has no CUDA here")

    b = case_bytes(shape, dtype)
    case["bytes"] = b
    per_set = b["logits"] + b["grad"] + b["labels"]
    # K input sets, rotated call by call, so that one rotation is >= 4x the L2 cache and no call finds
    # its inputs still cached by the one before (that would flatter the bandwidth).
    n_sets = min(64, max(3, math.ceil(4 * g.l2_bytes / per_set)))
    free, _ = cp.cuda.runtime.memGetInfo()
    while n_sets > 3 and n_sets * (b["logits"] + b["labels"]) > 0.3 * free:
        n_sets -= 1
    case["n_sets"] = n_sets
    log(f"  {n_sets} input sets ({n_sets * per_set / 2**20:.0f} MiB per rotation), fixed labels per set")

    # ---- inputs: N(0, 3^2) logits (never zeros), uniform labels; float32 made by CuPy, bf16 through torch.
    # Set k is X[k] (CuPy logits; None where CuPy cannot hold this dtype), TX[k] (a torch view of the same
    # memory, requires_grad; None without torch), Y[k] (CuPy int64 labels) and TY[k] (a torch view of Y[k]).
    X: list[Any] = []
    TX: list[Any] = []
    Y: list[Any] = []
    TY: list[Any] = []
    for k in range(n_sets):
        rs = cp.random.RandomState(1000 + k)
        x32 = rs.standard_normal((n, c), dtype=cp.float32)
        x32 *= 3.0
        y = rs.randint(0, c, size=n).astype(cp.int64)
        Y.append(y)
        if dtype == "float32":
            X.append(x32)
            tx = torch.from_dlpack(x32) if torch is not None else None
        else:
            tx = torch.from_dlpack(x32).to(torch.bfloat16)
            del x32
            X.append(cp.from_dlpack(tx) if fused_here else None)
        TX.append(tx.detach().requires_grad_(True) if tx is not None else None)
        TY.append(torch.from_dlpack(y) if torch is not None else None)
    g.sync()

    def fused(k: int) -> Any:
        return g.fsce(X[k], Y[k])

    def unfused(k: int) -> Any:
        return g.base_sce(g.cupy_backend, X[k], Y[k])

    def torch_step(k: int) -> Any:
        x = TX[k]
        x.grad = None  # the gradient goes to a fresh buffer every time
        loss = torch.nn.functional.cross_entropy(x, TY[k])
        loss.backward()
        return loss

    # ---- warm-up (compiles NVRTC / CuPy kernels outside any timing) and correctness, once, on set 0
    variants: dict[str, Callable[[int], Any]] = {}
    if fused_here:
        variants.update(fused=fused, unfused=unfused)
    if torch is not None:
        variants["torch"] = torch_step
    for name, fn in variants.items():
        def warm(fn: Callable[[int], Any] = fn) -> None:
            for k in range(min(3, n_sets)):
                fn(k)
            g.sync()
        rec.guard(f"{label} {name} warm-up", warm)
    cands: dict[str, tuple[Any, Any]] = {}

    def cand_fused() -> None:
        g.poison_pool(b["grad"])
        cands["fused"] = fused(0)

    def cand_unfused() -> None:
        cands["unfused"] = unfused(0)

    def cand_torch() -> None:
        loss = torch_step(0)
        cands["torch"] = (loss.detach(), TX[0].grad)
        TX[0].grad = None

    for name, fn in (("fused", cand_fused), ("unfused", cand_unfused), ("torch", cand_torch)):
        if name in variants:
            rec.guard(f"{label} {name} correctness run", fn)
    src = X[0] if X and X[0] is not None else TX[0].detach()
    checks = rec.guard(f"{label} correctness check", g.compare, src, Y[0], cands, dtype) or {}
    del src
    for name in variants:
        case["correctness"][name] = checks.get(name, {"ok": False, "error": "no checked result"})
    cands.clear()
    g.free()

    # ---- timing
    for name, fn in variants.items():
        def timed(fn: Callable[[int], Any] = fn, name: str = name) -> Any:
            reps = g.reps(g.estimate_ms(fn), name)
            if name == "torch":
                st = g.time_torch(fn, n_sets, reps)
            else:
                st = g.time_cupy(fn, n_sets, reps)
            g.sync()
            log(f"    time  {name:<14} median {st['median_ms']:9.4f} ms  IQR {st['iqr_ms']:.4f}"
                f"  min {st['min_ms']:.4f}  n={st['n']}")
            return st

        st = rec.guard(f"{label} {name} timing", timed)
        case["timings"][name] = st if st is not None else {"error": "timing failed (see stage_errors)"}
        g.free()

    # ---- peak extra memory (fresh CuPy pool per call)
    if fused_here:
        def mem_fused() -> None:
            case["memory"]["fused_peak_extra_bytes"] = g.cupy_peak(lambda: fused(0))

        def mem_unfused() -> None:
            case["memory"]["unfused_peak_extra_bytes"] = g.cupy_peak(lambda: unfused(0))

        rec.guard(f"{label} fused peak memory", mem_fused)
        rec.guard(f"{label} unfused peak memory", mem_unfused)
    if torch is not None:
        def mem_torch() -> None:
            TX[0].grad = None  # left by the timing: free it first, or the baseline would count it
            g.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch_step(0)
            torch.cuda.synchronize()
            case["memory"]["torch_peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
            TX[0].grad = None

        rec.guard(f"{label} torch peak memory", mem_torch)
    case["memory"]["grad_bytes"] = b["grad"]
    case["memory"]["row_slack_bytes"] = row_slack(n)
    mem = case["memory"]
    log("    memory: grad buffer {:.1f} MiB; fused extra {} MiB; unfused {} MiB; torch {} MiB".format(
        b["grad"] / 2**20, *(fmt_num(mem.get(k) / 2**20 if mem.get(k) is not None else None, ".1f") for k in (
            "fused_peak_extra_bytes", "unfused_peak_extra_bytes", "torch_peak_extra_bytes"))))

    # Release the inputs before the pool is emptied. The lists are emptied, not deleted: the closures
    # above capture them, and `del` would leave those closures with unbound names.
    for bufs in (X, TX, Y, TY):
        bufs.clear()
    g.free()
    return case
