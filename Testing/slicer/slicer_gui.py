"""A harness that runs the MetaSeg module's panel outside Slicer: real Qt widgets, real MRML.

What is real:
- the Qt widgets: PySide6 (PyPI), offscreen (QT_QPA_PLATFORM=offscreen), built from the module's
  own `MetaSeg.ui` by Qt's QUiLoader;
- the MRML layer and `slicer.util` (loadUI, childWidgetVariables, VTKObservationMixin,
  tryWithErrorDisplay, ...): Slicer's own, from the PyPI package `slicer-core`;
- the segmentation: the core in a child process, as in Slicer.

What is a stand-in (no PyPI package has them), each class named `...StandIn` or documented so:
- `qt`: PythonQt's view of Qt (a Q_PROPERTY is an attribute, `obj.connect("signal(args)", slot)`)
  over PySide6's classes: `pythonqt_class` adds exactly that to each PySide6 class, nothing else;
- the CTK and qMRML widget classes used by the .ui: `ctkCollapsibleButton`, `qMRMLWidget`,
  `qMRMLNodeComboBox` (StandIn classes below, registered under Slicer's class names), and CTK's
  `ctkMessageBox` (a QMessageBox whose exec_() does not wait for a person: it records the box and
  presses the button the test asked for, see `Panel.answers` and `Panel.message_boxes`);
- the Slicer application object `slicer.app`: not in testing mode unless the test asks
  (`Panel(testing=True)`, as `Slicer --testing`), in which slicer.util's dialogs are skipped; without
  a main window by default (as `Slicer --no-main-window`: no layout manager, and slicer.util shows no
  error dialog), or with a plain QMainWindow named qSlicerMainWindow (`Panel(main_window=True)`:
  slicer.util.mainWindow() finds it by that name, as in Slicer);
- the `PythonSlicer` launcher: a separate Python process that behaves as CTK's AppLauncher does
  (read in commontk/AppLauncher, Base/ctkAppLauncher.cpp: the real interpreter runs as its child
  through QProcess, in the launcher's process group, with the channels forwarded; no signal is
  forwarded; its exit code is the child's, or EXIT_FAILURE with "exit abnormally" when the child
  crashed); it starts this interpreter;
- the scripted-module base classes of `slicer.ScriptedLoadableModule`;
- `slicer.parameterNodeWrapper`: Slicer's wrapper is not on PyPI. In CI the stand-in in
  `parameter_node_rules.py` binds fields with the connector rules restated from Slicer's
  guiConnectors.py. With METASEG_SLICER_SOURCE set (a Slicer git mirror or checkout), Slicer's
  real wrapper code from that source is used instead (`slicer_wrapper_package`).

`Panel(...)` installs all this in `sys.modules` for the duration of a `with` block and imports a
fresh `MetaSeg` module under it; everything is put back afterwards, so the Qt-less tests that
share the pytest session see the module as before.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Optional

from mrml_helpers import MODULE_DIR

UI_FILE = MODULE_DIR / "Resources" / "UI" / "MetaSeg.ui"
SLICER_TAGS = ("v5.6.2", "v5.8.1", "v5.10.0")


PROBE = "from PySide6 import QtUiTools, QtWidgets; app = QtWidgets.QApplication(['probe']); QtWidgets.QLabel('x').grab()"


def qt_unavailable_reason() -> Optional[str]:
    """None when PySide6 loads and renders offscreen here; else why not (the GUI tests skip with it).

    Probed in a child process: a Qt platform plugin that cannot load its system libraries (libEGL,
    libxkbcommon, fontconfig...) aborts the process, which must not be pytest's."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Qt could not be probed: {e}"
    if out.returncode != 0:
        tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        return (f"PySide6 cannot run offscreen here ({tail}); pip install -r Testing/slicer/requirements.txt, and on "
                "Debian/Ubuntu the system libraries libegl1 libgl1 libxkbcommon0 libfontconfig1 libglib2.0-0 libdbus-1-3")
    return None


_APP = None


def application():
    """The process's one QApplication (offscreen)."""
    global _APP
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtWidgets

    _APP = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["MetaSegPanelTest"])
    return _APP


# ----------------------------------------------------------------------------- PythonQt's view of Qt
_PYTHONQT_CLASSES: Dict[type, type] = {}


