"""Synthetic T1-like training subjects from brain label maps (`metaseg synth`), after SynthSeg.

SynthSeg (Billot et al., Medical Image Analysis 2023) trains on images drawn from label maps: every
generation class gets a random Gaussian intensity, then the image gets a smooth bias field, the blur
of a random acquisition resolution and noise. Here the draws use SynthSeg's T1 hyper-priors, so the
images look like T1 scans (white matter brighter than grey matter brighter than CSF), and they are
skull-stripped like our real `native_t1` files (FreeSurfer's brainmask): 0 outside the brain and the
CSF around it. No deformation is drawn: `metaseg prepare` registers every scan affinely anyway.

A synthetic subject is written like a real one (`brains/<subject>/`): `native_t1.nii.gz` (float32,
FreeSurfer's T1 scale: the brain's 99th percentile at 110), `native_structures.nii.gz` (the 31
structures, uint8, by the data's `structures.py` aseg rule: values outside the 31 take the nearest
structure, extra-cerebral CSF 24 stays 0), `native_seg4.nii.gz` (the 4 tissues of those structures),
all on the label map's grid, plus `synth.json` (source map, seed and what was drawn).

The hyper-priors (`prior_means_t1.npy`, `prior_stds_t1.npy`: row 0 the mean, row 1 the spread of the
class means and of the class standard deviations) have one column per class of SynthSeg's
*contrast-specific* grouping (`generation_classes_contrast_specific.npy`, 25 classes: left and right
alike, all CSF one class), not of `generation_classes.npy` (48 classes). That grouping is T1_CLASSES
below (SynthSeg commit 66342c1, Apache-2.0).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..io.readers import InputError, read_image, write_image
from ..labelsets import STRUCTURES

# SynthSeg's generation labels (generation_labels.npy) and the T1 class of each (its
# generation_classes_contrast_specific.npy): the column of the T1 hyper-priors each label draws from.
GENERATION_LABELS: Tuple[int, ...] = (
    0, 14, 15, 16, 24, 72, 85, 502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530,
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 25, 26, 28, 30, 136, 137,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 163, 164)
T1_CLASSES: Tuple[int, ...] = (
    0, 1, 1, 13, 1, 1, 2, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
    2, 3, 1, 1, 4, 5, 6, 3, 7, 8, 3, 3, 10, 3, 9, 11, 12, 12,
    2, 3, 1, 1, 4, 5, 6, 3, 7, 8, 3, 3, 10, 3, 9, 11, 12, 12)
EXTRA_CEREBRAL_CSF = 24  # inside the skull-stripped image, but no structure (as in structures.py)
HEAD_LABELS = frozenset(v for v in GENERATION_LABELS if v >= 500)  # skull, scalp, eyes...: outside the brain
OUTPUT_SCALE = 110.0  # the brain's 99th percentile in native_t1 (FreeSurfer normalizes white matter to 110)
FILES = {"image": "native_t1.nii.gz", "structures": "native_structures.nii.gz", "tissues": "native_seg4.nii.gz"}


@dataclass(frozen=True)
class Priors:
    """T1 hyper-priors: `means` and `stds` are (2, n_classes): row 0 the mean, row 1 the spread of the class
    means and of the class standard deviations; `classes[label]` is the column a label value draws from."""

    means: np.ndarray
    stds: np.ndarray
    classes: Dict[int, int] = field(default_factory=lambda: dict(zip(GENERATION_LABELS, T1_CLASSES)))

    @staticmethod
    def load(folder: Path) -> "Priors":
        """SynthSeg's files in `folder`: generation_labels.npy, prior_means_t1.npy, prior_stds_t1.npy."""
        folder = Path(folder)
        try:
            labels = np.load(folder / "generation_labels.npy")
            means, stds = np.load(folder / "prior_means_t1.npy"), np.load(folder / "prior_stds_t1.npy")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the T1 priors in {folder} (generation_labels.npy, prior_means_t1.npy, "
                             f"prior_stds_t1.npy): {e}; pass --priors") from None
        if tuple(int(v) for v in labels) != GENERATION_LABELS:
            raise InputError(f"{folder / 'generation_labels.npy'} is not SynthSeg's generation label list: "
                             "its T1 classes are unknown")
        n = max(T1_CLASSES) + 1
        if means.shape != (2, n) or stds.shape != (2, n):
            raise InputError(f"T1 priors in {folder} have shapes {means.shape} and {stds.shape}; expected (2, {n}): "
                             "one column per class of SynthSeg's contrast-specific grouping")
        return Priors(means.astype(np.float64), stds.astype(np.float64))


