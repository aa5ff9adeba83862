"""Loading the neurite-oasis layout of ../shared/data/brains and the project's subject splits."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

SPLITS_FILE = Path(__file__).with_name("splits.json")
PAPER_SLICE = 109  # coronal index of the paper's 2D task in the 160x192x224 aligned grid


@dataclass
class LabeledImage:
    """One image with its reference labels, as numpy arrays in SimpleITK (z, y, x) order."""

    name: str
    image: np.ndarray  # float32
    labels: np.ndarray  # uint8


def load_splits(path: Path = SPLITS_FILE) -> Dict[str, List[str]]:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: list(v) for k, v in d.items() if not k.startswith("_")}


def _array(path: Path) -> np.ndarray:
    import SimpleITK as sitk  # here, not at import: training from a pack needs only numpy and torch

    if not path.exists():
        raise FileNotFoundError(f"missing data file {path}")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_slice(subject_dir: Path) -> LabeledImage:
    """The paper's 2D task: `slice_norm`/`slice_seg4` (160x192x1) as (192, 160) arrays."""
    d = Path(subject_dir)
    img = _array(d / "slice_norm.nii.gz").astype(np.float32)
    lab = _array(d / "slice_seg4.nii.gz").astype(np.uint8)
    return LabeledImage(d.name, img.reshape(img.shape[-2:]), lab.reshape(lab.shape[-2:]))


def load_volume(subject_dir: Path) -> LabeledImage:
    """The 3D task: `aligned_norm`/`aligned_seg4` as (224, 192, 160) arrays.

    `subject_dir` may also be `<pack>.npz/<subject>` for a pack written by `pack_volumes`.
    """
    d = Path(subject_dir)
    if d.parent.suffix == ".npz":
        with np.load(d.parent) as pack:
            if f"{d.name}/image" not in pack:
                raise FileNotFoundError(f"subject {d.name} is not in the pack {d.parent}")
            scale = float(pack[f"{d.name}/scale"])
            return LabeledImage(d.name, pack[f"{d.name}/image"].astype(np.float32) * scale, pack[f"{d.name}/labels"])
    return LabeledImage(
        d.name,
        _array(d / "aligned_norm.nii.gz").astype(np.float32),
        _array(d / "aligned_seg4.nii.gz").astype(np.uint8),
    )


def coronal_slices(subject_dir: Path, indices: Sequence[int]) -> List[LabeledImage]:
    """Coronal slices of the aligned volume; index 109 equals the subject's `slice_norm`."""
    vol = load_volume(subject_dir)
    return [LabeledImage(f"{vol.name}@{k}", vol.image[k], vol.labels[k]) for k in indices]


def pack_volumes(root: Path, subjects: Sequence[str], out: Path) -> Path:
    """Write the aligned volumes of `subjects` into one compressed .npz (intensities as uint16).

    For training on a machine without SimpleITK or without the data folder: pass the pack
    as `--data-root`. uint16 steps are 1/65535 of the maximum, far below the MRI noise.
    """
    arrays = {}
    for s in subjects:
        v = load_volume(Path(root) / s)
        scale = float(v.image.max()) / 65535.0 or 1.0
        arrays[f"{s}/image"] = np.round(v.image / scale).astype(np.uint16)
        arrays[f"{s}/scale"] = np.float64(scale)
        arrays[f"{s}/labels"] = v.labels
    np.savez_compressed(out, **arrays)
    return Path(out)
