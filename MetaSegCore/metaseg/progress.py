"""Progress reporting for the CLI: a terminal bar, or one JSON object per line for programs.

The JSON-lines protocol is what the Slicer module reads from its background process:
each line is an object with an "event" key:
  {"event": "stage", "stage": "fit", "message": "...", "device": "cpu", "torch": "2.13.0"}
  {"event": "progress", "step": 3, "steps": 10, "loss": ..., "psnr": ..., "elapsed_s": ..., "remaining_s": ...}
  {"event": "labels", "step": 4, "path": ".../live_00004.nii.gz", "segments": [{"value", "name", "color"}, ...]}
      (live preview with --live-dir: the labels so far, in the input's geometry)
  {"event": "warning", "message": "..."}
  {"event": "done", "outputs": {...}, "report": {...}}
  {"event": "error", "message": "...", "exit_code": 2}
`metaseg batch` sends each scan's events with a "scan" key, and its own (batch_progress.py).
"""
from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .fit import FitProgress


class Reporter:
    """Sends events either as JSON lines on stdout or as human text on stderr.

    Warnings and errors are always shown; "none" only silences the progress bar and stages.
    """

    def __init__(self, mode: str = "bar", stream: TextIO = None):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}: use bar, json or none")
        self.mode = mode
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)

    def emit(self, event: str, **fields: Any) -> None:
        if self.mode == "json":
            self.stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
            self.stream.flush()
        elif event in ("warning", "error") or (self.mode == "bar" and event == "stage"):
            prefix = {"stage": "", "warning": "warning: ", "error": "error: "}[event]
            self.stream.write(f"{prefix}{fields.get('message', '')}\n")
            self.stream.flush()

    def fit_progress(self, p: FitProgress) -> None:
        if self.mode == "json":
            self.emit("progress", **vars(p))
        elif self.mode == "bar" and (p.step == p.steps or p.step % max(1, p.steps // 25) == 0):
            n = int(30 * p.step / p.steps)
            self.stream.write(
                f"\r  fit [{'#' * n:<30}] {p.step}/{p.steps} PSNR {p.psnr:5.1f} dB  {p.elapsed_s:5.1f} s, ~{p.remaining_s:4.1f} s left"
            )
            if p.step == p.steps:
                self.stream.write("\n")
            self.stream.flush()
