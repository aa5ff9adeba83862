"""How large a file MetaSeg reads whole may be: checked on its size before a byte is read.

Weights and fitted networks are loaded into memory and hashed whole. Ours are far smaller than the bound: the
shipped weights 0.6 MB, a fitted 3D network about 10 MB (a network 4x wider than the shipped one, as in the
paper, stays under 40 MB). A file padded with a gigabyte of junk (its sha256 sidecar rewritten to match) would
otherwise be read and hashed whole, 1.9 GB of memory for a 1.5 GB file, before anything could refuse it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

MAX_MODEL_FILE_BYTES = 128 << 20  # 128 MiB
MAX_SIDECAR_BYTES = 1024  # a `.sha256` sidecar: one hash and a file name


def oversize(path: Path, what: str, limit: int = MAX_MODEL_FILE_BYTES) -> Optional[str]:
    """A one-line refusal if the file at `path` is larger than `limit` bytes, else None (reads only its size)."""
    size = Path(path).stat().st_size
    if size <= limit:
        return None
    return (f"{what} {path} is {size / 2**20:.0f} MB, more than any MetaSeg {what} ({limit / 2**20:.0f} MB at most): "
            "it is not one, or it was padded or damaged; it was not read")


def read_sidecar(path: Path) -> str:
    """The first word of a small `.sha256` sidecar (at most MAX_SIDECAR_BYTES are read), '' if it is empty."""
    with open(path, "rb") as f:
        words = f.read(MAX_SIDECAR_BYTES).decode("utf-8", "replace").split()
    return words[0] if words else ""
