"""Brain extraction: decide whether a scan still has its skull, and if so find its brain with deepbet.

The model was meta-learned on skull-stripped T1s; a clinician's scan comes with skull, scalp and
neck. `prepare_brain` turns either into a brain mask on the scan's own grid (or None: the scan is
used exactly as today, so skull-stripped inputs give the same labels bit for bit).

Extractor: deepbet (PyPI, MIT; Fisch et al. 2024), a TorchScript U-Net whose two weight files ship
inside its wheel: offline on CPU, CUDA and MPS, about 10 s for a 256^3 head on 2 CPU cores. We call
its `BrainExtraction` API (coarse box model, fine model, its post-processing) and check the sha256
of its weight files before loading them (TorchScript: no pickle is executed). It is an optional
dependency (`pip install "metaseg[brain]"`): only whole-head scans need it.

"Skull present" is decided from the image (`SkullDecision`): the volume of its foreground (voxels
above 10 % of its 99th percentile) says "one brain" up to FOREGROUND_BRAIN_ML (native skull-stripped
T1s here: 1.17-1.87 L; heads with skull: 2.4-3.7 L). Above it, deepbet's mask decides: a head
has much tissue outside the brain, a large skull-stripped brain (or one with a noisy background)
has almost none.
"""
from __future__ import annotations

import hashlib
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ..io.readers import InputError
from .plausibility import field_of_view_hint

MODES = ("auto", "on", "off")
DEEPBET_VERSION = "1.0.2"
# sha256 of the weight files inside the deepbet 1.0.2 wheel (its RECORD); anything else is refused.
DEEPBET_SHA256 = {
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
}
INSTALL_HINT = 'pip install "metaseg[brain]" (the deepbet package), or pass --brain-extraction off'

# Foreground (> 10 % of the 99th percentile, on a ~2 mm copy) of the data here (docs/results.md):
# native skull-stripped T1s 1168-1874 mL (30 subjects), Talairach-aligned ones 1873-2205 mL,
# whole heads 2425-3682 mL (9 subjects).
FOREGROUND_BRAIN_ML = 2000.0
FOREGROUND_FRACTION = 0.10
# Share of that foreground outside deepbet's brain above which the skull is present (heads: ~0.5).
OUTSIDE_SKULL = 0.30
# Plausible extracted brains: deepbet's masks of our 9 heads are 1.2-1.6 L (adult intracranial
# volumes 1.1-2.0 L). Outside this range the extraction did not find one brain.
MIN_BRAIN_ML = 500.0
MAX_BRAIN_ML = 2500.0
# A separate piece of deepbet's raw mask this large is a second brain-like object, not noise.
SECOND_COMPONENT_ML = 50.0
# deepbet keeps only the brain it finds first; a second head beside it would be silently dropped. The
# foreground's second-largest piece is at most 6 mL in our 19 scans, 2313 mL with two heads side by side.
SECOND_OBJECT_ML = 300.0
THRESHOLD = 0.5  # deepbet's own default on its probability
# CT in Hounsfield units: air is -1000. MRI magnitudes are never that negative.
CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.2


@dataclass
class SkullDecision:
    """Whether to extract the brain, and why (for the report and the terminal)."""

    extract: bool
    reason: str
    foreground_ml: float
    outside_fraction: Optional[float] = None  # foreground share outside deepbet's brain, when it was asked

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class BrainMask:
    """deepbet's brain on the scan's grid (uint8, 1 = brain) with its volume and cost."""

    mask: sitk.Image
    volume_ml: float
    seconds: float
    components_ml: Tuple[float, ...] = field(default_factory=tuple)  # raw mask pieces, largest first

    def to_dict(self) -> Dict[str, Any]:
        return {"extractor": f"deepbet {DEEPBET_VERSION}", "mask_volume_ml": round(self.volume_ml, 1),
                "seconds": round(self.seconds, 2)}


def foreground_components_ml(scan: sitk.Image) -> list:
    """Volumes (mL) of the connected pieces of the foreground (voxels above FOREGROUND_FRACTION of the
    scan's 99th percentile, on a ~2 mm copy), largest first."""
    img = sitk.Cast(scan, sitk.sitkFloat32)
    factors = [max(1, min(n, int(round(2.0 / s)))) for n, s in zip(img.GetSize(), img.GetSpacing())]
    if factors != [1, 1, 1]:
        img = sitk.BinShrink(img, factors)
    a = sitk.GetArrayViewFromImage(img)
    vox_ml = float(np.prod(img.GetSpacing())) / 1000.0
    return _components_ml(_foreground(a), vox_ml)


def foreground_ml(scan: sitk.Image) -> float:
    """Volume (mL) of the scan's foreground (see `foreground_components_ml`)."""
    return float(sum(foreground_components_ml(scan)))


