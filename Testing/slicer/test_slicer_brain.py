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


def test_whole_head_result_keeps_the_brain_mask_as_a_hidden_segment(scene, MetaSeg):
    from vtk.util.numpy_support import vtk_to_numpy

    import slicer

    volume = load_volume(scene, SAMPLE_HEAD, "ecog head")
    stages = []
    seg = MetaSeg.MetaSegLogic().segment(volume, device="cpu", steps=1, wait=True, keepBrainMask=True,
                                         onProgress=lambda e: stages.append(e["stage"]) if e.kind == "stage" else None)
    assert "extract" in stages  # the progress display shows "extracting brain"
    segmentation = seg.GetSegmentation()
    brain = segmentation.GetSegment(MetaSeg.BRAIN_MASK_SEGMENT)
    assert brain is not None and brain.GetName() == MetaSeg.BRAIN_MASK_SEGMENT
    assert not seg.GetDisplayNode().GetSegmentVisibility(MetaSeg.BRAIN_MASK_SEGMENT)
    tissues = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert len(tissues) == 5 and all(seg.GetDisplayNode().GetSegmentVisibility(segmentation.GetSegmentIdBySegmentName(t))
                                     for t in tissues if t != MetaSeg.BRAIN_MASK_SEGMENT)
    image = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(MetaSeg.BRAIN_MASK_SEGMENT, image)
    voxels = int((vtk_to_numpy(image.GetPointData().GetScalars()) > 0).sum())
    report = json.loads(seg.GetAttribute(MetaSeg.REPORT_ATTRIBUTE))
    spacing = np.prod(volume.GetSpacing())
    assert report["brain_extraction"]["extracted"]
    assert voxels * spacing / 1000 == pytest.approx(report["brain_extraction"]["mask_volume_ml"], rel=1e-3)


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
