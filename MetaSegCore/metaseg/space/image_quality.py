"""Does the scan's intensity still separate the tissues its labels name? A gate for what registration cannot see.

Motion ghosting (shifted copies of the brain laid over it), strong noise and a strong bias field leave a brain that
registers well and whose labels have plausible proportions, yet the labels are wrong (3 ghost copies at 25 % cost
36 % of the white matter). What they all do is blur the intensity contrast between tissues: under the run's own
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


# The gate (benchmarks/exploration/quality_gate_calibration.py, docs/results.md "Hostile inputs, round 4"). Clean
# scans (the sample as skull-stripped scan and as whole head, 6 native scans of training and validation subjects of
# both label groups): WM/GM contrast CLEAN_CONTRAST, explained variance CLEAN_EXPLAINED. Degraded copies of the
# sample: 3 ghost copies at 25 % 2.29 / 0.557 (skull-stripped) and 2.19 / 0.564 (whole head), noise 10 % 2.18 /
# 0.542, a x0.4-1.6 gradient without N4 2.51 / 0.600, a +-40 % ripple of 50 mm that N4 leaves 2.29 / 0.499 (a
# gradient that N4 removes: 2.89 / 0.645, white matter within 2.5 %: rightly passed). The gate fires when both lie
# below their threshold, set between the two groups.
CLEAN_CONTRAST = (2.93, 3.72)
CLEAN_EXPLAINED = (0.645, 0.724)
MIN_WM_GM_CONTRAST = 2.7
MIN_EXPLAINED_VARIANCE = 0.62


def quality_warnings(figures: Dict[str, Any]) -> List[str]:
    """A warning when the tissues' intensities under the labels overlap as on ghosted, very noisy or strongly
    biased scans (both the WM/GM contrast and the explained variance below the gate); [] otherwise."""
    c, e = figures.get("wm_gm_contrast"), figures.get("explained_variance")
    if c is None or e is None or c >= MIN_WM_GM_CONTRAST or e >= MIN_EXPLAINED_VARIANCE:
        return []
    return [f"the scan's tissues are poorly separated by their intensities under the labels (white/grey matter "
            f"contrast {c:.2f}, share of the intensity variance the tissues explain {e:.2f}; clean scans "
            f"{CLEAN_CONTRAST[0]:.2f}-{CLEAN_CONTRAST[1]:.2f} and {CLEAN_EXPLAINED[0]:.2f}-{CLEAN_EXPLAINED[1]:.2f}): "
            "motion ghosting (shifted copies of the brain), strong noise or a strong brightness gradient? The volumes "
            "are unreliable (3 ghost copies at 25 % cost the sample 36 % of its white matter): check the scan and "
            "the result"]
