"""Label sets: what a model's output classes mean, as one table per set.

A label set is data: for every output class its label value (what the labelmap stores), name,
colour, DICOM terminology code and the tissue class it belongs to. Every output (labelmap,
`.seg.nrrd`, report, preview, `volumes.tsv`, the Slicer segments) reads this table, so adding a
label set adds no branch anywhere else.

- `tissues`: the paper's 5-class task (values 0-4, our colours).
- `structures`: 31 brain structures in FreeSurfer's `aseg` numbering, named and coloured as in
  FreeSurfer's colour table (`FreeSurferColorLUT`, which 3D Slicer ships), the label set of SynthSeg
  and FastSurfer's aseg without extra-cerebral CSF (the data's `structures.py` protocol).

Terminology codes are SNOMED CT codes of Slicer's "Segmentation category and type - DICOM master
list" (SegmentationCategoryTypeModifier-DICOM-Master.json, a copy in Testing/slicer/data, checked by a
test), with the Left/Right modifier where the list offers one. Where the list has no exact code the
nearest broader one is used and `exact` is False (the reason is in `note`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

Code = Tuple[str, str, str]  # (coding scheme, code value, meaning)

ANATOMY: Code = ("SCT", "123037004", "Anatomical Structure")
LEFT: Code = ("SCT", "7771000", "Left")
RIGHT: Code = ("SCT", "24028007", "Right")

# Tissue classes of the 5-class task: every structure belongs to one (its `tissue`).
TISSUE_NAMES = {1: "Cortical gray matter", 2: "Subcortical gray matter", 3: "White matter", 4: "Cerebrospinal fluid"}


@dataclass(frozen=True)
class Label:
    """One output class: its value in the labelmap, and how every output names and draws it."""

    value: int
    name: str
    color: Tuple[int, int, int]
    code: Optional[Code] = None  # terminology type (category: ANATOMY); None for background
    modifier: Optional[Code] = None  # Left / Right
    tissue: int = 0  # tissue class (1-4) it belongs to; 0 background
    exact: bool = True  # the code names this structure exactly (False: the nearest broader code)
    note: str = ""

    def to_card(self) -> Dict[str, object]:
        """The entry written into a weights card's `labels` (JSON)."""
        d: Dict[str, object] = {"value": self.value, "name": self.name, "color": list(self.color), "tissue": self.tissue}
        if self.code is not None:
            d["terminology"] = terminology(self)
        return d


@dataclass(frozen=True)
class LabelSet:
    """The classes of one model output, in the order of the network's class axis."""

    name: str
    title: str
    labels: Tuple[Label, ...]

    @property
    def values(self) -> Tuple[int, ...]:
        return tuple(lab.value for lab in self.labels)

    @property
    def foreground(self) -> Tuple[int, ...]:
        return tuple(v for v in self.values if v != 0)

    def __len__(self) -> int:
        return len(self.labels)

    def by_value(self, value: int) -> Label:
        for lab in self.labels:
            if lab.value == value:
                return lab
        raise KeyError(f"label value {value} is not in the {self.name} label set")

    def index_lut(self) -> List[int]:
        """value -> class index for values 0..255 (-1 where the value is not in the set)."""
        lut = [-1] * 256
        for i, v in enumerate(self.values):
            lut[v] = i
        return lut

    def tissue_lut(self) -> List[int]:
        """value -> tissue class (0-4) for values 0..255: structures merged into the 5 tissue classes."""
        lut = [0] * 256
        for lab in self.labels:
            lut[lab.value] = lab.tissue
        return lut

    def card_labels(self) -> List[Dict[str, object]]:
        return [lab.to_card() for lab in self.labels]

    def merges_into(self, coarse: "LabelSet") -> Optional[List[int]]:
        """For each class of this set, the class of `coarse` it belongs to (structures -> tissues: each
        structure's tissue); None if this set does not merge into `coarse`. A set merges into itself."""
        if coarse is self:
            return list(range(len(self)))
        if coarse is TISSUES and all(lab.tissue in TISSUES.values for lab in self.labels):
            return [TISSUES.values.index(lab.tissue) for lab in self.labels]
        return None


def terminology(lab: Label) -> Dict[str, object]:
    """Slicer's terminology entry (as slicerio writes it) for one label."""
    d: Dict[str, object] = {
        "contextName": "Segmentation category and type - DICOM master list",
        "category": list(ANATOMY),
        "type": list(lab.code or ()),
        "anatomicContextName": "Anatomic codes - DICOM master list",
    }
    if lab.modifier is not None:
        d["typeModifier"] = list(lab.modifier)
    return d


def _tissue(value: int, name: str, color, code: Code, exact: bool = True, note: str = "") -> Label:
    return Label(value, name, tuple(color), code, None, value, exact, note)


TISSUES = LabelSet("tissues", "5 tissue classes", (
    Label(0, "Background", (0, 0, 0)),
    _tissue(1, "Cortical gray matter", (230, 155, 100), ("SCT", "40146001", "Cerebral cortex"),
            note="includes the cerebellar cortex"),
    _tissue(2, "Subcortical gray matter", (220, 50, 120), ("SCT", "389081007", "Gray Matter"), exact=False,
            note="the list has no subcortical grey matter: filed as grey matter"),
    _tissue(3, "White matter", (245, 245, 245), ("SCT", "389080008", "White Matter"),
            note="includes the cerebellar white matter and the brainstem"),
    _tissue(4, "Cerebrospinal fluid", (90, 160, 230), ("SCT", "65216001", "Cerebrospinal Fluid"),
            note="the ventricles"),
))


