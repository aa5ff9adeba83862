"""The panel's brain mask (issue 25, section 3): a labelmap or a segmentation of the user's, in any geometry and under
any linear transform, reaches the core as a mask on the input's own grid (what `metaseg job`'s "mask" takes, as the
command line's --mask). MRML only: Slicer's segmentation logic does the resampling (slicer-core)."""
from __future__ import annotations

import numpy as np
import pytest


def grid_volume(scene, name, shape, spacing, origin, labelmap=False, voxels=None):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    array = np.zeros(shape, np.uint8 if labelmap else np.float32) if voxels is None else voxels
    slicer.util.updateVolumeFromArray(node, array)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    return node


def translate(scene, node, offset):
    import vtk

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    for i in range(3):
        m.SetElement(i, 3, offset[i])
    transform.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(transform.GetID())


def read_mask(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (k, j, i)


def test_a_labelmap_in_another_geometry_and_frame_lands_on_the_inputs_grid(scene, tmp_path):
    import MetaSeg

    # input: 20^3 voxels of 1 mm at the origin, under a translation of +4.5 mm in R (its own frame is what the core
    # gets); mask: 10^3 voxels of 2 mm, labels 1 and 7 (both count), no transform, a cube [3, 11) mm in world R
    volume = grid_volume(scene, "scan", (20, 20, 20), (1, 1, 1), (0, 0, 0))
    translate(scene, volume, (4.5, 0, 0))
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:6, 2:4] = 1
    labels[2:6, 2:6, 4:6] = 7
    mask = grid_volume(scene, "mask", (10, 10, 10), (2, 2, 2), (0, 0, 0), labelmap=True, voxels=labels)
    MetaSeg.MetaSegLogic._checkBrainMask(mask, volume, 3, "auto")
    out = tmp_path / "mask.nrrd"
    MetaSeg.MetaSegLogic._exportBrainMask(mask, volume, out)
    got = read_mask(out) > 0
    assert got.shape == (20, 20, 20)
    # voxel i of the input lies at world R = i + 4.5 (note: Slicer's RAS; the file is LPS, the voxels the same)
    expected_i = [i for i in range(20) if 3 <= i + 4.5 < 11]
    assert sorted(set(np.nonzero(got)[2])) == expected_i == list(range(0, 7))
    assert sorted(set(np.nonzero(got)[1])) == list(range(3, 11))  # j: the same cube, untransformed
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0  # the user's scene untouched


def test_a_segmentation_gives_its_metaseg_brain_mask_segment_else_all_segments(scene, tmp_path):
    import slicer

    import MetaSeg

    volume = grid_volume(scene, "scan", (12, 12, 12), (1, 1, 1), (0, 0, 0))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)

    def add(segment_id, box):
        import vtk

        image = slicer.vtkOrientedImageData()
        image.SetDimensions(12, 12, 12)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        array = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(12, 12, 12)
        array[:] = 0
        array[box] = 1
        image.Modified()
        segment = slicer.vtkSegment()
        segment.SetName(segment_id)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
        seg.GetSegmentation().AddSegment(segment, segment_id)

    import vtk.util.numpy_support  # noqa: F401

    add("White matter", (slice(0, 3), slice(0, 3), slice(0, 3)))
    add(MetaSeg.BRAIN_MASK_SEGMENT, (slice(4, 9), slice(4, 9), slice(4, 9)))
    MetaSeg.MetaSegLogic._exportBrainMask(seg, volume, tmp_path / "a.nrrd")
    got = read_mask(tmp_path / "a.nrrd") > 0
    assert got.sum() == 5 ** 3 and got[4:9, 4:9, 4:9].all()  # only the kept brain mask
    seg.GetSegmentation().RemoveSegment(MetaSeg.BRAIN_MASK_SEGMENT)
    add("Other", (slice(6, 8), slice(6, 8), slice(6, 8)))
    MetaSeg.MetaSegLogic._exportBrainMask(seg, volume, tmp_path / "b.nrrd")
    got = read_mask(tmp_path / "b.nrrd") > 0
    assert got.sum() == 3 ** 3 + 2 ** 3  # the union of every segment


def test_a_brain_mask_is_refused_in_the_panels_words_where_it_cannot_apply(scene):
    import MetaSeg
    from MetaSegLib.refusals import CLI_OPTION

    volume = grid_volume(scene, "scan", (8, 8, 8), (1, 1, 1), (0, 0, 0))
    mask = grid_volume(scene, "mask", (8, 8, 8), (1, 1, 1), (0, 0, 0), labelmap=True)
    for dims, extraction, why in ((2, "auto", "3D scans only"), (3, "on", "Brain extraction is set to on")):
        with pytest.raises(MetaSeg.MetaSegError, match=why) as e:
            MetaSeg.MetaSegLogic._checkBrainMask(mask, volume, dims, extraction)
        assert not CLI_OPTION.search(str(e.value))
