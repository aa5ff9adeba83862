"""Runs from the panel as a user meets them (issue 25, sections 3 and 4), on the harness of slicer_gui.py.

Real: Qt widgets (PySide6, offscreen), Slicer's MRML and slicer.util (slicer-core), the core in a child
process started through a PythonSlicer launcher that behaves as CTK's does (a launcher process running the
interpreter as its child). Not in testing mode unless a test says so: dialogs are shown as in a user's Slicer
(`main_window=True`), through the ctkMessageBox stand-in that records them and presses the button the test
names. The event loop is all that runs while a run goes on (`Panel.pump`: processEvents, sleep).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mrml_helpers import ROOT, SAMPLE_T1, SAMPLE_T1_3D
from slicer_gui import Panel, qt_unavailable_reason

pytestmark = pytest.mark.usefixtures("slicer_core")
REASON = qt_unavailable_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

from MetaSegLib.refusals import CLI_OPTION  # noqa: E402

WEIGHTS_3D = ROOT / "Resources" / "Weights" / "metaseg3d.pt"


def volume_from(scene, path, name, change):
    """A scalar volume node read from `path` whose voxels are then replaced by `change(voxels)` (the node's own
    array, (k, j, i) as Slicer read it), geometry kept."""
    import slicer

    node = add_volume(scene, path, name)
    voxels = slicer.util.arrayFromVolume(node).astype(np.float32)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(change(voxels)))
    return node


def add_volume(scene, path, name):
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def visible_segmentations(scene):
    return [n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode") if not n.GetHideFromEditors()]


def record_progress(widget):
    """The kinds of the events the panel receives (wrapped before the click, which binds the callback)."""
    kinds = []
    original = widget.onJobProgress

    def recorded(event):
        kinds.append(event.kind)
        original(event)

    widget.onJobProgress = recorded
    return kinds


@pytest.mark.skipif(not WEIGHTS_3D.is_file(), reason="no shipped 3D weights")
def test_an_inverted_scan_is_refused_in_the_panels_words_and_segment_anyway_works(scene, tmp_path):
    """Acceptance: a T2-like (inverted-contrast) scan, default settings. The dialog says what is wrong in words a
    clinician reads, the core's own message (with its command-line advice) is behind Show Details, and the
    panel's Segment anyway segments it."""
    import json

    with Panel(tmp_path, scene, main_window=True) as panel:
        ui, widget = panel.ui, panel.widget
        volume = volume_from(scene, SAMPLE_T1_3D, "t2like", lambda a: np.where(a > 0, a.max() + 1 - a, 0))
        ui.inputSelector.setCurrentNode(volume)
        ui.stepsSpinBox.value = 3  # the refusal and the path through the panel are tested, not the labels
        assert ui.segmentAnywayButton.isHidden()
        panel.answers.append("Close")
        ui.segmentButton.click()
        panel.pump(lambda: widget._job is None, timeout=1500, what="the refusal")
        assert len(panel.message_boxes) == 1
        box = panel.message_boxes[0]
        assert "inverted" in box["text"] and "T1-weighted" in box["text"] and "Nothing was segmented" in box["text"]
        assert not CLI_OPTION.search(box["text"]), box["text"]
        assert box["buttons"] == ["Segment anyway", "Close", "Show Details..."] and box["pressed"] == "Close"
        assert "--accept-poor-match" in box["details"] and "T2-weighted" in box["details"]  # the core's words
        assert ui.statusLabel.text == box["text"] and visible_segmentations(scene) == []
        assert not ui.segmentAnywayButton.isHidden() and ui.segmentAnywayButton.enabled

        ui.segmentAnywayButton.click()
        assert ui.segmentAnywayButton.isHidden() and ui.segmentButton.text == "Cancel"
        panel.pump(lambda: widget._job is None, timeout=1500, what="the run segmented anyway")
        assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
        results = visible_segmentations(scene)
        assert len(results) == 1 and results[0].GetSegmentation().GetNumberOfSegments() == 4
        report = json.loads(results[0].GetAttribute("MetaSeg.Report"))
        poor = [w for w in report["warnings"] if "matches the model's template poorly" in w]
        assert poor and "inverted" in poor[0] and not CLI_OPTION.search(" ".join(report["warnings"]))
        assert not CLI_OPTION.search(ui.reportText.plainText)
        assert len(panel.message_boxes) == 1  # the successful run showed no dialog


