"""`Segmentation`: what one run gives back (labels on the input's grid, report, fitted network), and how its
files are written (the same checks and all-or-nothing publication as `metaseg segment`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .io.atomic import write_all
from .space.fitted import FittedVolume
from .images import RAS_TO_LPS
from .io.readers import InputError, labels_like, write_image
from .options import FILE_KINDS, VOLUME_ONLY, Outputs, PathLike
from .io.output_paths import check_output
from .io.outputs import preview_panels, write_preview, write_report, write_seg_nrrd

Writer = Tuple[Path, Callable[[str], None]]


@dataclass
class Segmentation:
    """The result of `metaseg.segment` / `Segmenter`: nothing is written until `save`.

    `labels`: a uint8 SimpleITK image with exactly the input's size, spacing, origin and direction
    (physical coordinates in LPS mm), values as in `label_set` (tissues: 0 background, 1 cortical GM,
    2 subcortical GM, 3 WM, 4 CSF). `report`: the dict `metaseg segment --report` writes (timings, device,
    fit PSNR, class sizes, registration quality, brain extraction, warnings, versions). `entropy` (3D, when
    asked with uncertainty=True): the per-voxel entropy of the class probabilities, 0 certain .. 1 all classes
    equally likely, on the input's grid. `fitted` (3D): the fitted network in physical space; `.reslice(plane)`
    draws any plane without refitting and `.save(path)` keeps it for `metaseg reslice`; None for 2D slices.
    `image`: the input as it was segmented (SimpleITK). `mask`: the brain the fit was restricted to (3D:
    the given or extracted mask; None: the scan's nonzero voxels).
    """

    labels: sitk.Image
    report: Dict[str, Any]
    label_set: List[Dict[str, Any]]
    image: sitk.Image
    entropy: Optional[sitk.Image] = None
    fitted: Optional[FittedVolume] = None
    mask: Optional[sitk.Image] = None
    nibabel_order: bool = False  # the caller indexes arrays [i, j, k] (nibabel, or a numpy array with affine=)
    source: Optional[Path] = None  # the input file, never to be overwritten

    @property
    def warnings(self) -> List[str]:
        """What looked unusual (poor registration or fit, implausible tissue proportions, thick slices...)."""
        return self.report["warnings"]

    @property
    def array(self) -> np.ndarray:
        """The labels as a numpy uint8 array in the caller's axis order: [k, j, i] (SimpleITK's) for paths,
        SimpleITK images and arrays given with spacing=; [i, j, k] for nibabel images and arrays with affine=."""
        arr = sitk.GetArrayFromImage(self.labels)
        return np.ascontiguousarray(arr.T) if self.nibabel_order else arr

    @property
    def volumes(self) -> Dict[str, float]:
        """Label name -> volume in mL (3D), or area in mm^2 for a 2D slice; background left out."""
        return {c["name"]: c["volume_ml"] if "volume_ml" in c else c["area_mm2"]
                for c in self.report["classes"] if c["value"] != 0}

    @property
    def brain_mask(self) -> Optional[sitk.Image]:
        """3D: the brain the fit used, uint8 (1 = brain) on the input's grid; None for a 2D slice."""
        if self.fitted is None:
            return None
        inside = sitk.GetArrayViewFromImage(self.mask if self.mask is not None else self.image) > 0
        return labels_like(inside, self.image)

    def to_nibabel(self) -> Any:
        """The labels as a `nibabel.Nifti1Image` (array [i, j, k], RAS affine); needs nibabel installed."""
        try:
            import nibabel
        except ImportError as e:
            raise ImportError("to_nibabel needs nibabel: pip install nibabel") from e
        img = self.labels
        n = img.GetDimension()
        m = np.eye(4)
        m[:n, :n] = np.array(img.GetDirection()).reshape(n, n) @ np.diag(img.GetSpacing())
        m[:n, 3] = img.GetOrigin()
        return nibabel.Nifti1Image(np.ascontiguousarray(sitk.GetArrayFromImage(img).T), RAS_TO_LPS @ m)

    def save(self, path: Optional[PathLike] = None, *, seg_nrrd: Optional[PathLike] = None,
             preview: Optional[PathLike] = None, report: Optional[PathLike] = None,
             uncertainty: Optional[PathLike] = None, brain_mask: Optional[PathLike] = None,
             fitted: Optional[PathLike] = None, force: bool = False) -> Dict[str, Path]:
        """Write the labels to `path` (.nii.gz, .nrrd, .mha, ...) and any of the other files, all or none.

        The rules of `metaseg segment`: known extensions, writable folders, no file naming the input, and no
        existing file replaced unless `force` (InputError, before anything is written; a file that appears
        meanwhile is kept: OutputExistsError). `seg_nrrd`: Slicer's segmentation (names, colours, terminology);
        `preview`: PNG; `report`: JSON; `uncertainty` (3D): the entropy map; `brain_mask` (3D): the brain used;
        `fitted` (3D): the fitted network (.safetensors) for `metaseg reslice`. Returns the files written, by kind.
        """
        outputs = Outputs(labels=path, report=report, preview=preview, seg_nrrd=seg_nrrd, uncertainty=uncertainty,
                          inr=fitted, brain_mask=brain_mask, force=force)
        files = check_outputs(outputs, [self.source])
        check_volume_outputs(files, self.image.GetDimension() == 3 and 1 not in self.image.GetSize())
        if "uncertainty" in files and self.entropy is None:
            raise InputError("the uncertainty map was not computed: segment with uncertainty=True")
        self.publish(files, force)
        return files

    def publish(self, files: Dict[str, Path], force: bool) -> None:
        """Write every file in `files` (checked by `check_outputs`) at once, the report last with their names."""
        self.report["outputs"] = {k: str(v) for k, v in files.items()}
        writers = self.writers(files)
        if "report" in files:
            report = self.report
            writers.append((files["report"], lambda tmp: write_report(report, tmp)))
        write_all(writers, overwrite=force)

    def writers(self, files: Dict[str, Path]) -> List[Writer]:
        """(path, writer) pairs for `atomic.write_all`: every file of `files` except the report."""
        makers: Dict[str, Callable[[Path], List[Writer]]] = {
            "labels": lambda p: [(p, lambda tmp: write_image(self.labels, tmp))],
            "seg_nrrd": lambda p: [(p, lambda tmp: write_seg_nrrd(self.labels, self.label_set, tmp))],
            "uncertainty": lambda p: [(p, lambda tmp: write_image(self.entropy, tmp))],
            "preview": lambda p: [(p, lambda tmp: write_preview(preview_panels(self.image, self.labels),
                                                               self.label_set, tmp))],
            "inr": lambda p: self.fitted.writers(p),
            "brain_mask": lambda p: [(p, lambda tmp, m=self.brain_mask: write_image(m, tmp))],
        }
        return [w for kind, path in files.items() if kind in makers for w in makers[kind](path)]