def _pythonqt_form(args, kwargs) -> bool:
    # PythonQt: obj.connect("clicked(bool)", callable). PySide's own signals call `connect` on the sender
    # too, with the sender first or a "2signal(...)" code: those go to Qt unchanged.
    return (not kwargs and len(args) >= 1 and isinstance(args[0], str) and args[0][:1].isalpha())


def _pythonqt_connect(self, *args, **kwargs):
    """PythonQt's obj.connect("signal(args)", callable); any other form is PySide's own."""
    from PySide6 import QtCore

    if _pythonqt_form(args, kwargs):
        return QtCore.QObject.connect(self, QtCore.SIGNAL(args[0]), *args[1:])
    if args and isinstance(args[0], QtCore.QObject):
        return QtCore.QObject.connect(*args, **kwargs)
    return QtCore.QObject.connect(self, *args, **kwargs)


def _pythonqt_disconnect(self, *args, **kwargs):
    from PySide6 import QtCore

    if _pythonqt_form(args, kwargs):
        return QtCore.QObject.disconnect(self, QtCore.SIGNAL(args[0]), *args[1:])
    if args and isinstance(args[0], QtCore.QObject):
        return QtCore.QObject.disconnect(*args, **kwargs)
    return QtCore.QObject.disconnect(self, *args, **kwargs)


def _qproperty(meta_property):
    """An attribute read and written through Qt's meta-property (Qt's own getter and setter)."""
    name = meta_property.name()

    def get(self):
        return meta_property.read(self)

    def set_(self, value):
        if not meta_property.write(self, value):
            raise AttributeError(f"{type(self).__name__}.{name} could not be set to {value!r}")

    return property(get, set_ if meta_property.isWritable() else None)


# Q_PROPERTYs whose getter is a C++ virtual function: PySide treats an attribute of that name as a Python
# override and calls it from C++, so these stay methods here (MetaSeg uses none of them as attributes).
VIRTUAL_GETTERS = {"*": ("sizeHint", "minimumSizeHint"), "QProgressBar": ("text",)}


def pythonqt_class(base: type) -> type:
    """`base` (a PySide6 QObject class) as PythonQt shows it: Q_PROPERTYs as attributes, `name` as
    the object name, `connect`/`disconnect` taking signal signatures."""
    if base in _PYTHONQT_CLASSES:
        return _PYTHONQT_CLASSES[base]
    ns = {"__module__": "qt", "connect": _pythonqt_connect, "disconnect": _pythonqt_disconnect}
    from PySide6 import QtCore

    meta = base.staticMetaObject
    for i in range(meta.propertyCount()):
        prop = meta.property(i)
        if isinstance(getattr(base, prop.name(), None), QtCore.Property):
            continue  # declared in Python (a stand-in): already an attribute, and Qt finds it by that name
        if prop.name() in VIRTUAL_GETTERS.get("*", ()) or any(
                prop.name() in VIRTUAL_GETTERS.get(k.__name__, ()) for k in base.__mro__):
            continue  # PySide would take the attribute for a Python override of the C++ virtual: left a method
        ns.setdefault(prop.name(), _qproperty(prop))
    ns["name"] = _qproperty(QtCore.QObject.staticMetaObject.property(
        QtCore.QObject.staticMetaObject.indexOfProperty("objectName")))
    cls = type(base.__name__, (base,), ns)
    _PYTHONQT_CLASSES[base] = cls
    return cls


