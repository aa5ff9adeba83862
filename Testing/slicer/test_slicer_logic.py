"""MetaSegLogic on a real MRML scene (slicer-core) with the real core in a child process.

Only Qt is absent: the widget is not exercised here (see MetaSeg.MetaSegTest for the
in-Slicer run). Runs use a small step budget (steps=1..3), which works with any weights.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mrml_helpers import SAMPLE_T1, load_volume, scene_state

pytestmark = pytest.mark.usefixtures("slicer_core")


@pytest.fixture
def MetaSeg(slicer_core):
    import MetaSeg as module

    return module


@pytest.fixture
def card_labels(any_weights):
    """Names and colours come from the weights' own card (read by the core), not from the test."""
    from metaseg.method.weights import load_weights

    return [lab for lab in load_weights(any_weights).card["labels"] if lab["value"] != 0]


def ijk_to_ras(volume):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def segment_labelmap_geometry(segmentation_node, segment_id):
    import slicer
    import vtk

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)]), image


def voxel_counts(segmentation_node, volume):
    """Voxels of each segment on the input's grid, through Slicer's own labelmap export."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    scene = slicer.vtkMRMLScene()  # private: the export must not add nodes to the scene under test
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    ref.Copy(volume)
    ref.SetAndObserveImageData(volume.GetImageData())
    ids = [segmentation_node.GetSegmentation().GetNthSegmentID(i)
           for i in range(segmentation_node.GetSegmentation().GetNumberOfSegments())]
    import vtk

    id_list = vtk.vtkStringArray()
    for i in ids:
        id_list.InsertNextValue(i)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, id_list, labelmap, ref)
    values = vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars())
    counts = np.bincount(values.astype(np.int64), minlength=len(ids) + 1)
    return {segmentation_node.GetSegmentation().GetSegment(i).GetName(): int(counts[k + 1]) for k, i in enumerate(ids)}


def test_segment_sample_slice(scene, any_weights, card_labels, MetaSeg):
    import slicer
    import vtk

    volume = load_volume(scene, SAMPLE_T1, "T1 slice")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "MRI study")
    sh.CreateItem(study, volume)
    volume_mtime = volume.GetMTime()
    image_mtime = volume.GetImageData().GetMTime()
    storage_file = volume.GetStorageNode().GetFileName()
    voxels_before = slicer.util.arrayFromVolume(volume).copy()

    events, finished = [], []
    logic = MetaSeg.MetaSegLogic()
    job = logic.segment(volume, device="cpu", steps=3, seed=0, weights=str(any_weights), wait=False,
                        keepLabelmap=True, onProgress=events.append, onFinished=finished.append)
    segmentation = job.wait(timeout=180)

    # the process reported its progress and device
    kinds = [e.kind for e in events]
    assert "stage" in kinds and kinds.count("progress") == 3
    assert [e["step"] for e in events if e.kind == "progress"] == [1, 2, 3]
    assert job.device == "cpu" and finished == [job] and job.state == "done"
    assert not job.process.workdir.exists(), "temporary files were left behind"

    # one segment per tissue, with the weights' names, colours and a terminology entry
    assert segmentation.IsA("vtkMRMLSegmentationNode") and segmentation.GetScene() is scene
    assert not segmentation.GetHideFromEditors()
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 4 == len(card_labels)
    from metaseg.labelsets import TISSUES

    for i, lab in enumerate(card_labels):
        segment = seg.GetNthSegment(i)
        assert segment.GetName() == lab["name"]
        assert np.allclose(segment.GetColor(), np.array(lab["color"]) / 255.0, atol=1e-6)
        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        assert TISSUES.by_value(lab["value"]).code[1] in str(tag)  # the tissue's code is in the terminology

    # reference geometry = the input volume's, and the labelmaps lie on the input's grid
    converter = slicer.vtkSegmentationConverter
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    expected = converter.SerializeImageGeometry(m, volume.GetImageData())
    assert seg.GetConversionParameter(converter.GetReferenceImageGeometryParameterName()) == expected
    matrix, image = segment_labelmap_geometry(segmentation, seg.GetNthSegmentID(0))
    assert np.allclose(matrix, ijk_to_ras(volume))
    assert image.GetExtent() == volume.GetImageData().GetExtent()

    # the voxels are the core's: per-tissue counts equal those of its report
    report = json.loads(segmentation.GetAttribute(MetaSeg.REPORT_ATTRIBUTE))
    assert report == job.report and report["device"] == "cpu" and report["fit"]["steps"] == 3
    expected_counts = {c["name"]: c["voxels"] for c in report["classes"] if c["value"] != 0}
    assert voxel_counts(segmentation, volume) == expected_counts

    # placed in the input's study; the optional labelmap too
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == study
    labelmap = job.labelmapNode
    assert labelmap is not None and labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    assert sh.GetItemParent(sh.GetItemByDataNode(labelmap)) == study
    assert np.allclose(ijk_to_ras(labelmap), ijk_to_ras(volume))
    values = slicer.util.arrayFromVolume(labelmap)
    assert values.shape == voxels_before.shape
    names = [seg.GetNthSegment(i).GetName() for i in range(4)]
    assert {names[v - 1]: int((values == v).sum()) for v in range(1, 5)} == expected_counts
    color = labelmap.GetDisplayNode().GetColorNode()
    assert [color.GetColorName(v) for v in range(1, 5)] == names

    # the input was not touched
    assert volume.GetMTime() == volume_mtime and volume.GetImageData().GetMTime() == image_mtime
    assert volume.GetStorageNode().GetFileName() == storage_file
    assert np.array_equal(slicer.util.arrayFromVolume(volume), voxels_before)


def test_oblique_geometry_and_transform(scene, any_weights, MetaSeg):
    """A volume with unusual spacing, origin and axis directions under a parent transform:
    the segmentation lies exactly on the input's grid and follows the same transform."""
    import slicer
    import vtk

    volume = load_volume(scene, SAMPLE_T1, "oblique")
    volume.SetSpacing(0.8, 1.3, 2.5)
    volume.SetOrigin(12.5, -40.0, 7.25)
    angle = np.deg2rad(25.0)
    directions = vtk.vtkMatrix4x4()
    rot = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]]
    for i in range(3):
        for j in range(3):
            directions.SetElement(i, j, rot[i][j])
    volume.SetIJKToRASDirectionMatrix(directions)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())

    segmentation = MetaSeg.MetaSegLogic().segment(volume, device="cpu", steps=1, weights=str(any_weights),
                                                  timeout=180)
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 4
    matrix, image = segment_labelmap_geometry(segmentation, seg.GetNthSegmentID(0))
    assert np.allclose(matrix, ijk_to_ras(volume), atol=1e-4)
    assert image.GetExtent() == volume.GetImageData().GetExtent()
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    converter = slicer.vtkSegmentationConverter
    assert seg.GetConversionParameter(converter.GetReferenceImageGeometryParameterName()) == \
        converter.SerializeImageGeometry(m, volume.GetImageData())
    assert segmentation.GetTransformNodeID() == transform.GetID()


