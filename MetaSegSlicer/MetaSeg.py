"""MetaSeg: brain-MRI tissue segmentation in 3D Slicer by fitting only the image's pixels.

The segmentation itself runs in the MetaSeg core (`python -m metaseg segment`) in a separate
process; this module is the GUI and the MRML glue: it exports the input volume, starts and
follows the process (MetaSegLib.process), and turns its result into a segmentation node.

Console use:
    logic = slicer.util.getModuleLogic("MetaSeg")          # or MetaSeg.MetaSegLogic()
    seg = logic.segment(volumeNode, device="cpu", steps=None, seed=0)
    job = logic.segment(volumeNode, wait=False, onProgress=print, onFinished=lambda job: print(job.state))
    job.cancel()

The Logic imports without Qt or the Slicer application (only MRML), so it also runs with the
PyPI package `slicer-core`; see Testing/slicer/.
"""

import atexit
import importlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import slicer
import vtk
import vtk.util.numpy_support

from MetaSegLib import dependencies, fitted, frames, install, paths, planes, refusals, rundirs, segfile, views
from MetaSegLib.preview import LabelReader, PreviewSegments
from MetaSegLib.process import ProcessError, ResliceProcess, SegmentProcess, python_executable
from MetaSegLib.protocol import Event, format_progress, format_seconds
from MetaSegLib.report import device_text, format_report

try:  # the Slicer application: Qt, CTK and the scripted-module base classes
    import ctk  # noqa: F401
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    HAVE_GUI = True
except ImportError:  # MRML only (slicer-core): the Logic works; the module and widget classes are inert
    qt = None
    HAVE_GUI = False

    class ScriptedLoadableModuleLogic:  # stand-in: the real one only adds parameter-node helpers
        def __init__(self, parent=None):
            self.parent = parent

    class _NeedsSlicerApplication:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{type(self).__name__} needs the Slicer application (Qt)")

    class ScriptedLoadableModule(_NeedsSlicerApplication):
        pass

    class ScriptedLoadableModuleWidget(_NeedsSlicerApplication):
        pass

    class ScriptedLoadableModuleTest(_NeedsSlicerApplication):
        pass

    class VTKObservationMixin:
        pass

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

IN_SLICER_APP = HAVE_GUI and hasattr(slicer, "app")
MODULE_DIR = Path(__file__).resolve().parent
REPORT_ATTRIBUTE = "MetaSeg.Report"
FITTED_NETWORK_ATTRIBUTE = "MetaSeg.FittedNetwork.safetensors"  # the fitted 3D network, base64 (MetaSegLib.fitted)
FITTED_REFERENCE = "MetaSeg.FittedNetwork"  # metaseg <= 0.4.0: node reference to a text node holding a pickle
FITTED_INFO_ATTRIBUTE = "MetaSeg.FittedInfo"  # JSON: the input's voxel spacing and size, the labels
CROSS_SECTIONS_ATTRIBUTE = "MetaSeg.CrossSections"  # "1" on results with a fitted network (the selector's filter)
CROSS_SECTION_OF = "MetaSeg.CrossSectionOf"  # on a rendered cross-section: the ID of its segmentation
CROSS_SECTION_VIEW = "MetaSeg.CrossSectionView"  # ... and of the slice node of its view (one node per pair and kind)
UNCERTAINTY_REFERENCE = "MetaSeg.Uncertainty"  # node reference: the uncertainty volume of a 3D result
BRAIN_MASK_SEGMENT = "MetaSeg brain mask"  # segment ID and name of the kept brain mask (hidden)
MAX_STEPS = 10_000  # the core's metaseg.options.MAX_STEPS (a test checks): more test-time steps are refused
LIVE_EVERY = {2: 10, 3: 50}  # live-preview interval (steps) per input dimension: overhead <= 10 % (docs/results.md)
DEVICES = ("auto", "cpu", "gpu")
LABEL_SETS = ("tissues", "structures")  # `metaseg segment --labels`; what the segments are comes from the result
BRAIN_EXTRACTION = ("auto", "on", "off")
QUALITIES = ("fast", "best")
CROSS_SECTION_WHAT = ("labels", "intensity")


def extensionInfo() -> Dict[str, Any]:
    """Resources/extension.json: the extension's URLs and contributors, in one place (the top-level CMakeLists.txt
    reads the same file for the extension's metadata), with {repository} and {raw} expanded."""
    info = json.loads((MODULE_DIR / "Resources" / "extension.json").read_text(encoding="utf-8"))
    raw = info["repository"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/" + info["branch"]

    def expand(text: str) -> str:
        return text.replace("{repository}", info["repository"]).replace("{raw}", raw)

    return {**info, "homepage": expand(info["homepage"]), "icon": expand(info["icon"]),
            "screenshots": [expand(u) for u in info["screenshots"]]}


README_URL = extensionInfo()["homepage"]
SAMPLES = (  # Sample Data: (name, file in Resources/Sample, node name)
    ("MetaSegHead", "ecog_head.nii.gz", "MetaSegHead"),
    ("MetaSegSlice", "ecog_slice_t1.nii.gz", "MetaSegSlice"),
)


# Session state that survives "Reload" (which re-runs this file in the same module namespace).
_RUNNING_JOBS = globals().get("_RUNNING_JOBS", set())  # running jobs, alive even if the caller drops them
_SWEPT_ROOTS = globals().get("_SWEPT_ROOTS", set())  # run roots swept for stale folders in this session
_KEPT_DIRS = globals().get("_KEPT_DIRS", set())  # this session's folders of fitted networks, removed at exit


def defaultRunRoot() -> Path:
    """Where runs keep their temporary files: Slicer's temporary folder, else the system's."""
    if IN_SLICER_APP:
        return Path(slicer.util.tempDirectory("MetaSeg", includeDateTime=False))
    return rundirs.default_root()


def _cleanupAtExit() -> None:
    """Application exit: stop running jobs and remove every temporary file of this session."""
    for job in list(_RUNNING_JOBS):
        try:
            job.onProgress = job.onFinished = None
            job.process.cleanup()  # stops the process, removes its run folder
        except Exception:  # noqa: BLE001 (exit must go on)
            logging.exception("MetaSeg: cleanup at exit")
    for folder in list(_KEPT_DIRS):
        rundirs.remove(folder)


if not globals().get("_AT_EXIT_REGISTERED"):  # once per session, not again on reload
    atexit.register(lambda: _cleanupAtExit())  # looks the function up at exit: the reloaded one
    _AT_EXIT_REGISTERED = True


class MetaSegError(RuntimeError):
    """A run that could not start or did not give a result; the message says why, in the panel's words.
    `failure` (MetaSegLib.refusals.Failure) adds the technical details and what the panel offers
    (e.g. "Segment anyway": `segment(..., acceptPoorMatch=True)` from the console)."""

    def __init__(self, message: str, failure: Optional["refusals.Failure"] = None):
        super().__init__(message)
        self.failure = failure if failure is not None else refusals.local(str(message))


class MetaSegCancelled(MetaSegError):
    """The run was cancelled; the scene is as it was before."""


#
# MetaSeg
#
class MetaSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MetaSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch (extension), slicerio and deepbet are checked when segmenting
        self.parent.contributors = list(extensionInfo()["contributors"])
        self.parent.helpText = _(
            "Segment a T1-weighted brain MRI: a 3D scan (whole head with skull, or skull-stripped) or one aligned "
            "coronal slice, into cortical grey matter, subcortical grey matter, white matter and CSF "
            "(Labels: tissues; or the FreeSurfer structures where the installed core provides them). "
            "MetaSeg fits a small implicit network to the image's intensities only and decodes its features "
            "with a meta-learned head (Vyas et al., MICCAI 2025). A whole head is first brain-extracted (deepbet). "
            "The weights ship with the extension: no download. The work runs in a separate process that Cancel "
            "stops at once. Options: live preview, uncertainty map, brain mask, quality (fast / best), and "
            "cross-sections of any 3D result on any slice plane at a finer resolution, without refitting. "
            "Try it on the whole-head sample in Sample Data (MetaSegHead). "
            '<a href="{url}">Documentation</a>.'
        ).format(url=README_URL)
        self.parent.acknowledgementText = _(
            "MetaSeg implements 'Fit Pixels, Get Labels: Meta-learned Implicit Networks for Image Segmentation' "
            "(K. Vyas, A. Veeraraghavan, G. Balakrishnan, MICCAI 2025). The shipped weights were trained on "
            "FreeSurfer-processed public T1 scans and on OASIS-1 scans with manual labels by Neuromorphometrics, Inc. "
            "(CC BY-NC 3.0): the weights are for non-commercial use only (model cards in Resources/Weights). "
            "Brain extraction: deepbet (Fisch et al.). Sample: MNE-Python's sample ECoG subject (BSD-3-Clause). "
            "Research software, not a medical device."
        )
        if IN_SLICER_APP:  # after start-up: Sample Data exists then, and crash leftovers are swept once
            slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted() -> None:
    """Slicer has started: remove run folders left by a crashed session, register the samples."""
    try:
        sweepStaleRuns()
    except Exception:  # noqa: BLE001 (start-up must go on)
        logging.exception("MetaSeg: sweeping stale temporary folders")
    try:
        registerSampleData()
    except Exception:  # noqa: BLE001
        logging.exception("MetaSeg: registering the sample data")


def sweepStaleRuns(runRoot: Optional[str] = None) -> list:
    """Remove the temporary folders (exported scans: patient data) of sessions that ended without
    cleaning up, e.g. a crash. Done once at Slicer start-up (startupCompleted); returns those removed."""
    root = Path(runRoot) if runRoot else defaultRunRoot()
    _SWEPT_ROOTS.add(str(root))
    return rundirs.sweep_stale(root)


def samplePath(name: str) -> Optional[Path]:
    """A bundled sample (Resources/Sample of the installed module, or of the source checkout)."""
    for d in (MODULE_DIR / "Resources" / "Sample", MODULE_DIR.parent / "Resources" / "Sample"):
        if (d / name).is_file():
            return d / name
    return None


def registerSampleData() -> bool:
    """Register the bundled samples in the Sample Data module (category MetaSeg): the whole head
    (`MetaSegHead`) is the one to try first. The files are local: SampleData copies them from the
    extension's folder into its cache. False when Sample Data is not available."""
    try:
        import SampleData
    except ImportError:
        return False
    thumbnail = MODULE_DIR / "Resources" / "Icons" / "MetaSeg.png"
    for name, fileName, nodeName in SAMPLES:
        path = samplePath(fileName)
        if path is None:
            continue
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="MetaSeg", sampleName=name, uris=path.resolve().as_uri(), fileNames=fileName,
            nodeNames=nodeName, thumbnailFileName=str(thumbnail) if thumbnail.is_file() else None)
    return True


