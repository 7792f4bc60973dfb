"""A convolutional training step on the CPU: deepcore (NumPy backend) against PyTorch eager, each in
its own process, alternated, medians of several rounds.

    python benchmarks/cnn_step.py                       # both networks, 2 threads, 5 rounds (~2-4 min)
    python benchmarks/cnn_step.py --threads 1 --rounds 3 --nets lenet

The networks are the ones ``deepcore train --model cnn`` builds by default (``cli/models.py``):
``lenet`` for 1x28x28 (MNIST: conv5x5 32 - ReLU - maxpool 2 - conv3x3 64 - ReLU - maxpool 2 - fc 256 -
fc 10, batch 128) and ``vgg`` for 3x32x32 (CIFAR-10: two conv3x3-BatchNorm2d-ReLU per width 32, 64,
128, each pair followed by maxpool 2, then global average pooling, fc 256, fc 10; batch 64). A step is
forward, softmax-cross-entropy, backward and SGD with momentum, float32, random data. Each round
starts one fresh process per contender in turn; a process warms up, then reports the median of 7
samples of at least 0.3 s each; figures are medians over rounds, and the ratio is the median over
rounds of the two processes' figures in that round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
threads, net, contender = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(threads)
shape, batch = ((1, 28, 28), 128) if net == "lenet" else ((3, 32, 32), 64)
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, *shape)).astype(np.float32)
y = rng.integers(0, 10, batch)
if contender == "deepcore":
    import deepcore as dc
    from deepcore.cli.models import build_model
    channels = (32, 64) if net == "lenet" else (32, 64, 128)
    model = build_model("cnn", int(np.prod(shape)), 10, (256,), image_shape=shape, channels=channels)
    opt = dc.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    def step():
        logits, back = model.forward(x, train=True)
        loss, g = dc.losses.softmax_cross_entropy(logits, y)
        back(g)
        opt.step()
        opt.zero_grad()
else:
    import torch
    torch.set_num_threads(threads)
    nn = torch.nn
    if net == "lenet":
        model = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))
    else:
        layers, c = [], 3
        for w in (32, 64, 128):
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 256), nn.ReLU(),
                              nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    def step():
        loss = nn.functional.cross_entropy(model(tx), ty)
        loss.backward()
        opt.step()
        opt.zero_grad()
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 1.0 or n < 3:
    step(); n += 1
per = (time.perf_counter() - t0) / n
calls = max(2, int(0.3 / per))
samples = []
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    samples.append((time.perf_counter() - t0) / calls)
print(json.dumps({"median": sorted(samples)[3]}))
"""


def _run(threads: int, net: str, contender: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), net, contender], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nets", nargs="+", choices=("lenet", "vgg"), default=["lenet", "vgg"])
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from deepcore.sysinfo import blas_info, cpu_model

    print(f"CPU: {cpu_model()}; BLAS: {blas_info()}")
    print("| network | threads | deepcore ms/step | torch ms/step | deepcore / torch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for net in args.nets:
        for threads in args.threads:
            times: dict[str, list[float]] = {"deepcore": [], "torch": []}
            for r in range(args.rounds):
                order = ("deepcore", "torch") if r % 2 == 0 else ("torch", "deepcore")
                for contender in order:
                    times[contender].append(_run(threads, net, contender))
            ratio = statistics.median(a / b for a, b in zip(times["deepcore"], times["torch"], strict=True))
            print(f"| {net} | {threads} | {statistics.median(times['deepcore']) * 1e3:.1f} | "
                  f"{statistics.median(times['torch']) * 1e3:.1f} | {ratio:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
