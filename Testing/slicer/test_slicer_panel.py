"""The module's panel, run (issue 19): MetaSegWidget.setup() and a Segment click, outside Slicer.

Real: Qt widgets (PySide6, offscreen) built from MetaSeg.ui, Slicer's MRML and slicer.util
(slicer-core), the core in a child process. Stand-ins (see slicer_gui.py): PythonQt's attribute
view of Qt, the CTK/qMRML widget classes (ctkCollapsibleButtonStandIn, qMRMLWidgetStandIn,
qMRMLNodeComboBoxStandIn), slicer.app without a main window (SlicerApplicationStandIn), the
PythonSlicer launcher, the scripted-module base classes, and in CI the parameter-node wrapper
(parameter_node_rules.py: Slicer's binding rules). With METASEG_SLICER_SOURCE pointing at a
Slicer git mirror or checkout, the panel is also built with Slicer's real wrapper code of
5.6.2, 5.8.1 and 5.10.0 (skipped otherwise).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrml_helpers import MODULE_DIR, SAMPLE_T1
from slicer_gui import SLICER_TAGS, UI_FILE, Panel, qt_unavailable_reason, render_png, slicer_source

pytestmark = pytest.mark.usefixtures("slicer_core")
REASON = qt_unavailable_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

import parameter_node_rules as rules  # noqa: E402

SCREENSHOT = MODULE_DIR.parent / "Screenshots" / "MetaSeg-panel.png"  # not packaged: the Extensions Index links it


def combo_items(combo):
    return [combo.itemText(i) for i in range(combo.count)]


def add_volume(scene, path, name):
    """A volume read first and then added to the scene, as Slicer's loaders do (the selector then picks a
    node that already has its voxels)."""
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def test_every_parameter_node_field_binds_under_slicers_rules(scene, tmp_path):
    with Panel(tmp_path, scene, setup=False) as panel:
        node_class = panel.MetaSeg.MetaSegParameterNode
        assert rules.binding_problems(node_class, UI_FILE) == []
        fields, bound = rules.fields_and_bindings(node_class, UI_FILE)
        assert {"inputVolume", "device", "labels", "brainExtraction", "quality", "crossSectionSegmentation"} <= set(fields)
        assert set(fields) == set(bound)  # every field has its widget, every bound widget its field
        M = panel.MetaSeg
        for name, values in (("device", M.DEVICES), ("labels", M.LABEL_SETS), ("brainExtraction", M.BRAIN_EXTRACTION),
                             ("quality", M.QUALITIES), ("crossSectionWhat", M.CROSS_SECTION_WHAT)):
            choice = rules.first(rules.split_annotations(fields[name])[1], rules.Choice)
            assert tuple(choice.choices) == tuple(values), name  # the panel offers what the logic accepts


def test_a_plain_str_on_a_combo_box_is_refused(scene, tmp_path):
    """The defect of issue 19: `brainExtraction: str` on a QComboBox. The rules refuse it, and setup()
    fails as it does in Slicer (every connector is built before any is used)."""
    with Panel(tmp_path, scene, setup=False) as panel:
        MetaSeg = panel.MetaSeg
        good = MetaSeg.MetaSegParameterNode
        annotations = dict(good.allParameters, brainExtraction=str)
        broken = rules.parameterNodeWrapper(type("MetaSegParameterNode", (), {"__annotations__": annotations,
                                                                               "brainExtraction": "auto"}))
        problems = rules.binding_problems(broken, UI_FILE)
        assert problems == ["brainExtraction (<class 'str'>) on brainExtractionComboBox (QComboBox): "
                            "ComboBoxToStringableConnector requires the Choice annotation to be used."]
        MetaSeg.MetaSegParameterNode = broken
        with pytest.raises(RuntimeError, match="requires the Choice annotation"):
            panel.setup()


def test_setup_binds_every_widget_and_segment_needs_a_volume(scene, tmp_path):
    with Panel(tmp_path, scene) as panel:
        ui, pn = panel.ui, panel.widget._parameterNode
        # the Choice connectors filled the combo boxes from the annotations
        assert combo_items(ui.brainExtractionComboBox) == ["auto", "on", "off"]
        assert combo_items(ui.qualityComboBox) == ["fast", "best"]
        assert combo_items(ui.deviceComboBox) == ["auto", "cpu", "gpu"]
        assert combo_items(ui.labelsComboBox) == ["tissues", "structures"]
        assert not ui.segmentButton.enabled and ui.modelLabel.text == "Select an input volume."
        volume = add_volume(scene, SAMPLE_T1, "slice")  # the selector shows it, as the current node
        ui.inputSelector.setCurrentNode(volume)
        assert pn.inputVolume is volume
        assert ui.segmentButton.enabled and "MetaSeg 2D" in ui.modelLabel.text
        # widget -> parameter node
        ui.qualityComboBox.currentIndex = 1
        ui.stepsSpinBox.value = 7
        ui.keepLabelmapCheckBox.checked = True
        assert (pn.quality, pn.steps, pn.keepLabelmap) == ("best", 7, True)
        # parameter node -> widget
        pn.brainExtraction = "off"
        pn.labels = "structures"
        assert ui.brainExtractionComboBox.currentText == "off" and ui.labelsComboBox.currentText == "structures"
        # no main window: no layout manager, no slice views, and nothing failed for it
        assert ui.sliceViewComboBox.count == 0
        assert not ui.crossSectionButton.enabled  # no 3D result yet


def test_segment_click_makes_a_segmentation_with_4_named_segments(scene, tmp_path):
    with Panel(tmp_path, scene) as panel:
        ui, widget = panel.ui, panel.widget
        volume = add_volume(scene, SAMPLE_T1, "slice")
        ui.inputSelector.setCurrentNode(volume)
        ui.stepsSpinBox.value = 3  # a short fit: the click path is what is tested
        if os.environ.get("METASEG_SCREENSHOT"):  # the committed screenshot shows a full fit
            ui.stepsSpinBox.value = 0
        assert ui.segmentButton.enabled
        ui.segmentButton.click()
        assert ui.segmentButton.text == "Cancel" and ui.segmentButton.enabled
        assert not ui.inputSelector.enabled and not ui.advancedCollapsibleButton.enabled
        panel.pump(lambda: widget._job is None, timeout=300, what="the segmentation")
        assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text + ui.reportText.plainText
        assert ui.segmentButton.text == "Segment" and ui.segmentButton.enabled
        results = [n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode") if not n.GetHideFromEditors()]
        assert len(results) == 1
        segmentation = results[0].GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        assert len(names) == 4 and all(names)
        assert list(segmentation.GetSegmentIDs()) == names  # stable IDs: the names
        assert "Cortical" in ui.reportText.plainText or names[0] in ui.reportText.plainText
        if os.environ.get("METASEG_SCREENSHOT"):  # regenerate the committed screenshot
            ui.advancedCollapsibleButton.collapsed = False
            panel.parent.resize(460, 980)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            render_png(panel.parent, SCREENSHOT)
        png = render_png(panel.parent, tmp_path / "panel.png")
        assert png.stat().st_size > 10000


class SliceWidgetStandIn:
    """Stand-in for qMRMLSliceWidget: visible or not, with its slice node."""

    def __init__(self, name, visible):
        self.name, self._visible = name, visible

    def isVisible(self):
        return self._visible

    def mrmlSliceNode(self):
        return f"node of {self.name}"


class LayoutManagerStandIn:
    """Stand-in for qSlicerLayoutManager: views created by earlier layouts stay, hidden."""

    def __init__(self, views):
        self.views = views
        self.connections = []

    def sliceViewNames(self):
        return list(self.views)

    def sliceWidget(self, name):
        return SliceWidgetStandIn(name, self.views[name]) if name in self.views else None

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def disconnect(self, signal, slot):
        self.connections.remove((signal, slot))


def test_view_list_holds_the_visible_views_of_the_layout(scene, tmp_path):
    layout = LayoutManagerStandIn({"Red": True, "Yellow": False, "Green": True, "Slice4": True})
    with Panel(tmp_path, scene, layout_manager=layout) as panel:
        assert combo_items(panel.ui.sliceViewComboBox) == ["Red", "Green", "Slice4"]
        assert layout.connections == [("layoutChanged(int)", panel.widget.updateSliceViews)]
        layout.views["Slice4"] = False  # changed while the module was not shown (no layoutChanged reached it)
        panel.widget.enter()  # entering the module refreshes the list (issue 25, section 7)
        assert combo_items(panel.ui.sliceViewComboBox) == ["Red", "Green"]
        from MetaSegLib import views

        with pytest.raises(ValueError, match="'Yellow' is not in the current layout"):
            views.slice_node(layout, "Yellow")
    assert layout.connections == []  # cleanup() disconnected


def test_module_registers_startup_work_and_sample_data(scene, tmp_path):
    """Start-up sweep and Sample Data registration hang on startupCompleted (not on opening the panel)."""
    with Panel(tmp_path, scene, setup=False) as panel:
        import slicer

        MetaSeg = panel.MetaSeg
        parent = type("ModuleParentStandIn", (), {})()
        MetaSeg.MetaSeg(parent)
        assert slicer.app.connections == [("startupCompleted()", MetaSeg.onStartupCompleted)]
        assert parent.categories == ["Segmentation"]
        assert "non-commercial" in parent.acknowledgementText
        assert MetaSeg.README_URL in parent.helpText
        stale = Path(slicer.app.temporaryPath) / "MetaSeg" / "run-crashed"
        stale.mkdir(parents=True)
        (stale / "owner").write_text("999999999")
        (stale / "input.nrrd").write_text("patient data")
        registered = []
        fake = type(sys)("SampleData")  # stand-in for Slicer's SampleData module (not in slicer-core)
        fake.SampleDataLogic = type("SampleDataLogic", (), {
            "registerCustomSampleDataSource": staticmethod(lambda **kw: registered.append(kw))})
        sys.modules["SampleData"] = fake
        try:
            MetaSeg.onStartupCompleted()
        finally:
            del sys.modules["SampleData"]
        assert not stale.exists()
        head = next(kw for kw in registered if kw["sampleName"] == "MetaSegHead")
        assert head["category"] == "MetaSeg" and head["fileNames"] == "ecog_head.nii.gz"
        assert head["uris"].startswith("file://") and Path(head["uris"][len("file://"):]).is_file()


@pytest.mark.skipif(slicer_source() is None, reason="METASEG_SLICER_SOURCE (a Slicer git mirror or checkout) is not set")
@pytest.mark.parametrize("tag", SLICER_TAGS)
def test_setup_with_slicers_own_parameter_node_wrapper(scene, tmp_path, tag):
    """Development-time check: the panel is bound by Slicer's actual parameterNodeWrapper of `tag`."""
    with Panel(tmp_path, scene, wrapper=tag) as panel:
        ui, pn = panel.ui, panel.widget._parameterNode
        assert combo_items(ui.brainExtractionComboBox) == ["auto", "on", "off"]
        volume = add_volume(scene, SAMPLE_T1, "slice")
        ui.inputSelector.setCurrentNode(volume)
        assert pn.inputVolume is volume and ui.segmentButton.enabled
        ui.qualityComboBox.currentIndex = 1
        assert pn.quality == "best"
        pn.device = "cpu"
        assert ui.deviceComboBox.currentText == "cpu"