def test_cancel_with_live_preview_leaves_scene_unchanged(scene, any_weights, card_labels, MetaSeg):
    """Live labels show in a hidden node with the final result's names and colours; cancel removes it."""
    import slicer

    volume = load_volume(scene, SAMPLE_T1)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    existing.CreateDefaultDisplayNodes()
    existing.GetSegmentation().AddEmptySegment("tumour", "tumour", [1.0, 0.0, 0.0])
    before = scene_state(scene)
    logic = MetaSeg.MetaSegLogic()

    for output in (None, existing):  # a new output, then an existing one (replaced only at the end)
        labels_seen, finished = [], []

        def on_progress(event, labels_seen=labels_seen):
            if event.kind == "labels":
                labels_seen.append(event["step"])

        job = logic.segment(volume, device="cpu", steps=400, weights=str(any_weights), wait=False,
                            outputSegmentation=output, livePreview=True,
                            onProgress=on_progress, onFinished=finished.append)
        deadline = time.monotonic() + 120
        while job.running and job._previewNode is None:  # the snapshot is decoded off the main thread
            job.poll()
            assert time.monotonic() < deadline, "no live labels arrived"
            time.sleep(0.02)
        assert labels_seen
        preview = job._previewNode
        assert preview is not None and preview.GetScene() is scene and preview is not existing
        assert preview.GetHideFromEditors(), "the preview must stay hidden until the run is done"
        shown = preview.GetSegmentation()
        assert [shown.GetNthSegment(i).GetName() for i in range(shown.GetNumberOfSegments())] == \
            [lab["name"] for lab in card_labels]  # the final result's names and colours
        for i, lab in enumerate(card_labels):
            assert np.allclose(shown.GetNthSegment(i).GetColor(), np.array(lab["color"]) / 255.0, atol=1e-6)
        assert shown.GetNumberOfLayers() == 1  # one shared labelmap: an update is one copy
        assert np.array(shown.GetNthSegment(0).GetRepresentation("Binary labelmap").GetDimensions()).prod() > 1
        assert existing.GetSegmentation().GetNumberOfSegments() == 1  # not touched during the run
        job.cancel()
        with pytest.raises(MetaSeg.MetaSegCancelled):
            job.wait(timeout=60)
        assert job.state == "cancelled" and finished == [job]
        assert job.process.returncode is not None
        assert not job.process.workdir.exists()
        assert scene_state(scene) == before, "cancel changed the scene"
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "tumour"
    assert slicer.util.arrayFromVolume(volume).any()


