"""The Gpu helper shared by the GPU stages: libraries, event timing, the float64 check, peak memory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .common import TOLERANCE, log, summarize


class Gpu:
    """What the GPU stages share: libraries, the fused function, the CuPy backend, timing helpers."""

    def __init__(self, cupy: Any, torch: Any, deepcore: Any, mode: str) -> None:
        self.cp = cupy
        self.torch = torch if (torch is not None and torch.cuda.is_available()) else None
        self.dc = deepcore
        self.mode = mode
        self.fsce = None
        self.cupy_backend = None
        self.base_sce = None
        if deepcore is not None:
            from deepcore.backend.base import Backend
            from deepcore.backend.cuda_kernels import fused_softmax_cross_entropy

            self.fsce = fused_softmax_cross_entropy
            self.cupy_backend = deepcore.get_backend("cupy")
            self.base_sce = Backend.softmax_cross_entropy  # the unfused array-API reference, unbound
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.l2_bytes = int(props.get("l2CacheSize") or (50 << 20))
        self.bf16_reachable = False

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()
        if self.torch is not None:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        self.sync()
        self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def time_cupy(self, call: Callable[[int], Any], n_sets: int, reps: int) -> dict[str, Any]:
        """Event-timed runs on the current stream, call i on input set i % n_sets."""
        cp = self.cp
        starts = [cp.cuda.Event() for _ in range(reps)]
        ends = [cp.cuda.Event() for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            call(i % n_sets)
            ends[i].record()
        ends[-1].synchronize()
        return summarize([cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends, strict=True)])

    def time_torch(self, call: Callable[[int], Any], n_sets: int, reps: int) -> dict[str, Any]:
        torch = self.torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            call(i % n_sets)
            ends[i].record()
        ends[-1].synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])

    def reps(self, est_ms: float, kind: str) -> int:
        if self.mode == "quick":
            return 5
        lo, hi, budget_ms = {"fused": (30, 300, 600.0), "unfused": (10, 60, 800.0), "torch": (20, 200, 600.0)}[kind]
        return int(min(hi, max(lo, budget_ms / max(est_ms, 1e-3))))

    def estimate_ms(self, call: Callable[[int], Any]) -> float:
        self.sync()
        t = time.perf_counter()
        call(0)
        self.sync()
        return (time.perf_counter() - t) * 1e3

    # ---- conversions used by the correctness check
    def is_torch(self, a: Any) -> bool:
        return self.torch is not None and isinstance(a, self.torch.Tensor)

    def as_f64(self, a: Any) -> Any:
        cp = self.cp
        if self.is_torch(a):
            return cp.from_dlpack(a.detach().to(self.torch.float64).contiguous())
        try:
            return a.astype(cp.float64)
        except Exception:  # e.g. bfloat16 without CuPy kernels: go through torch
            if self.torch is None:
                raise
            return cp.from_dlpack(self.torch.from_dlpack(a).to(self.torch.float64))

    def scalar(self, a: Any) -> float:
        if self.is_torch(a):
            return float(a.detach().double().item())
        return float(self.as_f64(a.reshape(1))[0])

    def poison_pool(self, nbytes: int) -> None:
        """Leave a freed all-0xFF block (NaN in float32 and bfloat16) where the next allocation of this size lands.

        The pool is emptied first, so no cached block (say, a correct gradient from the warm-up) can serve
        the allocation instead, and the block is 64 MiB larger than asked, so the call's small scratch
        allocations, if carved from it, still leave room for the gradient inside the poison."""
        pool = self.cp.get_default_memory_pool()
        self.sync()
        pool.free_all_blocks()
        p = self.cp.full((nbytes + (64 << 20),), 0xFF, dtype=self.cp.uint8)
        del p

    def compare(self, src: Any, labels: Any, cands: dict[str, tuple[Any, Any]], dtype: str) -> dict[str, Any]:
        """Each candidate (loss, grad) against a float64 reference of mean cross-entropy, in row chunks on the GPU."""
        cp = self.cp
        n, c = (int(d) for d in src.shape)
        rows = max(1, (256 << 20) // (8 * c))
        acc = {k: [0.0, 0.0, True] for k in cands}
        loss_sum = 0.0
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            s = self.as_f64(src[r0:r1])
            y = labels[r0:r1]
            m = s.max(axis=1, keepdims=True)
            e = cp.exp(s - m)
            se = e.sum(axis=1, keepdims=True)
            lse = m[:, 0] + cp.log(se[:, 0])
            idx = cp.arange(r1 - r0)
            loss_sum += float((lse - s[idx, y]).sum())
            g = e / se
            g[idx, y] -= 1.0
            g /= n
            ref2 = float((g * g).sum())
            for k, (_, grad) in cands.items():
                diff = self.as_f64(grad[r0:r1]) - g
                acc[k][0] += float((diff * diff).sum())
                acc[k][1] += ref2
                acc[k][2] = acc[k][2] and bool(cp.isfinite(diff).all())
                del diff
            del s, e, g, m, se, lse
        ref_loss = loss_sum / n
        tol = TOLERANCE[dtype]
        out: dict[str, Any] = {}
        for k, (loss, _) in cands.items():
            num2, den2, finite = acc[k]
            lv = self.scalar(loss)
            grad_rel = math.sqrt(num2 / den2) if den2 > 0 else float("inf")
            loss_rel = abs(lv - ref_loss) / abs(ref_loss) if ref_loss else abs(lv)
            finite = finite and math.isfinite(lv)
            ok = bool(finite and grad_rel <= tol and loss_rel <= tol)
            out[k] = {"grad_rel_err": grad_rel, "loss_rel_err": loss_rel, "loss": lv, "ref_loss": ref_loss,
                      "finite": finite, "tol": tol, "ok": ok}
            log(f"    check {k:<14} grad rel err {grad_rel:.2e}  loss rel err {loss_rel:.2e}"
                f"  (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
        return out

    def cupy_peak(self, fn: Callable[[], Any]) -> int:
        """Bytes a call draws from a fresh CuPy pool: its peak extra device memory (pool blocks are never
        released inside the call, so the pool's size is the high-water mark of its allocations)."""
        cp = self.cp
        self.sync()
        pool = cp.cuda.MemoryPool()
        out = None
        try:
            with cp.cuda.using_allocator(pool.malloc):
                out = fn()
                cp.cuda.Device().synchronize()
                return int(pool.total_bytes())
        finally:
            del out
            pool.free_all_blocks()
