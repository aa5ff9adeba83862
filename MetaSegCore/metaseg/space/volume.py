"""3D scans: into the model's space, fit, and labels back on the scan's own voxel grid.

A scan already on the training grid (160x192x224 voxels of 1 mm, identity header: the aligned
files) is fitted as it is. Any other scan is registered affinely to the template, resampled onto
the model grid and normalized like the training data. Either way the fitted INR is then decoded
at the scan's own brain voxels through one affine map (`FittedVolume`): the labels have exactly
the scan's size, spacing, origin and direction, and no label image is ever resampled.

Template: the mean of the *training* subjects' aligned T1s at 2 mm (`build_template`), not the
image the meta-learned initialization renders. That rendering was measured as a poor target:
the initialization is fitted on brain voxels only (3D fits are foreground-only), so it renders
noise outside the brain, and inside the brain it correlates only 0.41-0.57 with real aligned
brains (NCC, 4 subjects; docs/results.md), against 0.78-0.82 between real brains.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .bias import n4_correct
from ..io.data import load_volume
from ..method.fit import FitCancelled
from .fitted import FittedVolume
from .geometry import entropy_map, model_grid, physical_to_model, to_model_space
from .image_quality import ENTROPY_POINTS, measure, quality_warnings
from ..io.readers import InputError, image_array_3d, input_warnings, same_geometry
from ..labelsets import as_tissues
from .plausibility import registration_problem, tissue_warnings
from ..method.preprocess import normalize_intensity
from .registration import quality_as_is, register_affine, registration_ok
from ..resources import weights_dirs
from ..runtime import Hooks, Model
from ..method.segment import LIVE_POINTS, segment_array

TEMPLATE_NAME = "metaseg3d_template.nii.gz"
TEMPLATE_MM = 2.0
MIN_PSNR_3D = 18.0  # below: the fit did not reproduce the scan (real T1s: 22.7-23.9 dB on brain voxels)
# Registration gate for this template, calibrated on the training subjects of both label groups
# (`metaseg prepare`, docs/results.md): FreeSurfer-prepared native T1s 0.90-0.95 in the brain and
# 0.79-0.89 in its interior; OASIS scans (another scanner and intensity processing) 0.84-0.90 / 0.72-0.82,
# the lowest from the most atrophied brain (oas1-0113). The gate sits below the training minimum with a
# margin. Refused far below it: a head with skull 0.30 / 0.46, an inverted (T2-like) contrast
# 0.34 / -0.35, noise 0.00 / 0.00. A smooth brain-shaped blob (0.92 / 0.74) now passes this gate and
# is left to the label plausibility checks.
TEMPLATE_MIN_NCC = 0.80
TEMPLATE_MIN_NCC_INTERIOR = 0.66
# Far below that gate the scan is refused before the fit (minutes of garbage otherwise) unless the
# user insists. Refused: a voxel axis flipped in the header (sub-01: 0.72-0.77 / 0.55-0.59), a head with
# skull 0.30 / 0.46, inverted contrast 0.29 / -0.36, noise 0.00 / 0.00 (measured like the gate above).
REFUSE_NCC = 0.78
REFUSE_NCC_INTERIOR = 0.60
DECODE_CHUNK = 1 << 20  # voxels labelled between two progress reports
# Thick slices measured on the validation scans (slab-averaged copies, docs/results.md): 3 mm costs
# 0.005-0.018 fg-Dice, 5 mm 0.023-0.027. Thicker slices are unmeasured: warn above 5 mm.
THICK_SLICE_MM = 5.0


@dataclass
class VolumeResult:
    labels: sitk.Image  # uint8, the scan's exact geometry
    fitted: FittedVolume
    psnr: float
    entropy: Optional[sitk.Image] = None  # normalized entropy in [0, 1] on the scan's grid
    registration: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    quality: Dict[str, Any] = field(default_factory=dict)  # image_quality.measure: tissue contrast under the labels
    # With several fits: each fit's own labels counted per label value (fits, 256): how much the volumes move
    # from fit to fit, i.e. the spread the run measured (None for one fit)
    fit_counts: Optional[np.ndarray] = None


def is_model_grid(img: sitk.Image, canvas: Sequence[int]) -> bool:
    """True for a scan on the training grid itself (an `aligned_norm`-like file): no registration.

    Those files carry an identity affine: ITK reads it as a diagonal direction (NIfTI's identity
    is diag(-1, -1, 1) in LPS). Their header does not describe the anatomy (the voxels are LIA,
    see geometry.py), so registering them would start from a wrong orientation; their voxels are
    already the model's.
    """
    d = np.array(img.GetDirection()).reshape(3, 3)
    return (tuple(img.GetSize()) == tuple(reversed(canvas))
            and np.allclose(img.GetSpacing(), 1.0, atol=1e-3)
            and np.allclose(np.abs(d), np.eye(3), atol=1e-3))


def model_reference(canvas: Sequence[int]) -> sitk.Image:
    """An empty image with the model grid's geometry (1 mm, LIA, centred on 0)."""
    return model_grid(sitk.Image([int(x) for x in reversed(canvas)], sitk.sitkUInt8))


