"""What the module leaves behind and what it checks before a run (issue 14, points 3, 4, 9, 10).

Real child processes, real MRML (slicer-core), real package metadata. The crash case runs in a
separate Python that is killed (os._exit) mid-run, as a crashed or force-closed Slicer would be.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mrml_helpers import MODULE_DIR, SAMPLE_T1, load_volume

pytestmark = pytest.mark.usefixtures("slicer_core")

ABANDON = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
    import slicer, MetaSeg
    from mrml_helpers import SAMPLE_T1, load_volume
    scene = slicer.vtkMRMLScene(); slicer.mrmlScene = scene
    keep = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkMRMLColorLogic()]
    for k in keep:
        k.SetMRMLScene(scene)
    volume = load_volume(scene, SAMPLE_T1)
    job = MetaSeg.MetaSegLogic(runRoot=sys.argv[3]).segment(volume, device="cpu", steps=400, weights=sys.argv[4],
                                                            wait=False, livePreview=True)
    while not any(e.kind == "progress" for e in job.process.poll()):
        time.sleep(0.05)
    print(job.process.workdir, flush=True)
    job.cancel()  # cancelled, then abandoned: nothing polls the job again
    if sys.argv[5] == "crash":
        os._exit(0)  # no clean-up at all, as when Slicer crashes or is killed
    sys.exit(0)  # a normal exit mid-run (closing Slicer)
""")


@pytest.mark.parametrize("ending", ["crash", "exit"])
def test_abandoned_run_leaves_no_patient_data(ending, tmp_path, any_weights, MetaSeg):
    root = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-c", ABANDON, str(MODULE_DIR), str(MODULE_DIR.parent / "Testing" / "slicer"),
                          str(root), str(any_weights), ending], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    workdir = out.stdout.strip().splitlines()[-1]
    if ending == "exit":
        assert not os.path.exists(workdir), "a normal exit left the run folder behind"
        assert [p.name for p in root.iterdir()] == []
        return
    assert os.path.exists(os.path.join(workdir, "input.nrrd")), "the crash should have left the input behind"
    MetaSeg.sweepStaleRuns(str(root))  # the next session's start-up (startupCompleted) sweeps it
    assert list(root.iterdir()) == []


