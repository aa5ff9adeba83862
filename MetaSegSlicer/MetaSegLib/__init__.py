"""Helpers of the MetaSeg Slicer module that need neither Qt nor the Slicer application.

- `protocol`: parse and validate the core's JSON-lines progress events.
- `process`: run `python -m metaseg segment` as a child process, read its events on a thread,
  cancel the whole process tree.
- `paths`: where the shipped weights and the core package are, in an installed extension or
  a source checkout.
- `report`: human-readable text for progress and the run report.
"""
