"""Results that survive and scripts that hold (issue 19, point 5 and the reload of point 6), on slicer-core.

- segment IDs are the segments' names: the same on every run over the same input;
- the fitted network is an attribute of the result (base64 of a safetensors file): saved in the scene file
  (Slicer's own `vtkMRMLScene.WriteToMRB`, the File > Save path for a bundle), and after reloading the
  scene in a new scene a cross-section still renders (each version's .mrml rules: test_slicer_save_rules.py);
- node references, not ID strings in attributes;
- MetaSegLib reloads in dependency order.
"""
from __future__ import annotations

import base64
import hashlib
import json
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
    assert seg.GetNodeReference(MetaSeg.FITTED_REFERENCE) is None  # no separate node (it would need its own file)
    assert seg.GetAttribute(MetaSeg.FITTED_NETWORK_ATTRIBUTE)  # the network itself, in the scene file
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
        assert seg2 is not None
        assert seg2.GetAttribute(MetaSeg.FITTED_NETWORK_ATTRIBUTE) == seg.GetAttribute(MetaSeg.FITTED_NETWORK_ATTRIBUTE)
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


def test_a_damaged_kept_network_is_a_clear_error(scene, MetaSeg, fitted_3d, tmp_path):
    """The scene is untrusted: the file name is the hash of the decoded bytes, bad base64, text that is not a
    safetensors file, a network of an older MetaSeg and label values that would size a huge colour table are
    refused with a message; a valid network is written once per content."""
    from MetaSegLib import fitted

    text = fitted.encode(fitted_3d)
    path = fitted.materialize(text, tmp_path / "a")
    assert path.read_bytes() == fitted_3d.read_bytes() and path.name == hashlib.sha256(path.read_bytes()).hexdigest()[:32] + ".safetensors"
    assert fitted.materialize(text, tmp_path / "a") == path
    with pytest.raises(fitted.FittedError, match="not valid base85"):
        fitted.materialize(text[:-5] + "<<<<<", tmp_path / "b")
    with pytest.raises(fitted.FittedError, match="not valid base64"):  # the base64 text of MetaSeg 0.5
        fitted.materialize(base64.b64encode(fitted_3d.read_bytes()).decode()[:-5] + "!!!!!", tmp_path / "b")
    # MetaSeg 0.5's base64 text still gives the same file
    assert fitted.materialize(base64.b64encode(fitted_3d.read_bytes()).decode(), tmp_path / "e").read_bytes() \
        == fitted_3d.read_bytes()
    with pytest.raises(fitted.FittedError, match="not a MetaSeg fitted network"):
        fitted.materialize(base64.b64encode(b"hello, this is not a network").decode(), tmp_path / "c")
    with pytest.raises(fitted.FittedError, match="older MetaSeg"):
        fitted.materialize('{"format": "metaseg-fitted-network/1", "sha256": "/etc/passwd"}\nAAAA', tmp_path / "d")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    # a result of metaseg <= 0.4.0 (a text node holding a pickle): one message, nothing decoded
    logic = MetaSeg.MetaSegLogic(runRoot=str(tmp_path / "runs"))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "old")
    old = scene.AddNewNodeByClass("vtkMRMLTextNode", "old fitted network")
    old.SetText('{"format": "metaseg-fitted-network/1", "sha256": "ab", "name": "x.pt", "bytes": 4}\ngASVAA==')
    seg.SetNodeReferenceID(MetaSeg.FITTED_REFERENCE, old.GetID())
    seg.SetAttribute(MetaSeg.CROSS_SECTIONS_ATTRIBUTE, "1")
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    assert logic.hasFittedNetwork(seg)  # listed, so that Render says why it cannot
    with pytest.raises(MetaSeg.MetaSegError, match="made by an older MetaSeg.*segment the scan again"):
        logic.crossSection(seg, view)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_crafted_pickle_in_a_scene_never_runs(scene, MetaSeg, tmp_path):
    """Issue 25, point 1: a shared scene whose result carries a pickle (as this version keeps networks, and as
    metaseg <= 0.4.0 did) listed in the selector; Render refuses in one line and nothing runs (the control:
    unpickling the same bytes does run the payload)."""
    import pickle

    import torch

    marker = tmp_path / "MARKER"
    torch.save({"format": "metaseg-fitted/1", "x": _Payload(marker)}, tmp_path / "evil.pt")
    data = (tmp_path / "evil.pt").read_bytes()
    logic = MetaSeg.MetaSegLogic(runRoot=str(tmp_path / "runs"))
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "shared result")
    seg.SetAttribute(MetaSeg.FITTED_NETWORK_ATTRIBUTE, base64.b64encode(data).decode())
    seg.SetAttribute(MetaSeg.CROSS_SECTIONS_ATTRIBUTE, "1")
    seg.SetAttribute(MetaSeg.FITTED_INFO_ATTRIBUTE, json.dumps({"labels": []}))
    old = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "old shared result")
    text = scene.AddNewNodeByClass("vtkMRMLTextNode", "old fitted network")
    text.SetText(json.dumps({"format": "metaseg-fitted-network/1", "sha256": "/" * 64, "name": "x.pt",
                             "bytes": len(data)}) + "\n" + base64.b64encode(data).decode())
    old.SetNodeReferenceID(MetaSeg.FITTED_REFERENCE, text.GetID())
    for node in (seg, old):
        assert logic.hasFittedNetwork(node)
        with pytest.raises(MetaSeg.MetaSegError) as e:
            logic.crossSection(node, view)
        assert "\n" not in str(e.value) and "older MetaSeg" in str(e.value)
    assert not marker.exists()
    assert not list((tmp_path / "runs").rglob("*.safetensors")) if (tmp_path / "runs").exists() else True
    pickle.loads(zipped_pickle(data))  # control: the payload works when unpickled
    assert marker.exists()