def decide_skull(scan: sitk.Image, extractor: Optional[Callable[[sitk.Image], BrainMask]] = None,
                 say: Optional[Callable[[str, str], None]] = None) -> Tuple[SkullDecision, Optional[BrainMask]]:
    """Skull present? From the foreground volume, then (if that is ambiguous) deepbet's mask.

    Returns the decision and the mask when it was computed for the decision (reused, not recomputed).
    `extractor` defaults to `extract_brain` on the CPU; `say(stage, message)` hears the "extract" stage.
    """
    fg = foreground_ml(scan)
    if fg <= FOREGROUND_BRAIN_ML:
        return SkullDecision(False, f"skull-stripped: its foreground ({fg:.0f} mL) fits one brain "
                             f"(at most {FOREGROUND_BRAIN_ML:.0f} mL)", fg), None
    if say is not None:
        say("extract", f"extracting brain (deepbet): the scan's foreground, {fg:.0f} mL, is larger than one brain")
    bm = (extractor or extract_brain)(scan)
    fg_full = _foreground(sitk.GetArrayViewFromImage(scan))
    inside = int((fg_full & (sitk.GetArrayViewFromImage(bm.mask) > 0)).sum())
    outside = 1.0 - inside / max(int(fg_full.sum()), 1)
    if outside > OUTSIDE_SKULL:
        why = (f"skull present: its foreground is {fg:.0f} mL, more than one brain, and {100 * outside:.0f}% of it "
               f"lies outside the brain deepbet found")
        return SkullDecision(True, why, fg, outside), bm
    why = (f"skull-stripped: its foreground is {fg:.0f} mL but only {100 * outside:.0f}% of it lies outside the "
           "brain deepbet found")
    return SkullDecision(False, why, fg, outside), None


def _foreground(a: np.ndarray) -> np.ndarray:
    """Voxels above FOREGROUND_FRACTION of the way from the minimum to the 99th percentile of the rest."""
    lo = float(a.min())
    above = a[a > lo]
    if above.size == 0:
        return np.zeros(a.shape, bool)
    hi = float(np.percentile(above, 99))
    return a > lo + FOREGROUND_FRACTION * (hi - lo)


def load_deepbet(device: torch.device):
    """deepbet's `BrainExtraction` with its checked weights on `device`; InputError if not installed."""
    try:
        import deepbet
        from deepbet.utils import DATA_PATH
    except ImportError as e:
        raise InputError(f"the scan needs brain extraction, which needs deepbet: {INSTALL_HINT}",
                         reason="needs_deepbet") from e
    models = Path(DATA_PATH) / "models"
    for name, want in DEEPBET_SHA256.items():
        path = models / name
        if not path.is_file():
            raise InputError(f"deepbet's weights {path} are missing: reinstall deepbet=={DEEPBET_VERSION}",
                             reason="deepbet_damaged", version=DEEPBET_VERSION)
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            raise InputError(f"deepbet's weights {path} have sha256 {got[:12]}..., not those of deepbet "
                             f"{DEEPBET_VERSION}: install deepbet=={DEEPBET_VERSION}", reason="deepbet_damaged",
                             version=DEEPBET_VERSION)
    with warnings.catch_warnings():  # torch >= 2.9 calls torch.jit.load deprecated; it still loads these files
        warnings.simplefilter("ignore", DeprecationWarning)
        bet = deepbet.BrainExtraction(no_gpu=True)  # loads on the CPU; moved to our device below
    bet.model.to(device)
    bet.bbox_model.to(device)
    return bet


