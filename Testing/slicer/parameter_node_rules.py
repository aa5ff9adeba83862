"""Stand-in for `slicer.parameterNodeWrapper` (Slicer's is not on PyPI), holding Slicer's binding rules.

The rules are restated from Slicer's own `Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`
(read at v5.6.2, v5.8.1 and v5.10.0; no code copied). A field binds to a widget only through a
connector whose `canRepresent(widget, type)` accepts the widget's *exact* class (`type(widget) ==`,
not isinstance) and the field's unannotated type. Listed here are the connectors that accept the
same (class, type) pairs in all three versions, i.e. the bindings that work in every Slicer the
module supports (5.8 added QLabel<->str and ctkCheckBox<->bool; 5.10 more: not used, not listed):

  QCheckBox                 <-> bool
  QPushButton (checkable)   <-> bool
  QSpinBox, QSlider         <-> int      (QSlider only with WithinRange or Minimum+Maximum)
  QDoubleSpinBox, ctkSliderWidget, qMRMLSliderWidget <-> float
  QComboBox                 <-> int/float/str/bool, ONLY with a Choice annotation; the connector
                                clears the combo box and adds str(choice) for each choice
  QComboBox                 <-> an enum.Enum subclass
  QLineEdit, QTextEdit      <-> str
  qMRMLNodeComboBox         <-> a vtkMRMLNode subclass (or a Union of them); sets nodeTypes
  ctkPathLineEdit, ctkDirectoryButton <-> pathlib paths

Anything else raises RuntimeError, as Slicer's createGuiConnector does, and Slicer's wrapper
builds every connector of a GUI before it uses any: one refused field leaves the whole panel
unbound. `connectGui` here does the same. Values are kept in the vtkMRMLScriptedModuleNode
(parameters as text, nodes as node references), as Slicer's wrapper does.

The development-time check runs Slicer's real wrapper instead (test_slicer_panel.py with
METASEG_SLICER_SOURCE): these rules are what CI holds the module to in the meantime.
"""
from __future__ import annotations

import enum
import pathlib
import typing
from typing import Annotated, Any, Dict, List, Optional, Tuple

import vtk

SlicerParameterNamePropertyName = "SlicerParameterName"
PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
              pathlib.PureWindowsPath)


# ----------------------------------------------------------------------------- validators
class Validator:
    def validate(self, value) -> None:
        pass


class Choice(Validator):
    def __init__(self, choices):
        self.choices = tuple(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of the choices {list(self.choices)}")


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value!r} is not within [{self.minimum}, {self.maximum}]")


class Minimum(Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value) -> None:
        if value < self.minimum:
            raise ValueError(f"{value!r} is below {self.minimum}")


class Maximum(Validator):
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value) -> None:
        if value > self.maximum:
            raise ValueError(f"{value!r} is above {self.maximum}")


def split_annotations(datatype) -> Tuple[Any, List[Any]]:
    if typing.get_origin(datatype) is Annotated:
        args = typing.get_args(datatype)
        return args[0], list(args[1:])
    return datatype, []


def unannotated(datatype):
    return split_annotations(datatype)[0]


def first(annotations, kind):
    return next((a for a in annotations if isinstance(a, kind)), None)


def node_types(datatype) -> Optional[List[str]]:
    """The MRML class names a node field takes, or None if it is not a node field."""
    import slicer

    base = unannotated(datatype)
    members = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
    names = []
    for m in members:
        if m is type(None):
            continue
        if not (isinstance(m, type) and issubclass(m, slicer.vtkMRMLNode)):
            return None
        names.append(m.__name__)
    return names or None


# ----------------------------------------------------------------------------- the rules
def widget_class_name(widget) -> str:
    """The exact class of a widget by Slicer's name for it (the harness's classes carry those names)."""
    return type(widget).__name__


