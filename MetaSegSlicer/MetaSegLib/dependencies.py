"""The core's Python requirements, checked by version in Slicer's Python before a run.

Presence is not enough: another extension may have installed a torch 1.x, with which the child
process would fail with a raw exit code. `check` reads the installed distributions' metadata
(nothing is imported, so a broken torch cannot take Slicer down) and `describe` says exactly
what to do. REQUIREMENTS equals the `dependencies` of MetaSegCore/pyproject.toml (a test checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, List, Optional, Sequence

from packaging.requirements import Requirement  # shipped with Slicer's Python
from packaging.version import InvalidVersion, Version

REQUIREMENTS = ("torch>=2.0", "numpy>=1.21", "SimpleITK>=2.2", "slicerio>=1.0")


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
            lines.append(f"{p.name} is not installed (MetaSeg needs {p.requirement}): press Segment to install it, "
                         f'or run slicer.util.pip_install("{p.requirement}") in the Python console.')
        else:
            lines.append(f"{p.name} {p.installed} is installed, but MetaSeg needs {p.requirement}: run "
                         f'slicer.util.pip_install("{p.requirement}") in the Python console, then restart Slicer.')
    return "\n".join(lines)