def build_template(root: Path, subjects: Sequence[str], canvas: Sequence[int], out: Path) -> sitk.Image:
    """Mean of the subjects' normalized aligned T1s, averaged to 2 mm, on the model grid's geometry."""
    acc = None
    for s in subjects:
        img = normalize_intensity(load_volume(Path(root) / s).image)
        acc = img if acc is None else acc + img
    mean = sitk.GetImageFromArray((acc / len(subjects)).astype(np.float32))
    mean.CopyInformation(model_reference(canvas))
    f = int(TEMPLATE_MM)
    tpl = sitk.BinShrink(mean, [f, f, f])  # block means: the 2 mm voxels cover the 1 mm ones exactly
    sitk.WriteImage(tpl, str(out), True)
    return tpl


def load_template(path: Optional[Path] = None) -> sitk.Image:
    if path is None:
        for d in weights_dirs():
            if (d / TEMPLATE_NAME).is_file():
                path = d / TEMPLATE_NAME
                break
        else:
            raise FileNotFoundError(f"the registration template {TEMPLATE_NAME} is not installed (searched "
                                    f"{', '.join(str(d) for d in weights_dirs())})")
    return sitk.Image(_read_template(str(Path(path).resolve())))  # a copy-on-write copy: callers may change it


@functools.lru_cache(maxsize=2)
def _read_template(path: str) -> sitk.Image:
    """Read once per process: a batch registers every scan to the same template."""
    return sitk.ReadImage(path, sitk.sitkFloat32)


def register_to_template(work: sitk.Image) -> Tuple[sitk.AffineTransform, Dict[str, Any]]:
    """Register a skull-stripped scan to the template: (model -> scan transform, quality dict with "ok").

    The one path into the model's space, shared by `segment_volume` and `prepare` (training packs),
    so that training data is registered exactly as users' scans are."""
    transform, quality = register_affine(work, load_template())
    info = quality.to_dict()
    info["ok"] = registration_ok(quality, TEMPLATE_MIN_NCC, TEMPLATE_MIN_NCC_INTERIOR)
    return transform, info


def voxel_points(img: sitk.Image, flat_index: np.ndarray) -> np.ndarray:
    """Physical centres (N, 3) of voxels given by flat indices into the (z, y, x) array."""
    zyx = np.stack(np.unravel_index(flat_index, tuple(reversed(img.GetSize()))), 1)
    ijk = zyx[:, ::-1].astype(np.float64)
    m = np.array(img.GetDirection(), float).reshape(3, 3) @ np.diag(img.GetSpacing())
    return ijk @ m.T + np.array(img.GetOrigin(), float)