#
# Parameter node (Slicer application only)
#
if HAVE_GUI:
    from typing import Annotated, Union

    from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    # Every field is bound to a widget of MetaSeg.ui (its SlicerParameterName) under the rules of
    # Slicer's guiConnectors: a QComboBox takes a str only with a Choice annotation (the connector
    # then fills the items itself), a QSpinBox an int, a QCheckBox a bool, a qMRMLNodeComboBox a node.
    # Testing/slicer/test_slicer_panel.py holds every field to those rules. The choices are literals (the
    # same as DEVICES, LABEL_SETS, ...: a test checks) so that tools reading this source can evaluate them.
    @parameterNodeWrapper
    class MetaSegParameterNode:
        inputVolume: vtkMRMLScalarVolumeNode
        outputSegmentation: vtkMRMLSegmentationNode  # None: create a new segmentation
        device: Annotated[str, Choice(["auto", "cpu", "gpu"])] = "auto"
        labels: Annotated[str, Choice(["tissues", "structures"])] = "tissues"
        steps: Annotated[int, WithinRange(0, 10000)] = 0  # 0: the weights' own number of steps; the core's MAX_STEPS
        seed: Annotated[int, WithinRange(0, 2 ** 31 - 1)] = 0
        keepLabelmap: bool = False
        livePreview: bool = False
        uncertainty: bool = False
        surfaces: bool = False
        brainExtraction: Annotated[str, Choice(["auto", "on", "off"])] = "auto"  # 3D
        brainMask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]  # 3D: None = find the brain
        keepBrainMask: bool = False
        quality: Annotated[str, Choice(["fast", "best"])] = "fast"  # 3D: best = 3 fits averaged
        crossSectionSegmentation: vtkMRMLSegmentationNode  # a 3D MetaSeg result with a fitted network
        superResolution: Annotated[int, WithinRange(1, 8)] = 4
        crossSectionWhat: Annotated[str, Choice(["labels", "intensity"])] = "labels"


#
# MetaSegWidget
#
def layoutManager():
    """Slicer's layout manager, or None: `Slicer --no-main-window` (and the test harness) has none."""
    app = getattr(slicer, "app", None)
    return app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None


class MetaSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._busy = None  # what pumps events right now ("install", "render"): the panel is disabled meanwhile
        self._anywayFor = None  # ID of the input last refused as a poor match: "Segment anyway" is offered for it
        self._install = None  # the running InstallJob (the first Segment click on a fresh Slicer)
        self._followed = None  # the last rendered cross-section, kept on its view's plane (see _render)
        self._followTimer = None
        self._installState = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MetaSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MetaSegLogic()
        # the selector lists the segmentations that carry a fitted network (any MetaSeg 3D result)
        self.ui.crossSectionSegmentationSelector.addAttribute("vtkMRMLSegmentationNode", CROSS_SECTIONS_ATTRIBUTE, "1")
        self.ui.progressBar.hide()
        self.ui.segmentAnywayButton.hide()
        self.updateSliceViews()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.segmentAnywayButton.connect("clicked(bool)", self.onSegmentAnywayButton)
        self.ui.crossSectionButton.connect("clicked(bool)", self.onCrossSectionButton)
        manager = layoutManager()
        if manager is not None:
            manager.connect("layoutChanged(int)", self.updateSliceViews)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reload or application exit: the widget goes away, so the job must stop calling it."""
        self._stopJob()
        self._unfollow()
        manager = layoutManager()
        if manager is not None:
            try:
                manager.disconnect("layoutChanged(int)", self.updateSliceViews)
            except (AttributeError, ValueError, RuntimeError):
                pass
        self.removeObservers()

    def onReload(self) -> None:
        """Reload MetaSegLib too (Slicer reloads only MetaSeg.py), in dependency order, then the module."""
        self._stopJob()
        import MetaSegLib

        MetaSegLib.reload_all()
        ScriptedLoadableModuleWidget.onReload(self)

    def _stopJob(self) -> None:
        """Cancel the running job and detach it from this widget; it still finishes and cleans up on its own."""
        installing, self._install = self._install, None
        if installing is not None:
            installing.onProgress = installing.onFinished = None
            installing.cancel()
        job, self._job = self._job, None
        if job is not None:
            job.onProgress = job.onFinished = None
            job.cancel()

    def updateSliceViews(self, *args) -> None:
        """The visible slice views of the current layout (any names, not only Red/Yellow/Green)."""
        combo = self.ui.sliceViewComboBox
        current = combo.currentText
        combo.clear()
        for name in views.slice_view_names(layoutManager()):
            combo.addItem(name)
        if current and combo.findText(current) >= 0:
            combo.setCurrentIndex(combo.findText(current))

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateSliceViews()  # the layout may have changed while the module was not shown

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self._unfollow()
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # In the .ui file, each widget to connect has a "SlicerParameterName" dynamic property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        running = self._job is not None and self._job.running
        idle = not running and self._busy is None
        volume = pn.inputVolume if pn else None
        text, ok = self.logic.modelDescription(volume, pn.labels if pn else "tissues")
        self.ui.modelLabel.text = text
        self.ui.modelLabel.toolTip = self.logic.modelDetails(volume, pn.labels if pn else "tissues")
        for w in (self.ui.inputSelector, self.ui.outputSelector, self.ui.deviceComboBox, self.ui.labelsComboBox,
                  self.ui.advancedCollapsibleButton, self.ui.crossSectionCollapsibleButton):
            w.enabled = idle
        result = pn.crossSectionSegmentation if pn else None
        self.ui.crossSectionButton.enabled = idle and self.logic.hasFittedNetwork(result)
        # "Segment anyway" stays offered, after a refusal as a poor match, for that input only
        anyway = idle and ok and volume is not None and volume.GetID() == self._anywayFor
        self.ui.segmentAnywayButton.visible = anyway
        self.ui.segmentAnywayButton.enabled = anyway
        if self._busy == "install":
            self.ui.segmentButton.text = _("Cancel")
            self.ui.segmentButton.enabled = True
            self.ui.segmentButton.toolTip = _("Stop installing the Python packages MetaSeg needs")
        elif self._busy is not None:
            self.ui.segmentButton.text = _("Segment")
            self.ui.segmentButton.enabled = False
            self.ui.segmentButton.toolTip = _("Rendering a cross-section…")
        elif running:
            self.ui.segmentButton.text = _("Cancel")
            self.ui.segmentButton.toolTip = _("Stop the segmentation; the scene is left as it was")
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.text = _("Segment")
            self.ui.segmentButton.enabled = bool(volume) and ok
            self.ui.segmentButton.toolTip = _("Segment the input volume") if ok else text

    # ---------------------------------------------------------------- running
    def onSegmentButton(self) -> None:
        if self._install is not None and self._install.running:
            self.ui.statusLabel.text = _("Cancelling the installation…")
            self._install.cancel()
            return
        if self._job is not None and self._job.running:
            self.ui.statusLabel.text = _("Cancelling…")
            self._job.cancel()
            return
        self._startSegmentation()

    def onSegmentAnywayButton(self) -> None:
        """Segment the input that was refused as a poor match, this once."""
        if self._job is None and self._busy is None:
            self._startSegmentation(acceptPoorMatch=True)

    def _startSegmentation(self, acceptPoorMatch: bool = False) -> None:
        if self._busy is not None or self._job is not None:  # a click delivered while events are pumped
            return
        pn = self._parameterNode
        # Dialogs (install confirmations, replace?) without the wait cursor; the button is disabled meanwhile.
        if not self._ensureDependencies(acceptPoorMatch):
            return
        output = pn.outputSegmentation
        if output is not None:
            question = _("Replace all segments of '{name}' with the MetaSeg result?").format(name=output.GetName())
            if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("MetaSeg")):
                return
        self._anywayFor = None
        failure = None
        with slicer.util.tryWithErrorDisplay(_("MetaSeg could not start."), waitCursor=True):
            try:
                self._job = self.logic.segment(
                    pn.inputVolume, device=pn.device, labels=pn.labels, steps=pn.steps or None, seed=pn.seed,
                    wait=False, outputSegmentation=output, keepLabelmap=pn.keepLabelmap, livePreview=pn.livePreview,
                    uncertainty=pn.uncertainty, surfaces=pn.surfaces, brainExtraction=pn.brainExtraction,
                    keepBrainMask=pn.keepBrainMask, quality=pn.quality, brainMask=pn.brainMask,
                    acceptPoorMatch=acceptPoorMatch, onProgress=self.onJobProgress, onFinished=self.onJobFinished)
            except MetaSegError as e:  # refused before it started (a setting, a missing file): in the panel's words
                failure = e.failure
            else:  # events arrive from the job's timer, after this method returns
                self.ui.reportText.plainText = ""
                self.ui.progressBar.value = 0
                self.ui.progressBar.setFormat(_("starting…"))
                self.ui.progressBar.show()
                self.ui.statusLabel.text = (_("Starting the MetaSeg process (segmenting anyway)…") if acceptPoorMatch
                                            else _("Starting the MetaSeg process…"))
        if failure is not None:
            self._showFailure(failure, _("MetaSeg could not start"))
        self.updateGUI()

    def _showFailure(self, failure: "refusals.Failure", title: str) -> bool:
        """Show a failure: its text in the status line, and a dialog (not in testing mode and not without a main
        window, as slicer.util.errorDisplay does) with the technical details behind "Show Details..." and, for a
        refusal as a poor match, a "Segment anyway" button. True when that button was pressed."""
        self.ui.statusLabel.text = failure.text
        if refusals.SHOW_ADVANCED in failure.actions:
            self.ui.advancedCollapsibleButton.collapsed = False
        app = getattr(slicer, "app", None)
        if app is None or app.testingEnabled() or slicer.util.mainWindow() is None:
            return False
        import ctk

        box = ctk.ctkMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(title)
        box.setIcon(qt.QMessageBox.Warning)
        box.setText(failure.text)
        if failure.details:
            box.setDetailedText(failure.details)
        anyway = None
        if refusals.SEGMENT_ANYWAY in failure.actions:
            anyway = box.addButton(_("Segment anyway"), qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Close)
        box.setDefaultButton(qt.QMessageBox.Close)
        box.deleteLater()
        box.exec_()
        return anyway is not None and box.clickedButton() == anyway

    def _ensureDependencies(self, acceptPoorMatch: bool = False) -> bool:
        """True when every package the core needs is installed. Otherwise, after one confirmation that lists what
        is installed and about how much it downloads, the install starts in the panel (progress bar, status line,
        Cancel) and the segmentation follows it by itself; False meanwhile, and when something stands in the way."""
        try:
            steps = self.logic.installPlan()
        except MetaSegError as e:  # a package in an unsuitable version: what to do
            self._showFailure(e.failure, _("MetaSeg needs other Python packages"))
            return False
        if not steps:
            return True
        if not slicer.util.confirmOkCancelDisplay(install.describe_plan(steps), windowTitle=_("MetaSeg")):
            self.ui.statusLabel.text = _("Missing Python packages: segmentation not started.")
            return False
        self._installState = {}
        self._busy = "install"
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(_("installing…"))
        self.ui.progressBar.show()
        self.updateGUI()
        self._install = self.logic.startInstall(
            steps, onProgress=self.onInstallProgress,
            onFinished=lambda job: self.onInstallFinished(job, acceptPoorMatch))
        return False

    def onInstallProgress(self, step, event) -> None:
        text, fraction = install.progress_text(step, event, self._installState)
        index = self._install.index if self._install is not None else 0
        total = len(self._install.steps) if self._install is not None else 1
        self.ui.statusLabel.text = (f"({index + 1}/{total}) " if total > 1 else "") + text
        if fraction is not None:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(round(100 * fraction))
            self.ui.progressBar.setFormat("%p%")
        elif event.get("what") in ("downloading", "collecting", "starting", "installing"):
            self.ui.progressBar.setRange(0, 0)  # busy: pip says what, not how far (pip before 24.1)

    def onInstallFinished(self, job, acceptPoorMatch: bool) -> None:
        self._install, self._busy = None, None
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        importlib.invalidate_caches()
        if job.state == "done":
            self.ui.statusLabel.text = _("Python packages installed.")
            self.updateGUI()
            self._startSegmentation(acceptPoorMatch)
            return
        if job.state == "cancelled":
            self.ui.statusLabel.text = _("Installation cancelled: segmentation not started.")
        else:
            self._showFailure(job.failure, _("MetaSeg could not install its Python packages"))
        self.updateGUI()

    def onCrossSectionButton(self) -> None:
        if self._busy is not None or (self._job is not None and self._job.running):
            return
        pn = self._parameterNode
        try:
            sliceNode = views.slice_node(layoutManager(), self.ui.sliceViewComboBox.currentText)
        except ValueError as e:  # the view is not in the layout (anymore): views.slice_node says what to do
            self._showFailure(refusals.local(str(e)), _("MetaSeg could not render the cross-section"))
            return
        self._render(pn.crossSectionSegmentation, sliceNode, pn.superResolution, pn.crossSectionWhat)

    def _render(self, segmentationNode, sliceNode, superResolution: int, what: str, follow: bool = False) -> None:
        """Render (or render again, into the same node) the cross-section of a result on a view's plane, and keep it
        there: when the view moves to another plane (scrolling, rotating), it is rendered again on the new one once
        the view has stopped moving (`_onFollowedViewModified`), so that it never just vanishes from the view."""
        self._busy = "render"  # the render pumps events while its process runs: the panel is disabled
        self.updateGUI()
        node = None
        try:
            # Expected outcomes are handled inside: tryWithErrorDisplay shows a dialog for any exception that
            # leaves the block, before an outer handler could catch it.
            with slicer.util.tryWithErrorDisplay(_("MetaSeg could not render the cross-section."), waitCursor=True):
                try:
                    node = self.logic.crossSection(segmentationNode, sliceNode, superResolution, what)
                except MetaSegCancelled as e:  # the scene was closed meanwhile: nothing to show, nothing to report
                    self.ui.statusLabel.text = str(e)
                    return
                except MetaSegError as e:
                    self._showFailure(e.failure, _("MetaSeg could not render the cross-section"))
                    return
                dims = node.GetImageData().GetDimensions()
                text = (_("Rendered '{name}' again on the view's new plane: {w}×{h} pixels of {s:.2g} mm.") if follow
                        else _("Rendered '{name}': {w}×{h} pixels of {s:.2g} mm, no refit."))
                self.ui.statusLabel.text = text.format(name=node.GetName(), w=dims[0], h=dims[1],
                                                       s=node.GetSpacing()[0])
        finally:
            self._busy = None
            self.updateGUI()
            if node is not None:
                self._follow(segmentationNode, sliceNode, superResolution, what)
            elif not follow:
                self._unfollow()

    # the cross-section kept on its view's plane
    FOLLOW_DELAY_MS = 600  # the view must stand still this long before the cross-section is rendered again

    def _follow(self, segmentationNode, sliceNode, superResolution: int, what: str) -> None:
        if self._followed is not None and self._followed["sliceNode"] is not sliceNode:
            self._unfollow()
        if self._followed is None:
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self._onFollowedViewModified)
        self._followed = {"sliceNode": sliceNode, "segmentation": segmentationNode, "superResolution": superResolution,
                          "what": what, "plane": self._planeOf(sliceNode)}

    def _unfollow(self) -> None:
        if self._followed is not None:
            self.removeObserver(self._followed["sliceNode"], vtk.vtkCommand.ModifiedEvent,
                                self._onFollowedViewModified)
            self._followed = None
        if self._followTimer is not None:
            self._followTimer.stop()

    @staticmethod
    def _planeOf(sliceNode):
        return np.concatenate([frames.to_numpy(sliceNode.GetSliceToRAS()).ravel(), list(sliceNode.GetFieldOfView())])

    def _onFollowedViewModified(self, caller=None, event=None) -> None:
        followed = self._followed
        if followed is None or np.allclose(self._planeOf(followed["sliceNode"]), followed["plane"], atol=1e-6):
            return
        if self._followTimer is None:
            self._followTimer = qt.QTimer()
            self._followTimer.setSingleShot(True)
            self._followTimer.setInterval(self.FOLLOW_DELAY_MS)
            self._followTimer.connect("timeout()", self._renderFollowed)
        self._followTimer.start()  # (re)started by each move: the render waits until the view stands still

    def _renderFollowed(self) -> None:
        followed = self._followed
        if followed is None:
            return
        segmentation = followed["segmentation"]
        node = self.logic.crossSectionNode(segmentation, followed["sliceNode"], followed["what"])
        if node is None or node.GetScene() is None or not self.logic.hasFittedNetwork(segmentation):
            self._unfollow()  # the cross-section or its result was removed: nothing to keep on the plane
            return
        if self._busy is not None or (self._job is not None and self._job.running):
            self._followTimer.start()  # later, when the panel is free
            return
        self._render(segmentation, followed["sliceNode"], followed["superResolution"], followed["what"], follow=True)

    def onJobProgress(self, event: Event) -> None:
        if event.kind == "stage":
            self.ui.statusLabel.text = event["message"]
            if event.get("device"):
                self.ui.deviceLabel.text = _("running on {device}").format(device=event["device"])
        elif event.kind == "progress":
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.progressBar.setFormat(format_progress(event))
        elif event.kind == "labels":
            self.ui.statusLabel.text = _("live preview: labels after step {step}").format(step=event["step"])
        elif event.kind == "warning":
            self.ui.statusLabel.text = _("Warning: {message}").format(message=event["message"])

    def onJobFinished(self, job: "MetaSegJob") -> None:
        self._job = None
        self.ui.progressBar.hide()
        if job.state == "done":
            self.ui.statusLabel.text = _("Done in {t}.").format(t=format_seconds(job.elapsed))
            self.ui.deviceLabel.text = device_text(job.report)
            self.ui.reportText.plainText = format_report(job.report)
            self.ui.reportText.toolTip = format_report(job.report, weights=True)
            if self._parameterNode and self.logic.hasFittedNetwork(job.segmentationNode):
                self._parameterNode.crossSectionSegmentation = job.segmentationNode
            if layoutManager() is not None:  # no slice views without a main window
                slicer.util.setSliceViewerLayers(background=job.volumeNode, fit=True)
        elif job.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled: the scene is unchanged.")
        else:
            failure = job.failure or refusals.local(job.error or _("MetaSeg failed."))
            self.ui.reportText.plainText = failure.text
            if refusals.SEGMENT_ANYWAY in failure.actions:
                self._anywayFor = job.volumeNode.GetID()
            self.updateGUI()
            if self._showFailure(failure, _("MetaSeg: nothing was segmented")) and self._anywayFor is not None:
                self._startSegmentation(acceptPoorMatch=True)
                return
        self.updateGUI()


#
# MetaSegJob
#
class MetaSegJob:
    """One segmentation run: the child process and the MRML work around it.

    `poll()` handles the process's events on the calling (main) thread: progress callbacks,
    live-preview labels, and at the end the result nodes. In the Slicer application a QTimer
    calls it; elsewhere call `poll()` or `wait()` yourself.

    state: "running", "cancelling", then "done", "failed" or "cancelled".
    """

    POLL_MS = 100

    def __init__(self, logic: "MetaSegLogic", volumeNode, process: SegmentProcess, outputSegmentation=None,
                 keepLabelmap: bool = False, livePreview: bool = False, surfaces: bool = False,
                 onProgress: Optional[Callable[[Event], None]] = None,
                 onFinished: Optional[Callable[["MetaSegJob"], None]] = None):
        self.logic = logic
        self.volumeNode = volumeNode
        self.scene = volumeNode.GetScene()
        self.process = process
        self.outputSegmentation = outputSegmentation
        self.keepLabelmap = keepLabelmap
        self.surfaces = surfaces
        self.uncertaintyNode = None
        self.livePreview = livePreview
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.state = "running"
        self.error: Optional[str] = None  # the failure's text (as the panel words it)
        self.failure: Optional[refusals.Failure] = None  # the text, the technical details, what the panel offers
        self.report: Dict[str, Any] = {}
        self.warnings: List[str] = []
        self.device: Optional[str] = None
        self.segmentationNode = None
        self.labelmapNode = None
        self.elapsed = 0.0
        self._t0 = time.monotonic()
        self._previewNode = None  # hidden node showing the live labels; removed at the end
        self._preview: Optional[PreviewSegments] = None
        self._reader = LabelReader() if livePreview else None  # the newest snapshot, decoded when polled
        self._polling = False
        self._ended = False  # _finish has run (its callback may still raise: poll must not finish twice)
        self._timer = None
        _RUNNING_JOBS.add(self)  # kept alive until it ends; cancelled and cleaned up at exit

    @property
    def running(self) -> bool:
        return self.state in ("running", "cancelling")

    def startTimer(self) -> None:
        if qt is None:
            return
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.poll)
        self._timer.start()

    # ------------------------------------------------------------------ poll
    def poll(self) -> bool:
        """Handle what the process reported; returns True while the job is running."""
        if not self.running or self._polling:
            return self.running
        self._polling = True
        try:
            for event in self.process.poll():
                if self.state == "running":
                    self._handle(event)
            live = self._reader.take() if self._reader is not None else None
            if live is not None and self.state == "running":
                self._showLiveLabels(live)
            if self.process.finished:
                self._finish()
        except Exception as e:  # a failure in our own MRML work must end the job, not leave it hanging
            if self._ended:  # it came from the onFinished callback: the job has ended already
                logging.exception("MetaSeg: error in the callback of a finished run")
                return False
            logging.exception("MetaSeg: error while following the process")
            self.process.cancel(grace=0.5)
            self._finish(failure=refusals.local(_("MetaSeg could not show the run's progress: {error}").format(
                error=f"{type(e).__name__}: {e}"), traceback.format_exc()))
        finally:
            self._polling = False
        return self.running

    def _handle(self, event: Event) -> None:
        if event.kind == "stage" and event.get("device"):
            self.device = event["device"]
        elif event.kind == "warning":
            self.warnings.append(event["message"])
        elif event.kind == "done":
            self.report = event["report"]
        elif event.kind == "labels" and self._reader is not None:
            self._reader.submit(event["step"], event["path"], event.get("segments") or [])
        if self.onProgress is not None and event.kind != "done":
            self.onProgress(event)

    def _showLiveLabels(self, live) -> None:
        """Main thread: copy a decoded snapshot into the hidden preview node (made at the first one)."""
        if self._previewNode is None:
            # Its own node: an existing output segmentation is only touched at the end.
            self._previewNode = self.logic._createSegmentationNode(self.scene, self.volumeNode, hidden=True)
            self._preview = PreviewSegments(self._previewNode, live.segments)
        self._preview.update(live)

    # ---------------------------------------------------------------- cancel
    def cancel(self) -> None:
        """Stop the run; the scene is restored at once (nodes of this run are removed)."""
        if not self.running:
            return
        self.state = "cancelling"
        self.process.cancel()
        self._removePreview()

    def wait(self, timeout: Optional[float] = None):
        """Block until the end; return the segmentation node, or raise MetaSegError / MetaSegCancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.poll():
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    self.process.wait(10.0)
                    self.poll()
                    raise MetaSegError(f"MetaSeg did not finish within {timeout} s; the run was cancelled")
                if IN_SLICER_APP:
                    slicer.app.processEvents()
                time.sleep(0.02)
        except KeyboardInterrupt:
            self.cancel()
            self.process.wait(10.0)
            self.poll()
            raise
        if self.state == "cancelled":
            raise MetaSegCancelled("the segmentation was cancelled")
        if self.state == "failed":
            raise MetaSegError(self.error, self.failure)
        return self.segmentationNode

    # ---------------------------------------------------------------- finish
    def _finish(self, failure: Optional[refusals.Failure] = None) -> None:
        self._ended = True
        try:
            if failure is None and self.state == "cancelling":
                self.state = "cancelled"
            elif failure is None and (self.process.cancelled or self.process.returncode == 3):
                self.state = "cancelled"
            else:
                if failure is None:
                    reported = self.process.failure()  # the core's error event, or how the process ended
                    failure = refusals.explain(reported) if reported is not None else None
                if failure is None:
                    try:
                        self._loadResult()
                        self.state = "done"
                    except Exception as e:
                        logging.exception("MetaSeg: could not load the result")
                        failure = refusals.local(_("MetaSeg could not add the result to the scene: {error}").format(
                            error=e), traceback.format_exc())
                if failure is not None:
                    self.state, self.error, self.failure = "failed", failure.text, failure
                    logging.error("MetaSeg: %s%s", failure.text, f"\n{failure.details}" if failure.details else "")
            if self.state != "done":
                self._removePreview()
        finally:
            self.elapsed = time.monotonic() - self._t0
            if self._reader is not None:
                self._reader.stop()
            if self._timer is not None:
                self._timer.stop()
                self._timer = None
            _RUNNING_JOBS.discard(self)
            self.process.cleanup()
            if self.onFinished is not None:
                self.onFinished(self)

    def _removePreview(self) -> None:
        if self._previewNode is not None:
            self.logic._removeNode(self._previewNode)
            self._previewNode, self._preview = None, None

    def _loadResult(self) -> None:
        logic, volume = self.logic, self.volumeNode
        report = json.loads(self.process.report_path.read_text(encoding="utf-8"))
        segfile.name_ids(self.process.segmentation_path)  # stable segment IDs: the names the core gave
        _scene, source = logic._readSegmentationFile(str(self.process.segmentation_path))
        brainMask = self.process.brain_mask_path
        if brainMask is not None and brainMask.is_file():  # before the transform below: it moves with the rest
            logic._addBrainMaskSegment(source, brainMask)
        if self.outputSegmentation is not None:
            # An existing segmentation keeps its transform, reference geometry and display: only its
            # segments change, brought from the input's frame into its own (exact for linear transforms).
            target, created = self.outputSegmentation, False
            toTarget = frames.between(volume, target)
            if not np.allclose(toTarget, np.eye(4)):
                transform = vtk.vtkTransform()
                transform.SetMatrix(frames.to_vtk(toTarget))
                source.GetSegmentation().ApplyLinearTransform(transform)
        else:
            target, created = logic._createSegmentationNode(self.scene, volume, hidden=True), True
            toTarget = np.eye(4)
        labelmap = None
        try:
            wasModifying = target.StartModify()
            try:
                # DeepCopy would also take the file's conversion parameters (the reference geometry among
                # them): the target keeps its own, which are the input's for a new node.
                keep = slicer.vtkSegmentation()
                keep.CopyConversionParameters(target.GetSegmentation())
                target.GetSegmentation().DeepCopy(source.GetSegmentation())
                target.GetSegmentation().CopyConversionParameters(keep)
                target.SetAttribute(REPORT_ATTRIBUTE, json.dumps(report))
                if created:
                    target.SetHideFromEditors(False)
            finally:
                target.EndModify(wasModifying)
            if created:
                logic._placeBesideVolume(target, volume)
            if self.process.fitted_path is not None and self.process.fitted_path.is_file():
                logic._keepFitted(target, self.process.fitted_path, volume, np.linalg.inv(toTarget))
            else:  # a replaced output must not keep the network (or uncertainty) of its previous result
                logic._removeLegacyNetwork(target)
                target.RemoveAttribute(FITTED_NETWORK_ATTRIBUTE)
                target.RemoveAttribute(CROSS_SECTIONS_ATTRIBUTE)
                target.RemoveAttribute(FITTED_INFO_ATTRIBUTE)
            if target.GetSegmentation().GetSegment(BRAIN_MASK_SEGMENT) is not None:
                target.CreateDefaultDisplayNodes()
                target.GetDisplayNode().SetSegmentVisibility(BRAIN_MASK_SEGMENT, False)
            labelmap = logic._exportLabelmap(target, volume) if self.keepLabelmap else None
            target.RemoveNodeReferenceIDs(UNCERTAINTY_REFERENCE)
            uncertainty = self.process.uncertainty_path
            if uncertainty is not None and uncertainty.is_file():
                self.uncertaintyNode = logic._loadUncertainty(uncertainty, volume)
                target.SetNodeReferenceID(UNCERTAINTY_REFERENCE, self.uncertaintyNode.GetID())
            if self.surfaces:
                target.CreateClosedSurfaceRepresentation()
        except Exception:
            for node in (labelmap, self.uncertaintyNode):
                if node is not None:
                    logic._removeNode(node)
            if created:  # a failed run adds nothing to the scene
                logic._removeNode(target)
            raise
        self._removePreview()
        self.report, self.segmentationNode, self.labelmapNode = report, target, labelmap


