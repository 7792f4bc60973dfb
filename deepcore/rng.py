"""Seeds for layers that draw random numbers (initialisation, dropout).

A layer built without ``seed=`` takes the next seed from a process-wide
sequence, so ``deepcore.manual_seed(0)`` before building a model makes its
initial weights and dropout masks reproducible, on every backend alike.
"""

from __future__ import annotations

import numpy as np

_root = np.random.SeedSequence()


def manual_seed(seed: int) -> None:
    """Restart the sequence that seeds layers built without an explicit ``seed``."""
    global _root
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"manual_seed: seed must be a non-negative integer, got {seed!r}")
    _root = np.random.SeedSequence(int(seed))


def next_seed() -> int:
    """A fresh 63-bit seed from the process-wide sequence."""
    (child,) = _root.spawn(1)
    return int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def check_seed(seed: int | None, owner: str) -> int:
    if seed is None:
        return next_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{owner}: seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)
