"""The faster of two forms of one computation that give the same bits, chosen by timing them here.

Some of the NumPy backend's hot paths have two forms with identical results whose speed depends
on the machine: SGD's momentum step over the whole parameter (one pass per operation) or block by
block in the cache: blocked, it took 0.93x the one-pass time on a 2-core Xeon at 200k weights, and
1.06-1.36x on a 2-core AMD EPYC at 100k-3M weights (benchmarks/README.md). Rather than guess
from the CPU's name, a :class:`FormChooser` times the real calls: the first calls for a key (an
array size and dtype) alternate the two forms, and once each has ``rounds`` timings after one
call of warm-up, the form with the lower median runs from then on. The forms give the same bits,
so the choice changes the speed only, never a result (unlike cuDNN's benchmark mode, whose
algorithms round differently), and a wrong choice on a noisy machine costs speed, not correctness.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable

__all__ = ["FormChooser"]


class FormChooser:
    """Per key, which of two equivalent forms runs: ``False`` the first, ``True`` the second.

    :meth:`get` answers for the hot path (None while the key is still being timed); the caller
    then asks :meth:`trial` which form to run, times it and hands the seconds to :meth:`record`.
    ``fixed`` (True or False) skips the timing: every key gets that form (tests). At most
    ``max_keys`` keys are timed at once; the calls of any other key run the first form untimed."""

    __slots__ = ("rounds", "fixed", "max_keys", "_chosen", "_times")

    def __init__(self, rounds: int = 5, fixed: bool | None = None, max_keys: int = 64) -> None:
        if rounds < 1:
            raise ValueError(f"FormChooser: rounds must be >= 1, got {rounds}")
        self.rounds, self.fixed, self.max_keys = rounds, fixed, max_keys
        self._chosen: dict[Hashable, bool] = {}
        #: Per key being timed: the seconds of each form's calls, the first (warm-up) included.
        self._times: dict[Hashable, tuple[list[float], list[float]]] = {}

    def get(self, key: Hashable) -> bool | None:
        """The form chosen for ``key``, or None while it is being timed."""
        return self._chosen.get(key, self.fixed)

    def trial(self, key: Hashable) -> bool:
        """The form to run and time next for ``key``: the one with fewer timings (the first on a tie)."""
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen  # chosen since the caller's get (another thread's timings)
        times = self._slot(key)
        return times is not None and len(times[1]) < len(times[0])

    def record(self, key: Hashable, form: bool, seconds: float) -> None:
        """Note that ``form`` took ``seconds`` for ``key``; choose once both forms have their rounds."""
        times = None if key in self._chosen else self._slot(key)
        if times is None:
            return  # chosen already, or a key beyond max_keys
        times[form].append(seconds)
        first, second = times
        if min(len(first), len(second)) > self.rounds:
            # The first call of each form is left out: it pays for memory touched the first time.
            self._chosen[key] = statistics.median(second[1:]) < statistics.median(first[1:])
            self._times.pop(key, None)

    def chosen(self) -> dict[Hashable, bool]:
        """The choices made so far (a copy), for reports."""
        return dict(self._chosen)

    def _slot(self, key: Hashable) -> tuple[list[float], list[float]] | None:
        """``key``'s timings so far (a new, empty entry for a new key), or None beyond ``max_keys``."""
        times = self._times.get(key)
        if times is None and len(self._times) < self.max_keys:
            times = self._times.setdefault(key, ([], []))
        return times
