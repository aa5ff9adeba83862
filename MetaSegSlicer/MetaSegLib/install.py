"""Installing the Python packages the core needs, shown in the panel; and the recipe for a computer offline.

The first Segment click on a fresh Slicer may have to install PyTorch and the small packages (slicerio,
deepbet). `plan` turns the missing requirements into steps, each saying what it installs and about how
much it downloads: PyTorch without torchvision (MetaSeg does not use it), a CPU build where this computer
has no NVIDIA GPU (from PyTorch's CPU package index, a few hundred MB instead of a few GB), and the CUDA
build picked for the NVIDIA driver by light-the-torch where there is one (what PyTorch Utils uses, without
its torchvision). Each step runs `PythonSlicer -m pip install ...` (or `-m light_the_torch install ...`)
as a child process whose output is read like the core's (`PipProcess`: no thread); `pip_event` turns
pip's lines into the panel's progress (the package being downloaded, its size, the bytes so far where
pip prints them: `--progress-bar raw`, pip 24.1 and later).

`offline_recipe` writes the `pip download` command for another, connected computer that fetches the
wheels for *this* computer (its Python version, operating system and processor, whatever the other
computer runs), and the install command to run here afterwards.

No Qt, no MRML.
"""
from __future__ import annotations

import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

from .dependencies import PURPOSE, Problem, installed_version
from .process import JsonLinesProcess
from .protocol import Event

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's own index of CPU-only builds
PYPI_INDEX = "https://pypi.org/simple"
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what PyTorch Utils installs to pick the CUDA build (its _installLightTheTorch)
RAW_PROGRESS_PIP = (24, 1)  # pip prints "Progress N of M" with --progress-bar raw from this version on
# What a step downloads, roughly (pip's own "Downloading ... (size)" lines give the exact figure as it goes):
# torch 2.x wheels: CPU-only builds ~180-250 MB (Linux, Windows), macOS ~60-150 MB; CUDA builds ~0.9 GB plus the
# NVIDIA libraries they pull in, ~2.5-3 GB in all; deepbet 1.0.2 carries its two 8.7 MB networks, and with its
# dependencies (pandas, nibabel, fill-voids, connected-components-3d, ...) comes to some 40 MB.
SIZES = {"torch-cpu": "about 200 MB", "torch-mac": "about 100 MB", "torch-cuda": "about 2.5 GB",
         "light-the-torch": "under 1 MB", "small": "about 40 MB"}


@dataclass(frozen=True)
class Step:
    """One install: what it is (for the panel), about how much it downloads, and the arguments after `python -m`."""

    what: str
    size: str
    args: Tuple[str, ...]
    requirements: Tuple[str, ...] = field(default_factory=tuple)

    def command(self, python: str) -> List[str]:
        return [python, "-m", *self.args]


