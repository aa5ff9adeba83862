"""Does the scan's intensity still separate the tissues its labels name? A gate for what registration cannot see.

Motion ghosting (shifted copies of the brain laid over it), strong noise and a strong bias field leave a brain that
registers well and whose labels have plausible proportions, yet the labels are wrong (3 ghost copies at 25 % cost
40 % of the white matter). What they all do is blur the intensity contrast between tissues: under the run's own
labels, white and grey matter overlap, and the tissue classes explain less of the intensity. `measure` takes these
figures from the scan's brain voxels (after N4 where it ran) and the labels; `quality_warnings` compares them with
the range measured on clean scans (`benchmarks/exploration/quality_gate_calibration.py`, docs/results.md).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .geometry import entropy_map

# tissue classes (labelsets.as_tissues): 1 cortical GM, 2 subcortical GM, 3 WM, 4 CSF
GM, SUBCORTICAL, WM, CSF = 1, 2, 3, 4
ENTROPY_POINTS = 200_000  # brain voxels whose class probabilities are decoded for the mean entropy


def _robust(x: np.ndarray) -> tuple:
    """(median, robust SD from the interquartile range) of `x`."""
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return float(med), float(q3 - q1) / 1.349


def contrast(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """(median a - median b) / pooled robust SD: how many spreads apart two tissues' intensities lie."""
    if a.size < 100 or b.size < 100:
        return None
    (ma, sa), (mb, sb) = _robust(a), _robust(b)
    spread = float(np.sqrt((sa * sa + sb * sb) / 2))
    return (ma - mb) / spread if spread > 0 else None


def overlap(a: np.ndarray, b: np.ndarray, lo: float, hi: float, bins: int = 64) -> Optional[float]:
    """Overlap coefficient (sum of the smaller of two normalized histograms, 0 apart .. 1 identical)."""
    if a.size < 100 or b.size < 100 or hi <= lo:
        return None
    ha = np.histogram(a, bins, (lo, hi))[0] / a.size
    hb = np.histogram(b, bins, (lo, hi))[0] / b.size
    return float(np.minimum(ha, hb).sum())


def explained(values: np.ndarray, classes: np.ndarray) -> Optional[float]:
    """Share of the intensity variance that the tissue classes explain (eta squared)."""
    total = float(values.var()) * values.size
    if total <= 0:
        return None
    within = 0.0
    for c in np.unique(classes):
        v = values[classes == c]
        within += float(v.var()) * v.size
    return 1.0 - within / total


def measure(intensity: np.ndarray, tissues: np.ndarray, probabilities: Optional[np.ndarray] = None,
            psnr: Optional[float] = None) -> Dict[str, Any]:
    """The figures of the gate from the brain's voxels: `intensity` and `tissues` (1-4) of the labelled voxels,
    optionally class probabilities (N, C) of a sample of them and the fit's PSNR."""
    keep = tissues > 0
    v, t = intensity[keep].astype(np.float64), tissues[keep]
    lo, hi = (float(x) for x in np.percentile(v, [1, 99])) if v.size else (0.0, 0.0)
    out: Dict[str, Any] = {
        "wm_gm_contrast": contrast(v[t == WM], v[t == GM]),
        "gm_csf_contrast": contrast(v[t == GM], v[t == CSF]),
        "wm_gm_overlap": overlap(v[t == WM], v[t == GM], lo, hi),
        "explained_variance": explained(v, t) if v.size else None,
        "entropy_mean": float(entropy_map(probabilities.T).mean()) if probabilities is not None and len(probabilities) else None,
        "psnr_db": psnr,
    }
    return {k: (round(float(x), 4) if x is not None else None) for k, x in out.items()}


def quality_warnings(figures: Dict[str, Any]) -> List[str]:
    """Warnings for figures outside the range of clean scans (none yet: set by the calibration)."""
    return []