#
# InstallJob
#
class InstallJob:
    """The install steps of MetaSegLib.install, run one after the other as child processes and followed like a
    segmentation (`poll()` on the main thread: a QTimer in Slicer). state: running, then done, failed or cancelled;
    `failure` says what went wrong and, offline, how to install from files fetched on another computer."""

    POLL_MS = 100

    def __init__(self, steps, python: str, onProgress=None, onFinished=None):
        self.steps = list(steps)
        self.python = python
        self.onProgress, self.onFinished = onProgress, onFinished
        self.state = "running"
        self.failure: Optional[refusals.Failure] = None
        self.index = -1
        self.process: Optional[install.PipProcess] = None
        self._timer = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def step(self):
        return self.steps[self.index] if 0 <= self.index < len(self.steps) else None

    def start(self) -> None:
        self._next()
        if qt is not None and IN_SLICER_APP and self.running:
            self._timer = qt.QTimer()
            self._timer.setInterval(self.POLL_MS)
            self._timer.connect("timeout()", self.poll)
            self._timer.start()

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.steps):
            self._end("done")
            return
        self.process = install.PipProcess(self.step, self.python)
        try:
            self.process.start()
        except ProcessError as e:
            self._end("failed", refusals.local(str(e)))
            return
        if self.onProgress is not None:
            self.onProgress(self.step, Event("install", {"what": "starting"}))

    def poll(self) -> bool:
        if not self.running or self.process is None:
            return self.running
        for event in self.process.poll():
            if self.onProgress is not None:
                self.onProgress(self.step, event)
        if self.process.finished:
            if self.process.cancelled:
                self._end("cancelled")
            elif self.process.returncode == 0:
                self._next()
            else:
                reported = self.process.failure() or {}
                requirements = [r for s in self.steps[self.index:] for r in s.requirements]
                text = _("MetaSeg could not install {what}. Most often the computer is offline or a proxy blocks the "
                         "Python package index: connect to the internet and press Segment again.").format(
                    what=self.step.what)
                self._end("failed", refusals.Failure(text + "\n\n" + install.offline_text(
                    requirements, cuda=install.has_cuda_gpu()), reported.get("details", "")))
        return self.running

    def cancel(self) -> None:
        if self.running and self.process is not None:
            self.process.cancel()

    def wait(self, timeout: Optional[float] = None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
            if IN_SLICER_APP:
                slicer.app.processEvents()
            time.sleep(0.05)
        return self.state

    def _end(self, state: str, failure: Optional[refusals.Failure] = None) -> None:
        self.state, self.failure = state, failure
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self.onFinished is not None:
            self.onFinished(self)


#
# MetaSegLogic
#
class MetaSegLogic(ScriptedLoadableModuleLogic):
    """Segment volumes with MetaSeg; usable from the Python console without the GUI."""

    def __init__(self, runRoot: Optional[str] = None) -> None:
        """:param runRoot: folder for the runs' temporary files (default: Slicer's temporary folder,
        or the system's outside Slicer)."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleDir = MODULE_DIR
        self.runRoot = Path(runRoot) if runRoot else defaultRunRoot()
        self._keptDir: Optional[Path] = None  # this session's copies of fitted networks (cross-sections)
        # Folders left by a crashed session are swept at Slicer's start-up (onStartupCompleted), not here.

    if HAVE_GUI:
        def getParameterNode(self):
            return MetaSegParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ resources
    def inputDimension(self, volumeNode) -> int:
        return paths.input_dimension(volumeNode.GetImageData().GetDimensions())

    def weightsPath(self, dims: int, labels: str = "tissues") -> Optional[Path]:
        """The shipped weights of label set `labels` for `dims`-D inputs (module resources, or the source checkout)."""
        return paths.find_weights(dims, self.moduleDir, labels)

    def samplePath(self, name: str = "ecog_slice_t1.nii.gz") -> Optional[Path]:
        return samplePath(name)

    def modelDescription(self, volumeNode, labels: str = "tissues") -> "tuple[str, bool]":
        """Text for the model label, and whether the volume can be segmented with label set `labels`."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            return _("Select an input volume."), False
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            return _("The input is a labelmap; select a grey-level MRI volume."), False
        dims = self.inputDimension(volumeNode)
        size = "×".join(str(n) for n in volumeNode.GetImageData().GetDimensions())
        weights = self.weightsPath(dims, labels)
        if weights is None:
            return _("No {dims}D {labels} model is installed for this {size} input.").format(
                dims=dims, labels=labels, size=size), False
        what = _("the 31 brain structures") if labels == "structures" else _("4 tissues")
        return (_("MetaSeg {dims}D model ({what}) for this {size} volume").format(dims=dims, what=what, size=size),
                True)

    def modelDetails(self, volumeNode, labels: str = "tissues") -> str:
        """The model's file and checksum, for the model line's details (its tooltip), not for its text."""
        if volumeNode is None or volumeNode.GetImageData() is None or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            return _("The shipped model is chosen by the input's dimension (2D slice or 3D volume) and the labels.")
        weights = self.weightsPath(self.inputDimension(volumeNode), labels)
        if weights is None:
            return _("Searched: {folders}").format(folders=", ".join(str(d) for d in paths.weights_dirs(self.moduleDir)))
        digest = paths.weights_sha256(weights)
        return _("Weights: {path}\nsha256: {sha}").format(path=weights, sha=digest or _("(no .sha256 file)"))

    # --------------------------------------------------------- dependencies
    @staticmethod
    def missingPackages() -> List[str]:
        """Requirements of the core that are missing or installed in an unsuitable version (nothing imported)."""
        return [p.requirement for p in dependencies.check()]

    def installPlan(self) -> "List[install.Step]":
        """The install steps for what is missing (MetaSegLib.install.plan: PyTorch without torchvision, a CPU build
        where there is no NVIDIA GPU); MetaSegError saying what to do when a package is there in an unsuitable
        version (e.g. a torch 1.x from another extension: it is not replaced behind the user's back)."""
        problems = dependencies.check()
        wrong = [p for p in problems if p.installed is not None]
        if wrong:
            raise MetaSegError(dependencies.describe(wrong))
        if not problems:
            return []
        have_ltt = dependencies.installed_version("light-the-torch") is not None
        return install.plan(problems, cuda=install.has_cuda_gpu(), raw_progress=install.pip_supports_raw_progress(),
                            have_light_the_torch=have_ltt)

    def startInstall(self, steps, onProgress=None, onFinished=None) -> "InstallJob":
        """Run the install steps one after the other in child processes (`PythonSlicer -m pip ...`); returns at
        once. onProgress(step, event) for each of pip's lines the panel shows; onFinished(job) at the end."""
        job = InstallJob(steps, python_executable(IN_SLICER_APP), onProgress=onProgress, onFinished=onFinished)
        job.start()
        return job

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the core needs (Slicer application only; blocks, for the Python console); True when every
        requirement is met. The panel does the same without blocking, showing the progress (startInstall)."""
        steps = self.installPlan()
        if not steps:
            return True
        if not IN_SLICER_APP:
            raise MetaSegError(dependencies.describe(dependencies.check()))
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(install.describe_plan(steps),
                                                                      windowTitle=_("MetaSeg")):
            return False
        job = self.startInstall(steps)
        job.wait()
        if job.state == "failed":
            raise MetaSegError(job.failure.text, job.failure)
        if job.state == "cancelled":
            return False
        importlib.invalidate_caches()
        problems = dependencies.check()
        if problems:
            raise MetaSegError(dependencies.describe(problems))
        return True

    # -------------------------------------------------------------- segment
    def segment(self, volumeNode, device: str = "cpu", steps: Optional[int] = None, seed: int = 0, wait: bool = True,
                labels: str = "tissues",
                outputSegmentation=None, weights: Optional[str] = None, keepLabelmap: bool = False,
                uncertainty: bool = False, surfaces: bool = False,
                brainExtraction: str = "auto", keepBrainMask: bool = False, quality: str = "fast",
                livePreview: bool = False, liveEvery: Optional[int] = None,
                onProgress: Optional[Callable[[Event], None]] = None,
                onFinished: Optional[Callable[[MetaSegJob], None]] = None,
                timeout: Optional[float] = None, brainMask=None, acceptPoorMatch: bool = False):
        """Segment `volumeNode` into one segment per label; segment IDs are the segments' names, so a
        re-run on the same input (into a new or the same output) gives the same IDs.

        :param device: "cpu", "auto" (GPU if available), "gpu", "cuda", "cuda:N", "mps".
        :param labels: "tissues" (4 classes) or "structures" (FreeSurfer aseg structures, where the core
          supports `--labels structures`). The segments' names, colours and terminology are the core's.
        :param steps: test-time fit steps; None uses the weights' own setting.
        :param wait: True: block and return the vtkMRMLSegmentationNode (raises MetaSegError on
          failure). False: return a MetaSegJob at once (`cancel()`, `wait()`, `poll()`, `state`).
        :param outputSegmentation: an existing segmentation whose segments are replaced; by
          default a new segmentation node is created. Nothing else in the scene is modified.
        :param weights: weights file; default: the shipped model for the input's dimension.
        :param keepLabelmap: also create a labelmap volume of the tissues.
        :param uncertainty: 3D inputs: also create a volume of the per-voxel entropy of the class
          probabilities (`segNode.GetNodeReference(UNCERTAINTY_REFERENCE)`).
        :param surfaces: create the segments' closed surfaces (shown in 3D views).
        :param brainExtraction: 3D: "auto" (extract the brain when the scan still has its skull; the
          report's brain_extraction says what was decided and why), "on" or "off".
        :param keepBrainMask: 3D: add the brain mask used as a hidden segment (ID and name BRAIN_MASK_SEGMENT).
        :param quality: 3D: "fast" (one fit) or "best" (3 fits averaged in probability: about 3x the
          fit time, +0.01 validation Dice); 2D slices always fit once.
        :param livePreview: show the labels as they form (every `liveEvery` steps) in a hidden node.
          Default interval: LIVE_EVERY for the input's dimension, measured to slow the fit by <= 10 %.
        :param onProgress: called with each protocol Event (stage, progress, labels, warning).
        :param onFinished: called with the job once it is done, failed or cancelled.
        :param brainMask: 3D: the brain of this scan (a labelmap volume, nonzero = brain; or a segmentation: its
          BRAIN_MASK_SEGMENT, else all of its segments), in any geometry and under any linear transform: it is
          resampled onto the input's grid. Voxels outside are ignored and no brain extraction is done.
        :param acceptPoorMatch: segment even an input refused as not matching the model (the panel's
          "Segment anyway"); the result is then likely wrong.
        A refusal raises MetaSegError (wait=True) or ends the job "failed"; its `failure` says what to do.
        """
        self._checkInput(volumeNode, outputSegmentation)
        if str(device).lower() not in DEVICES and not str(device).lower().startswith(("cuda", "mps")):
            raise MetaSegError(f"unknown device {device!r}: use auto, cpu, gpu, cuda, cuda:N or mps")
        if steps is not None and int(steps) < 1:
            raise MetaSegError(f"steps must be at least 1 (got {steps})")
        if brainExtraction not in BRAIN_EXTRACTION:
            raise MetaSegError(f"brainExtraction must be auto, on or off (got {brainExtraction!r})")
        if quality not in QUALITIES:
            raise MetaSegError(f"quality must be fast or best (got {quality!r})")
        if labels not in LABEL_SETS:
            raise MetaSegError(f"labels must be one of {', '.join(LABEL_SETS)} (got {labels!r})")
        if steps is not None and int(steps) > MAX_STEPS:
            raise MetaSegError(_("Test-time steps can be at most {n} (0 uses the number the model was trained "
                                 "with).").format(n=MAX_STEPS))
        dims = self.inputDimension(volumeNode)
        if brainMask is not None:
            self._checkBrainMask(brainMask, volumeNode, dims, brainExtraction)
        if weights is None:
            weights = self.weightsPath(dims, labels)
            if weights is None:
                searched = ", ".join(str(d) for d in paths.weights_dirs(self.moduleDir))
                raise MetaSegError(f"no {dims}D MetaSeg {labels} weights ({paths.WEIGHTS_FILES.get((labels, dims), '?')}) "
                                   f"are installed "
                                   f"(searched {searched}); pass weights=FILE")
        problems = dependencies.check()
        if problems:
            raise MetaSegError(dependencies.describe(problems) +
                               "\n(MetaSegLogic().installDependencies() or the MetaSeg module panel install what is missing.)")
        corePath = self._corePath()
        try:
            # The child gets this process's environment (as slicer.util.pip_install does) plus the core.
            process = SegmentProcess(python=python_executable(IN_SLICER_APP), weights=str(weights),
                                     device=str(device).lower(), seed=seed, steps=steps,
                                     live_every=(liveEvery or LIVE_EVERY[dims]) if livePreview else 0,
                                     save_inr=dims == 3, uncertainty=uncertainty and dims == 3,
                                     brain_extraction=brainExtraction if dims == 3 else "auto",
                                     brain_mask=keepBrainMask and dims == 3,
                                     quality=quality if dims == 3 else "fast", labels=labels,
                                     accept_poor_match=bool(acceptPoorMatch), mask=brainMask is not None,
                                     python_path=[str(corePath)], temp_root=str(self.runRoot))
        except (ProcessError, ValueError) as e:
            raise MetaSegError(str(e)) from e
        try:
            self._exportVolume(volumeNode, process.input_path)
            if brainMask is not None:
                self._exportBrainMask(brainMask, volumeNode, process.mask_path)
            process.start()
        except MetaSegError:
            process.cleanup()
            raise
        except Exception as e:
            process.cleanup()
            raise MetaSegError(f"could not start MetaSeg: {e}") from e
        job = MetaSegJob(self, volumeNode, process, outputSegmentation=outputSegmentation, keepLabelmap=keepLabelmap,
                         surfaces=surfaces,
                         livePreview=livePreview, onProgress=onProgress, onFinished=onFinished)
        if wait:
            return job.wait(timeout)
        if IN_SLICER_APP:
            job.startTimer()
        return job

    def hasFittedNetwork(self, segmentationNode) -> bool:
        """True if cross-sections can be rendered for this segmentation (a 3D result, also of a reloaded scene)."""
        if segmentationNode is None or segmentationNode.GetScene() is None:
            return False
        if FITTED_NETWORK_ATTRIBUTE in (segmentationNode.GetAttributeNames() or ()):  # not the 2 MB value itself
            return True
        return segmentationNode.GetNodeReference(FITTED_REFERENCE) is not None  # metaseg <= 0.4.0: refused on use

    def fittedNetworkPath(self, segmentationNode) -> Path:
        """The fitted network of a result as a file the child process can read (made from the segmentation's
        attribute once per session and content; MetaSegLib.fitted says why it is kept there)."""
        text = segmentationNode.GetAttribute(FITTED_NETWORK_ATTRIBUTE) if segmentationNode is not None else None
        if not text:
            if segmentationNode is not None and segmentationNode.GetNodeReference(FITTED_REFERENCE) is not None:
                raise fitted.FittedError(fitted.LEGACY_MESSAGE)
            raise MetaSegError("this segmentation has no fitted network: cross-sections need a 3D MetaSeg result")
        return fitted.materialize(text, self._keptFolder())

    def crossSection(self, segmentationNode, sliceNode, superResolution: int = 4, what: str = "labels",
                     show: bool = True, device: str = "cpu", timeout: Optional[float] = 600):
        """Render a 3D result on the plane of `sliceNode` from the fitted network, without refitting.

        The network runs in a child process (`python -m metaseg reslice`), as the segmentation does.
        The view's plane is taken from world into the result's own frame, so parent transforms of
        the segmentation are followed (linear ones; a non-linear transform is refused).

        :param superResolution: pixels per input voxel along each in-plane axis (4: a quarter voxel).
        :param what: "labels" (a labelmap volume) or "intensity" (the intensity the network reproduces).
        :return: a new one-slice volume node lying on the view's plane (axial, coronal, sagittal or oblique).
        """
        if what not in ("labels", "intensity"):
            raise MetaSegError(f"what must be 'labels' or 'intensity', got {what!r}")
        if int(superResolution) < 1:
            raise MetaSegError(f"superResolution must be at least 1 (got {superResolution})")
        if not self.hasFittedNetwork(segmentationNode):
            raise MetaSegError("this segmentation has no fitted network: cross-sections need a 3D MetaSeg result")
        try:
            fittedPath = self.fittedNetworkPath(segmentationNode)
            info = fitted.read_info(segmentationNode.GetAttribute(FITTED_INFO_ATTRIBUTE))  # from the scene: checked
        except fitted.FittedError as e:
            raise MetaSegError(f"the fitted network kept with '{segmentationNode.GetName()}' is unusable: {e}") from e
        try:
            # world -> the segmentation's frame -> the network's (the input volume's untransformed) frame
            worldToNetwork = np.array(info.get("toNetwork", np.eye(4))) @ frames.world_to_local(segmentationNode)
        except frames.FrameError as e:
            raise MetaSegError(f"cannot render a cross-section: {e}") from e
        sliceToNetwork = worldToNetwork @ frames.to_numpy(sliceNode.GetSliceToRAS())
        spacing = np.array(info.get("spacing", [1.0, 1.0, 1.0]), float)
        diagonal = float(np.linalg.norm((np.array(info.get("size", [256, 256, 256])) - 1) * spacing))
        fov = sliceNode.GetFieldOfView()
        stretch = np.linalg.norm(sliceToNetwork[:3, :2], axis=0)  # mm of the network's frame per world mm
        side = max(fov[0] * stretch[0], fov[1] * stretch[1])  # `metaseg reslice` renders a square plane
        try:
            centre, u, v, extent, step = planes.plane_from_slice(
                sliceToNetwork, (side, side), float(spacing.min()) / int(superResolution), diagonal)
            process = ResliceProcess(str(fittedPath), centre, u, v, extent[0], step,
                                     what=what, device=device, python=python_executable(IN_SLICER_APP),
                                     python_path=[str(self._corePath())], temp_root=str(self.runRoot),
                                     weights=[str(d) for d in paths.weights_dirs(self.moduleDir) if d.is_dir()])
        except (ProcessError, ValueError) as e:
            raise MetaSegError(str(e)) from e
        try:
            process.start()
            self._waitForProcess(process, timeout)
            reported = process.failure()
            if reported is not None:
                failure = refusals.explain(reported, what=_("render the cross-section"))
                raise MetaSegError(failure.text, failure)
            if segmentationNode.GetScene() is None:  # the scene was closed while the process ran
                raise MetaSegCancelled("the scene was closed: the cross-section was not added")
            node = self._loadPlane(process.output_path, segmentationNode, sliceNode, what, info,
                                   np.linalg.inv(np.array(info.get("toNetwork", np.eye(4)))))
        finally:
            process.cleanup()
        if show and IN_SLICER_APP:
            widget = views.slice_widget(layoutManager(), sliceNode.GetLayoutName())
            if widget is not None:  # a view outside the current layout: the node is made, not shown
                composite = widget.sliceLogic().GetSliceCompositeNode()
                if what == "labels":
                    composite.SetLabelVolumeID(node.GetID())
                else:
                    composite.SetForegroundVolumeID(node.GetID())
                    composite.SetForegroundOpacity(1.0)
        return node

    @staticmethod
    def _waitForProcess(process, timeout: Optional[float]) -> None:
        """Block until the process ends; in Slicer the GUI keeps processing events meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while process.returncode is None:
            process.poll()  # reads its output as it comes: a full pipe must never block the child
            if deadline is not None and time.monotonic() > deadline:
                process.cancel(grace=0.5)
                raise MetaSegError(f"the cross-section took more than {timeout} s and was cancelled")
            if IN_SLICER_APP:
                slicer.app.processEvents()
            time.sleep(0.02)
        process.wait(30.0)

    @staticmethod
    def crossSectionNode(segmentationNode, sliceNode, what: str = "labels"):
        """The volume node that holds the cross-section of `segmentationNode` rendered for the view of `sliceNode`
        (one per result, view and kind, reused by every render), or None before the first."""
        scene = segmentationNode.GetScene() if segmentationNode is not None else None
        if scene is None:
            return None
        kind = "vtkMRMLLabelMapVolumeNode" if what == "labels" else "vtkMRMLScalarVolumeNode"
        for node in scene.GetNodesByClass(kind):
            if (node.GetClassName() == kind and node.GetAttribute(CROSS_SECTION_OF) == segmentationNode.GetID()
                    and node.GetAttribute(CROSS_SECTION_VIEW) == sliceNode.GetID()):
                return node
        return None

    def _loadPlane(self, path: Path, segmentationNode, sliceNode, what: str, info: Dict[str, Any], toSegmentation):
        """The rendered plane file in a volume node in the segmentation's frame, under its transform: the node of an
        earlier render of this result, view and kind (its voxels and place replaced), else a new one."""
        private = slicer.vtkMRMLScene()
        source = private.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        storage = private.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(source):
            raise MetaSegError(f"could not read the cross-section {path}")
        scene = segmentationNode.GetScene()
        kind = "vtkMRMLLabelMapVolumeNode" if what == "labels" else "vtkMRMLScalarVolumeNode"
        node = self.crossSectionNode(segmentationNode, sliceNode, what)
        if node is None:
            node = scene.AddNewNodeByClass(kind, scene.GenerateUniqueName(
                f"{segmentationNode.GetName()} {sliceNode.GetName()} {what}"))
            node.SetAttribute(CROSS_SECTION_OF, segmentationNode.GetID())
            node.SetAttribute(CROSS_SECTION_VIEW, sliceNode.GetID())
        node.SetAndObserveImageData(source.GetImageData())
        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(frames.to_vtk(toSegmentation @ frames.to_numpy(matrix)))
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        if what == "labels":
            node.GetDisplayNode().SetAndObserveColorNodeID(self._tissueColors(scene, info.get("labels", [])).GetID())
        node.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        return node

    @staticmethod
    def _tissueColors(scene, labels: List[Dict[str, Any]]):
        """The colour table of a result's labels, as the core wrote them (one per label set and scene,
        found again by its attribute: tissues and structures results get different tables). The labels come
        from the scene: values outside 0..255 are refused before they size the table."""
        try:
            labels = fitted.label_table(labels)
        except fitted.FittedError as e:
            raise MetaSegError(str(e)) from e
        key = json.dumps([[lab["value"], lab["name"]] for lab in labels])
        tables = scene.GetNodesByClass("vtkMRMLColorTableNode")
        for i in range(tables.GetNumberOfItems()):
            node = tables.GetItemAsObject(i)
            if node.GetAttribute("MetaSeg.LabelColors") == key:
                return node
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", scene.GenerateUniqueName("MetaSeg labels"))
        table.SetTypeToUser()
        table.SetNumberOfColors(max([lab["value"] for lab in labels] + [4]) + 1)
        table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for lab in labels:
            if lab["value"] > 0:
                r, g, b = lab["color"]
                table.SetColor(lab["value"], lab["name"], r, g, b, 1.0)
        table.SetAttribute("MetaSeg.LabelColors", key)
        return table

    def _corePath(self) -> Path:
        corePath = paths.core_python_path(self.moduleDir)
        if corePath is None:
            raise MetaSegError("the MetaSeg core package (metaseg) was not found beside the module "
                               f"({', '.join(str(d) for d in paths.core_search_dirs(self.moduleDir))})")
        return corePath

    def _keptFolder(self) -> Path:
        """This session's folder for fitted networks decoded from the results' attributes (removed at exit)."""
        if self._keptDir is None or not self._keptDir.is_dir():
            self._keptDir = rundirs.make_run_dir(self.runRoot, prefix="kept-")
            _KEPT_DIRS.add(self._keptDir)
        return self._keptDir

    def _keepFitted(self, segmentationNode, source: Path, volumeNode, toNetwork: np.ndarray) -> None:
        """Keep the fitted network with the result, for cross-sections: an attribute of the segmentation node
        (written into the scene file by every Slicer's File > Save and removed with the node, see
        MetaSegLib.fitted), and what cross-sections need to know (the input's voxel size, the labels as the
        core wrote them, the segmentation-to-network matrix)."""
        try:
            text = fitted.encode(Path(source))
        except (OSError, fitted.FittedError) as e:
            raise MetaSegError(f"could not keep the fitted network: {e}") from e
        self._removeLegacyNetwork(segmentationNode)
        segmentationNode.SetAttribute(FITTED_NETWORK_ATTRIBUTE, text)
        segmentation = segmentationNode.GetSegmentation()
        labels = []
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            if segmentation.GetNthSegmentID(i) == BRAIN_MASK_SEGMENT:
                continue
            labels.append({"value": segment.GetLabelValue(), "name": segment.GetName(), "color": list(segment.GetColor())})
        info = {"spacing": list(volumeNode.GetSpacing()), "size": list(volumeNode.GetImageData().GetDimensions()),
                "toNetwork": np.asarray(toNetwork).tolist(), "labels": labels}
        segmentationNode.SetAttribute(FITTED_INFO_ATTRIBUTE, json.dumps(info))
        segmentationNode.SetAttribute(CROSS_SECTIONS_ATTRIBUTE, "1")

    @staticmethod
    def _removeLegacyNetwork(segmentationNode) -> None:
        """Remove the text node in which metaseg <= 0.4.0 kept a result's network (a pickle), and its reference."""
        textNode = segmentationNode.GetNodeReference(FITTED_REFERENCE)
        segmentationNode.RemoveNodeReferenceIDs(FITTED_REFERENCE)
        scene = segmentationNode.GetScene()
        if textNode is not None and scene is not None and textNode.IsA("vtkMRMLTextNode"):
            scene.RemoveNode(textNode)

    @staticmethod
    def _checkInput(volumeNode, outputSegmentation) -> None:
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise MetaSegError("the input must be a scalar volume node")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise MetaSegError(f"the input '{volumeNode.GetName()}' is a labelmap; select a grey-level MRI volume")
        image = volumeNode.GetImageData()
        if image is None:
            raise MetaSegError(f"the volume '{volumeNode.GetName()}' has no image data")
        if image.GetNumberOfScalarComponents() != 1:
            raise MetaSegError(f"the volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} "
                               "components per voxel; MetaSeg needs a grey-level (scalar) MRI")
        if volumeNode.GetScene() is None:
            raise MetaSegError("the input volume is not in a scene")
        if outputSegmentation is not None:
            if not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
                raise MetaSegError("outputSegmentation must be a segmentation node")
            if outputSegmentation.GetScene() is not volumeNode.GetScene():
                raise MetaSegError("outputSegmentation is not in the input volume's scene")
            try:  # the result is brought into the output's frame: only linear transforms can be followed
                frames.between(volumeNode, outputSegmentation)
            except frames.FrameError as e:
                raise MetaSegError(f"cannot place the result in '{outputSegmentation.GetName()}': {e}") from e

    @staticmethod
    def _checkBrainMask(maskNode, volumeNode, dims: int, brainExtraction: str) -> None:
        """A brain mask the run can use, or MetaSegError in the panel's words."""
        if not (maskNode.IsA("vtkMRMLLabelMapVolumeNode") or maskNode.IsA("vtkMRMLSegmentationNode")):
            raise MetaSegError(_("The brain mask must be a labelmap volume or a segmentation."))
        if maskNode.GetScene() is not volumeNode.GetScene():
            raise MetaSegError(_("The brain mask is not in the input volume's scene."))
        if dims != 3:
            raise MetaSegError(refusals.explain({"reason": "needs_3d", "facts": {"option": "--mask"}}).text)
        if brainExtraction == "on":
            raise MetaSegError(refusals.explain({"reason": "mask_and_extraction"}).text)
        if maskNode.IsA("vtkMRMLSegmentationNode") and maskNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise MetaSegError(_("The brain mask '{name}' has no segment.").format(name=maskNode.GetName()))
        if maskNode.IsA("vtkMRMLLabelMapVolumeNode") and maskNode.GetImageData() is None:
            raise MetaSegError(_("The brain mask '{name}' has no image data.").format(name=maskNode.GetName()))
        try:
            frames.between(maskNode, volumeNode)
        except frames.FrameError as e:
            raise MetaSegError(_("The brain mask cannot be placed on the input volume: {error}").format(error=e)) from e

    @staticmethod
    def _exportBrainMask(maskNode, volumeNode, path: Path) -> None:
        """Write the brain mask onto the input volume's own grid (its voxels, in its untransformed frame: where the
        exported input lies) as a labelmap file, nonzero = brain. A labelmap volume counts where it is nonzero; a
        segmentation by its BRAIN_MASK_SEGMENT (a MetaSeg result's kept mask) or else all of its segments. Done in
        a private scene: the user's nodes are only read."""
        private = slicer.vtkMRMLScene()
        work = private.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation = work.GetSegmentation()
        labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        if maskNode.IsA("vtkMRMLSegmentationNode"):
            source = maskNode.GetSegmentation()
            segmentation.DeepCopy(source)
            keep = [BRAIN_MASK_SEGMENT] if source.GetSegment(BRAIN_MASK_SEGMENT) is not None else \
                list(source.GetSegmentIDs())
            for segmentId in list(segmentation.GetSegmentIDs()):
                if segmentId not in keep:
                    segmentation.RemoveSegment(segmentId)
            if not work.CreateBinaryLabelmapRepresentation():
                raise MetaSegError(_("The brain mask '{name}' cannot be turned into voxels.").format(
                    name=maskNode.GetName()))
            work.SetSourceRepresentationToBinaryLabelmap()
            toVolume = frames.between(maskNode, volumeNode)
        else:
            # the labelmap's voxels in world coordinates (its parent transform applied), as 0/1
            image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(maskNode)
            scalars = image.GetPointData().GetScalars()
            inside = (vtk.util.numpy_support.vtk_to_numpy(scalars) > 0).astype(np.uint8)
            image.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(
                inside, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
            segment = slicer.vtkSegment()
            segment.SetName("brain")
            segment.AddRepresentation(labelmapName, image)
            segmentation.AddSegment(segment, "brain")
            toVolume = frames.world_to_local(volumeNode)
        if not np.allclose(toVolume, np.eye(4)):
            transform = vtk.vtkTransform()
            transform.SetMatrix(frames.to_vtk(toVolume))
            segmentation.ApplyLinearTransform(transform)
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)  # the input's own grid, without its parent transform
        converter = slicer.vtkSegmentationConverter
        segmentation.SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                            converter.SerializeImageGeometry(ijkToRas, volumeNode.GetImageData()))
        labelmap = private.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
                work, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise MetaSegError(_("The brain mask '{name}' could not be placed on the input's grid.").format(
                name=maskNode.GetName()))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)
        if not storage.WriteData(labelmap) or not Path(path).is_file():
            raise MetaSegError(f"could not write the brain mask to {path}")

    # ----------------------------------------------------------- MRML glue
    @staticmethod
    def _exportVolume(volumeNode, path: Path) -> None:
        """Write the volume's voxels and geometry (without parent transforms) to a file.

        A storage node of our own, outside the scene: the user's node, its storage node and
        its file name are left as they are.
        """
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)
        if not storage.WriteData(volumeNode) or not Path(path).is_file():
            raise MetaSegError(f"could not write the input volume to {path}")

    @staticmethod
    def _readSegmentationFile(path: str):
        """(private scene, segmentation node) read from a .seg.nrrd; the user's scene is untouched.

        Not `slicer.util.loadSegmentation`: that would add a node whose storage node points at
        our temporary file, which is deleted after the run, and mark it as saved.
        """
        scene = slicer.vtkMRMLScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(path)
        if not storage.ReadData(node) or node.GetSegmentation().GetNumberOfSegments() == 0:
            raise MetaSegError(f"could not read the segmentation {path}")
        return scene, node  # the caller keeps the scene alive while it uses the node

    @staticmethod
    def _createSegmentationNode(scene, volumeNode, hidden: bool):
        name = scene.GenerateUniqueName(f"{volumeNode.GetName()} MetaSeg")
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.SetHideFromEditors(hidden)
        node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())  # first: the geometry is taken relative to it
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return node

    @staticmethod
    def _placeBesideVolume(node, volumeNode) -> None:
        """Put `node` in the subject hierarchy folder (study) of the input volume."""
        scene = volumeNode.GetScene()
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if sh is None:
            return
        volumeItem = sh.GetItemByDataNode(volumeNode)
        parent = sh.GetItemParent(volumeItem) if volumeItem else sh.GetSceneItemID()
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)

    def _loadUncertainty(self, path: Path, volumeNode):
        """The run's entropy map as a new scalar volume beside the input (no storage node: the file is temporary)."""
        private = slicer.vtkMRMLScene()
        source = private.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        storage = private.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(source):
            raise MetaSegError(f"could not read the uncertainty map {path}")
        scene = volumeNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{volumeNode.GetName()} MetaSeg uncertainty"))
        node.SetAndObserveImageData(source.GetImageData())
        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        self._placeBesideVolume(node, volumeNode)
        return node

    @staticmethod
    def _addBrainMaskSegment(segmentationNode, path: Path) -> None:
        """The run's brain mask as one more segment (ID and name BRAIN_MASK_SEGMENT) of the result read
        from the core's file; it is hidden once in the output, where the labels stay what is shown."""
        private = slicer.vtkMRMLScene()
        mask = private.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        storage = private.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(mask):
            raise MetaSegError(f"could not read the brain mask {path}")
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(mask)
        segment = slicer.vtkSegment()
        segment.SetName(BRAIN_MASK_SEGMENT)
        segment.SetColor(0.9, 0.9, 0.5)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveSegment(BRAIN_MASK_SEGMENT)
        segmentation.AddSegment(segment, BRAIN_MASK_SEGMENT)

    def _exportLabelmap(self, segmentationNode, volumeNode):
        """A labelmap volume of the segments on the input's exact grid (values 1..N in segment order)."""
        scene = volumeNode.GetScene()
        name = scene.GenerateUniqueName(f"{volumeNode.GetName()} MetaSeg labels")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
                segmentationNode, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            self._removeNode(labelmap)
            raise MetaSegError("could not export the segmentation to a labelmap volume")
        self._placeBesideVolume(labelmap, volumeNode)
        return labelmap

    @staticmethod
    def _removeNode(node) -> None:
        """Remove a node with its display and storage nodes (MRML keeps those otherwise)."""
        scene = node.GetScene()
        if scene is None:
            return
        dependents = []
        if node.IsA("vtkMRMLDisplayableNode"):
            dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene.GetFirstNodeByClass(
            "vtkMRMLSubjectHierarchyNode") else None
        if sh is not None and sh.GetItemByDataNode(node):
            sh.RemoveItem(sh.GetItemByDataNode(node), False, False)
        scene.RemoveNode(node)
        for d in dependents:
            if d is not None and d.GetScene() is scene:
                scene.RemoveNode(d)