def extract_brain(scan: sitk.Image, device: Optional[torch.device] = None) -> BrainMask:
    """deepbet's brain mask on the scan's grid, refused (InputError) unless it is one plausible brain.

    deepbet expects RAS voxel order (it reads NIfTI through nibabel's closest canonical): the scan
    is permuted/flipped to that order (exact, no interpolation) and the mask permuted back.
    """
    t0 = time.perf_counter()
    objects = foreground_components_ml(scan)
    if len(objects) > 1 and objects[1] >= SECOND_OBJECT_ML:
        raise InputError(f"the scan holds a second brain-like component ({objects[1]:.0f} mL of tissue beside "
                         f"{objects[0]:.0f} mL): two heads or a large object in the field of view? Crop it to one "
                         "head, or pass a brain mask with --mask", reason="two_objects", ml=round(objects[1]),
                         first_ml=round(objects[0]))
    bet = load_deepbet(device or torch.device("cpu"))
    ras = sitk.DICOMOrient(sitk.Cast(scan, sitk.sitkFloat32), "RAS")
    x = np.ascontiguousarray(sitk.GetArrayFromImage(ras).transpose(2, 1, 0))
    try:
        prob = bet.run_model(x)
    except (AssertionError, ValueError, RuntimeError) as e:  # no foreground for its bounding box, etc.
        raise InputError(f"brain extraction found no brain in the scan ({e}): is it a T1 brain MRI?",
                         reason="no_brain_found", ml=0) from e
    raw = prob > THRESHOLD
    vox_ml = float(np.prod(scan.GetSpacing())) / 1000.0
    pieces = _components_ml(raw, vox_ml)
    if not pieces or pieces[0] < MIN_BRAIN_ML:
        found = pieces[0] if pieces else 0.0
        raise InputError(f"brain extraction found almost no brain ({found:.0f} mL; a brain has 1100-2000 mL): "
                         "is the input a T1 MRI of a head? Pass a brain mask with --mask, or --brain-extraction off "
                         "for a skull-stripped scan" + field_of_view_hint(scan), reason="no_brain_found", ml=round(found))
    if len(pieces) > 1 and pieces[1] >= SECOND_COMPONENT_ML:
        raise InputError(f"brain extraction found a second brain-like component ({pieces[1]:.0f} mL beside "
                         f"{pieces[0]:.0f} mL): the scan may hold two heads or a large artefact; crop it to one "
                         "head or pass a brain mask with --mask" + field_of_view_hint(scan), reason="two_objects",
                         ml=round(pieces[1]), first_ml=round(pieces[0]))
    mask = bet.postprocess(raw, 0)  # deepbet: keep its largest piece, fill its holes
    volume = float(mask.sum()) * vox_ml
    if volume > MAX_BRAIN_ML:
        raise InputError(f"brain extraction found {volume:.0f} mL of brain-like tissue, more than one brain "
                         f"(at most {MAX_BRAIN_ML:.0f} mL): two heads in the field of view, or not a T1 brain MRI?"
                         + (field_of_view_hint(scan) or "; crop the scan to one head, or pass a brain mask with --mask"),
                         reason="too_much_brain", ml=round(volume), max_ml=round(MAX_BRAIN_ML))
    out = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
    out.CopyInformation(ras)
    # the RAS copy has the same voxel centres, so nearest-neighbour resampling is an exact permutation back
    out = sitk.Resample(out, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return BrainMask(out, volume, time.perf_counter() - t0, tuple(pieces[:3]))


def _components_ml(mask: np.ndarray, vox_ml: float) -> list:
    """Volumes (mL) of the 26-connected pieces of a boolean array, largest first."""
    if not mask.any():
        return []
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    sizes = np.bincount(sitk.GetArrayViewFromImage(cc).ravel())[1:]
    return sorted((float(s) * vox_ml for s in sizes if s > 0), reverse=True)


def _refuse_ct(scan: sitk.Image) -> None:
    """A CT in Hounsfield units (a large share of voxels at air, about -1000) is not a T1 MRI: refuse it."""
    a = sitk.GetArrayViewFromImage(scan)[::2, ::2, ::2]
    air = float((a <= CT_AIR_HU).mean())
    if air > CT_AIR_FRACTION:
        raise InputError(f"{100 * air:.0f}% of the voxels are at or below {CT_AIR_HU:g} (air in Hounsfield units): this "
                         "looks like a CT, not a T1 MRI; MetaSeg segments T1-weighted MRI", reason="looks_like_ct",
                         percent_air=round(100 * air))


def prepare_brain(scan: sitk.Image, mode: str, device: Optional[torch.device] = None, *,
                  say: Optional[Callable[[str, str], None]] = None, cancel: Optional[threading.Event] = None,
                  ) -> Tuple[Optional[BrainMask], Dict[str, Any]]:
    """Apply `mode` (auto|on|off) to a 3D scan: (brain mask or None, report entry with the decision and why)."""
    if mode not in MODES:
        raise InputError(f"brain extraction must be one of {', '.join(MODES)} (got {mode!r})")
    say = say or (lambda stage, msg: None)
    if mode != "off":
        _refuse_ct(scan)
    if mode == "off":
        return None, {"mode": mode, "extracted": False, "reason": "off: the scan is used as it is"}
    extractor = lambda img: extract_brain(img, device)  # noqa: E731
    if mode == "on":
        say("extract", "extracting brain (deepbet)")
        bm = extractor(scan)
        info: Dict[str, Any] = {"mode": mode, "extracted": True, "reason": "on: brain extraction requested"}
    else:
        decision, bm = decide_skull(scan, extractor, say)
        info = {"mode": mode, "extracted": decision.extract, "reason": decision.reason,
                "foreground_ml": round(decision.foreground_ml, 1)}
        if decision.outside_fraction is not None:
            info["outside_fraction"] = round(decision.outside_fraction, 3)
    if cancel is not None and cancel.is_set():
        from ..method.fit import FitCancelled

        raise FitCancelled("cancelled during brain extraction")
    if bm is not None:
        info.update(bm.to_dict())
    return bm, info
