"""Progress of a long phase: rows done / total, rows/s and ETA on the console and in ``progress.json``.

``progress.json`` in the run directory lets ``datasel status RUN`` show progress from another shell.
Writes are throttled (at most one every ``interval`` seconds) and atomic.
"""

from __future__ import annotations

import sys
import time

from datasel_ray.io.storage import Location


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


_last_activity = time.monotonic()


def mark_activity() -> None:
    """Note that the running phase made progress now (every :meth:`Progress.update` does)."""
    global _last_activity
    _last_activity = time.monotonic()


def last_activity() -> float:
    """``time.monotonic()`` of the last progress in this process (read by the stall watch)."""
    return _last_activity


class Progress:
    """Counts rows of one phase. ``already_done`` rows (resumed) count toward done but not toward speed."""

    def __init__(self, phase: str, total: int, progress_file: Location | None = None, already_done: int = 0,
                 interval: float = 2.0, stream=None, quiet: bool = False, unit: str = "rows"):
        self.phase = phase
        self.total = total
        self.done = already_done
        self.resumed = already_done
        self.file = progress_file
        self.interval = interval
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.unit = unit
        self.start = time.monotonic()
        self._last = 0.0
        self._printed: int | None = None  # rows shown by the last console line: a line is never repeated
        self._write(force=True)

    @property
    def per_second(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.resumed) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.per_second
        return (self.total - self.done) / rate if rate > 0 else None

    def update(self, rows: int) -> None:
        self.done += rows
        mark_activity()
        self._write()

    def finish(self) -> None:
        self._write(force=True, finished=True)

    def snapshot(self, finished: bool = False) -> dict:
        return {
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "resumed": self.resumed,
            "unit": self.unit,
            "rows_per_second": round(self.per_second, 3),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "elapsed_seconds": round(time.monotonic() - self.start, 3),
            "finished": finished,
            "updated": time.time(),
        }

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"[{self.phase}] {self.done}/{self.total} {self.unit} ({pct:5.1f}%) "
                f"{self.per_second:8.1f} {self.unit}/s  ETA {format_eta(self.eta_seconds)}")

    def _write(self, force: bool = False, finished: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if not self.quiet and self.done != self._printed:
            # stream.write, not print: Ray Train replaces print in its workers with one that also logs the line
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._printed = self.done
        if self.file is not None:
            state = self.file.read_json() if self.file.exists() else {}
            state[self.phase] = self.snapshot(finished)
            state["current"] = self.phase
            self.file.write_json(state)
