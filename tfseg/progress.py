"""Progress of a long step for the command line: items done, rate and time left.

On a terminal one line is redrawn in place (at most 10 times a second); anywhere else (a log
file, CI, a pipe) whole lines are written, one every ``every`` items (default: a twentieth of the
total) or every ``interval`` seconds, whichever comes first, and one at the end, so logs hold
no ANSI or carriage-return redraws.

    with Progress(total=120, label="predicting", unit="images") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts items done and reports them on ``stream`` (default: stderr)."""

    def __init__(self, total: int | None, label: str, *, unit: str = "images", stream: TextIO | None = None,
                 every: int | None = None, interval: float = 30.0, tty: bool | None = None,
                 clock=time.monotonic):
        self.total = int(total) if total else 0
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        if every is None:
            every = max(1, math.ceil(self.total / 20)) if self.total else 10
        self.every = every
        self.interval = interval
        self.clock = clock
        self.done = 0
        self._start = clock()
        self._first: tuple[float, int] | None = None  # (time, done) after the first update
        self._last_line_done = 0
        self._last_time = self._start
        self._closed = False

    def rate(self) -> float | None:
        """Items per second since the first update (model loading and other setup excluded);
        None before the second update."""
        now = self.clock()
        if self._first is not None and self.done > self._first[1] and now > self._first[0]:
            return (self.done - self._first[1]) / (now - self._first[0])
        return None

    def line(self) -> str:
        rate = self.rate()
        head = f"{self.label}: {self.done}/{self.total} {self.unit}" if self.total else \
            f"{self.label}: {self.done} {self.unit}"
        parts = [head] if rate is None else [head, f"{rate:.2f} {self.unit}/s"]
        if self.total and 0 < self.done < self.total and rate:
            parts.append(f"{_duration((self.total - self.done) / rate)} left")
        elif self._closed or (self.total and self.done >= self.total):
            parts.append(f"{_duration(self.clock() - self._start)} in all")
        return ", ".join(parts)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = self.clock()
        if self._first is None:
            self._first = (now, self.done)
        if self.tty:
            if now - self._last_time >= 0.1 or (self.total and self.done >= self.total):
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                self._last_time = now
        elif self.done - self._last_line_done >= self.every or now - self._last_time >= self.interval:
            self._write_line(now)

    def _write_line(self, now: float) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._last_line_done, self._last_time = self.done, now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()
        elif self.done != self._last_line_done or self.done == 0:
            self._write_line(self.clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.tty:
            self.stream.write("\n")
