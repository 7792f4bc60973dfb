"""Convolutional networks on the CPU: deepcore (NumPy backend) against PyTorch eager, each contender in
its own process, alternated, medians of several rounds; and the 3x3 convolution against the plain GEMMs
of the same size, the floor BLAS sets.

    python benchmarks/cnn_step.py                          # lenet, conv, gemms at 1 and 2 threads, 5 rounds
    python benchmarks/cnn_step.py --threads 2 --rounds 3 --items lenet vgg
    python benchmarks/cnn_step.py --threads 2 --rounds 3 --items epoch            # 60,000 images an epoch
    python benchmarks/cnn_step.py --items epoch --epoch-samples 12800             # 100 steps, scaled to 60,000

Every item is a workload of ``deepcore.bench`` (``deepcore/bench/cnn.py``: the same code as
``deepcore bench`` and ``pytest benchmarks/test_cnn_step.py benchmarks/test_conv.py``):

- ``lenet``: one training step (forward, softmax cross-entropy, backward, SGD momentum 0.9) of the network
  ``deepcore train --model cnn`` builds for 1x28x28 (conv5x5 32 - ReLU - maxpool 2 - conv3x3 64 - ReLU -
  maxpool 2 - fc 256 - ReLU - fc 10), batch 128, random data; PyTorch runs a mirror with the same layers
  and initial weights (``cnn.torch_mirror``);
- ``vgg``: the same for the 3x32x32 network (per width 32, 64, 128 two conv3x3-BatchNorm2d-ReLU, then
  maxpool 2; global average pooling, fc 256, fc 10), batch 64;
- ``conv``: one ``Conv2d(64, 64, 3, padding=1, bias=False)`` on 128 x 64 x 32 x 32, forward + backward
  forming dx and dW;
- ``gemms``: that convolution's three plain GEMMs into preallocated outputs, ``W cols`` (64 x 576)(576 x
  131072), ``cols dY^T`` and ``W^T dY``: NumPy (OpenBLAS) and ``torch.mm``;
- ``epoch``: one shuffled epoch of random 1x28x28 images (``--epoch-samples``, default MNIST's 60,000) at
  batch 128: ``deepcore.train.fit(epochs=1)`` against PyTorch's loop without a DataLoader (``randperm``,
  ``index_select`` from one tensor). Fewer samples are scaled to 60,000 in the table.

GFLOP/s count the convolutions' and Linear layers' multiply-adds (``2 N O OH OW C KH KW`` a forward, 3x with
the backward; 2x for the first layer, which forms no dx). Each round starts one fresh process per contender
in turn (the order alternating between rounds); a process warms up (not for ``epoch``), then reports the
median of its samples (7 of at least 0.3 s; an epoch is one sample). Figures are medians over rounds; a
ratio is the median over rounds of the two processes' figures in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_TRAIN = 60000

WORKER = r"""
import json, sys, time
threads, case, contender, params = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
epoch = case == "cnn_epoch"
import numpy  # loaded before the pools are pinned: threadpoolctl pins only the libraries loaded
if contender.startswith("torch"):
    import torch
    torch.set_num_threads(threads)
from threadpoolctl import threadpool_info, threadpool_limits
threadpool_limits(threads)
from deepcore.bench import make_workload
params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
wl = make_workload(case, contender, **params)
if epoch:
    t0 = time.perf_counter(); wl.call(); samples = [time.perf_counter() - t0]
else:
    t0 = time.perf_counter(); n = 0
    while time.perf_counter() - t0 < 1.0 or n < 2:
        wl.call(); n += 1
    per = (time.perf_counter() - t0) / n
    calls = max(1, int(0.3 / per))
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            wl.call()
        samples.append((time.perf_counter() - t0) / calls)
