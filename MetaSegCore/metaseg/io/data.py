"""Loading the neurite-oasis layout of ../shared/data/brains and the project's subject splits."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .atomic import write_all

SPLITS_FILE = Path(__file__).parent.parent / "splits.json"  # package data at metaseg/splits.json
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


# Folders of ../shared/data and their label protocol: results are reported per group.
LABEL_GROUPS = {"brains": "freesurfer", "oasis-nmm": "manual"}


def subject_dir(data: Path, name: str) -> Path:
    """The folder of subject `name`: `data/name`, or `data/<group folder>/name` for the data root."""
    for d in [Path(data) / name] + [Path(data) / g / name for g in LABEL_GROUPS]:
        if d.is_dir():
            return d
    raise FileNotFoundError(f"subject {name} not found in {data} (nor in its {', '.join(LABEL_GROUPS)} folders)")


def label_group(folder: Path) -> str:
    """'freesurfer' or 'manual': the label protocol of a subject folder of ../shared/data."""
    return LABEL_GROUPS.get(Path(folder).parent.name, "unknown")


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
    """Write the aligned volumes of `subjects` into one pack (see `write_pack`).

    For training on a machine without SimpleITK or without the data folder: pass the pack
    as `--data`. Labelled scans in other geometries become packs through `metaseg prepare`.
    """
    return write_pack({s: load_volume(Path(root) / s) for s in subjects}, out)


def write_pack(volumes: Dict[str, LabeledImage], out: Path, meta: Optional[dict] = None) -> Path:
    """Write volumes on the model grid into one compressed .npz, atomically (see `pack_writer`)."""
    write_all([(Path(out), pack_writer(volumes, meta))])
    return Path(out)


def pack_writer(volumes: Dict[str, LabeledImage], meta: Optional[dict] = None) -> Callable[[str], None]:
    """The writer (for `atomic.write_all`) of a pack: intensities as uint16 with their scale.

    Keys `<name>/image`, `<name>/scale`, `<name>/labels`, and `_meta` (JSON text, no pickle) when
    given. uint16 steps are 1/65535 of the maximum, far below the MRI noise.
    """
    arrays = {}
    for name, v in volumes.items():
        scale = float(v.image.max()) / 65535.0 or 1.0
        arrays[f"{name}/image"] = np.round(v.image / scale).astype(np.uint16)
        arrays[f"{name}/scale"] = np.float64(scale)
        arrays[f"{name}/labels"] = v.labels.astype(np.uint8)
    if meta is not None:
        arrays["_meta"] = np.array(json.dumps(meta, sort_keys=True))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez_compressed(f, **arrays)

    return write


def pack_subjects(pack: Path) -> List[str]:
    """The subject names stored in a pack."""
    with np.load(pack) as z:
        return sorted({k.split("/")[0] for k in z.files if k.endswith("/image")})


def check_training_data(root: Path, splits: Dict[str, List[str]]) -> None:
    """Before any run folder is made: every training and validation subject must be loadable from `root` (a
    folder of subject folders with aligned_norm/aligned_seg4, or a pack). Raises ValueError saying what is
    missing and what to do; an unreadable pack (not a zip, pickled data, truncated) is named as such."""
    import zipfile

    root = Path(root)
    wanted = [s for part in ("train", "validation") for s in splits.get(part, [])]
    if not wanted:
        raise ValueError("the splits name no 'train' or 'validation' subjects; give --splits with both lists")
    if root.suffix == ".npz":
        try:
            have = set(pack_subjects(root))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"--data {root} is not a readable training pack ({type(e).__name__}: {str(e)[:120]}); "
                             "make it again with `metaseg prepare` or metaseg.io.data.pack_volumes") from e
        where = f"the pack {root}"
        missing = [s for s in wanted if s not in have]
    else:
        where = f"{root} (each needs <subject>/aligned_norm.nii.gz and aligned_seg4.nii.gz)"
        missing = [s for s in wanted if not all((root / s / f).is_file() for f in ("aligned_norm.nii.gz", "aligned_seg4.nii.gz"))]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{len(missing)} of the {len(wanted)} training/validation subjects are not in {where}: "
                         f"{shown}. Give --data that holds them, or --splits naming the subjects it holds; nothing was started")