def has_cuda_gpu(which: Callable[[str], Optional[str]] = shutil.which, run=subprocess.run) -> bool:
    """Whether an NVIDIA GPU with its driver is present (`nvidia-smi` lists one), without importing anything."""
    if sys.platform == "darwin":
        return False
    exe = which("nvidia-smi")
    if not exe:
        return False
    try:
        out = run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def pip_supports_raw_progress(version: Optional[str] = None) -> bool:
    version = version if version is not None else installed_version("pip")
    try:
        parts = tuple(int(p) for p in re.findall(r"\d+", version or "")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= RAW_PROGRESS_PIP


def plan(problems: Sequence[Problem], cuda: bool, system: Optional[str] = None, raw_progress: bool = False,
         have_light_the_torch: bool = False) -> List[Step]:
    """The install steps for the missing requirements (`problems` whose `installed` is None), torch first."""
    system = system or platform.system()
    progress = ("--progress-bar", "raw") if raw_progress else ()
    missing = [p for p in problems if p.installed is None]
    steps: List[Step] = []
    torch = next((p for p in missing if p.name == "torch"), None)
    if torch is not None:
        req = torch.requirement
        if system == "Darwin":
            steps.append(Step("PyTorch (for this Mac's processor)", SIZES["torch-mac"],
                              ("pip", "install", req, *progress), (req,)))
        elif cuda:
            if not have_light_the_torch:
                steps.append(Step("light-the-torch (chooses the PyTorch build that fits the NVIDIA driver)",
                                  SIZES["light-the-torch"], ("pip", "install", LIGHT_THE_TORCH, *progress),
                                  (LIGHT_THE_TORCH,)))
            steps.append(Step("PyTorch with CUDA, for this computer's NVIDIA GPU", SIZES["torch-cuda"],
                              ("light_the_torch", "install", req), (req,)))
        else:
            steps.append(Step("PyTorch, CPU build (no NVIDIA GPU was found)", SIZES["torch-cpu"],
                              ("pip", "install", req, "--index-url", TORCH_CPU_INDEX, "--extra-index-url", PYPI_INDEX,
                               *progress), (req,)))
    others = [p.requirement for p in missing if p.name != "torch"]
    if others:
        names = ", ".join(p.name + (f" ({PURPOSE[p.name]})" if p.name in PURPOSE else "") for p in missing
                          if p.name != "torch")
        steps.append(Step(names, SIZES["small"], ("pip", "install", *others, *progress), tuple(others)))
    return steps


def describe_plan(steps: Sequence[Step]) -> str:
    """The confirmation's text: each step with its size."""
    lines = [f"• {s.what}: {s.size}" for s in steps]
    return ("MetaSeg needs these Python packages, which are not installed yet:\n" + "\n".join(lines) +
            "\n\nInstall them now? They are downloaded once from the Python package index; the panel shows the "
            "progress, and Cancel stops it.")


# ----------------------------------------------------------------------------- pip's output
_COLLECTING = re.compile(r"^\s*Collecting (\S+)")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+?)(?: \((?P<size>[\d.]+ [kMG]?B)\))?\s*$")
_PROGRESS = re.compile(r"Progress (\d+) of (\d+|\?)")
_INSTALLING = re.compile(r"^\s*Installing collected packages: (.+)$")
_DONE = re.compile(r"^\s*Successfully installed (.+)$")


def pip_event(line: str) -> Optional[Event]:
    """An install event from one line of pip's output, or None for lines the panel does not show.

    Kinds (Event.kind "install"; `data["what"]`): collecting (`package`), downloading (`file`, `size` as pip
    prints it), bytes (`done`, `total`: --progress-bar raw), installing (`packages`), installed (`packages`)."""
    m = _PROGRESS.search(line)
    if m:
        total = None if m.group(2) == "?" else int(m.group(2))
        return Event("install", {"what": "bytes", "done": int(m.group(1)), "total": total})
    m = _DOWNLOADING.match(line)
    if m:
        name = unquote(m.group(1).rsplit("/", 1)[-1])  # a URL on PyTorch's index: torch-2.5.1%2Bcpu-...whl
        return Event("install", {"what": "downloading", "file": name, "size": m.group("size")})
    m = _COLLECTING.match(line)
    if m:
        return Event("install", {"what": "collecting", "package": m.group(1)})
    m = _INSTALLING.match(line)
    if m:
        return Event("install", {"what": "installing", "packages": m.group(1).strip()})
    m = _DONE.match(line)
    if m:
        return Event("install", {"what": "installed", "packages": m.group(1).strip()})
    return None


class PipProcess(JsonLinesProcess):
    """One install step as a child process; `poll()` gives its install events (see `pip_event`)."""

    def __init__(self, step: Step, python: str, env: Optional[Dict[str, str]] = None):
        self.step = step
        super().__init__(step.command(python), env=env)

    def _stdout_line(self, line: str) -> None:
        self._noise.append(line)  # the whole output is the failure's details
        event = pip_event(line)
        if event is not None:
            self._events.append(event)

    def failure(self):
        rc = self.returncode
        if rc is None or self._cancelled or rc == 0:
            return None
        return {"message": f"installing {', '.join(self.step.requirements)} failed (exit code {rc})", "crash": False,
                "details": "\n".join(list(self._noise)[-40:] + list(self._stderr)[-40:])}


