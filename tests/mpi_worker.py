"""The program that tests/test_distributed.py starts under ``mpirun -n 2``, and the models, data and
cases it shares with the in-process references there.

    python tests/mpi_worker.py suite OUT       # equivalence cases, checkpoint writes, resume
    python tests/mpi_worker.py raise STEP      # rank 1 raises at training step STEP
    python tests/mpi_worker.py kill STEP       # rank 1 kills itself (SIGKILL) at training step STEP
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

from deepcore import available_backends, get_backend, nn
from deepcore.data import ArrayDataset
from deepcore.optim import SGD, Adam, CosineAnnealingLR
from deepcore.regularizers import L2

#: name -> (samples, per-rank batch, optimizer, regularized, epochs). "padded": 91 samples on two
#: ranks pad to 92 and end with per-rank batches of 6 (global 12), exercising the padding rule.
CASES = {
    "sgd": (96, 8, "sgd", True, 2),
    "adam": (96, 8, "adam", False, 2),
    "padded": (91, 8, "sgd", False, 2),
}
CKPT_CASE = (96, 8, "sgd", False)  # samples, per-rank batch, optimizer, regularized
RANKS = 2


def make_data(n: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0, 1.0, 0.0, 0.5], [-2.0, 0.0, 0.0, 1.0, 0.0], [0.0, 2.5, -1.0, 0.0, 0.0]])
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.standard_normal((n, 5)) * 0.8).astype(np.float32)
    return ArrayDataset(x, y)


def make_model(seed: int = 0) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16, seed=seed), nn.ReLU(), nn.Linear(16, 3, seed=seed + 1))


def make_optimizer(kind: str, model: nn.Module):
    if kind == "sgd":
        return SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return Adam(model.parameters(), lr=0.01)


def params_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: get_backend(v).to_numpy(v) for k, v in model.state_dict().items()}


def checkpoint_run(epochs: int, batch: int, *, checkpoint=None, resume=None, comm=None, seed_model: int = 0):
    """The checkpoint case: SGD with a cosine schedule, written or resumed with any number of ranks."""
    from deepcore.train import fit

    n, _, kind, _ = CKPT_CASE
    model = make_model(seed_model)
    opt = make_optimizer(kind, model)
    sched = CosineAnnealingLR(opt, T_max=4)
    history = fit(model, "softmax-ce", opt, make_data(n), epochs=epochs, batch_size=batch, scheduler=sched, seed=3,
                  verbose=False, checkpoint=checkpoint, resume=resume, comm=comm)
    return model, history


def suite(out: Path) -> None:
    import deepcore.checkpoint as ckmod
    from deepcore.distributed import get_communicator
    from deepcore.train import fit

    comm = get_communicator()
    assert comm.size == RANKS, comm
    # Collectives on every array library here: NumPy in place, the others through a host copy.
    collectives = {}
    for lib, status in available_backends().items():
        if status is not True or lib == "cupy":
            continue
        b = get_backend(lib)
        mean = comm.allreduce(b.from_numpy(np.arange(4, dtype=np.float32) * (comm.rank + 1)), "mean")
        total = comm.allreduce(b.from_numpy(np.arange(3, dtype=np.float64) * (comm.rank + 1)), "sum")
        root = comm.broadcast(b.from_numpy(np.full(2, comm.rank + 7, dtype=np.int64)))
        collectives.update({f"{lib}.mean": b.to_numpy(mean), f"{lib}.sum": b.to_numpy(total),
                            f"{lib}.bcast": b.to_numpy(root)})
    np.savez(out / f"collectives-rank{comm.rank}.npz", **collectives)
    for name, (n, batch, kind, reg, epochs) in CASES.items():
        # Rank 1 starts from other weights: the broadcast from rank 0 must make them equal.
        model = make_model(seed=comm.rank * 10)
        opt = make_optimizer(kind, model)
        history = fit(model, "softmax-ce", opt, make_data(n), epochs=epochs, batch_size=batch, seed=5,
                      regularizer=L2(1e-2) if reg else None, verbose=False)
        np.savez(out / f"{name}-rank{comm.rank}.npz", **params_of(model),
                 loss=np.array(history["loss"]), accuracy=np.array(history["accuracy"]))

    # Count the checkpoint writes of every rank.
    real_save = ckmod.save_checkpoint

    def counting_save(path, *args, **kwargs):
        with open(out / "saves.log", "a") as f:
            f.write(f"rank {comm.rank} {Path(path).name}\n")
        return real_save(path, *args, **kwargs)

    ckmod.save_checkpoint = counting_save
    batch = CKPT_CASE[1]
    checkpoint_run(2, batch, checkpoint=out / "from2.safetensors", seed_model=comm.rank * 10)
    ckmod.save_checkpoint = real_save
    # Continue, on two ranks, the run that one process wrote (test_distributed made it).
    model, history = checkpoint_run(4, batch, resume=out / "from1.safetensors", seed_model=comm.rank * 10)
    if comm.rank == 0:
        np.savez(out / "resumed-on-2.npz", **params_of(model), lr=np.array(history["lr"]))


def fail(mode: str, step: int) -> None:
    """Train on two ranks; rank 1 raises or dies at training step ``step`` (counted from 1)."""
    from deepcore.distributed import get_communicator
    from deepcore.losses import softmax_cross_entropy
    from deepcore.train import fit

    comm = get_communicator()
    calls = 0

    def loss(pred, target, **kwargs):
        nonlocal calls
        calls += 1
        if comm.rank == 1 and calls == step:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step}")
        return softmax_cross_entropy(pred, target, **kwargs)

    model = make_model()
    fit(model, loss, make_optimizer("sgd", model), make_data(4000), epochs=50, batch_size=8, verbose=False)
    print(f"rank {comm.rank}: training finished although rank 1 should have failed", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "suite":
        suite(Path(sys.argv[2]))
    else:
        fail(sys.argv[1], int(sys.argv[2]))