def make_qt_module() -> types.ModuleType:
    """The `qt` module of PythonQt, over PySide6 (QtCore, QtGui, QtWidgets, QtUiTools)."""
    from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

    qt = types.ModuleType("qt")
    qt.__doc__ = "PythonQt's `qt` module over PySide6 (test stand-in)"
    sources = (QtCore, QtGui, QtWidgets, QtUiTools)

    def lookup(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "QUiLoader":
            return UiLoader
        for module in sources:
            obj = getattr(module, name, None)
            if obj is None:
                continue
            if isinstance(obj, type) and issubclass(obj, QtCore.QObject):
                obj = pythonqt_class(obj)
            setattr(qt, name, obj)
            return obj
        raise AttributeError(f"qt has no {name}")

    qt.__getattr__ = lookup
    return qt


# ----------------------------------------------------------------------------- CTK / qMRML stand-ins
def make_widget_standins(qt):
    """The CTK and qMRML widget classes MetaSeg.ui uses, as PythonQt-style stand-ins."""
    from PySide6 import QtCore, QtWidgets

    class ctkCollapsibleButtonStandIn(QtWidgets.QGroupBox):
        """Stand-in for ctkCollapsibleButton: a titled box whose contents hide when collapsed."""

        def __init__(self, parent=None):
            super().__init__(parent)
            self._collapsed = False

        # PythonQt shows Q_PROPERTYs as attributes (title, visible, ...): Qt's methods are called explicitly
        def _get_text(self):
            return QtWidgets.QGroupBox.title(self)

        def _set_text(self, text):
            QtWidgets.QGroupBox.setTitle(self, text)

        def _get_collapsed(self):
            return self._collapsed

        def _set_collapsed(self, value):
            self._collapsed = bool(value)
            for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
                QtWidgets.QWidget.setVisible(child, not self._collapsed)

        text = QtCore.Property(str, _get_text, _set_text)
        collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)

    class qMRMLWidgetStandIn(QtWidgets.QWidget):
        """Stand-in for qMRMLWidget: holds the scene and emits mrmlSceneChanged (connected by the .ui)."""

        mrmlSceneChanged = QtCore.Signal(object)

        def __init__(self, parent=None):
            super().__init__(parent)
            self._scene = None

        def setMRMLScene(self, scene):
            self._scene = scene
            self.mrmlSceneChanged.emit(scene)

        def mrmlScene(self):
            return self._scene

    class qMRMLNodeComboBoxStandIn(QtWidgets.QComboBox):
        """Stand-in for qMRMLNodeComboBox: lists the scene's nodes of `nodeTypes` (exact classes unless
        showChildNodeTypes, minus hideChildNodeTypes, minus hidden nodes, filtered by addAttribute), with a
        "None" item when noneEnabled; currentNode()/setCurrentNode(); currentNodeChanged(node)."""

        currentNodeChanged = QtCore.Signal(object)
        mrmlSceneChanged = QtCore.Signal(object)

        def __init__(self, parent=None):
            super().__init__(parent)
            self._nodeTypes, self._hide, self._none, self._children = [], [], False, True
            self._attributes, self._noneDisplay = [], "None"
            self._scene, self._ids, self._tags = None, [], []
            self.currentIndexChanged.connect(self._onIndex)

        def _prop(name, kind, attr):  # noqa: N805
            return QtCore.Property(kind, lambda self: getattr(self, attr),
                                   lambda self, v: (setattr(self, attr, v), self._refresh()))

        nodeTypes = _prop("nodeTypes", "QStringList", "_nodeTypes")
        hideChildNodeTypes = _prop("hideChildNodeTypes", "QStringList", "_hide")
        noneEnabled = _prop("noneEnabled", bool, "_none")
        showChildNodeTypes = _prop("showChildNodeTypes", bool, "_children")
        noneDisplay = _prop("noneDisplay", str, "_noneDisplay")

        def addAttribute(self, nodeType, name, value=None):
            self._attributes.append((nodeType, name, value))
            self._refresh()

        def setMRMLScene(self, scene):
            if self._scene is not None:
                for tag in self._tags:
                    self._scene.RemoveObserver(tag)
            self._scene, self._tags = scene, []
            if scene is not None:
                for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent):
                    self._tags.append(scene.AddObserver(event, lambda *a: self._refresh()))
            self._refresh()
            self.mrmlSceneChanged.emit(scene)

        def mrmlScene(self):
            return self._scene

        def _accepts(self, node):
            if node.GetHideFromEditors() or any(node.IsA(t) for t in self._hide):
                return False
            kinds = [t for t in self._nodeTypes if (node.IsA(t) if self._children else node.GetClassName() == t)]
            if not kinds:
                return False
            for nodeType, name, value in self._attributes:
                if node.IsA(nodeType) and (node.GetAttribute(name) is None or
                                           (value is not None and node.GetAttribute(name) != str(value))):
                    return False
            return True

        def _refresh(self):
            current = self.currentNode()
            nodes = []
            if self._scene is not None:
                for i in range(self._scene.GetNumberOfNodes()):
                    node = self._scene.GetNthNode(i)
                    if self._accepts(node):
                        nodes.append(node)
            blocked = self.blockSignals(True)
            self.clear()
            self._ids = ([None] if self._none else []) + [n.GetID() for n in nodes]
            for node_id in self._ids:
                self.addItem(self._noneDisplay if node_id is None else self._scene.GetNodeByID(node_id).GetName())
            index = self._ids.index(current.GetID()) if current is not None and current.GetID() in self._ids else \
                (0 if self._ids else -1)
            self.setCurrentIndex(index)
            self.blockSignals(blocked)
            if self.currentNode() is not current:
                self.currentNodeChanged.emit(self.currentNode())

        def currentNode(self):
            i = QtWidgets.QComboBox.currentIndex(self)
            if self._scene is None or i < 0 or i >= len(self._ids) or self._ids[i] is None:
                return None
            return self._scene.GetNodeByID(self._ids[i])

        def currentNodeID(self):
            node = self.currentNode()
            return node.GetID() if node is not None else ""

        def setCurrentNode(self, node):
            node_id = node.GetID() if node is not None else None
            if node_id not in self._ids:
                self._refresh()
            if node_id in self._ids:
                self.setCurrentIndex(self._ids.index(node_id))

        def _onIndex(self, index):
            self.currentNodeChanged.emit(self.currentNode())

    classes = {
        "ctkCollapsibleButton": pythonqt_class(ctkCollapsibleButtonStandIn),
        "qMRMLWidget": pythonqt_class(qMRMLWidgetStandIn),
        "qMRMLNodeComboBox": pythonqt_class(qMRMLNodeComboBoxStandIn),
    }
    for name, cls in classes.items():
        cls.__name__ = name  # Slicer's class name, as PythonQt reports it (the stand-in is its base)
    return classes