def progress_text(step: Step, event: Event, state: Dict[str, object]) -> Tuple[str, Optional[float]]:
    """(status text, fraction done or None) for the panel, from an install event; `state` keeps the download
    being followed between events."""
    what = event.get("what")
    if what == "downloading":
        state["file"], state["size"] = event.get("file"), event.get("size")
    elif what == "collecting":
        state["package"] = event.get("package")
    if what == "bytes" and event.get("total"):
        done, total = event["done"], event["total"]
        return (f"Installing {step.what}: downloading {state.get('file') or ''} — {done / 1e6:.0f} of "
                f"{total / 1e6:.0f} MB", done / total)
    if what == "downloading":
        size = f" ({event.get('size')})" if event.get("size") else ""
        return f"Installing {step.what}: downloading {event.get('file')}{size}", None
    if what == "collecting":
        return f"Installing {step.what}: looking up {event.get('package')}", None
    if what == "installing":
        return f"Installing {step.what}: unpacking {event.get('packages')}", None
    if what == "installed":
        return f"Installed {event.get('packages')}", 1.0
    return f"Installing {step.what}", None


# ----------------------------------------------------------------------------- offline
def target_platforms(system: Optional[str] = None, machine: Optional[str] = None,
                     mac_version: Optional[str] = None) -> List[str]:
    """pip's --platform values for this computer's wheels (pip adds the older compatible ones of each)."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Windows":
        return ["win_amd64" if machine in ("amd64", "x86_64") else f"win_{machine}"]
    if system == "Darwin":
        arch = "arm64" if machine in ("arm64", "aarch64") else "x86_64"
        major = int((mac_version or platform.mac_ver()[0] or "11").split(".")[0])
        version = f"{major}_0" if major >= 11 else "10_9"
        return [f"macosx_{version}_{arch}"] + (["macosx_10_9_x86_64"] if arch == "x86_64" and major >= 11 else [])
    arch = "x86_64" if machine in ("x86_64", "amd64") else machine
    # PyPI's wheels are manylinux; PyTorch's CPU index also has plain linux_x86_64 ones (torch 2.5 and before)
    return [f"manylinux_2_28_{arch}", f"manylinux2014_{arch}", f"linux_{arch}"]


def offline_recipe(requirements: Sequence[str], python_version: Optional[str] = None, system: Optional[str] = None,
                   machine: Optional[str] = None, mac_version: Optional[str] = None, cuda: bool = False,
                   folder: str = "metaseg-wheels") -> Tuple[List[str], str]:
    """(the `pip download` command, as arguments, for a connected computer; the install command for Slicer's Python
    console here). The wheels are those of *this* computer: its Python (`python_version`, e.g. "3.9" for Slicer
    5.6/5.8, "3.12" for 5.10), operating system and processor, with only binary wheels (no build on the other side).
    Without an NVIDIA GPU here, torch comes from PyTorch's CPU index (Linux, Windows)."""
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    system = system or platform.system()
    digits = python_version.replace(".", "")
    args = ["pip", "download", *requirements, "--dest", folder, "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp",
            "--abi", f"cp{digits}", "--abi", "abi3", "--abi", "none"]
    for p in target_platforms(system, machine, mac_version):
        args += ["--platform", p]  # pure-Python wheels (py3-none-any) match whatever the platform
    if any(r.startswith("torch") for r in requirements) and system != "Darwin" and not cuda:
        args += ["--index-url", TORCH_CPU_INDEX, "--extra-index-url", PYPI_INDEX]
    install = ('slicer.util.pip_install("--no-index --find-links=<the copied ' + folder + ' folder> ' +
               " ".join(requirements) + '")')
    return args, install


def offline_text(requirements: Sequence[str], **kwargs) -> str:
    """What to tell a user whose Slicer cannot reach the package index."""
    args, install = offline_recipe(requirements, **kwargs)
    return ("Without internet: on a computer that has it, with Python and pip, run\n    " +
            " ".join(shlex.quote(a) for a in args) + "\ncopy the folder here, and in Slicer's Python console run\n    "
            + install + "\nthen restart Slicer.")