def _pair(left: int, right: int, name: str, color, code: Code, tissue: int, exact: bool = True,
          note: str = "", lateral_code: bool = True, right_color=None) -> List[Label]:
    """A left/right pair named and coloured as FreeSurfer's table has them ('Left-' / 'Right-' + name)."""
    return [Label(v, f"{side}-{name}", tuple(col), code, mod if lateral_code else None, tissue, exact, note)
            for v, side, mod, col in ((left, "Left", LEFT, color), (right, "Right", RIGHT, right_color or color))]


_NO_LATERALITY = "the list's code has no Left/Right modifier: the side is in the name only"
STRUCTURES = LabelSet("structures", "31 brain structures (FreeSurfer aseg numbering)", tuple(sorted([
    Label(0, "Unknown", (0, 0, 0)),
    *_pair(2, 41, "Cerebral-White-Matter", (245, 245, 245), ("SCT", "68523003", "Cerebral White Matter"), 3,
           right_color=(0, 225, 0)),  # FreeSurfer's table draws the right cerebral WM green
    *_pair(3, 42, "Cerebral-Cortex", (205, 62, 78), ("SCT", "40146001", "Cerebral cortex"), 1),
    *_pair(4, 43, "Lateral-Ventricle", (120, 18, 134), ("SCT", "66720007", "Lateral ventricle"), 4),
    *_pair(5, 44, "Inf-Lat-Vent", (196, 58, 250), ("SCT", "66720007", "Lateral ventricle"), 4, exact=False,
           note="the list has no code for the inferior (temporal) horn: filed as lateral ventricle"),
    *_pair(7, 46, "Cerebellum-White-Matter", (220, 248, 164), ("SCT", "33060004", "Cerebellar white matter"), 3,
           note=_NO_LATERALITY, lateral_code=False),
    *_pair(8, 47, "Cerebellum-Cortex", (230, 148, 34), ("SCT", "113305005", "Cerebellum"), 1, exact=False,
           note="the list has no cerebellar cortex: filed as cerebellum, side in the name", lateral_code=False),
    *_pair(10, 49, "Thalamus", (0, 118, 14), ("SCT", "42695009", "Thalamus"), 2),
    *_pair(11, 50, "Caudate", (122, 186, 220), ("SCT", "11000004", "Caudate nucleus"), 2),
    *_pair(12, 51, "Putamen", (236, 13, 176), ("SCT", "89278009", "Putamen"), 2),
    *_pair(13, 52, "Pallidum", (12, 48, 255), ("SCT", "14738005", "Globus pallidus"), 2),
    Label(14, "3rd-Ventricle", (204, 182, 142), ("SCT", "49841001", "Third ventricle"), None, 4),
    Label(15, "4th-Ventricle", (42, 204, 164), ("SCT", "35918002", "Fourth ventricle"), None, 4),
    Label(16, "Brain-Stem", (119, 159, 176), ("SCT", "119238007", "Brain stem"), None, 3),
    *_pair(17, 53, "Hippocampus", (220, 216, 20), ("SCT", "5366008", "Hippocampus"), 2),
    *_pair(18, 54, "Amygdala", (103, 255, 255), ("SCT", "4958002", "Amygdala"), 2),
    *_pair(26, 58, "Accumbens-area", (255, 165, 0), ("SCT", "427667007", "Nucleus accumbens"), 2),
    *_pair(28, 60, "VentralDC", (165, 42, 42), ("SCT", "87563008", "Diencephalon"), 2, exact=False,
           note="the list has no ventral diencephalon: filed as diencephalon, side in the name", lateral_code=False),
], key=lambda lab: lab.value)))
LABEL_SETS: Dict[str, LabelSet] = {s.name: s for s in (TISSUES, STRUCTURES)}


def label_set(name: str) -> LabelSet:
    """The label set called `name`; a clear error naming the choices otherwise."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}: choose one of {', '.join(LABEL_SETS)}") from None


def from_card(labels: Sequence[Dict[str, object]]) -> LabelSet:
    """The label set a weights card (or a fitted file's info) describes; a card written before label sets
    existed (values 0-4) is the tissues set."""
    return for_values(tuple(int(lab["value"]) for lab in labels))


def for_values(values: Sequence[int]) -> LabelSet:
    """The label set whose classes have these label values (a model's `ModelConfig.values`)."""
    values = tuple(int(v) for v in values)
    for s in LABEL_SETS.values():
        if s.values == values:
            return s
    raise ValueError(f"the labels {list(values)[:8]}... match no known label set ({', '.join(LABEL_SETS)})")


def as_tissues(labels, values: Sequence[int]):
    """A labelmap (numpy, label values of the set with `values`) as the 4 tissue classes: the plausibility
    checks, calibrated on tissue proportions, read any label set through this."""
    import numpy as np

    labels_set = for_values(values)
    if labels_set is TISSUES:
        return labels
    return np.asarray(labels_set.tissue_lut(), np.uint8)[labels]