blas = [p for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]]
out = {"median": sorted(samples)[len(samples) // 2], "flops": wl.info.get("flops")}
if blas:
    out["blas"] = f"{blas[0]['internal_api']} {blas[0]['version']} ({blas[0].get('architecture')}), " \
                  f"{blas[0]['num_threads']} threads"
if contender.startswith("torch"):
    out["torch"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads, " \
                   f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}"
print(json.dumps(out))
"""

CONV = {"n": 128, "c": 64, "o": 64, "hw": 32}
#: item -> (case, params, deepcore's contender, what the table calls it)
ITEMS = {
    "lenet": ("cnn_step", {"batch": 128}, "numpy", "LeNet step, 1x28x28, batch 128"),
    "vgg": ("cnn_step", {"batch": 64, "image_shape": [3, 32, 32]}, "numpy", "VGG-style step, 3x32x32, batch 64"),
    "conv": ("conv", CONV, "numpy", "conv3x3 64->64, 128x32x32, fwd+bwd (dx, dW)"),
    "gemms": ("conv_gemms", CONV, "numpy", "its 3 plain GEMMs (NumPy/OpenBLAS vs torch.mm)"),
    "epoch": ("cnn_epoch", {"batch": 128}, "numpy-fit", "LeNet epoch, 60,000 x 1x28x28, batch 128: fit vs torch loop"),
}


def _run(threads: int, case: str, contender: str, params: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(threads), case, contender, json.dumps(params)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{case} {contender} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s >= 10 else f"{s * 1e3:.1f} ms"


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", nargs="+", choices=tuple(ITEMS), default=["lenet", "conv", "gemms"])
    parser.add_argument("--epoch-samples", type=int, default=MNIST_TRAIN,
                        help="images in the epoch item (default 60,000; fewer are scaled to 60,000)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from deepcore.sysinfo import cpu_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_model()}, {cores} cores; Python {platform.python_version()}, NumPy {np.__version__}")
    print(f"load average at the start: {_load()}")
    rows, floors, libs, raw = [], [], {}, []
    for threads in args.threads:
        per_item: dict[str, dict[str, list[dict]]] = {}
        for r in range(args.rounds):
            for item in args.items:
                case, params, ours, _ = ITEMS[item]
                if item == "epoch":
                    params = {**params, "n": args.epoch_samples}
                order = (ours, "torch") if r % 2 == 0 else ("torch", ours)
                got = per_item.setdefault(item, {ours: [], "torch": []})
                for contender in order:
                    res = _run(threads, case, contender, params)
                    if contender == ours:  # NumPy's BLAS, as deepcore's process loaded it
                        libs.setdefault("blas", res.get("blas"))
                    if "torch" in res:
                        libs.setdefault(f"torch{threads}", res["torch"])
                    got[contender].append(res)
        for item, got in per_item.items():
            case, _, ours, label = ITEMS[item]
            scale = MNIST_TRAIN / args.epoch_samples if item == "epoch" else 1.0
            a = [x["median"] * scale for x in got[ours]]
            b = [x["median"] * scale for x in got["torch"]]
            ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
            flops = got[ours][0]["flops"] * scale

            def gf(ts: list[float], flops: float = flops) -> str:
                return f"{flops / statistics.median(ts) / 1e9:.1f}"

            raw.append(f"{item} @ {threads} threads: {ours} " + ", ".join(_fmt_time(t) for t in a)
                       + "; torch " + ", ".join(_fmt_time(t) for t in b))
            rows.append(f"| {label} | {threads} | {_fmt_time(statistics.median(a))} | "
                        f"{_fmt_time(statistics.median(b))} | {ratio:.2f}x | {gf(a)} | {gf(b)} |")
        if "conv" in per_item and "gemms" in per_item:
            conv, gemm = per_item["conv"], per_item["gemms"]
            fl = conv["numpy"][0]["flops"]
            cells = []
            for who in ("numpy", "torch"):
                c = [x["median"] for x in conv[who]]
                g = [x["median"] for x in gemm[who]]
                share = statistics.median(gi / ci for ci, gi in zip(c, g, strict=True))
                cells += [f"{fl / statistics.median(c) / 1e9:.1f}", f"{fl / statistics.median(g) / 1e9:.1f}",
                          f"{share:.0%}"]
            floors.append(f"| {threads} | " + " | ".join(cells) + " |")
    print(f"BLAS (NumPy): {libs.get('blas')}; " + "; ".join(v for k, v in libs.items() if k.startswith("torch")))
    print(f"load average at the end: {_load()}")
    print(f"command: python benchmarks/cnn_step.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    if "epoch" in args.items and args.epoch_samples != MNIST_TRAIN:
        print(f"(epoch: {args.epoch_samples} images timed, scaled to {MNIST_TRAIN})")
    print()
    print("| what | threads | deepcore | PyTorch | deepcore / PyTorch | deepcore GFLOP/s | PyTorch GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    if floors:
        print()
        print("| threads | deepcore conv GFLOP/s | NumPy GEMMs GFLOP/s | deepcore conv / GEMMs | "
              "torch conv GFLOP/s | torch.mm GEMMs GFLOP/s | torch conv / GEMMs |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(floors))
    print()
    print("per round (in the order run; the ratios pair the figures of one round):")
    print("\n".join(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
