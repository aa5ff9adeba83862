"""How much a volume moves when only the fit's seed changes: the measured figures, written into every 3D report.

The 400-step test-time fit draws random coordinate batches, so another `--seed` gives another network and moves
boundary voxels (issue 22). A difference between two scans smaller than these figures cannot be told from the
fit's own randomness. Every number is the largest change of a volume against seed 0 that docs/results.md reports
(same scan, only the seed changed); labels without a figure were not measured.
"""
from __future__ import annotations

from typing import Any, Dict

# Tissues, one fit (`--quality fast`), % of the volume: the larger of two measurements in docs/results.md,
# "Repeat scans ... The first measurement (0.2.0 weights)": 5 seeds of ecog, largest difference to seed 0
# 1.6 / 6.7 / 2.3 / 4.8 %, and "Flip rate: labels under sub-voxel changes of the input" (0.3.1 weights): seed 1
# against seed 0 on ws01 and oas1-0040, at most 0.8 / 1.9 / 2.0 / 1.7 %.
TISSUES_FAST = {"Cortical gray matter": 1.6, "Subcortical gray matter": 6.7, "White matter": 2.3,
                "Cerebrospinal fluid": 4.8}
# Structures, one fit: docs/results.md "Repeat copies: hippocampal and ventricular volumes", row "another fit
# seed" of ecog and oas1-0040 (the larger of the two).
STRUCTURES_FAST = {"Left-Hippocampus": 16.6, "Right-Hippocampus": 20.4, "Left-Lateral-Ventricle": 5.6,
                   "Right-Lateral-Ventricle": 4.0}
# Structures, `--quality best` (3 fits averaged): the same section, two ensembles with disjoint seeds: hippocampus
# 0.2 / 12.6 % (ecog L / R) and 6.0 / 5.8 % (oas1-0040), ventricles 0.4-4.9 %.
STRUCTURES_BEST = {"Left-Hippocampus": 6.0, "Right-Hippocampus": 12.6, "Left-Lateral-Ventricle": 4.9,
                   "Right-Lateral-Ventricle": 4.9}
SOURCE = ("docs/results.md: 'Repeat scans' (tissues, 5 seeds of ecog; 0.3.1 weights: ws01, oas1-0040) and 'Repeat "
          "copies: hippocampal and ventricular volumes' (structures: ecog, oas1-0040)")


def seed_spread(label_set: str, quality: str, schedule: str = "random") -> Dict[str, Any]:
    """The report's `seed_spread`: the largest measured change (%) of each volume when only the seed changes,
    for this label set and quality, what it means and where it was measured. A model whose fit follows the fixed
    schedule (`FitPlan.schedule`) does not read the seed: nothing moves."""
    if schedule == "fixed":
        return {"percent": {}, "quality": quality, "schedule": schedule,
                "note": "this model's fit follows a fixed schedule of batches: --seed changes nothing. Repeat scans "
                        "still differ (docs/results.md, 'Repeat copies')", "source": "metaseg.method.fit.FixedSchedule"}
    percent: Dict[str, float] = dict(TISSUES_FAST)
    if label_set == "structures":
        percent.update(STRUCTURES_BEST if quality == "best" else STRUCTURES_FAST)
    note = ("largest change (%) of each volume measured between fits of the same scan that differ only in --seed; "
            "a difference between two scans smaller than this is within the fit's own randomness. Labels not "
            "listed were not measured")
    if quality == "best":
        note += "; tissue figures are of single fits (3 averaged fits move less: the flip rate falls from 8 to 5 %)"
    return {"percent": percent, "quality": quality, "note": note, "source": SOURCE}
