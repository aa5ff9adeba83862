"""The core's Python requirements, checked by version in Slicer's Python before a run.

Presence is not enough: another extension may have installed a torch 1.x, with which the child
process would fail with a raw exit code. `check` reads the installed distributions' metadata
(nothing is imported, so a broken torch cannot take Slicer down) and `describe` says exactly
what to do. REQUIREMENTS equals the `dependencies` of MetaSegCore/pyproject.toml plus its `brain` extra
(deepbet: whole-head scans, the default 3D path; a test checks).

The messages are written for a user of the Slicer GUI: what is missing and what pressing Segment
does about it. Installing, and what to do when the package index cannot be reached: `install.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, List, Optional, Sequence

from packaging.requirements import Requirement  # shipped with Slicer's Python
from packaging.version import InvalidVersion, Version

CORE = ("torch>=2.0", "numpy>=1.21", "SimpleITK>=2.2", "slicerio>=1.0", "safetensors>=0.4.3")
BRAIN = ("deepbet==1.0.2",)  # the core's [brain] extra: brain extraction of whole-head scans
REQUIREMENTS = CORE + BRAIN
PURPOSE = {"slicerio": "reads and writes Slicer segmentation files",
           "deepbet": "finds the brain in a whole-head scan (skull present)",
           "SimpleITK": "reads and writes images", "numpy": "arrays",
           "safetensors": "reads and writes the network files without running code"}


@dataclass(frozen=True)
class Problem:
    """A requirement that the installed packages do not meet; `installed` is None when absent."""

    requirement: str
    installed: Optional[str]

    @property
    def name(self) -> str:
        return Requirement(self.requirement).name


def installed_version(name: str, path: Optional[Sequence[str]] = None) -> Optional[str]:
    """The version of the first distribution called `name` on `path` (default: sys.path), or None."""
    where = {} if path is None else {"path": list(path)}
    for dist in metadata.distributions(name=name, **where):
        return dist.version
    return None


def check(requirements: Iterable[str] = REQUIREMENTS, path: Optional[Sequence[str]] = None) -> List[Problem]:
    """The requirements that are missing or installed in a version outside their range."""
    problems = []
    for text in requirements:
        req = Requirement(text)
        version = installed_version(req.name, path)
        if version is None:
            problems.append(Problem(text, None))
            continue
        try:
            ok = req.specifier.contains(Version(version).base_version, prereleases=True)  # 2.5.0+cu121 -> 2.5.0
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(Problem(text, version))
    return problems


def describe(problems: Sequence[Problem]) -> str:
    """One message: what is wrong, and what to do about each package."""
    lines = []
    for p in problems:
        if p.name == "torch":
            if p.installed is None:
                what = f"PyTorch is not installed (MetaSeg needs {p.requirement})."
            else:
                what = f"PyTorch {p.installed} is installed, but MetaSeg needs {p.requirement}."
            lines.append(what + ' Open the "PyTorch Utils" module, uninstall PyTorch, install it again with the '
                         f'version requirement "{p.requirement[len("torch"):]}", then restart Slicer.')
        elif p.installed is None:
            why = f" (it {PURPOSE[p.name]})" if p.name in PURPOSE else ""
            lines.append(f"The Python package {p.name}{why} is not installed: press Segment in the MetaSeg module "
                         f"and confirm, and MetaSeg installs {p.requirement} (this needs an internet connection once).")
        else:
            lines.append(f"{p.name} {p.installed} is installed, but MetaSeg needs {p.requirement}: in Slicer's "
                         f'Python console run slicer.util.pip_install("{p.requirement}"), then restart Slicer.')
    return "\n".join(lines)
