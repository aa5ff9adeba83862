"""The GUI glue that CI can check without Qt (issue 14, points 5, 7 and 11; issue 19).

- MetaSeg.ui against MetaSeg.py: every `self.ui.X` exists with a class that has what the code
  uses of it, and every parameter-node field is bound to a widget under Slicer's binding rules
  (parameter_node_rules.refusal, restated from Slicer's guiConnectors: a QComboBox takes a str
  only with a Choice annotation; the rule here used to accept a plain str, which Slicer refuses).
  The panel itself runs in test_slicer_panel.py (real Qt).
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
WIDGET = {"enabled", "toolTip", "show", "hide", "connect", "setMRMLScene", "visible"}
ALLOWED = {
    "QComboBox": WIDGET | {"addItem", "clear", "findData", "findText", "currentIndex", "setCurrentIndex",
                           "currentText", "currentData", "itemData"},
    "qMRMLNodeComboBox": WIDGET | {"currentNode", "setCurrentNode", "addAttribute"},
    "QPushButton": WIDGET | {"text", "checked"},
    "QLabel": WIDGET | {"text"},
    "QProgressBar": WIDGET | {"value", "setFormat", "setRange"},
    "QSpinBox": WIDGET | {"value"},
    "QCheckBox": WIDGET | {"checked"},
    "QPlainTextEdit": WIDGET | {"plainText"},
    "ctkCollapsibleButton": WIDGET | {"collapsed"},
}


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
    """field -> annotation source, read from MetaSeg.py's text (no Slicer needed)."""
    body = CODE[CODE.index("class MetaSegParameterNode"):]
    body = body[:body.index("\n\n")]
    return {name: kind.strip() for name, kind in re.findall(r"^        (\w+): ([^=#\n]+)", body, re.M)}


def annotation(text):
    """The annotation source evaluated with the rules' Choice/WithinRange and stand-in node classes."""
    from typing import Annotated, Optional, Union

    import parameter_node_rules as rules

    nodes = {name: type(name, (), {}) for name in re.findall(r"vtkMRML\w+", text)}
    return eval(text, {"Annotated": Annotated, "Optional": Optional, "Union": Union, "Choice": rules.Choice,
                       "WithinRange": rules.WithinRange, **nodes})


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


def test_every_parameter_node_field_is_bound_under_slicers_rules(monkeypatch):
    import parameter_node_rules as rules

    widgets = ui_widgets()
    fields = parameter_fields()
    assert set(fields) >= {"inputVolume", "outputSegmentation", "device", "labels", "steps", "seed", "livePreview",
                           "brainExtraction", "quality"}
    bound = {b: (name, cls) for name, (cls, b) in widgets.items() if b}
    assert set(bound) == set(fields), f"unbound: {set(fields) - set(bound)}; no field: {set(bound) - set(fields)}"
    def node_types(t):  # the stand-in node classes by name; a Union (or Optional) of them as their names
        import typing

        members = typing.get_args(t) if typing.get_origin(t) is typing.Union else (t,)
        names = [m.__name__ for m in members if m is not type(None)]
        return names if names and all(n.startswith("vtkMRML") for n in names) else None

    monkeypatch.setattr(rules, "node_types", node_types)
    for field, (name, cls) in bound.items():
        why = rules.refusal(cls, annotation(fields[field]))
        assert why is None, f"{field} ({fields[field]}) on {name} ({cls}): {why}"


def test_the_rules_refuse_a_plain_str_on_a_combo_box():
    """The rule this file used to hold was wrong: Slicer refuses `str` on a QComboBox without Choice."""
    from typing import Annotated

    import parameter_node_rules as rules

    assert "requires the Choice annotation" in rules.refusal("QComboBox", str)
    assert rules.refusal("QComboBox", Annotated[str, rules.Choice(["a", "b"])]) is None
    assert rules.refusal("QLabel", str) is not None  # only from Slicer 5.8 on
    assert rules.refusal("QSlider", int) is not None and rules.refusal("QSpinBox", int) is None


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
    names = ("inputSelector", "outputSelector", "deviceComboBox", "labelsComboBox", "advancedCollapsibleButton",
             "crossSectionCollapsibleButton", "modelLabel", "crossSectionButton", "segmentButton", "statusLabel",
             "sliceViewComboBox")
    w.ui = SimpleNamespace(**{n: Stub() for n in names})
    w._job, w._busy, w._install, w._followed, w._followTimer, w._anywayFor = None, None, None, None, None, None
    w._parameterNode = SimpleNamespace(device="auto", labels="tissues", inputVolume=None, outputSegmentation=None,
                                       crossSectionSegmentation=None)
    return w


def test_a_segment_click_during_an_install_cancels_the_install_and_starts_nothing(widget):
    """The install runs in the panel (MetaSegLib.install): meanwhile the Segment button is Cancel, and a click stops
    the install instead of starting a second one or a segmentation."""
    cancelled = []
    widget._install = SimpleNamespace(running=True, cancel=lambda: cancelled.append(True))
    widget._busy = "install"
    widget.onSegmentButton()
    assert cancelled == [True] and widget._job is None
    assert widget.ui.statusLabel.text.startswith("Cancelling the installation")
    src = CODE[CODE.index("    def _ensureDependencies"):CODE.index("    def onInstallProgress")]
    assert "waitCursor" not in src and "WaitCursor" not in src, "install confirmations must not show under the wait cursor"


class Layout:
    """Stand-in for Slicer's layout manager: a layout with non-standard view names (all visible)."""

    def __init__(self, names):
        self.names = names

    def sliceViewNames(self):
        return list(self.names)

    def sliceWidget(self, name):
        return SimpleNamespace(mrmlSliceNode=lambda: f"node of {name}", isVisible=lambda: True) \
            if name in self.names else None


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
    assert views.slice_view_names(None) == []  # no main window: no views, no error


def test_every_layout_manager_call_is_guarded():
    """`Slicer --no-main-window` has no layout manager: the module reaches it only through layoutManager(),
    which returns None there, and every use checks for None (views.* take None)."""
    assert "slicer.app.layoutManager()" not in CODE and CODE.count("app.layoutManager()") == 1  # in layoutManager()
    for line in CODE.splitlines():
        if "layoutManager()" in line and "def layoutManager" not in line and "app.layoutManager()" not in line:
            assert ("manager = layoutManager()" in line or "views." in line or "is not None" in line
                    or line.strip().startswith(("#", '"""', "(`"))), line
