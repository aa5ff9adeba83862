"""The Python API: `segment(image)` and `Segmenter`, which runs exactly what `metaseg segment` runs.

A `Segmenter` loads the checked weights, the network and (on first 3D use) the registration template
once, then segments any number of images: brain extraction, bias correction, registration, fit,
labelling, and every check and warning of the command line, which itself runs through `Segmenter.run`.

Threads and processes: a Segmenter only reads its model (a fit works on a copy of the parameters), and
its calls run one at a time (a lock), so one instance may be shared by threads but gains nothing from
them; for parallel work use one Segmenter per process (as `metaseg batch --jobs` does), created in that
process. Set `cancel` (a `threading.Event`) from another thread to stop a call: it raises `Cancelled`.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .io.batch_progress import ScanReporter
from .space.brain import prepare_brain
from .method.device import pick_device
from .io.dicom import series_record
from .images import InputImage, as_input_image
from .io.readers import InputError, image_array_2d, image_array_3d, image_dims, input_warnings, labels_like, sitk_array
from .options import PathLike, SegmentOptions
from .labelsets import TISSUES, as_tissues, from_card
from .io.outputs import class_sizes, environment, hippocampus_ratio, hippocampus_spread, tissue_sums
from .space.plausibility import brain_size_warnings, slice_check, tissue_warnings
from .io.progress import Reporter
from .method.reproducibility import run_record
from .resources import check_label_set, default_weights
from .runtime import Hooks, Model
from .method.seed_spread import seed_spread
from .method.segment import segment_array
from .segmentation import Segmentation
from .space.volume import VolumeSettings, is_model_grid, load_template, segment_volume
from .method.weights import load_weights

ProgressCallback = Callable[[str, Dict[str, Any]], None]


class Segmenter:
    """Segments images with one model, loaded once: `Segmenter(device="cpu")(image)`.

    `device`: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N, mps or gpu. `weights`: a weights
    file (default: the shipped weights of `labels` for each input's dimension, 2D slice or 3D volume).
    `labels`: the label set, "tissues" (0 background, 1 cortical GM, 2 subcortical GM, 3 WM, 4 CSF) or
    "structures" (31 structures in FreeSurfer's aseg numbering; metaseg/labelsets.py).
    Raises InputError for an absent device or an unknown label set, WeightsError for damaged weights
    (on the first image of each dimension, when its weights load). Calling it gives the same result as
    `metaseg.segment` with the same settings.
    """

    def __init__(self, device: str = "auto", weights: Optional[PathLike] = None, labels: str = "tissues"):
        self.options = SegmentOptions(labels=labels, weights=weights, device=device).checked()
        if weights is None:
            check_label_set(labels)
        try:
            self.device = pick_device(device)
        except ValueError as e:  # an absent accelerator or an unknown name: the caller's to fix
            raise InputError(str(e), reason="device_unavailable", device=device) from e
        self._models: Dict[int, Model] = {}
        self._lock = threading.RLock()

    def model(self, dims: int) -> Model:
        """The model for `dims`-D inputs, loaded and checked on first use, then kept."""
        with self._lock:
            if dims not in self._models:
                self._models[dims] = self._load(dims)
            return self._models[dims]

    def _load(self, dims: int) -> Model:
        w = self.options.weights
        path = Path(w) if w else default_weights(dims, self.options.labels)
        weights = load_weights(path)
        found = weights.card["input"]["dims"]
        if found != dims:
            raise InputError(f"the weights {path.name} are for {found}D images but the input is {dims}D; "
                             f"use {dims}D weights")
        try:  # the weights' own label set, or one their classes merge into (a structures model gives tissues)
            return Model.build(weights, self.device, path, self.options.labels)
        except ValueError:
            raise InputError(f"the weights {path.name} segment the label set {weights.label_set!r}, not "
                             f"{self.options.labels!r}: ask for labels={weights.label_set!r} or give other weights") from None

    def __call__(self, image: Any, *, quality: str = "fast", brain_extraction: str = "auto",
                 bias_correction: str = "auto", mask: Any = None, steps: Optional[int] = None, seed: int = 0,
                 uncertainty: bool = False, accept_poor_match: bool = False,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None,
                 spacing: Optional[Sequence[float]] = None, origin: Optional[Sequence[float]] = None,
                 direction: Optional[Sequence[float]] = None, affine: Any = None) -> Segmentation:
        """Segment `image`; see `metaseg.segment` for every argument."""
        options = SegmentOptions(labels=self.options.labels, weights=self.options.weights, device=self.options.device,
                                 quality=quality, steps=steps, seed=seed, brain_extraction=brain_extraction,
                                 bias_correction=bias_correction, uncertainty=uncertainty,
                                 accept_poor_match=accept_poor_match).checked()
        check_callbacks(progress, cancel)
        inp = as_input_image(image, spacing=spacing, origin=origin, direction=direction, affine=affine)
        reporter = ScanReporter(progress or (lambda event, fields: None))
        return self.run(inp, options, reporter_hooks(reporter, self.device, cancel), mask=mask)

    def run(self, inp: InputImage, options: SegmentOptions, hooks: Hooks, *, mask: Any = None,
            started: Optional[float] = None) -> Segmentation:
        """One image with `options` (their labels, weights and device are this Segmenter's): the labels and
        report, nothing written. `mask`: a brain mask on the image's grid (path or image), 3D only.
        Errors the caller can fix raise InputError (or WeightsError); a cancelled run raises Cancelled."""
        with self._lock:
            t_start = time.perf_counter() if started is None else started
            dims = image_dims(inp.image)
            for option, given in (("--mask", mask is not None), ("--uncertainty", options.uncertainty)):
                if dims == 2 and given:
                    raise InputError(f"{option} needs a 3D volume; the input is a 2D slice", reason="needs_3d",
                                     option=option)
            model = self.model(dims).with_steps(options.steps)
            run = _segment_volume if dims == 3 else _segment_slice
            seg = run(inp, model, options, hooks, mask, t_start)
            seg.report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
            return seg


def segment(image: Any, *, labels: str = "tissues", quality: str = "fast", device: str = "auto",
            brain_extraction: str = "auto", bias_correction: str = "auto", mask: Any = None,
            steps: Optional[int] = None, seed: int = 0, uncertainty: bool = False,
            progress: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None,
            weights: Optional[PathLike] = None, accept_poor_match: bool = False,
            spacing: Optional[Sequence[float]] = None, origin: Optional[Sequence[float]] = None,
            direction: Optional[Sequence[float]] = None, affine: Any = None) -> Segmentation:
    """Segment a brain MRI exactly as `metaseg segment` does; nothing is written (see `Segmentation.save`).

    `image`: a file path (NIfTI, NRRD, MHA/MHD, MGZ, DICOM folder), a `SimpleITK.Image`, a nibabel image,
    or a numpy array with its geometry: `spacing=` (mm, with optional `origin=` in LPS mm and `direction=`)
    for an array in SimpleITK's [k, j, i] order, or `affine=` (4x4 voxel-to-RAS) for one in nibabel's
    [i, j, k] order (metaseg/images.py). A 3D T1 volume in any scanner geometry, whole head or
    skull-stripped, or one aligned coronal slice (2D model).

    `labels`: the label set ("tissues" or "structures"). `quality`: fast, or best (3D: 3 fits averaged). `device`: auto,
    cpu, cuda, cuda:N, mps, gpu. `brain_extraction` (3D): auto|on|off. `bias_correction` (3D): auto|n4|off.
    `mask` (3D): a brain mask on the image's grid (path, SimpleITK image; nonzero = brain). `steps`: test-time
    fit steps (default: the weights' card). `seed`: the fit's sampling seed. `uncertainty` (3D): also the
    entropy map. `progress(event, fields)`: the events of `metaseg segment --progress json` (stage, progress,
    warning; progress.py). `cancel`: a `threading.Event`; setting it raises `Cancelled`. `weights`: a weights
    file instead of the shipped one. `accept_poor_match`: segment an input refused as not matching the model.

    Exceptions (the contract; each case is tested in Testing/core/test_hostile_inputs_round4.py):
    - InputError (a ValueError): whatever the caller can fix, in one line, the command line's message: the image
      (unreadable or truncated file, a list, a 1D/4D, boolean, object or complex array, only two values, voxel
      sizes outside 0.05-30 mm, not a brain, a scan refused as not matching the model), every argument of the
      wrong type or out of range (spacing/origin/direction/affine that are not numbers, device not a name,
      seed outside 0..2^32-1, steps, quality, labels, brain_extraction, bias_correction, booleans that are not
      True/False, progress not callable, cancel not an Event, a mask that is not one value per voxel).
    - WeightsError (a ValueError): a weights file that is missing, damaged, tampered with or too large.
    - Cancelled: `cancel` was set.  FileNotFoundError: the shipped weights or template are not installed.
    Anything else is a bug. For many images use one `Segmenter`: it loads the model once.
    """
    return Segmenter(device=device, weights=weights, labels=labels)(
        image, quality=quality, brain_extraction=brain_extraction, bias_correction=bias_correction, mask=mask,
        steps=steps, seed=seed, uncertainty=uncertainty, accept_poor_match=accept_poor_match, progress=progress,
        cancel=cancel, spacing=spacing, origin=origin, direction=direction, affine=affine)


def check_callbacks(progress: Any, cancel: Any) -> None:
    """InputError unless `progress` is None or callable and `cancel` None or an Event-like object (is_set, set)."""
    if progress is not None and not callable(progress):
        raise InputError(f"progress= must be a function progress(event, fields) (got {progress!r})")
    if cancel is not None and not (callable(getattr(cancel, "is_set", None)) and callable(getattr(cancel, "set", None))):
        raise InputError(f"cancel= must be a threading.Event, set to stop the run (got {cancel!r})")


def reporter_hooks(rep: Reporter, device: torch.device, cancel: Optional[threading.Event]) -> Hooks:
    """Hooks that send a run's stages, fit steps, labelling progress and warnings to `rep` as events."""
    return Hooks(stage=lambda name, msg: rep.emit("stage", stage=name, message=msg, device=str(device),
                                                  torch=torch.__version__),
                 progress=rep.fit_progress, decode_progress=lambda d, n, s: rep.task_progress("decode", d, n, s),
                 warning=lambda msg: rep.emit("warning", message=msg), cancel=cancel)


def _base_report(inp: InputImage, model: Model, options: SegmentOptions, psnr: float, fits: int) -> Dict[str, Any]:
    img = inp.image
    dicom = series_record(img)  # a DICOM series: its SeriesInstanceUID, no patient identity
    return {"input": inp.source, **({"dicom": dicom} if dicom else {}), "input_size": list(img.GetSize()),
            "input_spacing": list(img.GetSpacing()),
            "outputs": {}, "device": str(model.device), "weights": str(model.path), "weights_sha256": model.weights.sha256,
            "fit": {**model.plan.to_dict(), "seed": options.seed, "psnr_db": round(psnr, 2), "quality": options.quality,
                    "fits": fits}, "reproducibility": run_record(options.seed, model.device)}


def _segment_slice(inp: InputImage, model: Model, options: SegmentOptions, hooks: Hooks, mask: Any,
                   t_start: float) -> Segmentation:
    """The 2D path: one aligned coronal slice -> fit -> labels on its pixels."""
    img = inp.image
    array = image_array_2d(img)
    warnings = input_warnings(img) + check_slice(array, model.canvas, options.accept_poor_match)
    if options.quality != "fast":
        why = ("its fit uses every pixel at every step: there is no random draw for an ensemble to average"
               if model.plan.batch_size >= math.prod(model.canvas) else "ensembles of fits are made for 3D only")
        warnings.append(f"--quality best applies to 3D volumes; this 2D slice was segmented as with fast ({why})")
    for msg in warnings:
        hooks.warn(msg)
    hooks.say("fit", f"fitting {model.plan.steps} steps on {model.device} (torch {torch.__version__})")
    t_load = time.perf_counter()
    live = (lambda step, labels: hooks.live(step, labels_like(labels, img))) if hooks.live else None
    res = segment_array(model.net, model.log_lr, model.plan, array, model.canvas, seed=options.seed,
                        progress=hooks.progress, cancel=hooks.cancel, live=live, live_every=hooks.live_every)
    labels = labels_like(res.labels, img)
    found = plausibility_warnings(as_tissues(res.labels, model.net.values), res.psnr)
    for msg in found:
        hooks.warn(msg)
    spacing = img.GetSpacing()[: res.labels.ndim] if img.GetDimension() == res.labels.ndim else _inplane_spacing(img)
    report = {**_base_report(inp, model, options, res.psnr, 1),
              "timings_s": {"load": round(t_load - t_start, 3), **{k: round(v, 3) for k, v in res.timings.items()}},
              **sizes(res.labels, spacing, model.labels), "warnings": warnings + found, "versions": environment()}
    return Segmentation(labels, report, model.labels, img, nibabel_order=inp.nibabel_order, source=inp.path)


def _segment_volume(inp: InputImage, model: Model, options: SegmentOptions, hooks: Hooks, mask: Any,
                    t_start: float) -> Segmentation:
    """The 3D path: scan -> (brain extraction, N4) -> registration -> fit -> labels on the scan's grid."""
    img = inp.image
    t_load = time.perf_counter()
    brain_mask, brain = _brain_mask(inp, mask, options.brain_extraction, model, hooks)
    # auto: N4 for a scan whose brain was extracted (raw-looking, like a scanner's); a skull-stripped scan has
    # usually been bias-corrected by the pipeline that stripped it and stays exactly as before
    n4 = options.bias_correction == "n4" or (options.bias_correction == "auto" and bool(brain.get("extracted")))
    settings = VolumeSettings(seed=options.seed, fits=options.fits, uncertainty=options.uncertainty,
                              bias_correction=n4, accept_poor_match=options.accept_poor_match)
    info = {"labels": model.labels, "weights_sha256": model.weights.sha256, "source": inp.source}
    res = segment_volume(img, model, settings, hooks, mask=brain_mask, info=info)
    measured = sizes(sitk_array(res.labels), img.GetSpacing(), model.labels, brain_mask, res.fit_counts)
    warnings = res.warnings + measured.pop("warnings", [])
    warnings += brain_size_warnings(*_brain_sizes_ml(res.labels, brain_mask if brain_mask is not None else img))
    for msg in warnings:
        hooks.warn(msg)
    report = {**_base_report(inp, model, options, res.psnr, options.fits),
              "registration": res.registration, "image_quality": res.quality, "brain_extraction": brain,
              "bias_correction": "n4" if n4 else "off",
              "timings_s": {"load": round(t_load - t_start, 3),
                            **({"brain_extraction": brain["seconds"]} if "seconds" in brain else {}),
                            **{k: round(v, 3) for k, v in res.timings.items()}},
              **measured,
              "seed_spread": seed_spread(from_card(model.labels).name, options.quality, model.plan.schedule),
              "warnings": warnings, "versions": environment()}
    return Segmentation(res.labels, report, model.labels, img, res.entropy, res.fitted, brain_mask,
                        inp.nibabel_order, inp.path)


def _brain_sizes_ml(labels: sitk.Image, brain: sitk.Image) -> Tuple[float, float]:
    """(labelled volume, brain volume) in mL: voxels labelled > 0, and nonzero voxels of `brain` (the brain mask
    used, or for a skull-stripped scan the scan itself: the brain the fit saw)."""
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return (float((sitk.GetArrayViewFromImage(labels) > 0).sum()) * voxel_ml,
            float((sitk.GetArrayViewFromImage(brain) > 0).sum()) * voxel_ml)


def sizes(labels: np.ndarray, spacing: Sequence[float], label_info: List[Dict[str, Any]],
          brain_mask: Optional[sitk.Image] = None, fit_counts: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The report's sizes: the label set's name and each label's size (mL; 2D: mm^2); for a set finer than the
    tissues also the 4 tissue sums, and with a brain mask the hippocampus-to-intracranial volume ratio. With
    several fits (`fit_counts`) each volume's spread over the fits, the hippocampus's, and under "warnings" the
    warning when that is too large for a clinic."""
    classes = class_sizes(labels, spacing, label_info, fit_counts)
    labels_set = from_card(label_info)
    out: Dict[str, Any] = {"label_set": labels_set.name, "classes": classes}
    if labels_set is not TISSUES:
        out["tissues"] = tissue_sums(classes, label_info)
        if brain_mask is not None:
            icv = float((sitk_array(brain_mask) > 0).sum()) * float(np.prod(brain_mask.GetSpacing())) / 1000.0
            ratio = hippocampus_ratio(classes, icv)
            if ratio:
                out["hippocampus_to_intracranial"] = ratio
        spread, warnings = hippocampus_spread(classes)
        if spread is not None:
            out["hippocampus_spread_pct"] = spread
            out["warnings"] = warnings
    return out


def _brain_mask(inp: InputImage, mask: Any, mode: str, model: Model, hooks: Hooks
                ) -> Tuple[Optional[sitk.Image], Dict[str, Any]]:
    """The brain mask for the fit (the caller's `mask`, deepbet's, or None) and the report's brain_extraction entry."""
    img = inp.image
    if mask is not None:
        if mode == "on":
            raise InputError("--mask gives the brain already: leave out --brain-extraction on",
                             reason="mask_and_extraction")
        return _mask_image(mask, inp), {"mode": mode, "extracted": False, "reason": "the brain mask given by --mask is used"}
    if mode != "off":
        image_array_3d(img)  # refuse NaN, vector or constant scans before deepbet sees them
    if mode == "auto" and is_model_grid(img, model.canvas):
        return None, {"mode": mode, "extracted": False, "reason": "skull-stripped: the scan is on the model's training grid"}
    bm, brain = prepare_brain(img, mode, model.device, say=hooks.stage, cancel=hooks.cancel)
    hooks.say("brain", ("brain extracted: " if bm is not None else "no brain extraction: ") + brain["reason"])
    return (bm.mask if bm is not None else None), brain


def _mask_image(mask: Any, inp: InputImage) -> sitk.Image:
    """A mask given as a path or an image, or as a numpy array in the caller's order on the image's grid; refused
    (InputError) if it is none of these or has more than one value per voxel (e.g. an RGB picture of a mask)."""
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "biuf":
            raise InputError(f"the mask array holds {mask.dtype} values; give numbers or booleans (nonzero = brain)")
        arr = np.ascontiguousarray((mask.T if inp.nibabel_order else mask).astype(np.uint8))
        if arr.shape != sitk.GetArrayViewFromImage(inp.image).shape:
            raise InputError(f"the mask array has shape {mask.shape}; it must have the image's")
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(inp.image)
        return out
    if not isinstance(mask, (str, Path, sitk.Image)):
        raise InputError(f"mask= must be a file path, a SimpleITK image or a numpy array on the image's grid (got "
                         f"{type(mask).__name__} {mask!r:.40})")
    img = as_input_image(mask).image
    components = img.GetNumberOfComponentsPerPixel()
    if components != 1:
        name = "" if isinstance(mask, sitk.Image) else f" {mask}"
        raise InputError(f"the mask{name} has {components} values per voxel "
                         "(an RGB or vector image): a mask holds one value per voxel, nonzero = brain. Save it as a "
                         "single-component label image (e.g. a Slicer labelmap) on the scan's grid")
    return img


def check_slice(array: np.ndarray, canvas: Sequence[int], accept_poor_match: bool) -> List[str]:
    """Before the fit: does the slice fit the 2D model's canvas, and is it an aligned coronal slice?
    Refuses (InputError) what cannot or should not be segmented; returns warnings for the rest."""
    if any(s > c for s, c in zip(array.shape, canvas)):
        raise InputError(f"the image is {array.shape[1]}x{array.shape[0]} pixels; the 2D model takes one coronal slice "
                         f"of a T1 aligned like neurite-oasis (160x192 pixels of 1 mm, at most {canvas[1]}x{canvas[0]}): "
                         "a photo or screenshot (PNG/JPG) or a slab of another size cannot be segmented. Use the 3D "
                         "model on the whole scan", reason="slice_too_large",
                         width=int(array.shape[1]), height=int(array.shape[0]))
    ncc, refusal, warning = slice_check(array, load_template())
    if refusal and not accept_poor_match:
        raise InputError(refusal, reason="poor_match", dims=2, ncc=round(ncc, 3))
    return [warning] if warning else []


def _inplane_spacing(img: sitk.Image) -> tuple:
    """Spacing of the two non-singleton axes of a one-slice 3D image."""
    return tuple(sp for sp, n in zip(img.GetSpacing(), img.GetSize()) if n != 1)[:2]


# Below: the 2D fit did not reproduce the slice. Set on the training subjects with the shipped 2D
# weights (20-step fit): slice 109 17.9-18.5 dB, the same slices with inverted contrast 16.2-16.9 dB,
# noise 10.2 dB (benchmarks/exploration/psnr_gate_2d.py; validation and test slices: 18.2-18.7 dB).
MIN_PSNR_2D = 16.0


def plausibility_warnings(labels: np.ndarray, psnr: float) -> List[str]:
    """Signs that the input was not what the model expects; reported, never silently ignored."""
    warn = []
    if psnr < MIN_PSNR_2D:
        warn.append(f"the fit reproduced the image poorly (PSNR {psnr:.1f} dB): is this a skull-stripped T1 brain slice?")
    fg = labels > 0
    if fg.mean() < 0.05:
        warn.append("less than 5% of the image was labelled as brain: check that the input is a brain slice aligned like the training data")
    else:
        warn += tissue_warnings(labels, 2)
    return warn