def test_existing_output_is_replaced_only_when_given(scene, any_weights, card_labels, MetaSeg):
    volume = load_volume(scene, SAMPLE_T1)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    existing.CreateDefaultDisplayNodes()
    existing.GetSegmentation().AddEmptySegment("tumour", "tumour", [1.0, 0.0, 0.0])
    count = scene.GetNumberOfNodes()
    result = MetaSeg.MetaSegLogic().segment(volume, device="cpu", steps=1, weights=str(any_weights),
                                            outputSegmentation=existing, timeout=180)
    assert result is existing and result.GetName() == "manual"
    assert scene.GetNumberOfNodes() == count  # no new node
    names = [existing.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(existing.GetSegmentation().GetNumberOfSegments())]
    assert names == [lab["name"] for lab in card_labels]


def test_failing_process_is_an_error_not_a_hang(scene, MetaSeg, tmp_path):
    volume = load_volume(scene, SAMPLE_T1)
    before = scene_state(scene)
    logic = MetaSeg.MetaSegLogic()
    t0 = time.monotonic()
    with pytest.raises(MetaSeg.MetaSegError, match="weights file not found"):
        logic.segment(volume, device="cpu", steps=1, weights=str(tmp_path / "bogus.safetensors"), timeout=120)
    assert time.monotonic() - t0 < 60
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a weights file")
    (tmp_path / "corrupt.safetensors.sha256").write_text("0" * 64 + "  corrupt.safetensors\n")
    finished = []
    job = logic.segment(volume, device="cpu", steps=1, weights=str(bad), wait=False, onFinished=finished.append)
    with pytest.raises(MetaSeg.MetaSegError, match="checksum mismatch"):
        job.wait(timeout=120)
    assert job.state == "failed" and "checksum mismatch" in job.error and finished == [job]
    assert not job.process.workdir.exists()
    assert scene_state(scene) == before


def test_invalid_inputs_are_refused_before_starting(scene, any_weights, MetaSeg):
    import slicer

    logic = MetaSeg.MetaSegLogic()
    labelmap = load_volume(scene, SAMPLE_T1, "labels", labelmap=True)
    with pytest.raises(MetaSeg.MetaSegError, match="labelmap"):
        logic.segment(labelmap, weights=str(any_weights))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(MetaSeg.MetaSegError, match="no image data"):
        logic.segment(empty, weights=str(any_weights))
    volume = load_volume(scene, SAMPLE_T1)
    with pytest.raises(MetaSeg.MetaSegError, match="unknown device"):
        logic.segment(volume, device="tpu", weights=str(any_weights))
    with pytest.raises(MetaSeg.MetaSegError, match="steps"):
        logic.segment(volume, steps=0, weights=str(any_weights))
    text, ok = logic.modelDescription(volume)
    assert ok == (logic.weightsPath(2) is not None)
    # a 3D volume needs 3D weights, which are not shipped (yet): a clear message, no process
    volume3d = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume3d")
    volume3d.SetAndObserveImageData(slicer.util.vtkImageDataFromArray(np.ones((4, 5, 6), np.float32))
                                    if hasattr(slicer.util, "vtkImageDataFromArray") else _image3d())
    if logic.weightsPath(3) is None:
        with pytest.raises(MetaSeg.MetaSegError, match="no 3D MetaSeg weights"):
            logic.segment(volume3d)
        assert logic.modelDescription(volume3d)[1] is False


def _image3d():
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(6, 5, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    return image


def test_structures_give_a_31_segment_node(scene, MetaSeg):
    """labels="structures": the shipped 2D structures model through the child process; one segment per
    structure (named and coloured as FreeSurfer's table, ID = name), also those absent from this slice."""
    from metaseg.labelsets import STRUCTURES
    from metaseg.resources import default_weights

    try:
        default_weights(2, "structures")
    except FileNotFoundError:
        pytest.skip("shipped 2D structures weights not built yet")
    volume = load_volume(scene, SAMPLE_T1, "T1 slice")
    node = MetaSeg.MetaSegLogic().segment(volume, device="cpu", steps=3, seed=0, labels="structures", timeout=300)
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 31
    for lab in STRUCTURES.labels[1:]:
        segment = seg.GetSegment(lab.name)
        assert segment is not None, lab.name
        assert np.allclose(segment.GetColor(), np.array(lab.color) / 255.0, atol=1e-6)
    counts = voxel_counts(node, volume)
    assert counts["Left-Hippocampus"] > 0 and counts["Right-Hippocampus"] > 0
