"""The segments' terminology codes exist in the list that Slicer ships (issue 14, point 6).

Slicer looks a segment's category and type up by code in "Segmentation category and type - DICOM
master list" (a verbatim copy of Slicer's JSON is in Testing/slicer/data). A code that is not there
shows as unknown in the Segment Editor and cannot be chosen again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrml_helpers import SAMPLE_SEG

DATA = Path(__file__).resolve().parent / "data" / "SegmentationCategoryTypeModifier-DICOM-Master.json"


@pytest.fixture(scope="module")
def master():
    d = json.loads(DATA.read_text(encoding="utf-8"))
    types, modifiers = {}, {}
    for category in d["SegmentationCodes"]["Category"]:
        key = (category["CodingSchemeDesignator"], category["CodeValue"])
        for t in category.get("Type", []):
            k = key + (t["CodingSchemeDesignator"], t["CodeValue"])
            types[k] = (category["CodeMeaning"], t["CodeMeaning"])
            modifiers[k] = {(m["CodingSchemeDesignator"], m["CodeValue"], m["CodeMeaning"]) for m in t.get("Modifier", [])}
    return d["SegmentationCategoryTypeContextName"], types, modifiers


@pytest.mark.parametrize("name", ["tissues", "structures"])
def test_every_code_is_in_slicers_dicom_master_list(master, name):
    """Every label of every label set: category/type pair, meanings and Left/Right modifier as Slicer lists them."""
    from metaseg.labelsets import label_set, terminology

    context, types, modifiers = master
    labels = label_set(name)
    for lab in labels.labels[1:]:
        t = terminology(lab)
        key = (t["category"][0], t["category"][1], t["type"][0], t["type"][1])
        assert key in types, f"{lab.name}: category {t['category']} / type {t['type']} is not in Slicer's list"
        assert types[key] == (t["category"][2], t["type"][2]), f"{lab.name}: meanings differ from Slicer's list"
        assert t["contextName"] == context
        if "typeModifier" in t:
            assert tuple(t["typeModifier"]) in modifiers[key], f"{lab.name}: modifier not offered for this type"
        elif lab.name.startswith(("Left-", "Right-")):  # a side without a modifier: the list offers none
            assert not modifiers[key], f"{lab.name}: the list offers a Left/Right modifier: use it"
    if name == "structures":
        assert len(labels) == 32 and sum(1 for lab in labels.labels if lab.modifier) >= 20


def test_seg_nrrd_written_by_the_core_carries_those_codes(master, tmp_path, slicer_core):
    """The core's .seg.nrrd, read by Slicer's own segmentation reader: each segment's terminology tag
    names the list's context and a category/type pair from it."""
    import SimpleITK as sitk
    import vtk
    from metaseg.io.outputs import write_seg_nrrd
    from metaseg.method.weights import LABELS

    slicer = slicer_core
    path = tmp_path / "sample.seg.nrrd"
    write_seg_nrrd(sitk.ReadImage(str(SAMPLE_SEG)), LABELS, path)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    context, types, _ = master
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    for i in range(4):
        segment = segmentation.GetNthSegment(i)
        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        fields = str(tag).split("~")  # context~category~type~modifier~anatomic context~region~region modifier
        category, kind = (f.split("^") for f in fields[1:3])
        assert fields[0] == context
        assert (category[0], category[1], kind[0], kind[1]) in types, str(tag)
    assert np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_SEG)))).tolist() == [0, 1, 2, 3, 4]