@pytest.mark.skipif(slicer_source() is None, reason="METASEG_SLICER_SOURCE (a Slicer git mirror or checkout) is not set")
@pytest.mark.parametrize("tag", SLICER_TAGS)
def test_slicer_bindings_tool_accepts_every_field(tag):
    """Development-time check with the project's tool (Testing/slicer/tools/slicer_bindings.py), which runs
    Slicer's guiConnectors of `tag` on each SlicerParameterName of MetaSeg.ui."""
    tool = Path(__file__).parent / "tools" / "slicer_bindings.py"
    out = subprocess.run([sys.executable, str(tool), slicer_source(), tag, str(MODULE_DIR / "MetaSeg.py"), str(UI_FILE)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 refused" in out.stdout


def test_the_panel_is_disabled_while_a_cross_section_renders_and_a_closed_scene_is_handled(scene, tmp_path, fitted_3d):
    import numpy as np

    from mrml_helpers import SAMPLE_T1_3D

    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    slice_node.SetLayoutName("Red")
    slice_node.SetFieldOfView(160.0, 160.0, 1.0)
    slice_node.UpdateMatrices()

    class RedOnly(LayoutManagerStandIn):
        def sliceWidget(self, name):
            widget = super().sliceWidget(name)
            if widget is not None:
                widget.mrmlSliceNode = lambda: slice_node
            return widget

    # not in testing mode, with a main window: slicer.util would show an error dialog here, as in a user's Slicer
    with Panel(tmp_path, scene, setup=False, layout_manager=RedOnly({"Red": True}), main_window=True) as panel:
        import slicer

        volume = add_volume(scene, SAMPLE_T1_3D, "ecog")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ecog MetaSeg")
        panel.MetaSeg.MetaSegLogic()._keepFitted(seg, fitted_3d, volume, np.eye(4))
        panel.setup()
        ui = panel.ui
        ui.crossSectionSegmentationSelector.setCurrentNode(seg)
        assert panel.widget._parameterNode.crossSectionSegmentation is seg
        assert ui.crossSectionButton.enabled and ui.sliceViewComboBox.currentText == "Red"
        seen = []

        def events_while_rendering(*args):  # the render pumps events: what the user could click meanwhile
            if not seen:
                seen.append((ui.segmentButton.enabled, ui.crossSectionButton.enabled, ui.inputSelector.enabled))
                scene.Clear(0)  # File > Close Scene during the render

        slicer.app.processEvents = events_while_rendering
        ui.crossSectionButton.click()
        assert seen == [(False, False, False)]
        assert "scene was closed" in ui.statusLabel.text
        assert panel.message_boxes == []  # MetaSegCancelled is no error: no dialog, no traceback (issue 25)
        assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
        assert not ui.crossSectionButton.enabled  # nothing left to render


def test_labels_reach_the_child_process(slicer_core, tmp_path):
    from MetaSegLib.process import SegmentProcess

    default = SegmentProcess(weights="w.pt", temp_root=str(tmp_path))
    assert default.job_settings()["options"]["labels"] == "tissues"
    structures = SegmentProcess(weights="w.pt", labels="structures", temp_root=str(tmp_path))
    assert structures.job_settings()["options"]["labels"] == "structures"
    default.cleanup()
    structures.cleanup()


def test_a_rendered_cross_section_is_reused_and_kept_on_its_views_plane(scene, tmp_path, fitted_3d):
    """Issue 25, section 7: Render again into the same node, not another one; and when the view moves to another
    plane (scrolling), the cross-section is rendered on the new plane once the view stands still, so it never
    just vanishes from the view."""
    import numpy as np

    from mrml_helpers import SAMPLE_T1_3D

    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    slice_node.SetLayoutName("Red")
    slice_node.SetFieldOfView(160.0, 160.0, 1.0)
    slice_node.UpdateMatrices()
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")

    class SliceLogicStandIn:
        def GetSliceCompositeNode(self):
            return composite

    class RedOnly(LayoutManagerStandIn):
        def sliceWidget(self, name):
            widget = super().sliceWidget(name)
            if widget is not None:
                widget.mrmlSliceNode = lambda: slice_node
                widget.sliceLogic = SliceLogicStandIn
            return widget

    with Panel(tmp_path, scene, setup=False, layout_manager=RedOnly({"Red": True}), main_window=True) as panel:
        volume = add_volume(scene, SAMPLE_T1_3D, "ecog")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ecog MetaSeg")
        panel.MetaSeg.MetaSegLogic()._keepFitted(seg, fitted_3d, volume, np.eye(4))
        panel.setup()
        ui, widget = panel.ui, panel.widget
        widget.FOLLOW_DELAY_MS = 200
        ui.crossSectionSegmentationSelector.setCurrentNode(seg)
        ui.superResolutionSpinBox.value = 1
        ui.crossSectionButton.click()
        assert ui.statusLabel.text.startswith("Rendered"), ui.statusLabel.text
        labelmaps = lambda: [n for n in scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode")]  # noqa: E731
        [node] = labelmaps()
        assert composite.GetLabelVolumeID() == node.GetID()
        first = node.GetImageData()
        ui.crossSectionButton.click()  # Render again: the same node
        assert labelmaps() == [node] and node.GetImageData() is not first

        def plane_z():  # where the node lies along the view's normal (an axial view: RAS z)
            m = __import__("vtk").vtkMatrix4x4()
            node.GetIJKToRASMatrix(m)
            return m.GetElement(2, 3)

        before = plane_z()
        slice_node.SetSliceOffset(slice_node.GetSliceOffset() + 12.0)  # the user scrolls the view by 12 mm
        panel.pump(lambda: "again on the view's new plane" in ui.statusLabel.text, timeout=300,
                   what="the render on the new plane")
        assert labelmaps() == [node] and abs(plane_z() - (before + 12.0)) < 1e-3
        assert panel.message_boxes == []
