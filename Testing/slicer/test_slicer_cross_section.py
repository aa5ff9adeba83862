"""Cross-sections of a 3D result on a slice view's plane (MetaSegLogic.crossSection, slicer-core).

A 3D run on the bundled scan (short fit) keeps the fitted network; the logic then renders labels
on the planes of slice nodes (axial, oblique) at 4x resolution. Checked: the node lies on the
view's plane with the requested spacing, its labels agree with the run's own segmentation at the
same points, and nothing else in the scene changes.
"""
from __future__ import annotations

import numpy as np
import pytest

from mrml_helpers import SAMPLE_T1_3D, load_volume, scene_state

pytestmark = pytest.mark.usefixtures("slicer_core")


@pytest.fixture
def MetaSeg(slicer_core):
    import MetaSeg as module

    return module


def matrix(vtk_matrix):
    return np.array([[vtk_matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def slice_node(scene, name, slice_to_ras, fov=(120.0, 100.0)):
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
    node.SetLayoutName(name)
    m = node.GetSliceToRAS()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, slice_to_ras[i][j])
    node.SetFieldOfView(fov[0], fov[1], 1.0)
    node.UpdateMatrices()
    return node


def test_cross_section_of_a_3d_result(scene, MetaSeg):
    from vtk.util.numpy_support import vtk_to_numpy

    logic = MetaSeg.MetaSegLogic()
    volume = load_volume(scene, SAMPLE_T1_3D, "ecog")
    seg = logic.segment(volume, device="cpu", steps=5, wait=True, uncertainty=True, surfaces=True)
    assert logic.hasFittedNetwork(seg)
    # the uncertainty volume: on the input's grid, values in [0, 1]
    entropy = seg.GetNodeReference(MetaSeg.UNCERTAINTY_REFERENCE)  # a node reference, not an ID string
    assert entropy is not None and entropy.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(matrix(_ijk(entropy)), matrix(_ijk(volume)), atol=1e-4)
    values = vtk_to_numpy(entropy.GetImageData().GetPointData().GetScalars())
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6 and values.max() > 0.1
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    # the run's own labels, on the volume's grid
    labels_node = logic._exportLabelmap(seg, volume)
    ijk_to_ras = matrix(_ijk(labels_node))
    labels = vtk_to_numpy(labels_node.GetImageData().GetPointData().GetScalars()).reshape(
        labels_node.GetImageData().GetDimensions()[::-1])

    centre = ijk_to_ras @ np.r_[(np.array(labels.shape[::-1]) - 1) // 2, 1.0]  # a voxel centre
    rot = np.array([[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)], [0, np.sin(0.4), np.cos(0.4)]])
    for name, r in (("Red", np.eye(3)), ("Yellow", rot)):
        s2r = np.eye(4)
        s2r[:3, :3] = r
        s2r[:3, 3] = centre[:3]
        view = slice_node(scene, name, s2r)
        before = scene_state(scene)
        node = logic.crossSection(seg, view, superResolution=4)
        assert node.IsA("vtkMRMLLabelMapVolumeNode")
        m = matrix(_ijk(node))
        np.testing.assert_allclose(np.linalg.norm(m[:3, :2], axis=0), [0.25, 0.25], atol=1e-6)  # 1 mm / 4
        np.testing.assert_allclose(m[:3, 0] / 0.25, r[:, 0], atol=1e-6)  # on the view's plane
        np.testing.assert_allclose(m[:3, 1] / 0.25, r[:, 1], atol=1e-6)
        dims = node.GetImageData().GetDimensions()
        # a square plane covering the view (120 x 100 mm): what `metaseg reslice` renders
        assert dims[2] == 1 and abs((dims[0] - 1) * 0.25 - 120.0) <= 0.25 and dims[1] == dims[0]
        plane = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[1], dims[0])
        # the pixels that lie within 0.1 voxel of a voxel centre: the run's label there agrees with the
        # cross-section (up to boundaries). Farther from the centres the labels may rightly differ: the
        # head reads the intensity interpolated at the point, not the nearest voxel's.
        jj, ii = np.mgrid[0:dims[1], 0:dims[0]]
        ras = (m @ np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)]))
        ijk_float = np.linalg.solve(ijk_to_ras, ras)[:3]
        ijk = np.rint(ijk_float).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape[::-1])[:, None]), axis=0)
        inside &= np.abs(ijk_float - ijk).max(0) < 0.1
        want = labels[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
        got = plane[jj.ravel()[inside], ii.ravel()[inside]]
        tissue = (want > 0) | (got > 0)
        assert tissue.sum() > 100 and np.mean(want[tissue] == got[tissue]) > 0.95
        tables = [n for n in scene_state(scene)[0] if n[1] == "vtkMRMLColorTableNode" and n[2].startswith("MetaSeg labels")]
        assert len(tables) == 1  # the tissue colour table is made once and reused
        # only the new node (its display node and the colour table) was added; nothing else changed
        after_nodes = {n[0]: n for n in scene_state(scene)[0]}
        for n in before[0]:
            if n[1] != "vtkMRMLSubjectHierarchyNode":
                assert after_nodes[n[0]] == n or n[1] == "vtkMRMLColorTableNode"


def test_cross_section_needs_a_3d_result(scene, MetaSeg):
    logic = MetaSeg.MetaSegLogic()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    view = slice_node(scene, "Red", np.eye(4))
    with pytest.raises(MetaSeg.MetaSegError, match="no fitted network"):
        logic.crossSection(seg, view)


def _ijk(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def rotation(axis, degrees, shift=(0.0, 0.0, 0.0)):
    import vtk

    t = vtk.vtkTransform()
    t.Translate(*shift)
    t.RotateWXYZ(degrees, *axis)
    return matrix(t.GetMatrix())


def test_cross_section_follows_the_segmentation_transform(scene, MetaSeg, fitted_3d):
    """Issue 14, point 2: under a rotation transform the view's plane is taken into the network's
    frame. The same plane moved with the transform gives the same labels as without it, and the
    result lies under the transform; a non-linear transform is refused with a message."""
    import vtk

    logic = MetaSeg.MetaSegLogic()
    volume = load_volume(scene, SAMPLE_T1_3D, "ecog")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    logic._keepFitted(seg, fitted_3d, volume, np.eye(4))  # what a finished 3D run stores
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = np.array([(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)])
    s2r = rotation((1, 0, 0), 20.0)  # an oblique plane through the scan's centre
    s2r[:3, 3] = centre
    plain = logic.crossSection(seg, slice_node(scene, "Red", s2r, fov=(160.0, 160.0)), superResolution=1)

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rotated")
    T = rotation((0.3, 0.2, 1.0), 35.0, shift=(12.0, -7.0, 4.0))
    transform.SetMatrixTransformToParent(MetaSeg.frames.to_vtk(T))
    seg.SetAndObserveTransformNodeID(transform.GetID())
    moved = logic.crossSection(seg, slice_node(scene, "Yellow", T @ s2r, fov=(160.0, 160.0)), superResolution=1)

    a, b = (vtk_array(n) for n in (plain, moved))
    assert a.shape == b.shape and (a > 0).sum() > 1000
    assert np.mean(a == b) > 0.999, "the transformed plane shows other labels"
    np.testing.assert_allclose(matrix(_ijk(moved)), matrix(_ijk(plain)), atol=1e-6)  # same plane, local frame
    assert moved.GetTransformNodeID() == transform.GetID()

    # the old behaviour (world plane read as local): what the user used to get instead
    wrong = logic.crossSection(seg, slice_node(scene, "Green", s2r, fov=(160.0, 160.0)), superResolution=1)
    assert np.mean(vtk_array(wrong) == a) < 0.9

    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (((0, 0, 0), (0, 0, 5)), ((50, 0, 0), (50, 0, 0)), ((0, 50, 0), (0, 50, 0)), ((0, 0, 50), (0, 0, 50))):
        source.InsertNextPoint(*p)
        target.InsertNextPoint(*q)
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(tps)
    seg.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(MetaSeg.MetaSegError, match="non-linear transform 'warp'"):
        logic.crossSection(seg, slice_node(scene, "Red", s2r), superResolution=1)


def vtk_array(node):
    from vtk.util.numpy_support import vtk_to_numpy

    dims = node.GetImageData().GetDimensions()
    return vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[1], dims[0])