def refusal(class_name: str, datatype) -> Optional[str]:
    """None if a widget of exactly `class_name` binds a field of `datatype` in Slicer 5.6-5.10;
    otherwise Slicer's reason (its error message)."""
    base, annotations = split_annotations(datatype)
    if class_name == "QCheckBox" and base is bool:
        return None
    if class_name == "QPushButton" and base is bool:
        return None
    if class_name in ("QSpinBox", "QSlider") and base is int:
        bounded = first(annotations, WithinRange) or (first(annotations, Minimum) and first(annotations, Maximum))
        if class_name == "QSlider" and not bounded:
            return "Cannot have a connection to QSlider where the int type is unbounded."
        return None
    if class_name in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget") and base is float:
        return None
    if class_name == "QComboBox" and base in (int, float, str, bool):
        if first(annotations, Choice) is None:
            return "ComboBoxToStringableConnector requires the Choice annotation to be used."
        return None
    if class_name == "QComboBox" and isinstance(base, type) and issubclass(base, enum.Enum):
        return None
    if class_name in ("QLineEdit", "QTextEdit") and base is str:
        return None
    if class_name == "qMRMLNodeComboBox" and node_types(datatype):
        return None
    if class_name in ("ctkPathLineEdit", "ctkDirectoryButton") and base in PATH_TYPES:
        return None
    return (f"Unable to create GUI connector from datatype '{datatype}' to widget type '{class_name}' "
            "(no connector of Slicer 5.6-5.10 represents it)")


# ----------------------------------------------------------------------------- connectors
class Connector:
    def __init__(self, widget, datatype):
        self.widget, self.datatype = widget, datatype
        self.base, self.annotations = split_annotations(datatype)
        self.callback = None

    def changed(self, *args):
        if self.callback is not None:
            self.callback()


class CheckBoxConnector(Connector):
    signal = "toggled"

    def read(self):
        return bool(self.widget.checked)

    def write(self, value):
        self.widget.checked = bool(value)


class IntConnector(Connector):
    signal = "valueChanged"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        r = first(self.annotations, WithinRange)
        lo = r.minimum if r else getattr(first(self.annotations, Minimum), "minimum", -(2 ** 31))
        hi = r.maximum if r else getattr(first(self.annotations, Maximum), "maximum", 2 ** 31 - 1)
        widget.setRange(lo, hi)

    def read(self):
        return self.base(self.widget.value)

    def write(self, value):
        self.widget.value = value


class ChoiceComboBoxConnector(Connector):
    signal = "currentIndexChanged"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        self.choices = first(self.annotations, Choice).choices
        widget.clear()
        for c in self.choices:
            widget.addItem(str(c))

    def read(self):
        return self.choices[self.widget.currentIndex]

    def write(self, value):
        if value not in self.choices:
            raise ValueError(f"Unable to find value {value} in choices {self.choices}")
        self.widget.currentIndex = self.choices.index(value)


class TextConnector(Connector):
    signal = "textChanged"

    def read(self):
        return self.widget.text if hasattr(self.widget, "text") else self.widget.plainText

    def write(self, value):
        self.widget.text = value


class NodeComboBoxConnector(Connector):
    signal = "currentNodeChanged"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        widget.nodeTypes = node_types(datatype)

    def read(self):
        return self.widget.currentNode()

    def write(self, value):
        self.widget.setCurrentNode(value)


def createGuiConnector(widget, datatype) -> Connector:
    name = widget_class_name(widget)
    why = refusal(name, datatype)
    if why is not None:
        raise RuntimeError(why)
    base = unannotated(datatype)
    if name == "qMRMLNodeComboBox":
        return NodeComboBoxConnector(widget, datatype)
    if name == "QComboBox" and first(split_annotations(datatype)[1], Choice) is not None:
        return ChoiceComboBoxConnector(widget, datatype)
    if base is bool:
        return CheckBoxConnector(widget, datatype)
    if base in (int, float):
        return IntConnector(widget, datatype)
    if base is str:
        return TextConnector(widget, datatype)
    raise RuntimeError(f"the stand-in has no connector for {name} <-> {datatype} (Slicer has one)")


