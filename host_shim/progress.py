"""A progress line on a terminal: pages done, pages/s, ETA. Silent when
stderr is not a terminal (logs and CI stay clean)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0

    def advance(self, pages: int) -> None:
        with self._lock:
            self.done += pages
            now = time.monotonic()
            if self._enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        fraction = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        bar = "#" * int(width * fraction) + "." * (width - int(width * fraction))
        eta_text = f"{eta:5.1f}s" if eta != float("inf") else "  ?  "
        self._stream.write(
            f"\r{self.label:7} [{bar}] {100 * fraction:5.1f}% {self.done}/{self.total} pages "
            f"{rate:8.0f} pages/s ETA {eta_text}"
        )
        self._stream.flush()

    def finish(self) -> None:
        if self._enabled:
            with self._lock:
                self._draw(time.monotonic())
                self._stream.write("\n")
                self._stream.flush()
