"""Where the shipped weights and sample live, in a source checkout or an installed extension."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

WEIGHTS_ENV = "METASEG_WEIGHTS_DIR"
# label set -> the shipped weights file per input dimension; a weights card names its set ("label_set",
# "tissues" when absent) and carries the set's table (value, name, colour) under "labels". In 3D one model
# serves both sets: the structures model's classes summed into the tissues (docs/results.md: it labels the
# tissues better than the tissue model, metaseg3d.safetensors, which stays for `--weights` and old results).
LABEL_SETS: Dict[str, Dict[int, str]] = {
    "tissues": {2: "metaseg2d.safetensors", 3: "metaseg3d_structures.safetensors"},
    "structures": {2: "metaseg2d_structures.safetensors", 3: "metaseg3d_structures.safetensors"}}


def weights_dirs() -> List[Path]:
    """Folders searched for shipped weights: $METASEG_WEIGHTS_DIR, the repository's Resources/Weights, and
    the Slicer extension's (qt-scripted-modules/Resources/Weights beside this package)."""
    dirs = []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]))
    here = Path(__file__).resolve().parent
    dirs += [here.parent.parent / "Resources" / "Weights", here.parent / "Resources" / "Weights"]
    return dirs


def check_label_set(labels: str) -> None:
    """Refuse a label set no shipped weights provide (ValueError: the caller's to fix)."""
    if labels not in LABEL_SETS:
        from .io.readers import InputError

        raise InputError(f"unknown label set {labels!r}: the shipped weights provide {', '.join(LABEL_SETS)}")


def default_weights(dims: int, labels: str = "tissues") -> Path:
    """The shipped weights of label set `labels` for `dims`-D inputs; a clear error if none is installed."""
    check_label_set(labels)
    name = LABEL_SETS[labels].get(dims)
    if name is None:
        made = " and ".join(f"{d}D" for d in sorted(LABEL_SETS[labels]))
        raise FileNotFoundError(f"no MetaSeg model of the label set {labels!r} for {dims}D images (it has {made} weights)")
    for d in weights_dirs():
        if (d / name).is_file():
            return d / name
    searched = ", ".join(str(d) for d in weights_dirs())
    raise FileNotFoundError(f"no shipped {dims}D weights ({name}) found in {searched}; pass --weights FILE or set {WEIGHTS_ENV}")
