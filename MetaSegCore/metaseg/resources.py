"""Where the shipped weights and sample live, in a source checkout or an installed extension."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

WEIGHTS_ENV = "METASEG_WEIGHTS_DIR"
# (label set, dims) -> shipped weights file
DEFAULT_WEIGHTS = {("tissues", 2): "metaseg2d.pt", ("tissues", 3): "metaseg3d.pt",
                   ("structures", 2): "metaseg2d_structures.pt", ("structures", 3): "metaseg3d_structures.pt"}


def weights_dirs() -> List[Path]:
    """Folders searched for shipped weights: $METASEG_WEIGHTS_DIR, the repository's Resources/Weights, and
    the Slicer extension's (qt-scripted-modules/Resources/Weights beside this package)."""
    dirs = []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]))
    here = Path(__file__).resolve().parent
    dirs += [here.parent.parent / "Resources" / "Weights", here.parent / "Resources" / "Weights"]
    return dirs


def default_weights(dims: int, labels: str = "tissues") -> Path:
    """The shipped weights for `dims`-D inputs and the label set `labels`; a clear error if none is installed."""
    name = DEFAULT_WEIGHTS.get((labels, dims))
    if name is None:
        if labels not in {k[0] for k in DEFAULT_WEIGHTS}:
            raise FileNotFoundError(f"no MetaSeg model for the label set {labels!r}: choose tissues or structures")
        raise FileNotFoundError(f"no MetaSeg model for {dims}D images: only 2D slices and 3D volumes are supported")
    for d in weights_dirs():
        if (d / name).is_file():
            return d / name
    searched = ", ".join(str(d) for d in weights_dirs())
    raise FileNotFoundError(f"no shipped {dims}D {labels} weights ({name}) found in {searched}; pass --weights FILE or set {WEIGHTS_ENV}")
