"""Whole-head scans in the module (real MRML layer, real core in a child process, real deepbet):
the "extract" stage, the brain mask kept as a hidden segment, and Cancel during the extraction."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mrml_helpers import ROOT, load_volume, scene_state

pytestmark = pytest.mark.usefixtures("slicer_core")
pytest.importorskip("deepbet")
SAMPLE_HEAD = ROOT / "Resources" / "Sample" / "ecog_head.nii.gz"  # ecog's whole head with skull


@pytest.fixture
def MetaSeg(slicer_core):
    import MetaSeg as module

    return module


def oriented(seg, segment_id):
    import slicer

    image = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(segment_id, image)
    m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return image, np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def voxels(image):
    """(extent start ijk, boolean array in k, j, i order) of a labelmap."""
    from vtk.util.numpy_support import vtk_to_numpy

    e = image.GetExtent()
    dims = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return np.array([e[4], e[2], e[0]]), vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims)


def test_whole_head_gives_a_brain_only_result_with_the_mask_placed_like_the_labels(scene, MetaSeg):
    """deepbet as the module installs it (dependencies.BRAIN, checked), a whole head through the logic: the
    tissues lie inside the brain mask, and the mask segment gets the output's transform like the tissues."""
    import vtk

    from MetaSegLib import dependencies

    assert dependencies.check(dependencies.BRAIN) == []  # the version the module's install puts in place
    volume = load_volume(scene, SAMPLE_HEAD, "ecog head")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing output")
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    T = vtk.vtkTransform()
    T.Translate(12.0, -5.0, 3.0)
    moved.SetMatrixTransformToParent(T.GetMatrix())
    output.SetAndObserveTransformNodeID(moved.GetID())
    stages = []
    seg = MetaSeg.MetaSegLogic().segment(volume, device="cpu", steps=1, wait=True, keepBrainMask=True,
                                         outputSegmentation=output,
                                         onProgress=lambda e: stages.append(e["stage"]) if e.kind == "stage" else None)
    assert seg is output
    assert "extract" in stages  # the progress display shows "extracting brain"
    segmentation = seg.GetSegmentation()
    brain = segmentation.GetSegment(MetaSeg.BRAIN_MASK_SEGMENT)
    assert brain is not None and brain.GetName() == MetaSeg.BRAIN_MASK_SEGMENT
    assert not seg.GetDisplayNode().GetSegmentVisibility(MetaSeg.BRAIN_MASK_SEGMENT)
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    tissues = [i for i in ids if i != MetaSeg.BRAIN_MASK_SEGMENT]
    assert len(tissues) == 4 and all(seg.GetDisplayNode().GetSegmentVisibility(t) for t in tissues)
    assert tissues == [segmentation.GetSegment(t).GetName() for t in tissues]  # IDs are the names
    # the mask moved with the labels into the output's frame (its parent transform undone)
    mask_image, mask_matrix = oriented(seg, MetaSeg.BRAIN_MASK_SEGMENT)
    tissue_image, tissue_matrix = oriented(seg, tissues[0])
    np.testing.assert_allclose(mask_matrix, tissue_matrix, atol=1e-6)
    ijk = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk)
    expected = np.linalg.inv(np.array([[T.GetMatrix().GetElement(i, j) for j in range(4)] for i in range(4)])) @ \
        np.array([[ijk.GetElement(i, j) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(mask_matrix, expected, atol=1e-4)
    # brain only: every tissue voxel lies inside the brain mask
    m0, mask = voxels(mask_image)
    t0, labels = voxels(tissue_image)
    kji = np.argwhere(labels > 0) + t0 - m0
    assert len(kji) > 100000
    assert (kji >= 0).all() and (kji < np.array(mask.shape)).all(), "tissue outside the mask's extent"
    assert (mask[kji[:, 0], kji[:, 1], kji[:, 2]] > 0).all(), "tissue outside the brain mask"
    report = json.loads(seg.GetAttribute(MetaSeg.REPORT_ATTRIBUTE))
    spacing = np.prod(volume.GetSpacing())
    assert report["brain_extraction"]["extracted"]
    assert (mask > 0).sum() * spacing / 1000 == pytest.approx(report["brain_extraction"]["mask_volume_ml"], rel=1e-3)


def test_cancel_during_brain_extraction_leaves_the_scene_unchanged(scene, MetaSeg):
    volume = load_volume(scene, SAMPLE_HEAD, "ecog head")
    before = scene_state(scene)
    stages, finished = [], []
    job = MetaSeg.MetaSegLogic().segment(volume, device="cpu", wait=False, keepBrainMask=True,
                                         onProgress=lambda e: stages.append(e["stage"]) if e.kind == "stage" else None,
                                         onFinished=finished.append)
    deadline = time.monotonic() + 120
    while job.running and "extract" not in stages:
        job.poll()
        assert time.monotonic() < deadline, "the extraction stage never started"
        time.sleep(0.02)
    job.cancel()
    with pytest.raises(MetaSeg.MetaSegCancelled):
        job.wait(timeout=60)
    assert job.state == "cancelled" and finished == [job]
    assert "fit" not in stages
    assert not job.process.workdir.exists()
    assert scene_state(scene) == before
