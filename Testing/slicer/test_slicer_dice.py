"""Quality of the shipped 2D weights through the whole module path (MRML in, MRML out).

Its only hard-coded number is a floor on the mean foreground Dice (classes 1-4, the core's
`metrics.foreground_dice`) at the weights' default number of steps: the shipped weights score
0.813 on this unseen subject (docs/results.md); the floor catches regressions.
"""
from __future__ import annotations

import numpy as np
import pytest

from mrml_helpers import SAMPLE_SEG, SAMPLE_T1, SHIPPED_2D, load_volume

DICE_FLOOR = 0.75


@pytest.mark.skipif(not SHIPPED_2D.is_file(),
                    reason="shipped weights Resources/Weights/metaseg2d.safetensors are not in this checkout")
def test_mean_foreground_dice_of_sample(scene):
    import slicer

    import MetaSeg
    from metaseg.metrics import FOREGROUND, foreground_dice

    volume = load_volume(scene, SAMPLE_T1)
    reference = load_volume(scene, SAMPLE_SEG, "reference", labelmap=True)
    logic = MetaSeg.MetaSegLogic()
    assert logic.weightsPath(2) is not None  # found by the module itself, no weights= argument
    job = logic.segment(volume, device="cpu", steps=None, seed=0, keepLabelmap=True, wait=False)
    segmentation = job.wait(timeout=600)

    # The exported labelmap numbers the segments 1..N in order; map them back to the tissue
    # values of the report by name.
    value_of = {c["name"]: c["value"] for c in job.report["classes"]}
    seg = segmentation.GetSegmentation()
    exported = slicer.util.arrayFromVolume(job.labelmapNode)
    labels = np.zeros_like(exported, dtype=np.uint8)
    for i in range(seg.GetNumberOfSegments()):
        labels[exported == i + 1] = value_of[seg.GetNthSegment(i).GetName()]
    ref = slicer.util.arrayFromVolume(reference).astype(np.uint8)
    assert labels.shape == ref.shape
    dice = foreground_dice(labels, ref, FOREGROUND)
    print(f"mean foreground Dice {dice:.4f} with {job.report['fit']['steps']} steps "
          f"(weights sha256 {job.report['weights_sha256'][:12]})")
    assert dice >= DICE_FLOOR
