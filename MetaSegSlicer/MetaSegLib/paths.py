"""Where the module finds the shipped weights and the core package.

Installed extension (build or install tree), all beside the module file `MetaSeg.py`:
  qt-scripted-modules/MetaSeg.py
  qt-scripted-modules/Resources/Weights/metaseg2d.safetensors (+ .sha256)
  qt-scripted-modules/metaseg/            the core package (MetaSegCore/CMakeLists.txt)
Source checkout:
  MetaSegSlicer/MetaSeg.py
  Resources/Weights/metaseg2d.safetensors          (repository root)
  MetaSegCore/metaseg/
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

# (label set, dims) -> shipped weights file (the core's resources.LABEL_SETS, for the module's own lookups)
WEIGHTS_FILES = {("tissues", 2): "metaseg2d.safetensors", ("tissues", 3): "metaseg3d_structures.safetensors",
                 ("structures", 2): "metaseg2d_structures.safetensors",
                 ("structures", 3): "metaseg3d_structures.safetensors"}
CORE_PACKAGE = "metaseg"


def weights_dirs(module_dir: Path) -> List[Path]:
    """Folders searched for the shipped weights, in order."""
    module_dir = Path(module_dir)
    return [module_dir / "Resources" / "Weights", module_dir.parent / "Resources" / "Weights"]


def find_weights(dims: int, module_dir: Path, labels: str = "tissues") -> Optional[Path]:
    """The shipped weights file of label set `labels` for `dims`-D inputs, or None if not installed."""
    name = WEIGHTS_FILES.get((labels, dims))
    if name is None:
        return None
    for d in weights_dirs(module_dir):
        if (d / name).is_file():
            return d / name
    return None


def weights_sha256(path: Path) -> Optional[str]:
    """The expected hash from the `.sha256` file beside the weights (the core verifies it)."""
    side = Path(str(path) + ".sha256")
    try:
        return side.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return None


def input_dimension(size: Sequence[int]) -> int:
    """2 for an image with a singleton axis (one slice), else the number of axes."""
    size = [int(s) for s in size]
    if len(size) == 3 and 1 in size:
        return 2
    return len(size)


def core_search_dirs(module_dir: Path) -> List[Path]:
    module_dir = Path(module_dir)
    return [module_dir, module_dir.parent / "MetaSegCore"]


def core_python_path(module_dir: Path) -> Optional[Path]:
    """The folder to put on the child's PYTHONPATH so that `python -m metaseg` works.

    Prefers the copy beside the module (the one shipped with it); falls back to an installed
    `metaseg` distribution (found without importing it). None if there is none.
    """
    for d in core_search_dirs(module_dir):
        if (d / CORE_PACKAGE / "__main__.py").is_file():
            return d
    spec = importlib.util.find_spec(CORE_PACKAGE)
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    return None


def existing(paths: Iterable[Path]) -> List[Path]:
    return [p for p in paths if p.exists()]
