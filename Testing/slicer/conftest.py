"""Fixtures for testing the MetaSeg Slicer module outside Slicer.

The MRML layer is Slicer's own, from the PyPI package `slicer-core` (Kitware): a real
vtkMRMLScene, real volume/segmentation/storage nodes, the real Segmentations logic. The
segmentation runs in a real child process (`python -m metaseg segment`). Nothing is mocked.

Without Qt, MetaSeg.py itself defines inert stand-ins for the Qt-based
ScriptedLoadableModule/Widget/Test base classes, which is what lets the Logic import. The panel
(MetaSegWidget) runs in test_slicer_panel.py on real Qt widgets (PySide6, offscreen) through the
harness in slicer_gui.py, which imports its own copy of MetaSeg.py with Qt and puts everything back
afterwards. The in-Slicer scenario is MetaSeg.MetaSegTest.

Needs: pip install -r Testing/slicer/requirements.txt (slicer-core; the MRML tests skip without it).

Run:  .venv/bin/python -m pytest Testing/slicer -q
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from mrml_helpers import MODULE_DIR, SHIPPED_2D  # noqa: E402

if str(MODULE_DIR) not in sys.path:  # MetaSeg.py and MetaSegLib, as Slicer puts them on sys.path
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture(scope="session")
def slicer_core():
    """The `slicer` package of slicer-core (skips the MRML tests where it is not installed)."""
    pytest.importorskip("slicer_core", reason="slicer-core is not installed: pip install slicer-core")
    import slicer

    return slicer


@pytest.fixture
def scene(slicer_core):
    """A scene set up the way the Slicer application sets up its own at startup.

    - the Segmentations module logic registers the segmentation converter rules
      (qSlicerSegmentationsModule does this in Slicer; without it segments cannot be copied);
    - the color logic adds the default color tables (labelmap display needs them);
    - the subject hierarchy node exists (Slicer always has one);
    - `slicer.mrmlScene` points at it, as in Slicer.
    """
    slicer = slicer_core
    scene = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    scene._keep_alive = (segmentations_logic, color_logic)
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(1)


@pytest.fixture(scope="session")
def any_weights(tmp_path_factory) -> Path:
    """Weights for runs with a small step budget: the shipped 2D weights if present, else an
    untrained (randomly initialized) model saved with the core's own writer."""
    if SHIPPED_2D.is_file():
        return SHIPPED_2D
    import torch
    from metaseg.method.config import ModelConfig
    from metaseg.method.fit import FitPlan
    from metaseg.method.model import MetaSegNet
    from metaseg.method.weights import LABELS, Weights, save_weights

    torch.manual_seed(0)
    config = ModelConfig()
    net = MetaSegNet(config)
    plan = FitPlan(steps=5)
    log_lr = torch.full((plan.steps, len(net.inr_parameter_names())), -7.0)
    card = {"name": "untrained test model", "labels": LABELS,
            "input": {"dims": 2, "canvas": [192, 192]}, "fit": plan.to_dict()}
    path = tmp_path_factory.mktemp("weights") / "untrained2d.safetensors"
    save_weights(Weights(config, net.state_dict(), log_lr, card), path)
    return path


@pytest.fixture(scope="session")
def fitted_3d(tmp_path_factory) -> Path:
    """A fitted 3D network of the bundled 256^3 scan (`metaseg segment --save-inr`, 2 fit steps: the
    geometry is what the cross-section tests check, not the labels' accuracy)."""
    import subprocess

    from mrml_helpers import ROOT, SAMPLE_T1_3D

    folder = tmp_path_factory.mktemp("fitted3d")
    if not (ROOT / "Resources" / "Weights" / "metaseg3d.safetensors").is_file():
        pytest.skip("no shipped 3D weights")
    out = subprocess.run([sys.executable, "-m", "metaseg", "segment", str(SAMPLE_T1_3D), "-o", str(folder / "labels.nrrd"),
                          "--steps", "2", "--save-inr", str(folder / "fitted.safetensors"), "--progress", "none"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return folder / "fitted.safetensors"