@dataclass(frozen=True)
class SynthParams:
    """How strong each random corruption may be. `bias_std`: the log bias field's control points have a std
    drawn from [0, bias_std], made of cosines of up to `bias_frequencies` - 1 half-waves across the brain's box.
    `thickness`: range of the slice thickness (mm) drawn for one random axis (blur sigma 0.75 x thickness
    there, half a voxel elsewhere, as SynthSeg). `noise`: noise std drawn from [0, noise] x the brain's
    99th percentile."""

    bias_std: float = 0.3
    bias_frequencies: int = 3
    thickness: Tuple[float, float] = (1.0, 3.0)
    noise: float = 0.03


@dataclass
class Synthetic:
    """One synthetic subject on the label map's grid: the T1-like image, its 31 structures and 4 tissues, and
    what was drawn for it."""

    image: np.ndarray
    structures: np.ndarray
    tissues: np.ndarray
    drawn: Dict[str, object]


def check_label_map(labels: np.ndarray, name: str = "the label map") -> None:
    """Refuse (InputError) a map with values SynthSeg's generation set lacks or without all 31 structures."""
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{name} holds non-integer values: expected a label map (FreeSurfer aseg numbers)")
    values = {int(v) for v in np.unique(labels)}
    unknown = sorted(values - set(GENERATION_LABELS))
    if unknown:
        raise InputError(f"{name} has label values {unknown[:8]} outside SynthSeg's generation labels "
                         "(FreeSurfer aseg numbers): they have no T1 intensity class")
    missing = [v for v in STRUCTURES.foreground if v not in values]
    if missing:
        named = ", ".join(f"{v} {STRUCTURES.by_value(v).name}" for v in missing[:6])
        raise InputError(f"{name} lacks {len(missing)} of the 31 structures ({named}{', ...' if len(missing) > 6 else ''}): "
                         "a training subject must hold every structure")


def to_structures(labels: np.ndarray, spacing: Sequence[float], radius_mm: float = 8.0) -> np.ndarray:
    """The 31-structure map of an aseg label map (structures.py's rule): the 31 keep their value, 0, extra-cerebral
    CSF (24) and head labels become 0, every other brain label takes the value of the nearest voxel (Euclidean, in mm)
    that holds a structure. The search visits offsets in order of distance, within `radius_mm` and then twice as
    far until every voxel has found one: exact, and fast because such voxels are few (vessels, lesions, ...)."""
    lab = np.asarray(labels).astype(np.int32)
    out = np.where(np.isin(lab, STRUCTURES.foreground), lab, 0).astype(np.uint8)
    todo = np.argwhere((lab != 0) & (out == 0) & (lab != EXTRA_CEREBRAL_CSF) & ~np.isin(lab, list(HEAD_LABELS)))
    if not out.any():
        return out
    base = out.copy()  # the structures as mapped: filled voxels are not searched for
    sp, shape = np.asarray(spacing, float), np.asarray(lab.shape)
    radius, left = radius_mm, np.arange(len(todo))
    while left.size:
        r = np.ceil(radius / sp).astype(int)
        grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij"), -1).reshape(-1, 3)
        dist = np.sqrt((((grid * sp) ** 2).sum(1)))
        keep = dist <= radius
        offsets = grid[keep][np.argsort(dist[keep], kind="stable")]
        for off in offsets:
            q = todo[left] + off
            inside = ((q >= 0) & (q < shape)).all(1)
            found = np.zeros(len(left), np.uint8)
            found[inside] = base[tuple(q[inside].T)]
            hit = found > 0
            if hit.any():
                point = todo[left[hit]]
                out[tuple(point.T)] = found[hit]
                left = left[~hit]
                if not left.size:
                    break
        radius *= 2
    return out