MESSAGE_BOXES: list = []  # every ctkMessageBox "shown": {"title", "text", "details", "buttons", "pressed"}
ANSWERS: list = []  # texts of the buttons to press, in order; none left: the default (or escape) button


def make_message_box_class():
    """Stand-in for ctkMessageBox: a QMessageBox whose exec_() waits for no one. It records what a person would
    see and presses the button named next in ANSWERS (by its text), else the default (or escape) button."""
    from PySide6 import QtWidgets

    class ctkMessageBoxStandIn(QtWidgets.QMessageBox):
        def exec_(self):
            buttons = self.buttons()
            wanted = ANSWERS.pop(0) if ANSWERS else None
            chosen = next((b for b in buttons if wanted is not None and b.text().replace("&", "") == wanted), None)
            if wanted is not None and chosen is None:
                raise AssertionError(f"the message box has no button {wanted!r}: {[b.text() for b in buttons]}")
            chosen = chosen or self.defaultButton() or self.escapeButton()
            if chosen is None:
                raise AssertionError(f"a message box without a default button was shown and the test named no "
                                     f"button to press: {QtWidgets.QMessageBox.text(self)!r} "
                                     f"{[b.text() for b in buttons]}")
            box = QtWidgets.QMessageBox  # Qt's getters: PythonQt shows the properties as attributes on the class
            MESSAGE_BOXES.append({"title": QtWidgets.QWidget.windowTitle(self), "text": box.text(self),
                                  "details": box.detailedText(self), "buttons": [b.text().replace("&", "") for b in buttons],
                                  "pressed": chosen.text().replace("&", "") if chosen is not None else None})
            if chosen is not None:
                chosen.click()  # QMessageBox records it as the clicked button
            return int(self.standardButton(chosen).value) if chosen is not None else 0

        exec = exec_

    cls = pythonqt_class(ctkMessageBoxStandIn)
    cls.__name__ = "ctkMessageBox"
    return cls


def make_ctk_module(standins) -> types.ModuleType:
    ctk = types.ModuleType("ctk")
    ctk.__doc__ = ("CTK stand-in: ctkCollapsibleButton and ctkMessageBox are stand-ins; other names are inert "
                   "placeholder classes")
    ctk.ctkCollapsibleButton = standins["ctkCollapsibleButton"]
    ctk.ctkMessageBox = make_message_box_class()

    def lookup(name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {"__doc__": "placeholder: no widget of this class is in MetaSeg.ui"})
        setattr(ctk, name, cls)
        return cls

    ctk.__getattr__ = lookup
    return ctk


