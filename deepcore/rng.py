"""Seeds for layers that draw random numbers (initialisation, dropout).

A layer built without ``seed=`` takes the next seed from a process-wide
sequence, so ``deepcore.manual_seed(0)`` before building a model makes its
initial weights and dropout masks reproducible, on every backend alike.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_int

_root = np.random.SeedSequence()


def manual_seed(seed: int) -> None:
    """Restart the sequence that seeds layers built without an explicit ``seed``."""
    global _root
    _root = np.random.SeedSequence(check_int(seed, "seed", "manual_seed", 0))


def next_seed() -> int:
    """A fresh 63-bit seed from the process-wide sequence."""
    (child,) = _root.spawn(1)
    return int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends only on ``(seed, index)``: the k-th draw of a seeded stream."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def host_generator(seed: int) -> np.random.Generator:
    """A NumPy generator on the host, for draws that must not depend on the backend (initial weights)."""
    return np.random.default_rng(seed)


def check_seed(seed: int | None, owner: str) -> int:
    return next_seed() if seed is None else check_int(seed, "seed", owner, 0)