# ----------------------------------------------------------------------------- the wrapper
def parameterNodeWrapper(cls):
    """The class decorator: fields (annotations + defaults) kept in a vtkMRMLScriptedModuleNode."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapped:
        allParameters = hints

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guis", {})
            object.__setattr__(self, "_nextTag", 1)
            object.__setattr__(self, "_updating", False)
            for name, default in defaults.items():
                if node_types(hints[name]) is None and not parameterNode.GetParameter(name) and default is not None:
                    self._write(name, default)

        @staticmethod
        def dataType(name):
            return hints[name]

        def _read(self, name):
            node = self.parameterNode
            if node_types(hints[name]) is not None:
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            base = unannotated(hints[name])
            if text == "":
                return defaults[name]
            if base is bool:
                return text == "true"
            return base(text)

        def _write(self, name, value):
            base, annotations = split_annotations(hints[name])
            if node_types(hints[name]) is not None:
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                self.parameterNode.Modified()
                return
            for a in annotations:
                if isinstance(a, Validator):
                    a.validate(value)
            text = ("true" if value else "false") if base is bool else str(value)
            self.parameterNode.SetParameter(name, text)

        def __getattr__(self, name):
            if name in hints:
                return self._read(name)
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name in hints:
                self._write(name, value)
            else:
                object.__setattr__(self, name, value)

        # observers are the parameter node's (VTKObservationMixin.addObserver calls these)
        def AddObserver(self, *args):
            return self.parameterNode.AddObserver(*args)

        def RemoveObserver(self, *args):
            return self.parameterNode.RemoveObserver(*args)

        def connectGui(self, gui):
            if hasattr(gui, "isWidgetType") and gui.isWidgetType():
                widgets = list(gui.findChildren(object))
            else:
                widgets = list(vars(gui).values())
            mapping = {}
            for w in widgets:
                name = w.property(SlicerParameterNamePropertyName) if hasattr(w, "property") else None
                if name:
                    if name not in hints:
                        raise ValueError(f"{name} is not a parameter of {cls.__name__}")
                    mapping[name] = w
            connectors = {name: createGuiConnector(w, hints[name]) for name, w in mapping.items()}  # all first
            tag = self._nextTag
            object.__setattr__(self, "_nextTag", tag + 1)
            for name, c in connectors.items():
                self._writeGui(c, self._read(name))
                c.callback = (lambda n=name, cc=c: None if self._updating else self._write(n, cc.read()))
                getattr(c.widget, c.signal).connect(c.changed)
            observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: self._updateGuis())
            self._guis[tag] = (connectors, observer)
            return tag

        def _writeGui(self, connector, value):
            object.__setattr__(self, "_updating", True)
            try:
                connector.write(value)
            finally:
                object.__setattr__(self, "_updating", False)

        def _updateGuis(self):
            for connectors, _ in list(self._guis.values()):
                for name, c in connectors.items():
                    self._writeGui(c, self._read(name))

        def disconnectGui(self, tag):
            entry = self._guis.pop(tag, None)
            if entry is None:
                return
            connectors, observer = entry
            self.parameterNode.RemoveObserver(observer)
            for c in connectors.values():
                c.callback = None
                try:
                    getattr(c.widget, c.signal).disconnect(c.changed)
                except (RuntimeError, TypeError):
                    pass

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    Wrapped.__doc__ = cls.__doc__
    return Wrapped


def fields_and_bindings(parameter_class, ui_path) -> Tuple[Dict[str, Any], Dict[str, Tuple[str, str]]]:
    """(field -> annotation of the parameter node class, field -> (widget name, widget class) of the .ui)."""
    import xml.etree.ElementTree as ET

    fields = dict(parameter_class.allParameters)
    bound = {}
    for w in ET.parse(ui_path).getroot().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == SlicerParameterNamePropertyName:
                bound[prop.find("string").text] = (w.get("name"), w.get("class"))
    return fields, bound


def binding_problems(parameter_class, ui_path) -> List[str]:
    """Every field must be bound to exactly one widget, each under the rules above."""
    fields, bound = fields_and_bindings(parameter_class, ui_path)
    problems = [f"{name} is bound in the .ui but is no field of the parameter node" for name in bound if name not in fields]
    for name, datatype in fields.items():
        if name not in bound:
            problems.append(f"{name} ({datatype}) is bound to no widget")
            continue
        widget, cls = bound[name]
        why = refusal(cls, datatype)
        if why:
            problems.append(f"{name} ({datatype}) on {widget} ({cls}): {why}")
    return problems