# ----------------------------------------------------------------------------- loading the .ui
_STANDINS: Dict[str, type] = {}


def _make_loader_class():
    from PySide6 import QtUiTools

    class UiLoaderImpl(QtUiTools.QUiLoader):
        """QUiLoader making the PythonQt-style classes (and the stand-ins for Slicer's), then making
        the .ui's `mrmlSceneChanged(vtkMRMLScene*)` -> `setMRMLScene(vtkMRMLScene*)` connections,
        which Qt cannot (vtkMRMLScene* is not a Qt type outside Slicer)."""

        def createWidget(self, className, parent=None, name=""):
            if className in _STANDINS:
                widget = _STANDINS[className](parent)
            else:
                from PySide6 import QtWidgets

                base = getattr(QtWidgets, className, None)
                if base is None:
                    raise RuntimeError(f"MetaSeg.ui uses the class {className}, which the harness does not know")
                widget = pythonqt_class(base)(parent)
            widget.setObjectName(name)
            return widget

        def load(self, device, parent=None):
            from PySide6 import QtCore

            path = QtCore.QFile.fileName(device)
            widget = super().load(device, parent)
            if widget is not None and path:
                _connect_scene_signals(widget, Path(path))
            return widget

    return UiLoaderImpl


def _connect_scene_signals(root, path: Path) -> None:
    from PySide6 import QtCore

    for c in ET.parse(path).getroot().iter("connection"):
        sender, signal = c.findtext("sender"), c.findtext("signal")
        receiver, slot = c.findtext("receiver"), c.findtext("slot")
        if not signal.startswith("mrmlSceneChanged") or not slot.startswith("setMRMLScene"):
            continue
        s = root if QtCore.QObject.objectName(root) == sender else root.findChild(QtCore.QObject, sender)
        r = root if QtCore.QObject.objectName(root) == receiver else root.findChild(QtCore.QObject, receiver)
        if s is None or r is None:
            raise RuntimeError(f"MetaSeg.ui connects {sender} to {receiver}, one of which does not exist")
        s.mrmlSceneChanged.connect(r.setMRMLScene)


UiLoader = None


LAUNCHER = '''"""PythonSlicer stand-in: what CTK's AppLauncher does (commontk/AppLauncher, Base/ctkAppLauncher.cpp).

The launcher is a process of its own that starts the real interpreter as its child (QProcess::start: same
process group, channels forwarded), forwards no signal (a SIGTERM ends the launcher and leaves the child
running), and exits with the child's exit code, or with EXIT_FAILURE and "exit abnormally" when the child
crashed (QProcess::CrashExit).
"""
import subprocess
import sys

child = subprocess.Popen([INTERPRETER] + sys.argv[1:])
code = child.wait()
if code < 0:
    sys.stderr.write(f"error: [{INTERPRETER}] exit abnormally - Report the problem.\\n")
    sys.exit(1)
sys.exit(code)
'''


def write_launcher(bin_dir: Path) -> Path:
    """Write the PythonSlicer stand-in (see LAUNCHER) into `bin_dir`; it runs this interpreter."""
    script = Path(bin_dir) / "python_slicer_launcher.py"
    script.write_text(LAUNCHER.replace("INTERPRETER", repr(sys.executable)), encoding="utf-8")
    launcher = Path(bin_dir) / "PythonSlicer"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")  # sh execs: the launcher is one process
    launcher.chmod(0o755)
    return launcher


# ----------------------------------------------------------------------------- application and module bases
class SlicerApplicationStandIn:
    """Stand-in for slicer.app (qSlicerApplication). Testing mode only when asked (`Slicer --testing` sets it;
    a user's Slicer does not); a main window only when given (a plain QMainWindow named qSlicerMainWindow)."""

    applicationName = "Slicer"

    def __init__(self, temporary_path: str, layout_manager=None, testing: bool = False, main_window=None):
        self.temporaryPath = temporary_path
        self._layout = layout_manager
        self._testing = testing
        self._main_window = main_window
        self.connections = []

    def layoutManager(self):
        return self._layout

    def testingEnabled(self):
        return self._testing

    def processEvents(self, *args):
        application().processEvents()

    def setOverrideCursor(self, cursor):
        application().setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        application().restoreOverrideCursor()

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def topLevelWidgets(self):
        return [self._main_window] if self._main_window is not None else []


