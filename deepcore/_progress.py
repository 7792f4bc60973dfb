"""One progress bar for downloads and training epochs.

tqdm when it is installed, else a single stderr line redrawn at most five times
a second; by default only when stderr is a terminal (logs and CI stay clean).
The bar disappears when closed, as ``tqdm(leave=False)``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int | None, desc: str, *, enabled: bool | None = None, unit: str = "it",
                 byte_counts: bool = False) -> None:
        if enabled is None:  # auto: only on a terminal; True forces it, False turns it off
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.total, self.desc, self.unit, self.byte_counts = total, desc, unit, byte_counts
        self.done, self._last, self._width = 0, 0.0, 0
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
            if time.monotonic() - self._last > 0.2:
                self._last = time.monotonic()
                self._write()

    def _write(self) -> None:
        if self.byte_counts:
            done = f"{self.done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else "") + " MB"
        else:
            done = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        text = f"{self.desc}: {done}" + (f"  {self._postfix}" if self._postfix else "")
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._line and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
