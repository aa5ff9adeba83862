"""Helpers of the MetaSeg Slicer module that need neither Qt nor the Slicer application.

- `protocol`: parse and validate the core's JSON-lines progress events.
- `process`: run the core (`python -m metaseg job` / `reslice`) as a child process, read its events
  with non-blocking reads from the caller's polls (no thread), cancel the whole process tree.
- `install`: the install of what the core needs, planned (no torchvision, PyTorch's CPU build
  without an NVIDIA GPU) and followed like a run; the offline `pip download` recipe.
- `refusals`: a failed run in the panel's words (no command-line options), with the details and
  what the panel offers (Segment anyway, Advanced settings).
- `install`: the missing packages installed from the panel, with what is downloaded and its progress.
- `rundirs`: the runs' temporary folders (owner-marked, removed when done, swept when stale).
- `dependencies`: the core's requirements, checked by version without importing anything.
- `paths`: where the shipped weights and the core package are, in an installed extension or
  a source checkout.
- `planes`: a slice view's plane as the core's plane; `frames`: world <-> a node's own frame
  (MRML); `views`: the slice views of the current layout.
- `preview`: live labels decoded off the main thread, shown with the final names and colours (MRML).
- `report`: human-readable text for progress and the run report.
- `fitted`: the fitted 3D network as text (an attribute of its segmentation, saved in the scene file),
  decoded without trusting the scene; `segfile`: stable
  segment IDs (the names) in the core's `.seg.nrrd`.
"""
import importlib
import sys

# Every module of the package, each after the modules it imports (checked by a test). A reload in
# this order leaves no module holding a class of an older copy of another (e.g. process.py catching
# the old ProtocolError while protocol.py raises the new one).
MODULES = ("protocol", "rundirs", "report", "paths", "dependencies", "refusals", "frames", "planes", "views", "fitted",
           "segfile", "preview", "process", "install")


def reload_all() -> None:
    """Reload the loaded modules of this package in dependency order, then the package itself."""
    for name in MODULES:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            importlib.reload(module)
    importlib.reload(sys.modules[__name__])
