"""What a batch shows while it runs: the cohort's progress with the time left, and each running scan's fit.

JSON mode (`--progress json`) passes every scan's `segment` events on, tagged with `"scan": id`, and adds:
  {"event": "batch", "scans": 12, "todo": 9, "skipped": 3, "workers": 2, "table": ".../volumes.tsv", "shard": "1/2"}
  {"event": "scan", "scan": "sub-01", "index": 0, "status": "ok"|"failed"|"cancelled", "error": "...",
   "seconds": 12.1, "done": 4, "total": 12, "remaining_s": 95.0}
  {"event": "done", "table": ".../volumes.tsv", "ok": 11, "failed": 1, "pending": 0}
Bar mode prints a line per finished scan with the time left; on a terminal, one status line below
shows the running scans' fit steps. Warnings and failures are always shown.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional

from .progress import Reporter


class ScanReporter(Reporter):
    """A scan's `segment` events, handed to the batch (`sink(event, fields)`) instead of printed.

    Its mode is "json" so that the pipeline sends every event, fit steps included; the scan's own
    "done" event is dropped: the batch reports the finished scan with its table row instead.
    """

    def __init__(self, sink: Callable[[str, Dict[str, Any]], None]):
        super().__init__("json")
        self.sink = sink

    def emit(self, event: str, **fields: Any) -> None:
        if event != "done":
            self.sink(event, fields)


class BatchProgress:
    """Overall and per-scan progress of one batch run; thread-safe (worker events arrive on a thread)."""

    def __init__(self, rep: Reporter, total: int, skipped: int):
        self.rep, self.total, self.done = rep, total, skipped
        self.finished_here = 0
        self.t0 = time.perf_counter()
        self.active: Dict[str, str] = {}  # running scan id -> its state ("register", "fit 12/20", ...)
        self.lock = threading.RLock()  # re-entered when a signal handler says something mid-update
        self._drawn = 0
        self._status_line = rep.mode == "bar" and hasattr(rep.stream, "isatty") and rep.stream.isatty()

    def remaining_s(self) -> Optional[float]:
        """Time left for the whole run, from this run's throughput so far (None before the first scan ends)."""
        if not self.finished_here:
            return None
        rate = self.finished_here / max(time.perf_counter() - self.t0, 1e-6)
        return round((self.total - self.done) / rate, 1)

    def started(self, scan: str) -> None:
        with self.lock:
            self.active[scan] = "starting"
            self._draw()

    def scan_event(self, scan: str, event: str, fields: Dict[str, Any]) -> None:
        with self.lock:
            if self.rep.mode == "json":
                self.rep.emit(event, scan=scan, **fields)
            elif event in ("warning", "error"):
                self._line(f"warning: {scan}: {fields.get('message', '')}")
            elif event == "stage":
                self.active[scan] = str(fields.get("stage", ""))
            elif event == "progress":
                self.active[scan] = f"fit {fields['step']}/{fields['steps']}"
            self._draw()

    def finished(self, scan: str, index: int, status: str, seconds: float, error: str = "") -> None:
        with self.lock:
            self.active.pop(scan, None)
            if status != "cancelled":
                self.done += 1
                self.finished_here += 1
            left = self.remaining_s()
            if self.rep.mode == "json":
                self.rep.emit("scan", scan=scan, index=index, status=status, error=error, seconds=round(seconds, 3),
                              done=self.done, total=self.total, remaining_s=left)
            elif status == "failed":
                self._line(f"warning: {scan} failed: {error}")
            if self.rep.mode == "bar" and status != "failed":
                self._line(f"[{self.done}/{self.total}] {scan}: {status} ({seconds:.1f} s){_left(left)}")
            self._draw()

    def say(self, message: str) -> None:
        """A line for people (bar mode only)."""
        if self.rep.mode == "bar":
            with self.lock:
                self._line(message)

    def _line(self, text: str) -> None:
        self._clear()
        self.rep.stream.write(text + "\n")
        self.rep.stream.flush()

    def _draw(self) -> None:
        if not self._status_line:
            return
        running = " | ".join(f"{k}: {v}" for k, v in self.active.items())
        text = f"  {self.done}/{self.total} scans{_left(self.remaining_s())}" + (f" | {running}" if running else "")
        text = text[:150]
        self._clear()
        self.rep.stream.write(text)
        self.rep.stream.flush()
        self._drawn = len(text)

    def _clear(self) -> None:
        if self._drawn:
            self.rep.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0


def _left(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    return f", ~{seconds / 60:.1f} min left" if seconds >= 90 else f", ~{seconds:.0f} s left"
