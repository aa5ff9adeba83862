"""Paths and MRML helpers shared by the MetaSeg Slicer tests (no fixtures here: see conftest.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MetaSegSlicer"
SAMPLE_T1 = ROOT / "Resources" / "Sample" / "ecog_slice_t1.nii.gz"
SAMPLE_SEG = ROOT / "Resources" / "Sample" / "ecog_slice_seg4.nii.gz"
SHIPPED_2D = ROOT / "Resources" / "Weights" / "metaseg2d.safetensors"


def load_volume(scene, path: Path, name: str = None, labelmap: bool = False):
    """What slicer.util.loadVolume does in Slicer (through its IO manager): node + storage + display."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or Path(path).name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(Path(path).resolve()))
    assert storage.ReadData(node), f"could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def scene_state(scene):
    """Everything a user could see of a scene: its nodes (ID, class, name, modification time)
    and the serialized XML of all of them (subject hierarchy items included).

    The subject hierarchy node's modification time is left out: it observes the scene and is
    "modified" by every node added or removed anywhere, also in Slicer; its content (the
    items) is compared through the XML.
    """
    nodes = []
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        mtime = None if n.IsA("vtkMRMLSubjectHierarchyNode") else n.GetMTime()
        nodes.append((n.GetID(), n.GetClassName(), n.GetName(), mtime))
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    return nodes, hashlib.sha256(xml.encode()).hexdigest()
SAMPLE_T1_3D = ROOT / "Resources" / "Sample" / "ecog_t1.nii.gz"  # native scanner geometry, 256^3
SAMPLE_SEG_3D = ROOT / "Resources" / "Sample" / "ecog_seg4.nii.gz"
