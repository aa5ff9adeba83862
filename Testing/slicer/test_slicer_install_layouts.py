"""The module in both install layouts, imported the way Slicer imports it (issue 14, point 1).

Slicer puts only the module's folder on sys.path (qSlicerScriptedLoadableModuleFactory), and its
Python has no `metaseg` package. Each layout is built in a temporary folder:
- checkout: <repo>/MetaSegSlicer, <repo>/MetaSegCore/metaseg, <repo>/Resources (the README's
  "additional module path" install);
- extension: the files the CMake lists install into qt-scripted-modules/ (module, MetaSegLib,
  resources, weights, and the core package `metaseg/` beside them).
A fresh Python then imports MetaSeg with only that folder added and `metaseg` made unimportable in
it, segments nothing but renders a cross-section of a fitted 3D network (the part that used to
import the core into Slicer's process), and reports what it imported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mrml_helpers import ROOT, SAMPLE_T1_3D
from test_slicer_cmake_lists import cmake_list, module_name

pytestmark = pytest.mark.usefixtures("slicer_core")


def build_checkout(dest: Path) -> Path:
    shutil.copytree(ROOT / "MetaSegSlicer", dest / "MetaSegSlicer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "MetaSegCore" / "metaseg", dest / "MetaSegCore" / "metaseg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "Resources").symlink_to(ROOT / "Resources", target_is_directory=True)  # weights: large, read-only
    return dest / "MetaSegSlicer"


def build_extension(dest: Path) -> Path:
    """qt-scripted-modules/ as `make install` fills it, from the CMake lists (nothing else is copied)."""
    modules = dest / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    text = (ROOT / "MetaSegSlicer" / "CMakeLists.txt").read_text(encoding="utf-8")
    names = {"MODULE_NAME": module_name(text)}
    for f in cmake_list(text, "MODULE_PYTHON_SCRIPTS", names) + cmake_list(text, "MODULE_PYTHON_RESOURCES", names):
        (modules / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "MetaSegSlicer" / f, modules / f)
    for f in cmake_list(text, "_metaseg_shared_files", {}):
        if (ROOT / "Resources" / f).is_file():
            (modules / "Resources" / f).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(ROOT / "Resources" / f, modules / "Resources" / f)
    core = (ROOT / "MetaSegCore" / "CMakeLists.txt").read_text(encoding="utf-8")
    for f in cmake_list(core, "MODULE_PYTHON_SCRIPTS", {}) + cmake_list(core, "MODULE_PYTHON_RESOURCES", {}):
        (modules / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "MetaSegCore" / f, modules / f)
    return modules


SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    module_dir, fitted, volume_path = sys.argv[1:4]

    class NotInSlicersPython(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "metaseg" or name.startswith("metaseg."):
                raise ModuleNotFoundError(f"No module named {name!r} (not in Slicer's Python)")
            return None

    sys.meta_path.insert(0, NotInSlicersPython())
    sys.path.insert(0, module_dir)  # what Slicer adds, and nothing else
    import numpy as np
    import slicer
    import MetaSeg

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    keep = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkMRMLColorLogic()]
    for logic in keep:
        logic.SetMRMLScene(scene)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(volume_path)
    assert storage.ReadData(volume)
    logic = MetaSeg.MetaSegLogic()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    logic._keepFitted(seg, fitted, volume, np.eye(4))  # what a finished 3D run stores
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    view.SetLayoutName("Red")
    view.SetOrientation("Axial")
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    view.JumpSliceByCentering(*[(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)])
    view.SetFieldOfView(200.0, 200.0, 1.0)
    view.UpdateMatrices()
    node = logic.crossSection(seg, view, superResolution=1)
    labels = slicer.util.arrayFromVolume(node)
    print(json.dumps({"core": str(MetaSeg.paths.core_python_path(logic.moduleDir)),
                      "module_dir": str(logic.moduleDir),
                      "weights3d": str(logic.weightsPath(3)),
                      "imported_metaseg": sorted(m for m in sys.modules if m.split(".")[0] == "metaseg"),
                      "has_test_class": hasattr(MetaSeg, "MetaSegTest"),
                      "values": sorted(int(v) for v in np.unique(labels)), "shape": list(labels.shape)}))
""")


@pytest.mark.parametrize("layout", ["checkout", "extension"])
def test_cross_section_in_each_install_layout(layout, tmp_path, fitted_3d):
    module_dir = (build_checkout if layout == "checkout" else build_extension)(tmp_path / layout)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(module_dir), str(fitted_3d), str(SAMPLE_T1_3D)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported_metaseg"] == [], "the core was imported into Slicer's process"
    assert result["has_test_class"]
    assert Path(result["module_dir"]) == module_dir.resolve()
    core = Path(result["core"])
    assert core.resolve() == (module_dir.parent / "MetaSegCore" if layout == "checkout" else module_dir).resolve()
    assert Path(result["weights3d"]).parent.name == "Weights"
    assert result["shape"][0] == 1 and {1, 3} <= set(result["values"])  # cortex and white matter on the plane
