"""Dice scores: per class, mean foreground (our primary figure) and the paper's generalized Dice."""
from __future__ import annotations

from typing import Dict

import numpy as np

FOREGROUND = (1, 2, 3, 4)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int = 5) -> Dict[int, float]:
    """Dice of each class; NaN where the class is absent from both (it is then skipped in means)."""
    pred, ref = np.asarray(pred).ravel(), np.asarray(ref).ravel()
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference differ in size: {pred.size} vs {ref.size}")
    out = {}
    for c in range(n_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out[c] = float(2.0 * np.logical_and(p, r).sum() / denom) if denom else float("nan")
    return out


def foreground_dice(pred: np.ndarray, ref: np.ndarray, classes=FOREGROUND) -> float:
    """Mean Dice over the foreground classes present in prediction or reference."""
    d = dice_per_class(pred, ref, max(classes) + 1)
    vals = [d[c] for c in classes if not np.isnan(d[c])]
    return float(np.mean(vals)) if vals else float("nan")


def generalized_dice(pred: np.ndarray, ref: np.ndarray, n_classes: int = 5) -> float:
    """The paper's figure: torchmetrics generalized_dice_score, background included, weight 'simple'.

    weight_c = 1 / |ref_c|; a class absent from the reference gets the largest weight (as
    torchmetrics does), so predicting it anyway is penalized.
    GDS = 2 * sum_c w_c |pred_c & ref_c| / sum_c w_c (|pred_c| + |ref_c|).
    """
    pred, ref = np.asarray(pred).ravel(), np.asarray(ref).ravel()
    counts = np.array([(ref == c).sum() for c in range(n_classes)], dtype=np.float64)
    w = np.zeros(n_classes)
    w[counts > 0] = 1.0 / counts[counts > 0]
    w[counts == 0] = w.max() if (counts > 0).any() else 1.0
    inter = np.array([np.logical_and(pred == c, ref == c).sum() for c in range(n_classes)])
    size = np.array([(pred == c).sum() for c in range(n_classes)]) + counts
    den = float((w * size).sum())
    return float(2.0 * (w * inter).sum() / den) if den else float("nan")

