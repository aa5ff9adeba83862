"""Scans in physical space: registration, geometry, 3D volumes, brain extraction, bias correction, the fitted
volume and its planes, plausibility checks. It builds on method/ and io/ (and runtime.py, resources.py)."""
