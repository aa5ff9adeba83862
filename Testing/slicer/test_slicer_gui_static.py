"""The GUI glue that CI can check without Qt (issue 14, points 5, 7 and 11).

- MetaSeg.ui against MetaSeg.py: every `self.ui.X` exists with a class that has what the code
  uses of it, and every parameter-node field is bound to a widget of a fitting class.
- The widget's own decisions, with stand-ins for Qt widgets and the layout manager (no Qt
  application exists here; the stand-ins only record what the widget sets): a Segment click
  delivered while an install pumps events starts nothing, the button is disabled during the
  install, and the slice views come from the layout, with a clear message for a missing one.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from mrml_helpers import MODULE_DIR

UI = MODULE_DIR / "Resources" / "UI" / "MetaSeg.ui"
CODE = (MODULE_DIR / "MetaSeg.py").read_text(encoding="utf-8")

# What the module may use of each widget class (Qt/CTK/qMRML properties, methods and signals).
WIDGET = {"enabled", "toolTip", "show", "hide", "connect", "setMRMLScene"}
ALLOWED = {
    "QComboBox": WIDGET | {"addItem", "clear", "findData", "findText", "currentIndex", "setCurrentIndex",
                           "currentText", "currentData", "itemData"},
    "QPushButton": WIDGET | {"text", "checked"},
    "QLabel": WIDGET | {"text"},
    "QProgressBar": WIDGET | {"value", "setFormat"},
    "QSpinBox": WIDGET | {"value"},
    "QCheckBox": WIDGET | {"checked"},
    "QPlainTextEdit": WIDGET | {"plainText"},
    "qMRMLNodeComboBox": WIDGET | {"currentNode", "setCurrentNode"},
    "ctkCollapsibleButton": WIDGET | {"collapsed"},
}
BINDABLE = {"vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}, "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
            "bool": {"QCheckBox"}, "int": {"QSpinBox", "ctkSliderWidget"}, "str": {"QComboBox", "QLineEdit"}}


def ui_widgets():
    root = ET.parse(UI).getroot()
    widgets = {}
    for w in root.iter("widget"):
        bound = None
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound = prop.find("string").text
        widgets[w.get("name")] = (w.get("class"), bound)
    return widgets


def parameter_fields():
    body = CODE[CODE.index("class MetaSegParameterNode"):]
    body = body[:body.index("\n\n")]
    return {name: re.sub(r"Annotated\[(\w+),.*", r"\1", kind).strip()
            for name, kind in re.findall(r"^        (\w+): ([^=#\n]+)", body, re.M)}


def test_every_ui_widget_the_module_uses_exists_with_a_fitting_class():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", CODE))
    assert used, "the module uses no widgets?"
    missing = used - set(widgets)
    assert not missing, f"used in MetaSeg.py but not in MetaSeg.ui: {sorted(missing)}"
    for name, member in set(re.findall(r"self\.ui\.(\w+)\.(\w+)", CODE)):
        cls = widgets[name][0]
        assert cls in ALLOWED, f"{name}: class {cls} is not one the module knows"
        assert member in ALLOWED[cls], f"self.ui.{name}.{member}: a {cls} has no '{member}'"


def test_every_parameter_node_field_is_bound():
    widgets = ui_widgets()
    fields = parameter_fields()
    assert set(fields) >= {"inputVolume", "outputSegmentation", "steps", "seed", "livePreview"}
    bound = {b: (name, cls) for name, (cls, b) in widgets.items() if b}
    assert set(bound) <= set(fields), f"bound to no parameter: {set(bound) - set(fields)}"
    # device is bound by code: the combo box's item data (auto/cpu/gpu) is the value, not its text
    assert set(fields) - set(bound) == {"device"}
    assert "self._parameterNode.device = self.ui.deviceComboBox.itemData(index)" in CODE
    assert "self.ui.deviceComboBox.findData(pn.device)" in CODE
    for field, (name, cls) in bound.items():
        assert cls in BINDABLE[fields[field]], f"{field} ({fields[field]}) is bound to {name}, a {cls}"


class Stub:
    """Stand-in for a Qt widget: records the properties the widget sets (no Qt application here)."""

    def __init__(self, **kw):
        self.enabled, self.text, self.toolTip = True, "", ""
        self.items = []
        self.__dict__.update(kw)

    def findData(self, data):
        return -1

    def findText(self, text):
        return self.items.index(text) if text in self.items else -1

    def addItem(self, text, data=None):
        self.items.append(text)

    def clear(self):
        self.items = []

    @property
    def currentText(self):
        return self.items[0] if self.items else ""

    def setCurrentIndex(self, i):
        pass


@pytest.fixture
def widget(slicer_core):
    import MetaSeg

    w = object.__new__(MetaSeg.MetaSegWidget)  # the Qt base class cannot be built without Qt
    names = ("inputSelector", "outputSelector", "deviceComboBox", "advancedCollapsibleButton", "modelLabel",
             "crossSectionButton", "segmentButton", "statusLabel", "sliceViewComboBox")
    w.ui = SimpleNamespace(**{n: Stub() for n in names})
    w._job, w._installing, w._lastSegmentation = None, False, None
    w._parameterNode = SimpleNamespace(device="auto", inputVolume=None, outputSegmentation=None)
    return w


def test_segment_is_disabled_and_not_reentered_during_an_install(widget):
    import MetaSeg

    seen = []

    class InstallingLogic(MetaSeg.MetaSegLogic):
        def installDependencies(self, askConfirmation=True):
            # pip_install pumps Qt events: the user clicks Segment again meanwhile
            seen.append(("button enabled during install", widget.ui.segmentButton.enabled))
            widget.onSegmentButton()
            seen.append(("nested click started", widget._job is not None))
            return False  # the user declined the install

    widget.logic = InstallingLogic()
    widget.onSegmentButton()
    assert seen == [("button enabled during install", False), ("nested click started", False)]
    assert widget._installing is False and widget._job is None
    assert widget.ui.statusLabel.text.startswith("Missing Python packages")
    src = CODE[CODE.index("    def _ensureDependencies"):CODE.index("    def onCrossSectionButton")]
    assert "waitCursor" not in src, "install confirmations must not show under the wait cursor"


class Layout:
    """Stand-in for Slicer's layout manager: a layout with non-standard view names."""

    def __init__(self, names):
        self.names = names

    def sliceViewNames(self):
        return list(self.names)

    def sliceWidget(self, name):
        return SimpleNamespace(mrmlSliceNode=lambda: f"node of {name}") if name in self.names else None


def test_slice_views_come_from_the_layout(slicer_core):
    from MetaSegLib import views

    layout = Layout(["Red", "Slice4", "Yellow+"])
    assert views.slice_view_names(layout) == ["Red", "Slice4", "Yellow+"]
    assert views.slice_node(layout, "Slice4") == "node of Slice4"
    with pytest.raises(ValueError, match="'Green' is not in the current layout: choose one of Red, Slice4, Yellow"):
        views.slice_node(layout, "Green")
    with pytest.raises(ValueError, match="switch to a layout with a slice view"):
        views.slice_node(Layout([]), "Red")
    assert "sliceWidget(view)" not in CODE and '("Red", "Yellow", "Green")' not in CODE
