"""Signs that an input or a result is not what the model expects: reported or refused, never ignored.

Every threshold here was measured on training subjects only: the 7 FreeSurfer-labelled subjects that
were the whole training split at the time (the validation and test subjects and the 20 manually labelled
OASIS scans, 14 of which train since 0.3.0, were used to check that none of them is flagged; no warning on
the validation and test scans with the 0.3.0 weights either): `benchmarks/exploration/plausibility_calibration.py`
prints the figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..method.preprocess import normalize_intensity
from .registration import register_affine, registration_ok

NAMES = {1: "cortical grey matter", 2: "subcortical grey matter", 3: "white matter", 4: "CSF"}

# Share of each class in the labelled tissue of the training subjects' reference labels (min, max):
# 3D the aligned volumes, 2D coronal slice 109 (plausibility_calibration.py).
TRAINING_FRACTIONS = {
    3: {1: (0.537, 0.566), 2: (0.046, 0.052), 3: (0.372, 0.404), 4: (0.008, 0.019)},
    2: {1: (0.385, 0.458), 2: (0.148, 0.174), 3: (0.370, 0.436), 4: (0.008, 0.021)},
}
# The plausible range is the training range widened: down to half its minimum, up to 1.5x its maximum;
# CSF up to 4x, because the ventricles grow severalfold with age (the OASIS scans reach 5.4 % at 83 years).
LOW, HIGH = 0.5, {1: 1.5, 2: 1.5, 3: 1.5, 4: 4.0}

# The 2D model takes coronal slice 109 of an aligned volume. NCC of a slice with that slice of the 3D
# registration template (2 mm, inside the template's brain), training subjects: slice 109 0.85-0.93, slices
# 9 mm before/after 0.75-0.86; wrong planes of the same subjects: sagittal 0.34-0.49, axial 0.40-0.53,
# upside down 0.41-0.53; coronal slices of the unaligned native scans 0.41-0.76.
MIN_SLICE_NCC = 0.65  # below: refused (unless the user insists)
WARN_SLICE_NCC = 0.78  # below: segmented with a warning
TEMPLATE_SLICE = 109  # of the 1 mm aligned grid
SLICE_SHAPE = (192, 160)


def fraction_ranges(dims: int) -> Dict[int, Tuple[float, float]]:
    """The plausible share of each class in the labelled tissue, for 2D slices or 3D volumes."""
    return {c: (lo * LOW, min(1.0, hi * HIGH[c])) for c, (lo, hi) in TRAINING_FRACTIONS[dims].items()}


def tissue_warnings(labels: np.ndarray, dims: int) -> List[str]:
    """One warning naming every class whose share of the labelled tissue lies outside `fraction_ranges`
    (e.g. hashed-but-corrupt weights that call 65 % of a brain white matter); [] if all are plausible."""
    n = int((labels > 0).sum())
    if n == 0:
        return ["no tissue was labelled: the input does not look like a brain MRI"]
    counts = np.bincount(labels.ravel(), minlength=5)
    odd = []
    for c, (lo, hi) in fraction_ranges(dims).items():
        share = float(counts[c]) / n
        if not lo <= share <= hi:
            odd.append(f"{NAMES[c]} {100 * share:.1f}% (plausible {100 * lo:.1f}-{100 * hi:.1f}%)")
    if not odd:
        return []
    return [f"implausible tissue proportions: {'; '.join(odd)} of the labelled tissue (training brains: "
            + ", ".join(f"{NAMES[c]} {100 * lo:.0f}-{100 * hi:.0f}%" for c, (lo, hi) in TRAINING_FRACTIONS[dims].items())
            + "). Check the result: the input may not be a T1-weighted brain MRI, or the weights may be damaged"]


# Sizes of the 21 training brains (splits.json "train"), from their reference labels (native_seg4 > 0) and their
# skull-stripped scans (native_t1 > 0, an intracranial estimate like the brain mask of a run), in mL; measured
# by benchmarks/exploration/training_brain_sizes.py (docs/results.md). Adults: OASIS-1 scans of 18-83 years
# and FreeSurfer-processed adult scans. A brain outside this range widened by BRAIN_SIZE_MARGIN is one the model
# has not seen (an infant's, or voxel sizes wrong in the header): the validation brains lie within it
# (labelled 948-1222 mL, masks 1150-1495 mL).
TRAINING_BRAIN_ML = {"labelled": (1077.0, 1543.0), "brain mask": (1176.0, 1887.0)}
BRAIN_SIZE_MARGIN = 0.25


def brain_size_warnings(labelled_ml: float, mask_ml: float) -> List[str]:
    """A warning for a 3D brain whose labelled volume or brain mask (intracranial estimate) lies outside the
    training brains' range (widened by BRAIN_SIZE_MARGIN); [] otherwise."""
    odd = []
    for what, value in (("labelled", labelled_ml), ("brain mask", mask_ml)):
        lo, hi = TRAINING_BRAIN_ML[what]
        if not lo * (1 - BRAIN_SIZE_MARGIN) <= value <= hi * (1 + BRAIN_SIZE_MARGIN):
            odd.append(f"its {what} volume is {value:.0f} mL (training brains {lo:.0f}-{hi:.0f} mL)")
    if not odd:
        return []
    return [f"the brain lies outside the sizes the model was trained on: {'; '.join(odd)}. The model has seen only "
            "adult brains (18-83 years): an infant's or child's brain, or voxel sizes wrong in the header, give less "
            "reliable labels (small structures shrink more than scaling predicts); check the result"]


