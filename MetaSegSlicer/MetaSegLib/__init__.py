"""Helpers of the MetaSeg Slicer module that need neither Qt nor the Slicer application.

- `protocol`: parse and validate the core's JSON-lines progress events.
- `process`: run `python -m metaseg segment` / `reslice` as a child process, read its events on a
  thread, cancel the whole process tree.
- `rundirs`: the runs' temporary folders (owner-marked, removed when done, swept when stale).
- `dependencies`: the core's requirements, checked by version without importing anything.
- `paths`: where the shipped weights and the core package are, in an installed extension or
  a source checkout.
- `planes`: a slice view's plane as the core's plane; `frames`: world <-> a node's own frame
  (MRML); `views`: the slice views of the current layout.
- `preview`: live labels decoded off the main thread, shown with the final names and colours (MRML).
- `report`: human-readable text for progress and the run report.
"""