def zipped_pickle(data: bytes) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


@pytest.mark.parametrize("labels,message", [
    ([{"value": 10**9, "name": "huge", "color": [1, 0, 0]}], "has the value 1000000000"),
    ([{"value": -1, "name": "negative", "color": [1, 0, 0]}], "has the value -1"),
    ([{"value": 3, "name": "x", "color": [1, 0, 0]}] * 2, "each once"),
    ([{"value": 3, "name": "x", "color": [1e9, 0, 0]}], "not three numbers in 0..1"),
    ("not a list", "not a list"),
])
def test_label_values_from_a_scene_are_bounded_before_a_colour_table(scene, MetaSeg, fitted_3d, tmp_path, labels,
                                                                      message):
    """Issue 25, point 7: a crafted label value must not allocate a colour table of gigabytes."""
    logic = MetaSeg.MetaSegLogic(runRoot=str(tmp_path / "runs"))
    volume = load_volume(scene, SAMPLE_T1_3D, "ecog")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "crafted")
    logic._keepFitted(seg, fitted_3d, volume, np.eye(4))
    info = json.loads(seg.GetAttribute(MetaSeg.FITTED_INFO_ATTRIBUTE))
    seg.SetAttribute(MetaSeg.FITTED_INFO_ATTRIBUTE, json.dumps(dict(info, labels=labels)))
    tables = scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems()
    with pytest.raises(MetaSeg.MetaSegError, match=message):
        logic.crossSection(seg, scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red"))
    with pytest.raises(MetaSeg.MetaSegError, match=message):
        MetaSeg.MetaSegLogic._tissueColors(scene, labels)
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == tables
    table = MetaSeg.MetaSegLogic._tissueColors(scene, [{"value": 255, "name": "top", "color": [0, 1, 0]}])
    assert table.GetNumberOfColors() == 256  # the largest a uint8 labelmap can need



def test_a_kept_network_is_decoded_from_the_scene_every_time(tmp_path):
    """Issue 26: a network decoded earlier in the session never stands in for another scene's (the file name is
    the hash of the bytes decoded from this scene's text, computed here); a padded text is refused by its length."""
    from MetaSegLib import fitted
    from testdata import small_fitted_file

    first = small_fitted_file(tmp_path / "a.safetensors", mask=True)
    second = small_fitted_file(tmp_path / "b.safetensors", mask=False)
    kept = tmp_path / "kept"
    one = fitted.materialize(fitted.encode(first), kept)
    two = fitted.materialize(fitted.encode(second), kept)
    assert one.read_bytes() == first.read_bytes() and two.read_bytes() == second.read_bytes() and one != two
    two.write_bytes(b"tampered")  # a file left in the folder is checked again, never trusted by its name
    assert fitted.materialize(fitted.encode(second), kept).read_bytes() == second.read_bytes()
    with pytest.raises(fitted.FittedError, match="more than a fitted network can have"):
        fitted.decode("A" * (fitted.MAX_BYTES * 2))


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