#
# MetaSegTest
#
class MetaSegTest(ScriptedLoadableModuleTest):
    """The module's scenarios inside Slicer: "Reload and Test" in the module panel, ctest
    (slicer_add_python_unittest in CMakeLists.txt), or
      Slicer --no-splash --testing --python-code "import slicer.testing; slicer.testing.runUnitTest(['<folder of MetaSeg.py>'], 'MetaSeg')"
    The samples come through Sample Data, as a user gets them. No path needs a main window
    (`--no-main-window`): slice nodes are made in the scene, views are used only when present.
    The same scenarios, and more, run outside Slicer with slicer-core in Testing/slicer/.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        for test in (self.test_segment_sample, self.test_cancel_leaves_scene_unchanged,
                     self.test_bad_weights_is_an_error, self.test_cross_section_of_3d_sample):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(f"{test.__name__} skipped: {e}")

    def _loadSample(self, sampleName: str = "MetaSegSlice"):
        import SampleData

        registerSampleData()
        volume = SampleData.downloadSample(sampleName)
        self.assertIsNotNone(volume, f"the sample {sampleName} is not installed (Resources/Sample)")
        return MetaSegLogic(), volume

    def _weightsOrSkip(self, logic, dims: int = 2):
        if logic.weightsPath(dims) is None:
            self.skipTest(f"no shipped {dims}D weights (Resources/Weights)")
        if logic.missingPackages():
            self.skipTest("missing Python packages: " + ", ".join(logic.missingPackages()))

    def test_segment_sample(self):
        self.delayDisplay("MetaSeg: segment the sample slice")
        logic, volume = self._loadSample("MetaSegSlice")
        self._weightsOrSkip(logic)
        events = []
        segmentation = logic.segment(volume, device="cpu", steps=3, seed=0, onProgress=events.append)
        self.assertTrue(any(e.kind == "progress" for e in events))
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 4)
        report = json.loads(segmentation.GetAttribute(REPORT_ATTRIBUTE))
        names = [c["name"] for c in report["classes"] if c["value"] != 0]
        segments = [segmentation.GetSegmentation().GetNthSegment(i) for i in range(4)]
        self.assertEqual([s.GetName() for s in segments], names)
        self.assertEqual(list(segmentation.GetSegmentation().GetSegmentIDs()), names)  # stable IDs: the names
        self.assertEqual(len({tuple(round(c, 3) for c in s.GetColor()) for s in segments}), 4)
        for s in segments:
            tag = vtk.reference("")
            self.assertTrue(s.GetTag(s.GetTerminologyEntryTagName(), tag) and str(tag))
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        converter = slicer.vtkSegmentationConverter
        self.assertEqual(segmentation.GetSegmentation().GetConversionParameter(
            converter.GetReferenceImageGeometryParameterName()),
            converter.SerializeImageGeometry(ijkToRas, volume.GetImageData()))
        self.delayDisplay("MetaSeg: sample segmented")

    def test_cancel_leaves_scene_unchanged(self):
        self.delayDisplay("MetaSeg: cancel a run")
        logic, volume = self._loadSample("MetaSegSlice")
        self._weightsOrSkip(logic)
        before = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.segment(volume, device="cpu", steps=200, wait=False, livePreview=True)
        started = time.monotonic()
        while job.running and job._previewNode is None and time.monotonic() - started < 120:
            slicer.app.processEvents()
            job.poll()
            time.sleep(0.05)
        job.cancel()
        with self.assertRaises(MetaSegCancelled):
            job.wait(60)
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertFalse(job.process.workdir.exists())

    def test_bad_weights_is_an_error(self):
        self.delayDisplay("MetaSeg: a bogus weights file is a clear error")
        logic, volume = self._loadSample("MetaSegSlice")
        if logic.missingPackages():
            self.skipTest("missing Python packages")
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(MetaSegError) as ctx:
            logic.segment(volume, device="cpu", steps=1, weights="/nonexistent/metaseg.pt", timeout=120)
        self.assertIn("weights", str(ctx.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_cross_section_of_3d_sample(self):
        self.delayDisplay("MetaSeg: whole-head sample, then labels on an oblique plane at 4x")
        logic, volume = self._loadSample("MetaSegHead")
        self._weightsOrSkip(logic, 3)
        segmentation = logic.segment(volume, device="cpu", steps=5)
        self.assertTrue(logic.hasFittedNetwork(segmentation))
        # a slice node of our own: a coronal plane through the volume's centre, tilted by 20 degrees
        sliceNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode", "MetaSegTestSlice")
        sliceNode.SetLayoutName("MetaSegTestSlice")
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        coronal = vtk.vtkMatrix4x4()
        for i, row in enumerate(((-1, 0, 0), (0, 0, 1), (0, 1, 0))):
            for j in range(3):
                coronal.SetElement(i, j, row[j])
            coronal.SetElement(i, 3, (bounds[2 * i] + bounds[2 * i + 1]) / 2)
        tilt = vtk.vtkTransform()
        tilt.RotateX(20)
        oblique = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(coronal, tilt.GetMatrix(), oblique)
        sliceNode.GetSliceToRAS().DeepCopy(oblique)
        sliceNode.SetFieldOfView(160.0, 160.0, 1.0)
        sliceNode.UpdateMatrices()
        before = slicer.mrmlScene.GetNumberOfNodes()
        node = logic.crossSection(segmentation, sliceNode, superResolution=4)
        self.assertTrue(node.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertAlmostEqual(node.GetSpacing()[0], volume.GetSpacing()[0] / 4, places=4)
        labels = slicer.util.arrayFromVolume(node)
        self.assertTrue((labels == 3).any(), "no white matter on the plane")
