"""Files in and out: image readers and their checks, writers (atomic files, output paths, result tables),
the subject data and splits, safetensors files, and the progress reporting. It imports nothing from method/,
space/, train/ or cohort/ (only labelsets.py above it)."""