def slice_template_ncc(image: np.ndarray, template: sitk.Image) -> float:
    """NCC of a 2D slice (centred on SLICE_SHAPE) with coronal slice 109 of the 3D template, both at
    the template's spacing, inside the template's brain."""
    f = int(round(template.GetSpacing()[0]))
    tpl = sitk.GetArrayFromImage(template)[TEMPLATE_SLICE // f]
    arr = normalize_intensity(_centred(np.asarray(image, np.float32), SLICE_SHAPE))
    h, w = tpl.shape
    small = arr[: h * f, : w * f].reshape(h, f, w, f).mean((1, 3))
    m = tpl > 0
    a, b = small[m] - small[m].mean(), tpl[m] - tpl[m].mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def slice_check(image: np.ndarray, template: sitk.Image) -> Tuple[float, Optional[str], Optional[str]]:
    """(NCC, refusal or None, warning or None) for a 2D input: is it an aligned coronal slice? With a refusal, the
    warning is what a run segmented anyway reports."""
    ncc = slice_template_ncc(image, template)
    if ncc < MIN_SLICE_NCC:
        finding = (f"the slice does not look like an aligned coronal brain slice (correlation {ncc:.2f} with the "
                   f"model's coronal slice; aligned slices score {WARN_SLICE_NCC:.2f} or more, sagittal and axial "
                   "slices 0.34-0.53): the 2D model takes coronal slice 109 of a T1 aligned like neurite-oasis "
                   "(160x192, 1 mm)")
        # the refusal speaks to the command line; the warning of a run that went on anyway to every reader
        return ncc, (f"{finding}. Extract that slice, use the 3D model on the whole scan, or pass "
                     "--accept-poor-match to segment it anyway"), f"{finding}. Check the result"
    if ncc < WARN_SLICE_NCC:
        return ncc, None, (f"the slice matches the model's aligned coronal slice only loosely (correlation {ncc:.2f}; "
                           f"aligned slices {WARN_SLICE_NCC:.2f} or more): is it coronal slice 109 of an aligned T1? "
                           "Check the result")
    return ncc, None, None


# Nonzero volume of the training subjects' skull-stripped native scans 1.41-1.89 L; the same heads with
# skull 3.33-4.30 L. Above this a scan holds more than a brain (skull, neck or background noise).
MAX_BRAIN_LITRES = 2.5
# A scan whose interior correlates negatively with the template has its tissue contrast inverted
# (training subjects with inverted intensities: -0.36; T1s 0.86 or more).
INVERTED_NCC_INTERIOR = -0.1
# Gate a flipped copy must pass to blame the header's orientation: stricter than volume.py's warning gate
# (0.80 / 0.66), so that only a clear match is reported as a wrong header.
FLIP_OK = (0.85, 0.78)


# A head is about 200-250 mm along its longest side (the training heads' fields of view: 256 mm). A field of view
# beyond this holds more than a head: neck, shoulders, a spine scan.
MAX_HEAD_FOV_MM = 300.0


def field_of_view_hint(scan: sitk.Image) -> str:
    """A clause ('; ...') advising a crop when the scan's field of view is larger than a head, else ''."""
    sides = [n * sp for n, sp in zip(scan.GetSize(), scan.GetSpacing())]
    if max(sides) <= MAX_HEAD_FOV_MM:
        return ""
    return (f"; its field of view is {' x '.join(f'{x:.0f}' for x in sides)} mm, more than a head (at most about "
            f"{MAX_HEAD_FOV_MM:.0f} mm): crop it to the head (e.g. Slicer's Crop Volume module) and run again")


# Told when the scan went into registration without a brain mask: a small whole head (a child's, or a scan whose
# voxel size is understated) has a foreground that fits one adult brain, so `auto` takes it for skull-stripped.
EXTRACTION_HINT = ("; if the scan still has its skull (e.g. a small or a child's head, taken for a skull-stripped "
                   "brain by its size), pass --brain-extraction on")


@dataclass(frozen=True)
class MatchCause:
    """The likely cause of a failed registration. `kind`: whole_head, inverted_contrast, flipped_axis or unknown;
    `finding`: what was seen, in words for anyone; `advice`: what to do, in the command line's words (it may
    name options); `facts`: the numbers behind the finding (a program words its own advice from `kind` and these)."""

    kind: str
    finding: str
    advice: str = ""
    facts: Dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return f"{self.finding}. {self.advice}" if self.advice else self.finding


def registration_problem(scan: sitk.Image, template: sitk.Image, ncc_interior: float,
                         try_flips: bool = True, brain_given: bool = True) -> MatchCause:
    """The likely cause of a failed registration: a whole head, inverted (T2-like) contrast,
    a voxel axis flipped in the header (found by registering flipped copies, ~10 s each: only
    when `try_flips`, i.e. before refusing), or else a generic question. Without `brain_given` (no extracted or
    given brain mask) the advice includes brain extraction; a field of view larger than a head, a crop."""
    arr = sitk.GetArrayViewFromImage(scan)
    litres = float((arr > 0).sum()) * float(np.prod(scan.GetSpacing())) / 1e6
    extra = ("" if brain_given else EXTRACTION_HINT) + field_of_view_hint(scan)
    if litres > MAX_BRAIN_LITRES:
        return MatchCause("whole_head", f"it has {litres:.1f} L of nonzero voxels, more than a brain (skull-stripped "
                          "scans: about 1.1-1.9 L): a whole head with skull, neck or background noise?",
                          "Give a skull-stripped T1, or pass --mask with a brain mask"
                          + ("" if brain_given else " or --brain-extraction on") + field_of_view_hint(scan),
                          {"litres": round(litres, 2)})
    if ncc_interior < INVERTED_NCC_INTERIOR:
        return MatchCause("inverted_contrast", "its tissue contrast looks inverted (dark white matter, bright CSF): "
                          "a T2-weighted or FLAIR scan? The model needs a T1-weighted scan")
    if try_flips:
        for axis in range(3):
            flipped = sitk.Flip(scan, [a == axis for a in range(3)])
            flipped.CopyInformation(scan)  # same header, mirrored voxels: what a wrong direction sign looks like
            _, q = register_affine(flipped, template)
            if registration_ok(q, *FLIP_OK):
                return MatchCause("flipped_axis", f"its header's orientation looks wrong: the voxels match the "
                                  f"template once voxel axis {'ijk'[axis]} is flipped (NCC {q.ncc:.2f} / "
                                  f"{q.ncc_interior:.2f}). Fix the direction in the header (e.g. reorient the volume "
                                  "in Slicer and save it) and run again", "",
                                  {"axis": "ijk"[axis], "flipped_ncc": round(q.ncc, 3),
                                   "flipped_ncc_interior": round(q.ncc_interior, 3)})
    return MatchCause("unknown", "is it a skull-stripped T1-weighted brain MRI (not noise, another modality or a "
                      "partial field of view)?", "Check the scan, or pass --mask with a brain mask" + extra)


def _centred(a: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """`a` centre-cropped or zero-padded to `shape`."""
    out = np.zeros(shape, np.float32)
    h, w = min(a.shape[0], shape[0]), min(a.shape[1], shape[1])
    ay, ax = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    oy, ox = (shape[0] - h) // 2, (shape[1] - w) // 2
    out[oy : oy + h, ox : ox + w] = a[ay : ay + h, ax : ax + w]
    return out