def test_sweep_keeps_folders_of_a_running_session(tmp_path, MetaSeg):
    from MetaSegLib import rundirs

    mine = rundirs.make_run_dir(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = rundirs.make_run_dir(tmp_path)
        (theirs / rundirs.OWNER_FILE).write_text(str(other.pid))
        assert rundirs.sweep_stale(tmp_path) == []
        assert mine.is_dir() and theirs.is_dir()
    finally:
        other.kill()
        other.wait()
    assert rundirs.sweep_stale(tmp_path) == [theirs]


def test_sweep_takes_a_reused_process_id_for_what_it_is(tmp_path, MetaSeg):
    """A crashed session's folder whose process id now belongs to another process (ids are reused): the start time
    in the owner mark tells them apart, and the folder is swept. The mark of the running process itself holds."""
    from MetaSegLib import rundirs

    mine = rundirs.make_run_dir(tmp_path)
    pid, started = rundirs.owner_mark(mine)
    assert pid == os.getpid() and (started is not None or sys.platform == "win32")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while rundirs.process_start_time(other.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        crashed = rundirs.make_run_dir(tmp_path)  # a crashed session's, whose id `other` has been given since
        (crashed / rundirs.OWNER_FILE).write_text(f"{other.pid} {rundirs.process_start_time(other.pid)}x")
        alive = rundirs.make_run_dir(tmp_path)  # the same id with its true start time: a running session
        (alive / rundirs.OWNER_FILE).write_text(f"{other.pid} {rundirs.process_start_time(other.pid)}")
        old = rundirs.make_run_dir(tmp_path)  # a mark of the previous format (id only): judged by the id alone
        (old / rundirs.OWNER_FILE).write_text(str(other.pid))
        assert rundirs.sweep_stale(tmp_path) == [crashed]
        assert mine.is_dir() and alive.is_dir() and old.is_dir()
    finally:
        other.kill()
        other.wait()


@pytest.fixture
def MetaSeg(slicer_core):
    import MetaSeg as module

    return module


def plant(folder, name, version):
    """An installed distribution's metadata, as another extension's pip install leaves it."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_dependency_versions_are_checked(tmp_path, MetaSeg):
    from MetaSegLib import dependencies

    plant(tmp_path, "torch", "1.13.1")
    plant(tmp_path, "numpy", "1.26.4")
    plant(tmp_path, "SimpleITK", "2.3.1")
    plant(tmp_path, "deepbet", "1.0.1")
    problems = dependencies.check(path=[str(tmp_path)])
    assert [(p.name, p.installed) for p in problems] == [("torch", "1.13.1"), ("slicerio", None), ("safetensors", None),
                                                         ("deepbet", "1.0.1")]
    text = dependencies.describe(problems)
    assert "PyTorch 1.13.1 is installed, but MetaSeg needs torch>=2.0" in text and "PyTorch Utils" in text
    assert "restart Slicer" in text and 'pip_install("deepbet==1.0.2")' in text
    # written for a GUI user: what is missing, what pressing Segment does; no pip command line, no "metaseg[brain]"
    missing = dependencies.describe([dependencies.Problem("deepbet==1.0.2", None)])
    assert "finds the brain in a whole-head scan" in missing and "press Segment" in missing
    assert "metaseg[brain]" not in text + missing and "pip install" not in missing
    from MetaSegLib import refusals

    core = refusals.explain({"message": 'needs deepbet: pip install "metaseg[brain]"', "reason": "needs_deepbet"})
    assert "metaseg[brain]" not in core.text and "Brain extraction to off" in core.text
    plant(tmp_path / "cuda", "torch", "2.5.1+cu121")  # a local version label is fine
    assert dependencies.check(["torch>=2.0"], path=[str(tmp_path / "cuda")]) == []
    assert dependencies.check(path=None) == []  # this environment meets them all


def test_requirements_equal_the_cores(MetaSeg):
    import re

    from MetaSegLib import dependencies

    text = (MODULE_DIR.parent / "MetaSegCore" / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    brain = re.search(r"^brain = \[(.*?)\]", text, re.S | re.M).group(1)
    assert sorted(re.findall(r'"([^"]+)"', block)) == sorted(dependencies.CORE)
    assert sorted(re.findall(r'"([^"]+)"', brain)) == sorted(dependencies.BRAIN)  # deepbet: whole heads
    assert dependencies.REQUIREMENTS == dependencies.CORE + dependencies.BRAIN


def test_replacing_an_existing_segmentation_changes_only_its_segments(scene, any_weights, MetaSeg):
    """Issue 14, point 9: the output keeps its transform, reference geometry and display; its new
    segments lie where those of a new segmentation do, in world coordinates."""
    import slicer
    import vtk

    volume = load_volume(scene, SAMPLE_T1)
    tv = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "volume moved")
    m = vtk.vtkTransform()
    m.Translate(5.0, -3.0, 2.0)
    m.RotateZ(10.0)
    tv.SetMatrixTransformToParent(m.GetMatrix())
    volume.SetAndObserveTransformNodeID(tv.GetID())
    ts = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "segmentation moved")
    n = vtk.vtkTransform()
    n.Translate(-20.0, 4.0, 0.0)
    n.RotateX(25.0)
    ts.SetMatrixTransformToParent(n.GetMatrix())
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    existing.CreateDefaultDisplayNodes()
    existing.SetAndObserveTransformNodeID(ts.GetID())
    geometry = "1;0;0;0;0;1;0;0;0;0;1;0;0;0;0;1;0;9;0;9;0;9;"
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    existing.GetSegmentation().SetConversionParameter(name, geometry)
    existing.GetSegmentation().AddEmptySegment("tumour", "tumour", [1.0, 0.0, 0.0])
    displays = existing.GetNumberOfDisplayNodes()

    logic = MetaSeg.MetaSegLogic()
    new = logic.segment(volume, device="cpu", steps=1, weights=str(any_weights), timeout=180)
    logic.segment(volume, device="cpu", steps=1, weights=str(any_weights), outputSegmentation=existing, timeout=180)
    assert existing.GetTransformNodeID() == ts.GetID()
    assert existing.GetSegmentation().GetConversionParameter(name) == geometry
    assert existing.GetNumberOfDisplayNodes() == displays
    assert existing.GetSegmentation().GetNumberOfSegments() == 4

    def world(node):
        image = slicer.vtkOrientedImageData()
        node.GetBinaryLabelmapRepresentation(node.GetSegmentation().GetNthSegmentID(0), image)
        local = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(local)
        return MetaSeg.frames.local_to_world(node) @ MetaSeg.frames.to_numpy(local), image.GetDimensions()

    (a, da), (b, db) = world(new), world(existing)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert da == db


def test_a_job_detached_by_reload_never_calls_back(tmp_path, any_weights, scene, MetaSeg):
    """Issue 14, point 10: cleanup()/onReload() detach the job from the widget before cancelling it;
    the job still ends (and removes its folder) but calls nothing of the destroyed widget."""
    volume = load_volume(scene, SAMPLE_T1)
    calls = []
    job = MetaSeg.MetaSegLogic(runRoot=str(tmp_path)).segment(
        volume, device="cpu", steps=400, weights=str(any_weights), wait=False,
        onProgress=calls.append, onFinished=calls.append)
    widget = object.__new__(MetaSeg.MetaSegWidget)  # no Qt here: only the job handling is exercised
    widget._job, widget._install = job, None
    while not calls:
        job.poll()
        time.sleep(0.02)
    calls.clear()
    widget._stopJob()
    assert widget._job is None
    with pytest.raises(MetaSeg.MetaSegCancelled):
        job.wait(timeout=60)
    assert calls == [] and job.state == "cancelled"
    assert list(tmp_path.iterdir()) == []


def test_reload_reloads_metaseglib():
    """Slicer's Reload re-executes MetaSeg.py only; the widget's onReload reloads MetaSegLib first."""
    script = textwrap.dedent("""
        import sys, types
        sys.path.insert(0, sys.argv[1])
        import MetaSeg, MetaSegLib.process
        old = MetaSegLib.process.ResliceProcess
        called = []
        MetaSeg.ScriptedLoadableModuleWidget.onReload = lambda self: called.append(True)  # Slicer's part: no Qt here
        widget = object.__new__(MetaSeg.MetaSegWidget)
        widget._job = widget._install = None
        widget.onReload()
        assert called and MetaSegLib.process.ResliceProcess is not old
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
