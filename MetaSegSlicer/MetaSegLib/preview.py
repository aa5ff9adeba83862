"""Live preview: the labels of a fit in progress, shown with the final result's names and colours.

The core writes each snapshot as a file and announces it with a "labels" event that also carries
the segments (value, name, colour) of the weights' card: the same that the final `.seg.nrrd` has.
`LabelReader` keeps only the newest announced snapshot and decodes it when the job's timer asks
(`take()`, on Slicer's main thread: no worker thread, which Slicer's idle event loop need not let
run); the snapshot is the core's coarse live grid (at most ~40,000 brain voxels), so that read is
short. The decoded array is copied into the preview segmentation (`PreviewSegments.update`), whose
segments share one labelmap (benchmarks/bench_slicer_preview.py, docs/results.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class LiveLabels:
    """One decoded snapshot: labels (k, j, i), their IJK-to-RAS matrix, and the segments."""

    step: int
    array: np.ndarray
    ijk_to_ras: np.ndarray
    segments: Tuple[Dict[str, Any], ...]


def read_labels(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 array (k, j, i), 4x4 IJK-to-RAS) of a label image file (2D files become one slice)."""
    import SimpleITK as sitk  # shipped with Slicer

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.uint8, copy=False)
    n = img.GetDimension()
    if n == 2:
        arr = arr[None]
    direction = np.eye(3)
    direction[:n, :n] = np.array(img.GetDirection()).reshape(n, n)
    spacing = np.ones(3)
    spacing[:n] = img.GetSpacing()
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing[None, :]
    ijk_to_lps[:n, 3] = img.GetOrigin()
    return np.ascontiguousarray(arr), LPS_TO_RAS @ ijk_to_lps


class LabelReader:
    """The newest announced snapshot, decoded on request; `take()` returns it once.

    A snapshot announced before the previous one was taken replaces it: the preview skips what it
    cannot keep up with. A file that cannot be read (e.g. removed by a cancel) drops the snapshot.
    """

    def __init__(self) -> None:
        self._pending: Optional[Tuple[int, str, Tuple[Dict[str, Any], ...]]] = None
        self._stopped = False
        import SimpleITK  # noqa: F401  (its first import takes ~0.5 s: here, when the run starts, not in a preview poll)

    def submit(self, step: int, path: str, segments: Sequence[Dict[str, Any]]) -> None:
        if not self._stopped:
            self._pending = (int(step), str(path), tuple(segments))

    def take(self) -> Optional[LiveLabels]:
        job, self._pending = self._pending, None
        if job is None or self._stopped:
            return None
        step, path, segments = job
        try:
            array, ijk_to_ras = read_labels(path)
        except Exception as e:  # noqa: BLE001 (a snapshot that cannot be read is skipped, not fatal)
            log.debug("MetaSeg: live labels %s skipped: %s", path, e)
            return None
        return LiveLabels(step, array, ijk_to_ras, segments)

    def stop(self) -> None:
        self._stopped, self._pending = True, None

    def idle(self) -> bool:
        """Nothing announced and not yet taken."""
        return self._pending is None


class PreviewSegments:
    """The segments of a preview segmentation node, one per tissue, sharing one labelmap."""

    def __init__(self, segmentation_node, segments: Sequence[Dict[str, Any]]):
        import slicer

        self.node = segmentation_node
        self.image = slicer.vtkOrientedImageData()
        name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        for s in segments:
            if int(s["value"]) == 0:
                continue
            segment = slicer.vtkSegment()
            segment.SetName(str(s["name"]))
            segment.SetColor(*[c / 255.0 for c in s["color"]])
            segment.SetLabelValue(int(s["value"]))
            segment.AddRepresentation(name, self.image)  # the same image object: one shared layer
            segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(str(s["name"])))

    def update(self, live: LiveLabels) -> None:
        """Show a decoded snapshot (one copy of its voxels; the views redraw on the image's Modified)."""
        import vtk
        from vtk.util.numpy_support import numpy_to_vtk

        k, j, i = live.array.shape
        image = vtk.vtkImageData()
        image.SetDimensions(i, j, k)
        image.GetPointData().SetScalars(numpy_to_vtk(live.array.reshape(-1), deep=True,
                                                     array_type=vtk.VTK_UNSIGNED_CHAR))
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(live.ijk_to_ras[r, c]))
        self.image.ShallowCopy(image)  # the voxels (the plain image's own origin/spacing are replaced next)
        self.image.SetImageToWorldMatrix(matrix)

