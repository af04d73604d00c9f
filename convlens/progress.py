"""The terminal progress bar of ``convlens run``, drawn from the engine's ProgressEvents."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from convlens.engine.run import ProgressEvent


class TerminalBar:
    """One line on stderr (images, img/s, ETA), redrawn at most 5 times a second, only
    when stderr is a terminal; the line ends when the last image is done."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.width = width
        self._last = 0.0

    def __call__(self, e: ProgressEvent) -> None:
        now = time.perf_counter()
        finished = e.done >= e.total
        if not self.enabled or (now - self._last < 0.2 and not finished):
            return
        self._last = now
        eta = (e.total - e.done) / e.rate if e.rate > 0 else 0.0
        filled = int(self.width * e.done / max(e.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r[{bar}] {e.done}/{e.total} {e.rate:6.1f} img/s "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" + ("\n" if finished else "")
        )
        self.stream.flush()