def _bias_field(shape: Tuple[int, ...], rng: np.random.Generator, p: SynthParams) -> Tuple[np.ndarray, float]:
    """exp of a random low-frequency field: a random sum of products of cosines (up to `bias_frequencies` - 1
    half-waves along each axis), scaled to a std drawn from [0, bias_std]; and that std."""
    std = float(rng.uniform(0.0, p.bias_std))
    k = p.bias_frequencies
    field_ = rng.standard_normal((k, k, k))
    for axis, n in enumerate(shape):
        basis = np.cos(np.pi * np.outer(np.arange(k), (np.arange(n) + 0.5) / n))  # (k, n)
        field_ = np.moveaxis(np.tensordot(field_, basis, axes=([axis], [0])), -1, axis)
    sd = float(field_.std())
    return np.exp(field_ * (std / sd if sd > 0 else 0.0)).astype(np.float32), std


def synthesize(labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, priors: Priors,
               params: SynthParams = SynthParams()) -> Synthetic:
    """A T1-like, skull-stripped image of a label map (numpy, `spacing` in mm along its axes) with its 31
    structures and 4 tissues; every random draw comes from `rng`, so one seed gives one subject."""
    check_label_map(labels)
    lab = np.asarray(labels).astype(np.int32)
    spacing = tuple(float(s) for s in spacing)
    brain = (lab != 0) & ~np.isin(lab, list(HEAD_LABELS))
    # work on the brain's box plus a margin wider than any blur: the result is that of the whole grid
    idx = np.argwhere(brain)
    margin = [int(np.ceil(4 * 0.75 * params.thickness[1] / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, int(lo) - m), min(n, int(hi) + m + 1))
                for lo, hi, m, n in zip(idx.min(0), idx.max(0), margin, lab.shape))
    lab_c, brain_c = lab[box], brain[box]

    n = priors.means.shape[1]
    means = np.clip(rng.normal(priors.means[0], priors.means[1]), 0.0, None)
    stds = np.abs(rng.normal(priors.stds[0], priors.stds[1]))
    lut = np.zeros(int(lab_c.max()) + 1, np.int64)
    for v in np.unique(lab_c):
        lut[v] = priors.classes[int(v)]
    cls = lut[lab_c]
    img = (means[cls] + stds[cls] * rng.standard_normal(lab_c.shape, dtype=np.float32)).astype(np.float32)

    field_, bias_std = _bias_field(lab_c.shape, rng, params)
    img *= field_

    axis = int(rng.integers(len(spacing)))
    thickness = float(rng.uniform(*params.thickness))
    sigma_mm = [0.5 * s for s in spacing]
    if thickness > spacing[axis]:
        sigma_mm[axis] = 0.75 * thickness
    work = sitk.GetImageFromArray(img)
    work.SetSpacing(list(reversed(spacing)))
    img = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(work, list(reversed(sigma_mm))))

    p99 = float(np.percentile(img[brain_c], 99))
    noise_sd = float(rng.uniform(0.0, params.noise)) * p99
    img = img + noise_sd * rng.standard_normal(img.shape, dtype=np.float32)

    p99 = float(np.percentile(img[brain_c], 99))
    img = np.clip(img * (OUTPUT_SCALE / p99), 1.0, 255.0)  # brain voxels stay > 0: prepare trains on those only
    image = np.zeros(lab.shape, np.float32)
    image[box] = np.where(brain_c, img, 0.0)

    structures = np.zeros(lab.shape, np.uint8)
    structures[box] = to_structures(lab_c, spacing)
    tissues = np.asarray(STRUCTURES.tissue_lut(), np.uint8)[structures]
    drawn = {"class_means": [round(float(m), 2) for m in means], "class_stds": [round(float(s), 2) for s in stds],
             "bias_std": round(bias_std, 4), "blur_axis": axis, "thickness_mm": round(thickness, 3),
             "sigma_mm": [round(s, 3) for s in sigma_mm], "noise_sd": round(noise_sd, 3), "classes": n}
    return Synthetic(image, structures, tissues, drawn)


