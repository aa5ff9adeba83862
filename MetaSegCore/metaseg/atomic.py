"""All-or-nothing file output: every file of a run appears, or none does.

Kept free of SimpleITK so that meta-training and weights handling run where only torch is installed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence, Tuple


def write_all(outputs: Sequence[Tuple[Path, Callable[[str], None]]]) -> None:
    """Write every (path, writer) to a temporary file beside it, then rename them all into place.

    If any writer fails, every temporary file is removed and no output appears: a run
    publishes all of its files or none (a crash between the renames is the only window).
    """
    temps: List[Tuple[str, Path]] = []
    try:
        for path, writer in outputs:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix(path), dir=path.parent)
            os.close(fd)
            temps.append((tmp, path))
            writer(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)




def suffix(path: Path) -> str:
    """The extension writers dispatch on (".seg.nrrd" and ".nii.gz" included)."""
    name = path.name.lower()
    for s in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".json", ".pt"):
        if name.endswith(s):
            return s
    return path.suffix