def make_scripted_module_module(qt) -> types.ModuleType:
    """Stand-ins for slicer.ScriptedLoadableModule's base classes: what MetaSeg uses of them."""
    import slicer

    m = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Widget")]
            if parent is None:
                parent = qt.QWidget()
                parent.setLayout(qt.QVBoxLayout())
            self.parent = parent
            self.layout = parent.layout()
            self.parent.isEntered = True

        def resourcePath(self, filename):
            return str(MODULE_DIR / "Resources" / filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

        def onReload(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest:
        pass

    m.ScriptedLoadableModule = ScriptedLoadableModule
    m.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    m.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    m.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return m


# ----------------------------------------------------------------------------- Slicer's real wrapper (dev check)
def slicer_source() -> Optional[str]:
    """METASEG_SLICER_SOURCE: a Slicer git directory (e.g. a bare mirror) or a source checkout."""
    value = os.environ.get("METASEG_SLICER_SOURCE")
    return value if value and os.path.exists(value) else None


def slicer_wrapper_package(source: str, tag: str, folder: Path) -> Path:
    """Slicer's Base/Python/slicer/parameterNodeWrapper at `tag` (a git dir) or as checked out, copied
    into `folder`; returns the package folder."""
    rel = "Base/Python/slicer/parameterNodeWrapper"
    target = Path(folder) / f"parameterNodeWrapper-{tag}"
    target.mkdir(parents=True, exist_ok=True)
    checkout = Path(source) / rel
    if checkout.is_dir() and not tag:
        for f in checkout.glob("*.py"):
            (target / f.name).write_bytes(f.read_bytes())
        return target
    git = ["git", "--git-dir", source] if not (Path(source) / ".git").exists() else ["git", "-C", source]
    names = subprocess.run(git + ["ls-tree", "--name-only", f"{tag}:{rel}"], check=True, capture_output=True,
                           text=True).stdout.split()
    for n in names:
        data = subprocess.run(git + ["show", f"{tag}:{rel}/{n}"], check=True, capture_output=True).stdout
        (target / n).write_bytes(data)
    return target


def _load_package(name: str, folder: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the panel
class Panel:
    """`with Panel(tmp_path) as panel:` -> panel.MetaSeg (the module, imported with Qt), panel.widget
    (a MetaSegWidget after setup()), panel.ui, panel.scene (slicer.mrmlScene).

    :param wrapper: "standin" (CI: the rules restated in parameter_node_rules.py) or a Slicer tag
      (v5.8.1...) to run Slicer's real parameterNodeWrapper from METASEG_SLICER_SOURCE.
    :param setup: run MetaSegWidget.setup() on entering.
    """

    SAVED_MODULES = ("qt", "ctk", "MetaSeg", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper",
                     "slicer.i18n")
    SLICER_ATTRIBUTES = ("app", "qMRMLNodeComboBox", "qMRMLWidget", "qSlicerWidget", "qMRMLSubjectHierarchyComboBox",
                         "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLCheckableNodeComboBox",
                         "ScriptedLoadableModule", "parameterNodeWrapper", "mrmlScene")

    def __init__(self, tmp_path: Path, scene=None, wrapper: str = "standin", setup: bool = True, layout_manager=None,
                 testing: bool = False, main_window: bool = False):
        self.tmp_path = Path(tmp_path)
        self.scene = scene
        self.wrapper = wrapper
        self.do_setup = setup
        self.layout_manager = layout_manager
        self.testing = testing
        self.want_main_window = main_window
        self.widget = None
        self.message_boxes = MESSAGE_BOXES  # what the dialogs showed (see make_message_box_class)
        self.answers = ANSWERS  # which buttons to press

    def __enter__(self) -> "Panel":
        import slicer

        application()
        self._saved = {name: sys.modules.get(name) for name in self.SAVED_MODULES}
        self._saved_attrs = {name: getattr(slicer, name, _MISSING) for name in self.SLICER_ATTRIBUTES}
        self._saved_path = os.environ.get("PATH", "")
        self._saved_syspath = list(sys.path)
        try:
            self._install(slicer)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self, slicer) -> None:
        global UiLoader
        qt = make_qt_module()
        standins = make_widget_standins(qt)
        _STANDINS.clear()
        _STANDINS.update(standins)
        UiLoader = pythonqt_class(_make_loader_class())
        qt.QUiLoader = UiLoader
        ctk = make_ctk_module(standins)
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
        slicer.qMRMLNodeComboBox = standins["qMRMLNodeComboBox"]
        slicer.qMRMLWidget = standins["qMRMLWidget"]
        for name in ("qSlicerWidget", "qMRMLSubjectHierarchyComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget",
                     "qMRMLSpinBox", "qMRMLCheckableNodeComboBox"):
            setattr(slicer, name, type(name, (), {"__doc__": "placeholder: not in MetaSeg.ui"}))
        slm = make_scripted_module_module(qt)
        sys.modules["slicer.ScriptedLoadableModule"] = slm
        slicer.ScriptedLoadableModule = slm
        if self.wrapper == "standin":
            import parameter_node_rules as pnw
        else:
            folder = slicer_wrapper_package(slicer_source(), self.wrapper, self.tmp_path / "slicer-src")
            pnw = _load_package("slicer.parameterNodeWrapper", folder)
        sys.modules["slicer.parameterNodeWrapper"] = pnw
        slicer.parameterNodeWrapper = pnw
        sys.modules.pop("slicer.i18n", None)  # not in slicer-core: MetaSeg falls back to plain strings
        # the PythonSlicer launcher (stand-in): a launcher process running this interpreter as its child
        bin_dir = self.tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        self.launcher = write_launcher(bin_dir)
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{self._saved_path}"
        (self.tmp_path / "slicer-temp").mkdir(exist_ok=True)
        MESSAGE_BOXES.clear()
        ANSWERS.clear()
        if self.want_main_window:
            from PySide6 import QtWidgets

            self.main_window = pythonqt_class(QtWidgets.QMainWindow)()
            self.main_window.setObjectName("qSlicerMainWindow")
        else:
            self.main_window = None
        slicer.app = SlicerApplicationStandIn(str(self.tmp_path / "slicer-temp"), self.layout_manager,
                                              testing=self.testing, main_window=self.main_window)
        if self.scene is not None:
            slicer.mrmlScene = self.scene
        sys.modules.pop("MetaSeg", None)
        if str(MODULE_DIR) not in sys.path:
            sys.path.insert(0, str(MODULE_DIR))
        self.MetaSeg = importlib.import_module("MetaSeg")
        self.qt = qt
        if self.do_setup:
            self.setup()

    def setup(self):
        parent = self.qt.QWidget()
        parent.setLayout(self.qt.QVBoxLayout())
        parent.resize(420, 900)
        self.parent = parent
        self.widget = self.MetaSeg.MetaSegWidget(parent)
        self.widget.setup()
        self.ui = self.widget.ui
        return self.widget

    def pump(self, until, timeout: float = 300.0, what: str = "the condition") -> None:
        """Run the Qt event loop (the job's QTimer polls the process) until `until()` holds."""
        import time

        app = application()
        deadline = time.monotonic() + timeout
        while not until():
            app.processEvents()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not happen within {timeout} s")
            time.sleep(0.02)

    def __exit__(self, *exc):
        import slicer

        try:
            if self.widget is not None:
                try:
                    self.widget.cleanup()
                except Exception:  # noqa: BLE001
                    pass
        finally:
            for name, module in self._saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
            for name, value in self._saved_attrs.items():
                if value is _MISSING:
                    if hasattr(slicer, name):
                        delattr(slicer, name)
                else:
                    setattr(slicer, name, value)
            os.environ["PATH"] = self._saved_path
            sys.path[:] = self._saved_syspath
        return False


_MISSING = object()


def render_png(widget, path: Path) -> Path:
    """The widget rendered offscreen to a PNG."""
    application().processEvents()
    pixmap = widget.grab()
    if not pixmap.save(str(path), "PNG"):
        raise RuntimeError(f"could not write {path}")
    return Path(path)


__all__ = ["Panel", "qt_unavailable_reason", "render_png", "slicer_source", "SLICER_TAGS", "UI_FILE"]