def sagittal_slice(slice_array):
    """A sagittal plane of the 3D sample where the 2D model expects the coronal slice: `slice_array` (the 2D
    sample's own voxels, 1 x 192 x 160) replaced by the 3D sample's middle sagittal plane, cropped to that size."""
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1_3D)))  # LIA voxels: array (A, I, L)
    sag = vol[:, :, vol.shape[2] // 2].T  # (I, A): a sagittal plane
    h, w = slice_array.shape[-2:]
    r, c = (sag.shape[0] - h) // 2, (sag.shape[1] - w) // 2
    return np.ascontiguousarray(sag[r: r + h, c: c + w]).reshape(slice_array.shape).astype(np.float32)


def test_the_dialogs_segment_anyway_segments_a_refused_slice(scene, tmp_path):
    """A sagittal slice where the 2D model takes an aligned coronal one: refused, and the dialog's own Segment
    anyway button starts the run at once."""
    with Panel(tmp_path, scene, main_window=True) as panel:
        ui, widget = panel.ui, panel.widget
        volume = volume_from(scene, SAMPLE_T1, "sagittal", sagittal_slice)
        ui.inputSelector.setCurrentNode(volume)
        ui.stepsSpinBox.value = 3
        panel.answers.append("Segment anyway")
        ui.segmentButton.click()
        panel.pump(lambda: ui.statusLabel.text.startswith("Done in") or (widget._job is None and not panel.answers
                                                                         and ui.statusLabel.text.startswith("Fail")),
                   timeout=600, what="the refusal and the run segmented anyway")
        assert [b["pressed"] for b in panel.message_boxes] == ["Segment anyway"]
        assert "coronal brain slice" in panel.message_boxes[0]["text"]
        assert not CLI_OPTION.search(panel.message_boxes[0]["text"])
        assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
        assert len(visible_segmentations(scene)) == 1
        assert "does not look like an aligned coronal" in ui.reportText.plainText
        assert not CLI_OPTION.search(ui.reportText.plainText), ui.reportText.plainText


def test_progress_arrives_while_only_the_event_loop_runs_and_no_thread_is_started(scene, tmp_path, monkeypatch):
    """Acceptance: no reader thread. Any Python thread started during the run fails the test; the job's QTimer,
    run by the event loop, is all that reads the child's output (progress and live-preview snapshots)."""
    started = []

    def no_threads(self):
        started.append(self.name)
        raise AssertionError(f"a Python thread was started: {self.name}")

    with Panel(tmp_path, scene, testing=True) as panel:
        ui, widget = panel.ui, panel.widget
        ui.inputSelector.setCurrentNode(add_volume(scene, SAMPLE_T1, "slice"))
        ui.stepsSpinBox.value = 40
        ui.livePreviewCheckBox.checked = True  # snapshots every 10 steps, decoded on the timer too
        kinds = record_progress(widget)
        threads_before = threading.active_count()
        monkeypatch.setattr(threading.Thread, "start", no_threads)
        ui.segmentButton.click()
        values = []
        panel.pump(lambda: (values.append(ui.progressBar.value), widget._job is None)[1], timeout=600,
                   what="the segmentation")
        monkeypatch.undo()
        assert started == [] and threading.active_count() == threads_before
        assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
        assert kinds.count("progress") >= 4 and kinds.count("labels") >= 2, kinds
        assert len(set(values)) >= 3  # the bar moved while the fit ran


def _group_members(pgid: int):
    """The processes of a process group (Linux: /proc/PID/stat's 5th field), zombies left out."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process groups from /proc")
def test_cancel_mid_fit_stops_the_interpreter_behind_the_launcher(scene, tmp_path):
    """The child as the module starts it in Slicer: PythonSlicer (here the launcher stand-in: a process that runs
    the interpreter as its child and forwards no signal), found on PATH. Cancel during the fit ends both, leaves
    the scene as it was and removes the run folder."""
    import slicer

    with Panel(tmp_path, scene) as panel:
        ui, widget = panel.ui, panel.widget
        ui.inputSelector.setCurrentNode(add_volume(scene, SAMPLE_T1, "slice"))
        ui.stepsSpinBox.value = 5000  # minutes of fitting: the cancel comes in the middle
        nodes_before = scene.GetNumberOfNodes()
        kinds = record_progress(widget)
        ui.segmentButton.click()
        job = widget._job
        assert job.process.args[0] == str(panel.launcher) and slicer.app.testingEnabled() is False
        panel.pump(lambda: "progress" in kinds, timeout=600, what="the first fit step")
        group = _group_members(job.process.pid)
        assert job.process.pid in group and len(group) >= 2, group  # the launcher and the interpreter it started
        ui.segmentButton.click()  # Cancel
        t0 = time.monotonic()
        panel.pump(lambda: widget._job is None, timeout=60, what="the cancel")
        assert time.monotonic() - t0 < 30
        assert job.state == "cancelled" and ui.statusLabel.text == "Cancelled: the scene is unchanged."
        deadline = time.monotonic() + 10
        while _group_members(job.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _group_members(job.process.pid) == [], "a process of the run survived the cancel"
        assert not job.process.workdir.exists()
        assert scene.GetNumberOfNodes() == nodes_before and panel.message_boxes == []


def test_a_failure_dialog_shows_the_message_with_the_traceback_behind_details(scene, tmp_path):
    """A fault of the core itself (here: a core whose segment raises): the dialog says so in words, and the
    child's traceback is in the details, not in the message."""
    import shutil

    # a copy of the core whose Segmenter.run raises: the child's own traceback must end up under "details"
    bad_core = tmp_path / "badcore"
    shutil.copytree(ROOT / "MetaSegCore" / "metaseg", bad_core / "metaseg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    segmenter = bad_core / "metaseg" / "segmenter.py"
    text = segmenter.read_text(encoding="utf-8")
    marker = "        with self._lock:\n            t_start = time.perf_counter() if started is None else started\n"
    assert marker in text
    segmenter.write_text(text.replace(marker, "        raise RuntimeError('a fault planted by the test')\n" + marker),
                         encoding="utf-8")
    with Panel(tmp_path, scene, main_window=True) as panel:
        ui, widget = panel.ui, panel.widget
        widget.logic._corePath = lambda: bad_core
        ui.inputSelector.setCurrentNode(add_volume(scene, SAMPLE_T1, "slice"))
        ui.stepsSpinBox.value = 2
        ui.segmentButton.click()
        panel.pump(lambda: widget._job is None, timeout=300, what="the failed run")
        [box] = panel.message_boxes
        assert "internal error" in box["text"] and "Traceback" not in box["text"]
        assert "Traceback (most recent call last)" in box["details"] and "a fault planted by the test" in box["details"]
        assert box["buttons"] == ["Close", "Show Details..."]  # Qt adds that button for the detailed text
        assert "Traceback" not in ui.statusLabel.text + ui.reportText.plainText
        assert visible_segmentations(scene) == []