def check_outputs(outputs: Outputs, inputs: Iterable[Optional[PathLike]]) -> Dict[str, Path]:
    """The output files of `outputs`, checked before any input is read or anything is fitted: known
    extensions, folders that exist or can be made and are writable, no input named as an output, none
    existing unless `outputs.force`, no two outputs naming one file. InputError says what is wrong."""
    given = [Path(p) for p in inputs if p is not None]
    files = {k: check_output(p, FILE_KINDS[k][0], outputs.force, given, FILE_KINDS[k][1])
             for k, p in outputs.files().items()}
    published = list(files.values())
    if "inr" in files:  # its checksum sidecar is published with it
        side = Path(str(files["inr"]) + ".sha256")
        if side.exists() and not outputs.force:
            raise InputError(f"output {side} exists; pass --force to overwrite it")
        published.append(side)
    if "labels" not in files:
        raise InputError("no labelmap file to write: give its path (-o)")
    if len({str(p.resolve()) for p in published}) != len(published):
        raise InputError("two outputs name the same file")
    return files


def check_volume_outputs(files: Dict[str, Path], volume: bool, mask_given: bool = False) -> None:
    """Refuse the outputs (and a --mask) that only a 3D volume has when the input is a 2D slice."""
    if volume:
        return
    for kind, option in VOLUME_ONLY.items():
        if kind in files:
            raise InputError(f"{option} needs a 3D volume; the input is a 2D slice", reason="needs_3d", option=option)
    if mask_given:
        raise InputError("--mask needs a 3D volume; the input is a 2D slice", reason="needs_3d", option="--mask")
