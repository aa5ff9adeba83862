"""Results that survive and scripts that hold (issue 19, point 5 and the reload of point 6), on slicer-core.

- segment IDs are the segments' names: the same on every run over the same input;
- the fitted network is a text node referenced by the result: saved with the scene (Slicer's own
  `vtkMRMLScene.WriteToMRB`, the File > Save path for a bundle), and after reloading the scene in a
  new scene a cross-section still renders;
- node references, not ID strings in attributes;
- MetaSegLib reloads in dependency order.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mrml_helpers import MODULE_DIR, SAMPLE_T1, SAMPLE_T1_3D, load_volume

pytestmark = pytest.mark.usefixtures("slicer_core")


@pytest.fixture
def MetaSeg(slicer_core):
    import MetaSeg as module

    return module


def segment_ids(node):
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def test_rerunning_keeps_the_segment_ids(scene, MetaSeg, any_weights):
    logic = MetaSeg.MetaSegLogic()
    volume = load_volume(scene, SAMPLE_T1)
    first = logic.segment(volume, device="cpu", steps=2, weights=str(any_weights))
    names = [first.GetSegmentation().GetNthSegment(i).GetName() for i in range(4)]
    assert segment_ids(first) == names and len(set(names)) == 4
    again = logic.segment(volume, device="cpu", steps=2, seed=1, weights=str(any_weights))
    assert segment_ids(again) == names  # a new result: the same IDs
    logic.segment(volume, device="cpu", steps=2, seed=2, weights=str(any_weights), outputSegmentation=first)
    assert segment_ids(first) == names  # the same output, replaced: the same IDs
    assert first.GetSegmentation().GetSegment(names[2]).GetName() == names[2]


def test_segfile_names_the_ids(tmp_path, MetaSeg):
    from MetaSegLib import segfile

    path = tmp_path / "s.seg.nrrd"
    header = ("NRRD0004\ntype: unsigned char\nSegment0_ID:=Segment_1\nSegment0_Name:=White matter\n"
              "Segment1_ID:=Segment_2\nSegment1_Name:=White matter\nSegment2_ID:=x\nSegment2_Name:=\n")
    path.write_bytes(header.encode() + b"\n\x00\x01binary\n\n")
    assert segfile.name_ids(path) == ["White matter", "Segment_2", "x"]  # duplicate or empty name: ID kept
    data = path.read_bytes()
    assert data.endswith(b"\n\n\x00\x01binary\n\n") and b"Segment0_ID:=White matter\n" in data


def test_saved_and_reloaded_scene_still_renders_a_cross_section(scene, MetaSeg, fitted_3d, tmp_path):
    import slicer

    logic = MetaSeg.MetaSegLogic(runRoot=str(tmp_path / "session1"))
    volume = load_volume(scene, SAMPLE_T1_3D, "ecog")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ecog MetaSeg")
    seg.CreateDefaultDisplayNodes()
    seg.GetSegmentation().AddEmptySegment("White matter", "White matter")
    logic._keepFitted(seg, fitted_3d, volume, np.eye(4))  # what a finished 3D run stores
    text = seg.GetNodeReference(MetaSeg.FITTED_REFERENCE)
    assert text is not None and text.IsA("vtkMRMLTextNode")  # a node reference, not an ID string
    assert seg.GetAttribute("MetaSeg.FittedNetwork") is None
    assert seg.GetAttribute(MetaSeg.CROSS_SECTIONS_ATTRIBUTE) == "1"  # the panel's selector lists it

    bundle = tmp_path / "scene.mrb"
    assert scene.WriteToMRB(str(bundle)), "Slicer's scene writer failed"

    # a later session: a new scene read from the bundle, a new logic with its own temporary folder
    reloaded = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(reloaded)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(reloaded)
    cache = slicer.vtkCacheManager()  # the application gives its scene these (the bundle is unpacked there)
    (tmp_path / "cache").mkdir()
    cache.SetRemoteCacheDirectory(str(tmp_path / "cache"))
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    reloaded.SetDataIOManager(io_manager)
    reloaded.SetCacheManager(cache)
    assert reloaded.ReadFromMRB(str(bundle))
    slicer.mrmlScene = reloaded
    try:
        seg2 = reloaded.GetFirstNodeByName("ecog MetaSeg")
        assert seg2 is not None and seg2.GetNodeReference(MetaSeg.FITTED_REFERENCE) is not None
        assert seg2.GetNodeReference(MetaSeg.FITTED_REFERENCE).GetStorageNode() is not None  # saved as a file
        logic2 = MetaSeg.MetaSegLogic(runRoot=str(tmp_path / "session2"))
        assert logic2.hasFittedNetwork(seg2)
        bounds = [0.0] * 6
        reloaded.GetFirstNodeByName("ecog").GetRASBounds(bounds)
        node = reloaded.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
        node.SetLayoutName("Red")
        m = node.GetSliceToRAS()
        for i in range(3):  # an axial plane through the scan's centre
            m.SetElement(i, 3, (bounds[2 * i] + bounds[2 * i + 1]) / 2)
        node.SetFieldOfView(160.0, 160.0, 1.0)
        node.UpdateMatrices()
        plane = logic2.crossSection(seg2, node, superResolution=1)
        from vtk.util.numpy_support import vtk_to_numpy

        labels = vtk_to_numpy(plane.GetImageData().GetPointData().GetScalars())
        assert (labels > 0).sum() > 1000  # brain tissue on the plane
    finally:
        slicer.mrmlScene = scene
        reloaded.Clear(1)


def test_a_damaged_kept_network_is_a_clear_error(scene, MetaSeg, tmp_path):
    from MetaSegLib import fitted

    source = tmp_path / "f.pt"
    source.write_bytes(b"network bytes")
    text = fitted.encode(source)
    assert fitted.materialize(text, tmp_path / "a").read_bytes() == b"network bytes"
    with pytest.raises(fitted.FittedError, match="does not match its sha256"):
        fitted.materialize(text[:-4] + "AAAA", tmp_path / "b")
    with pytest.raises(fitted.FittedError, match="not a MetaSeg fitted network"):
        fitted.materialize("hello", tmp_path / "c")



def test_a_kept_network_is_decoded_from_the_scene_every_time(tmp_path):
    """Issue 26: a header repeating the hash of a network decoded earlier in the session gets no file of another
    scene; a hash that is not 64 hex digits never becomes a file name; a padded text is refused by its length."""
    import json

    from MetaSegLib import fitted

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"the first network")
    second.write_bytes(b"another network")
    kept = tmp_path / "kept"
    assert fitted.materialize(fitted.encode(first), kept).read_bytes() == b"the first network"
    head, data = fitted.encode(first).split("\n", 1)[0], fitted.encode(second).split("\n", 1)[1]
    with pytest.raises(fitted.FittedError, match="does not match its sha256"):
        fitted.materialize(head + "\n" + data, kept)  # the first network's hash, another network's data
    for digest in ("../../../etc/passwd", "g" * 64, json.loads(head)["sha256"][:40]):
        with pytest.raises(fitted.FittedError, match="not a MetaSeg fitted network"):
            fitted.materialize(json.dumps(dict(json.loads(head), sha256=digest)) + "\n" + data, kept)
    with pytest.raises(fitted.FittedError, match="more than any MetaSeg network"):
        fitted.materialize(head + "\n" + "A" * fitted.MAX_TEXT_CHARS, kept)


RELOAD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import MetaSegLib
from MetaSegLib import process, protocol
MetaSegLib.reload_all()
import MetaSegLib.protocol as p2
assert process.ProtocolError is p2.ProtocolError, "process.py holds a stale ProtocolError"
try:
    process.parse_line("not json at all")
except process.ProtocolError:
    print("caught")
"""


def test_metaseglib_reloads_in_dependency_order():
    import ast

    import MetaSegLib

    names = sorted(p.stem for p in (MODULE_DIR / "MetaSegLib").glob("*.py") if p.stem != "__init__")
    assert sorted(MetaSegLib.MODULES) == names, "every module of MetaSegLib is reloaded"
    for name in MetaSegLib.MODULES:
        tree = ast.parse((MODULE_DIR / "MetaSegLib" / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used = [node.module] if node.module else [a.name for a in node.names]
                for dep in used:
                    assert MetaSegLib.MODULES.index(dep) < MetaSegLib.MODULES.index(name), f"{name} before {dep}"
    # in a fresh interpreter (a reload here would leave this session's classes stale for other tests)
    out = subprocess.run([sys.executable, "-c", RELOAD, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "caught", out.stderr
