"""Progress reporting for the CLI: a terminal bar, or one JSON object per line for programs.

The JSON-lines protocol is what the Slicer module reads from its background process:
each line is an object with an "event" key:
  {"event": "stage", "stage": "fit", "message": "...", "device": "cpu", "torch": "2.13.0"}
  {"event": "progress", "step": 3, "steps": 10, "loss": ..., "psnr": ..., "elapsed_s": ..., "remaining_s": ...}
  {"event": "labels", "step": 4, "path": ".../live_00004.nii.gz", "segments": [{"value", "name", "color"}, ...]}
      (live preview with --live-dir: the labels so far, in the input's geometry)
  {"event": "warning", "message": "..."}
  {"event": "done", "outputs": {...}, "report": {...}}
  {"event": "error", "message": "...", "exit_code": 2, "reason": "poor_match", "facts": {"ncc": 0.21, ...}}
      (the message is the command line's; a refusal also names its `reason` (REASONS below) and the numbers it
      quotes, so that a program can word it for its own users; an unexpected fault has reason "unexpected", exit
      code 1 and its "traceback")
`metaseg batch` sends each scan's events with a "scan" key, and its own (batch_progress.py).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class FitProgress:
    """What a progress callback receives after each step of a fit (method/fit.py sends it; the reporters show it)."""

    step: int
    steps: int
    loss: float
    psnr: float
    elapsed_s: float
    remaining_s: float


# The reasons an error event can name, and the facts each carries (InputError(..., reason=..., **facts)).
REASONS = {
    "poor_match": "the scan does not match the model: dims (2 or 3), ncc; 3D also ncc_interior, cause (whole_head, "
                  "inverted_contrast, flipped_axis, unknown), cause_finding and the cause's numbers (litres; axis, "
                  "flipped_ncc, flipped_ncc_interior)",
    "slice_too_large": "a 2D image larger than the 2D model's canvas: width, height",
    "needs_3d": "an option that only a 3D volume has, given for a 2D slice: option",
    "mask_geometry": "the brain mask is not on the scan's grid: why",
    "mask_misses_brain": "no voxel of the scan above 0 inside the brain mask",
    "mask_and_extraction": "a brain mask and brain extraction 'on' together",
    "empty_scan": "no voxel of the scan above 0",
    "binary_image": "the input holds two values only: a mask or a binary image, not an MRI",
    "needs_deepbet": "brain extraction is needed and deepbet is not installed",
    "deepbet_damaged": "deepbet's weights are missing or not its own: version",
    "two_objects": "two brain-like objects (two heads?): ml, first_ml",
    "no_brain_found": "brain extraction found (almost) no brain: ml",
    "too_much_brain": "brain extraction found more than one brain's volume: ml, max_ml",
    "looks_like_ct": "a CT in Hounsfield units, not an MRI: percent_air",
    "device_unavailable": "the requested device is not available: device",
    "unexpected": "a fault of MetaSeg itself (exit code 1): the event has the traceback",
}


class Reporter:
    """Sends events either as JSON lines on stdout or as human text on stderr.

    Warnings and errors are always shown; "none" only silences the progress bar and stages.
    The bar is redrawn every 1/25 of the steps and at least every BAR_EVERY_S seconds (a slow fit of
    many steps still moves); any other message starts on a fresh line, never on the bar's.
    """

    BAR_EVERY_S = 1.0

    def __init__(self, mode: str = "bar", stream: TextIO = None):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}: use bar, json or none")
        self.mode = mode
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self._bar_open = False  # a bar is on the current line, without its newline yet
        self._last_draw = float("-inf")

    def emit(self, event: str, **fields: Any) -> None:
        if self.mode == "json":
            self.stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
            self.stream.flush()
        elif event in ("warning", "error") or (self.mode == "bar" and event == "stage"):
            prefix = {"stage": "", "warning": "warning: ", "error": "error: "}[event]
            self._end_bar()
            self.stream.write(f"{prefix}{fields.get('message', '')}\n")
            self.stream.flush()

    def fit_progress(self, p: FitProgress) -> None:
        if self.mode == "json":
            self.emit("progress", **vars(p))
        elif self.mode == "bar" and self._due(p.step == p.steps or p.step % max(1, p.steps // 25) == 0):
            self._draw("fit", p.step / p.steps, f"{p.step}/{p.steps} PSNR {p.psnr:5.1f} dB  {p.elapsed_s:5.1f} s, "
                       f"~{p.remaining_s:4.1f} s left", p.step == p.steps)

    def task_progress(self, stage: str, done: int, total: int, elapsed_s: float) -> None:
        """Progress of a stage other than the fit (e.g. labelling a large scan's voxels): a bar, or a
        JSON "stage" event with `done` and `total` (programs that know only the fit's events still read it)."""
        left = elapsed_s / max(done, 1) * (total - done)
        if self.mode == "json":
            self.emit("stage", stage=stage, message=f"{stage}: {100 * done // max(total, 1)}% (~{left:.0f} s left)",
                      done=done, total=total, elapsed_s=elapsed_s, remaining_s=left)
        elif self.mode == "bar" and self._due(done >= total):
            self._draw(stage, done / max(total, 1), f"{done}/{total}  {elapsed_s:5.1f} s, ~{left:4.1f} s left", done >= total)

    def _due(self, on_schedule: bool) -> bool:
        return on_schedule or time.monotonic() - self._last_draw >= self.BAR_EVERY_S

    def _draw(self, name: str, fraction: float, text: str, last: bool) -> None:
        n = int(30 * min(max(fraction, 0.0), 1.0))
        self.stream.write(f"\r  {name} [{'#' * n:<30}] {text}")
        self._bar_open = not last
        if last:
            self.stream.write("\n")
        self.stream.flush()
        self._last_draw = time.monotonic()

    def _end_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
