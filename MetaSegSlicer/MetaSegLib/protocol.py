"""The core's progress protocol: one JSON object per line on the child's stdout.

The events (see `metaseg/io/progress.py` in the core):

  {"event": "stage", "stage": "fit", "message": "...", ...}
  {"event": "progress", "step": 3, "steps": 10, "loss": ..., "psnr": ..., "elapsed_s": ..., "remaining_s": ...}
  {"event": "labels", "step": 4, "path": ".../live_00004.nii.gz"}
  {"event": "warning", "message": "..."}
  {"event": "done", "outputs": {...}, "report": {...}}
  {"event": "error", "message": "...", "exit_code": 2}

`parse_line` turns a line into an `Event` or raises `ProtocolError` saying what is wrong;
fields beyond the required ones are kept, so that a newer core can add information.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

NUMBER = (int, float)

# Required fields and their types, per event kind.
SCHEMA: Dict[str, Dict[str, Tuple[type, ...]]] = {
    "stage": {"stage": (str,), "message": (str,)},
    "progress": {"step": (int,), "steps": (int,), "psnr": NUMBER, "elapsed_s": NUMBER, "remaining_s": NUMBER},
    "labels": {"step": (int,), "path": (str,)},
    "warning": {"message": (str,)},
    "done": {"outputs": (dict,), "report": (dict,)},
    "error": {"message": (str,)},
}

KINDS = tuple(SCHEMA)


class ProtocolError(ValueError):
    """A line that is not a valid progress event; the message says why."""


@dataclass(frozen=True)
class Event:
    """One progress event: its kind ("stage", "progress", ...) and all of its fields."""

    kind: str
    data: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def fraction(self) -> Optional[float]:
        """Completed fraction of the fit for a progress event, else None."""
        if self.kind != "progress" or self.data["steps"] <= 0:
            return None
        return min(1.0, max(0.0, self.data["step"] / self.data["steps"]))


def _type_ok(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int in Python; never a valid number here
        return False
    return isinstance(value, types)


def parse_event(obj: Any) -> Event:
    """Validate a decoded JSON value as an event."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("event")
    if not isinstance(kind, str):
        raise ProtocolError("the object has no string 'event' field")
    if kind not in SCHEMA:
        raise ProtocolError(f"unknown event {kind!r} (known: {', '.join(KINDS)})")
    for name, types in SCHEMA[kind].items():
        if name not in obj:
            raise ProtocolError(f"{kind} event without {name!r}")
        if not _type_ok(obj[name], types):
            want = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"{kind} event: {name!r} should be {want}, got {type(obj[name]).__name__}")
    if kind == "progress":
        if obj["steps"] < 1 or not 0 <= obj["step"] <= obj["steps"]:
            raise ProtocolError(f"progress event: step {obj['step']} of {obj['steps']} is out of range")
    if kind == "labels" and not obj["path"]:
        raise ProtocolError("labels event with an empty path")
    data = {k: v for k, v in obj.items() if k != "event"}
    return Event(kind, data)


def parse_line(line: str) -> Optional[Event]:
    """Parse one stdout line. Blank lines give None; anything else is an Event or a ProtocolError."""
    text = line.strip()
    if not text:
        return None
    if not text.startswith("{"):
        raise ProtocolError(f"not a JSON object: {text[:80]!r}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"invalid JSON ({e.msg} at column {e.colno}): {text[:80]!r}") from e
    return parse_event(obj)


def format_seconds(seconds: float) -> str:
    """'45 s', '2 min 05 s', '1 h 02 min'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def format_progress(event: Event) -> str:
    """Text for a progress bar: 'step 3/10 · PSNR 24.1 dB · ~2 s left'."""
    if event.kind != "progress":
        raise ValueError(f"not a progress event: {event.kind}")
    d = event.data
    psnr = d["psnr"]
    psnr_text = f"PSNR {psnr:.1f} dB" if math.isfinite(psnr) else "PSNR ∞"
    left = "done" if d["step"] >= d["steps"] else f"~{format_seconds(d['remaining_s'])} left"
    return f"step {d['step']}/{d['steps']} · {psnr_text} · {left}"
