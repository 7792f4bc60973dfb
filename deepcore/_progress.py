"""One progress bar for downloads and training epochs.

tqdm when it is installed, else a single stderr line redrawn at most five times
a second, with tqdm's counts, times and rate: ``epoch 1/30: 12/50 [00:03<00:09, 3.90batch/s]``
(done/total [elapsed<remaining, rate]); by default only when stderr is a terminal (logs and
CI stay clean). The bar disappears when closed, as ``tqdm(leave=False)``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress", "format_interval"]

#: The clock of the plain line (a name of its own, so tests can move time).
_clock = time.monotonic


def format_interval(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on, as tqdm writes elapsed and remaining times."""
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _rate(per_second: float, unit: str) -> str:
    """tqdm's rate: ``3.90it/s``, or ``2.50s/it`` below one per second; ``?it/s`` before any time passed."""
    if per_second <= 0.0:
        return f"?{unit}/s"
    return f"{per_second:.2f}{unit}/s" if per_second >= 1.0 else f"{1.0 / per_second:.2f}s/{unit}"


class Progress:
    def __init__(self, total: int | None, desc: str, *, enabled: bool | None = None, unit: str = "it",
                 byte_counts: bool = False) -> None:
        if enabled is None:  # auto: only on a terminal; True forces it, False turns it off
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.total, self.desc, self.unit, self.byte_counts = total, desc, unit, byte_counts
        self.done, self._last, self._width = 0, float("-inf"), 0
        self._start = _clock()
        self._bar: Any = None
        self._line = False
        self._postfix = ""
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm  # optional
        except ImportError:
            self._line = True
            return
        if byte_counts:
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        else:
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif self._line:
            self._postfix = "  ".join(f"{k} {v:.4g}" for k, v in postfix.items())
            now = _clock()
            if now - self._last > 0.2:
                self._last = now
                self._write(now)

    def line(self, now: float | None = None) -> str:
        """The plain line as it stands at time ``now`` (the clock's now by default)."""
        elapsed = max((_clock() if now is None else now) - self._start, 0.0)
        per_second = self.done / elapsed if elapsed > 0 else 0.0
        if self.byte_counts:
            done = f"{self.done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else "") + " MB"
            rate = _rate(per_second / 1e6, "MB")
        else:
            done = f"{self.done}" + (f"/{self.total}" if self.total else "")
            rate = _rate(per_second, self.unit)
        times = format_interval(elapsed)
        if self.total:
            times += "<" + (format_interval(max(self.total - self.done, 0) / per_second) if per_second > 0 else "?")
        text = f"{self.desc}: {done} [{times}, {rate}]"
        return text + (f"  {self._postfix}" if self._postfix else "")

    def _write(self, now: float) -> None:
        text = self.line(now)
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._line and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