@dataclass(frozen=True)
class VolumeSettings:
    """How `segment_volume` runs. `seed`: of the fit's coordinate sampling. `fits` > 1: an ensemble of
    that many fits (seeds `seed`, `seed` + 1, ...) averaged in probability at every voxel (the accuracy
    mode: +0.010 validation fg-Dice for 3 fits, docs/results.md). `uncertainty`: also the per-voxel entropy.
    `bias_correction`: divide the brain by N4's bias field first (bias.py). `accept_poor_match`: segment a
    scan whose registration is far below the gate (otherwise refused). `register`: None decides
    (registration unless the scan is on the model grid), True/False force."""

    seed: int = 0
    fits: int = 1
    uncertainty: bool = False
    bias_correction: bool = False
    accept_poor_match: bool = False
    register: Optional[bool] = None


def segment_volume(scan: sitk.Image, model: Model, settings: VolumeSettings = VolumeSettings(),
                   hooks: Hooks = Hooks(), *, mask: Optional[sitk.Image] = None,
                   info: Optional[Dict[str, Any]] = None) -> VolumeResult:
    """Segment a 3D scan: labels (and optional entropy) on its own grid, plus the fitted volume.

    `mask` (the scan's geometry, nonzero = brain) restricts the scan to a brain the user trusts. `info`
    is kept in the fitted volume (labels, weights sha256, source). A registration far below the gate
    (REFUSE_NCC) raises InputError naming the likely cause, before the fit, unless
    `settings.accept_poor_match`. With several fits, `fitted` and live previews are the first fit's.
    `hooks.decode_progress(done, total, elapsed_s)` follows the labelling of the scan's voxels (minutes
    for a 512^3 scan).
    """
    net, log_lr, plan, canvas = model.net, model.log_lr, model.plan, model.canvas
    seed, fits, cancel, live, live_every = settings.seed, settings.fits, hooks.cancel, hooks.live, hooks.live_every
    say = hooks.say
    t0 = time.perf_counter()
    arr = image_array_3d(scan)
    if mask is not None:
        ok, why = same_geometry(mask, scan)
        if not ok:
            raise InputError(f"the mask does not have the scan's geometry ({why}); resample it onto the scan first",
                             reason="mask_geometry", why=why)
        arr = np.where(sitk.GetArrayViewFromImage(mask) > 0, arr, 0).astype(np.float32)
    if not (arr > 0).any():
        if mask is not None:
            raise InputError("no voxel of the scan above 0 lies inside the mask: the mask is empty or misses the "
                             "brain; give a mask whose nonzero voxels cover the brain (or leave --mask out)",
                             reason="mask_misses_brain")
        raise InputError("the scan has no voxel above 0: expected a skull-stripped T1 (background 0), or pass --mask",
                         reason="empty_scan")
    work = sitk.GetImageFromArray(arr)
    work.CopyInformation(scan)
    if settings.bias_correction:
        say("bias", "correcting the bias field (N4)")
        work = n4_correct(work, work > 0)
        arr = sitk.GetArrayFromImage(work)
    warnings: List[str] = input_warnings(scan) + spacing_warnings(scan)
    reg_info = None
    transform = None
    register = settings.register if settings.register is not None else not is_model_grid(scan, canvas)
    if register:
        say("register", "registering the scan to the model's template (affine, mutual information)")
        transform, reg_info = register_to_template(work)
        warnings += match_gate(reg_info, work, settings.accept_poor_match, say, brain_given=mask is not None)
        reference = model_reference(canvas)
        model_arr = sitk.GetArrayFromImage(to_model_space(work, reference, transform))
        model_arr[model_arr < 0] = 0
        m2p = physical_to_model(reference, canvas, transform=transform)
    else:
        if tuple(arr.shape) != tuple(canvas):
            raise InputError(f"without registration the scan must be on the model grid {tuple(reversed(canvas))}, "
                             f"got {scan.GetSize()}")
        model_arr, reference, m2p = arr, scan, physical_to_model(scan, canvas)
        # not registered, but judged by the same gate as it lies: an inverted or foreign scan that happens to have
        # the training grid's size must not skip it (aligned validation brains: NCC 0.89-0.92 / 0.77-0.83)
        as_is = sitk.GetImageFromArray(arr)
        as_is.CopyInformation(model_reference(canvas))
        quality = quality_as_is(as_is, load_template())
        reg_info = {**quality.to_dict(), "metric": None, "ok": registration_ok(quality, TEMPLATE_MIN_NCC, TEMPLATE_MIN_NCC_INTERIOR)}
        warnings += match_gate(reg_info, as_is, settings.accept_poor_match, say)
    brain = model_arr > 0  # what the fit sees; the network knows tissue only there
    model_arr = normalize_intensity(model_arr, brain, denoise=True)  # noise must not darken the brain
    t1 = time.perf_counter()

    snapshot = None
    if live is not None:
        preview = _ScanPreview(scan, arr)

        def labels_now(step: int, inr) -> None:
            live(step, preview.labels(FittedVolume(inr, m2p, mask=brain)))

        snapshot = labels_now

    members, psnrs = [], []
    fit_info = {**(info or {}), "reference": _geometry(scan)}
    for k in range(fits):
        say("fit", f"fitting {plan.steps} steps" + (f" (fit {k + 1} of {fits})" if fits > 1 else ""))
        res = segment_array(net, log_lr, plan, model_arr, canvas, seed=seed + k, normalize=False, progress=hooks.progress,
                            cancel=cancel, snapshot=snapshot if k == 0 else None, live_every=live_every, decode=False,
                            member=k)
        members.append(FittedVolume(res.fitted, m2p, mask=brain, info=fit_info))
        psnrs.append(res.psnr)
    fitted, psnr = members[0], min(psnrs)  # the worst fit decides the PSNR warning
    t2 = time.perf_counter()

    say("decode", "labelling the scan's voxels")
    flat = np.flatnonzero(arr.reshape(-1) > 0)
    labels = np.zeros(arr.size, np.uint8)
    values = np.asarray(net.values, np.uint8)
    fit_counts = np.zeros((len(members), 256), np.int64) if len(members) > 1 else None
    ent = np.zeros(arr.size, np.float32) if settings.uncertainty else None
    t_dec = time.perf_counter()
    for s in range(0, len(flat), DECODE_CHUNK):  # in chunks: bounded memory, and progress on big scans
        if cancel is not None and cancel.is_set():
            raise FitCancelled("cancelled while labelling the scan's voxels")
        part = flat[s : s + DECODE_CHUNK]
        points = voxel_points(scan, part)
        if ent is not None or len(members) > 1:
            each = [m.query(points, "probabilities") for m in members]
            if fit_counts is not None:
                for k, p in enumerate(each):
                    fit_counts[k] += np.bincount(values[p.argmax(1)], minlength=256)
            probs = sum(each) / len(each)
            labels[part] = values[probs.argmax(1)]
            if ent is not None:
                ent[part] = entropy_map(probs.T)
        else:
            labels[part] = fitted.query(points, "labels")
        if hooks.decode_progress is not None:
            hooks.decode_progress(min(s + DECODE_CHUNK, len(flat)), len(flat), time.perf_counter() - t_dec)
    entropy_img = None
    if ent is not None:
        entropy_img = sitk.GetImageFromArray(ent.reshape(arr.shape))
        entropy_img.CopyInformation(scan)
    labels_img = sitk.GetImageFromArray(labels.reshape(arr.shape))
    labels_img.CopyInformation(scan)
    if psnr < MIN_PSNR_3D:
        warnings.append(f"the fit reproduced the scan poorly (PSNR {psnr:.1f} dB on brain voxels): is this a "
                        "skull-stripped T1 brain MRI?")
    tissues = as_tissues(labels, net.values)
    warnings += tissue_warnings(tissues, 3)
    sample = flat[:: max(1, len(flat) // ENTROPY_POINTS)]  # a fixed sample: the same figures on every rerun
    probs = sum(m.query(voxel_points(scan, sample), "probabilities") for m in members) / len(members)
    quality = measure(arr.reshape(-1)[flat], tissues[flat], probs, psnr)
    found = quality_warnings(quality)
    quality["ok"] = not found
    warnings += found
    t3 = time.perf_counter()
    return VolumeResult(labels_img, fitted, psnr, entropy_img, reg_info, warnings,
                        {"prepare_s": t1 - t0, "fit_s": t2 - t1, "decode_s": t3 - t2}, quality, fit_counts)


def match_gate(reg_info: Dict[str, Any], work: sitk.Image, accept_poor_match: bool,
               say: Callable[[str, str], None], brain_given: bool = True) -> List[str]:
    """The scan's match with the template (after registration, or as it lies on the model grid) against the
    gate: [] if good, a warning if below it, InputError with the likely cause if far below (REFUSE_NCC) unless
    `accept_poor_match`. `brain_given`: the scan was restricted to a brain mask (else the cause may be a skull)."""
    if reg_info["ok"]:
        return []
    hopeless = not (reg_info["ncc"] >= REFUSE_NCC and reg_info["ncc_interior"] >= REFUSE_NCC_INTERIOR)
    diagnose = hopeless and not accept_poor_match
    if diagnose:
        say("diagnose", "the scan does not match the model's template: looking for the cause")
    cause = registration_problem(work, load_template(), reg_info["ncc_interior"], try_flips=diagnose,
                                 brain_given=brain_given)
    how = "as it lies on the training grid" if reg_info.get("iterations") == 0 else "after registration"
    what = (f"the scan matches the model's template poorly {how} (NCC {reg_info['ncc']:.2f} in "
            f"the brain, {reg_info['ncc_interior']:.2f} in its interior; skull-stripped T1s score about "
            f"0.90-0.95 / 0.79-0.89)")
    if diagnose:
        raise InputError(f"{what}: {cause.text}. Nothing was segmented; pass --accept-poor-match to segment it anyway",
                         reason="poor_match", dims=3, ncc=round(reg_info["ncc"], 3),
                         ncc_interior=round(reg_info["ncc_interior"], 3), cause=cause.kind, cause_finding=cause.finding,
                         **cause.facts)
    return [f"{what}: {cause.finding}. Check the result"]  # a warning reaches every reader: no command-line advice


def spacing_warnings(scan: sitk.Image) -> List[str]:
    """Slices thicker than THICK_SLICE_MM: the labels stay on those voxels but lose accuracy."""
    thick = max(scan.GetSpacing())
    if thick <= THICK_SLICE_MM:
        return []
    return [f"the scan has {thick:g} mm voxels along one axis (thick slices): expect less accurate labels (5 mm "
            f"slices cost 0.02-0.03 fg-Dice on our validation scans; thicker than {THICK_SLICE_MM:g} mm was not "
            "measured); a 1 mm scan is better"]


class _ScanPreview:
    """Live labels on a coarse copy of the scan's own grid (every s-th voxel, s chosen so that at
    most LIVE_POINTS brain voxels are decoded): the same place and orientation as the scan, a
    fraction of the cost of a full decode."""

    def __init__(self, scan: sitk.Image, arr: np.ndarray):
        n = int((arr > 0).sum())
        s = max(1, int(np.ceil((n / LIVE_POINTS[3]) ** (1.0 / 3.0))))
        coarse = arr[::s, ::s, ::s]
        self.shape = coarse.shape
        self.flat = np.flatnonzero(coarse.reshape(-1) > 0)
        self.image = sitk.Image([int(x) for x in reversed(coarse.shape)], sitk.sitkUInt8)
        self.image.SetSpacing(tuple(sp * s for sp in scan.GetSpacing()))
        self.image.SetDirection(scan.GetDirection())
        self.image.SetOrigin(scan.GetOrigin())
        self.points = voxel_points(self.image, self.flat)

    def labels(self, fitted: FittedVolume) -> sitk.Image:
        out = np.zeros(int(np.prod(self.shape)), np.uint8)
        out[self.flat] = fitted.query(self.points)
        img = sitk.GetImageFromArray(out.reshape(self.shape))
        img.CopyInformation(self.image)
        return img


def _geometry(img: sitk.Image) -> Dict[str, Any]:
    return {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}