@dataclass(frozen=True)
class SynthSettings:
    """`metaseg synth`: label maps in, one subject folder per map and copy in `output`
    (`<map name>_synth<copy>`). Copy k of a map draws from the seed (`seed`, crc32 of the map's file name, k),
    so a subject does not depend on the other maps given. `priors`: folder of SynthSeg's T1 prior files
    (default: the first map's folder). Existing subject folders are replaced only with `force`."""

    maps: Tuple[Path, ...]
    output: Path
    copies: int = 1
    seed: int = 0
    priors: Optional[Path] = None
    force: bool = False
    params: SynthParams = SynthParams()


def map_name(path: Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def _read_map(path: Path) -> Tuple[sitk.Image, np.ndarray, Tuple[float, ...]]:
    img = read_image(Path(path))
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D label map (found {img.GetDimension()}D, "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s))")
    arr = sitk.GetArrayFromImage(img)
    return img, arr, tuple(reversed(img.GetSpacing()))


def write_subject(folder: Path, geometry: sitk.Image, s: Synthetic, info: Dict[str, object], force: bool) -> None:
    """Write a subject folder atomically: built in a hidden folder beside it, then renamed into place."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        for key, arr in (("image", s.image), ("structures", s.structures), ("tissues", s.tissues)):
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(geometry)
            write_image(out, tmp / FILES[key])
        (tmp / "synth.json").write_text(json.dumps({**info, "drawn": s.drawn}, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if folder.exists():
            if not force:
                raise InputError(f"{folder} appeared while this run was working; it was kept: pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / "x")
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def run_synth(s: SynthSettings, say: Callable[[str], None] = print) -> List[Path]:
    """Write every map's copies as subject folders; every refusal (existing folders, unreadable or incomplete
    maps, missing priors) comes before anything is written. Returns the folders written."""
    if s.copies < 1:
        raise InputError(f"--copies must be at least 1 (got {s.copies})")
    if not s.maps:
        raise InputError("no label map given")
    out = Path(s.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} is a file: give the folder to write the subject folders into")
    names = [map_name(m) for m in s.maps]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"label maps with the same name: {', '.join(dup)}; names identify the subjects")
    plan = [(m, k, out / f"{n}_synth{k}") for m, n in zip(s.maps, names) for k in range(s.copies)]
    there = [f.name for _, _, f in plan if f.exists()]
    if there and not s.force:
        raise InputError(f"{len(there)} subject folder(s) exist in {out} ({', '.join(there[:4])}"
                         f"{', ...' if len(there) > 4 else ''}); pass --force to replace them")
    priors = Priors.load(Path(s.priors) if s.priors else Path(s.maps[0]).parent)
    for m in s.maps:  # refuse a bad map before any subject is written
        check_label_map(_read_map(m)[1], str(m))
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for m in s.maps:
        img, arr, spacing = _read_map(m)
        for k in range(s.copies):
            folder = out / f"{map_name(m)}_synth{k}"
            entropy = [s.seed, zlib.crc32(map_name(m).encode("utf-8")), k]
            syn = synthesize(arr, spacing, np.random.default_rng(entropy), priors, s.params)
            info = {"source": str(m), "seed": s.seed, "copy": k, "rng_entropy": entropy,
                    "params": {"bias_std": s.params.bias_std, "bias_frequencies": s.params.bias_frequencies,
                               "thickness": list(s.params.thickness), "noise": s.params.noise}}
            write_subject(folder, img, syn, info, s.force)
            say(f"wrote {folder}")
            done.append(folder)
    return done
