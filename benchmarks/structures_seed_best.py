"""Seed-to-seed change of hippocampal and ventricular volumes with `--quality best` (3 fits averaged), structures.

Run by hand (not a test): .venv/bin/python benchmarks/structures_seed_best.py  (validation subjects ecog, oas1-0040;
seeds 0 and 3, so the two ensembles share no fit seed). Prints |dV| in % per structure.
"""
import torch

import metaseg
from metaseg.io.readers import read_image
torch.set_num_threads(2)
seg = metaseg.Segmenter(device="cpu", labels="structures")
out = {}
for s, path in (("ecog", "../shared/data/brains/ecog/native_t1.nii.gz"), ("oas1-0040", "../shared/data/oasis-nmm/oas1-0040/native_t1.nii.gz")):
    scan = read_image(path)
    a, b = (seg(scan, seed=k, quality="best").volumes for k in (0, 3))
    out[s] = {n: round(100 * abs(a[n] - b[n]) / a[n], 2) for n in ("Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle", "Right-Lateral-Ventricle")}
    print(s, out[s], flush=True)
