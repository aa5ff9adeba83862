"""GUI-thread time per live-preview event of the Slicer module, on slicer-core (issue 14, point 8: < 100 ms).

Run by hand:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_slicer_preview.py [--steps 40 --every 10]

The bundled 256^3 scan (Resources/Sample/ecog_t1.nii.gz) is segmented by the module's logic with
live preview on, in its real child process. Everything the module does on Slicer's main (GUI)
thread happens inside `MetaSegJob.poll()` (a QTimer calls it in Slicer); this times each poll that
handled a "labels" event or updated the preview, i.e. the GUI-thread cost of one preview update
(since issue 25 the module decodes the newest snapshot file in the poll itself: no worker thread). slicer-core has no
rendering: the slice views' redraw of the preview is not part of the figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Testing" / "slicer"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--json", help="also write the record here")
    ap.add_argument("--module-dir", default=str(ROOT / "MetaSegSlicer"),
                    help="the module folder to measure (e.g. an older commit's, from git archive)")
    a = ap.parse_args()
    sys.path.insert(0, a.module_dir)

    import slicer
    import MetaSeg
    from mrml_helpers import SAMPLE_T1_3D, load_volume

    scene = slicer.vtkMRMLScene()
    keep = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkMRMLColorLogic()]
    for logic in keep:
        logic.SetMRMLScene(scene)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    slicer.mrmlScene = scene
    volume = load_volume(scene, SAMPLE_T1_3D, "ecog")

    seen = []
    job = MetaSeg.MetaSegLogic().segment(volume, device="cpu", steps=a.steps, wait=False, livePreview=True,
                                         liveEvery=a.every, onProgress=lambda e: seen.append(e.kind))
    def preview_stamp():
        """Changes whenever the preview shows new labels (its shared labelmap, or its segments)."""
        preview = getattr(job, "_preview", None)
        if preview is not None:
            return preview.image.GetMTime()
        node = job._previewNode
        return node.GetSegmentation().GetMTime() if node is not None else None

    per_event, polls = [], []
    while True:
        n, stamp = len(seen), preview_stamp()
        t0 = time.perf_counter()
        running = job.poll()
        dt = time.perf_counter() - t0
        if not running:
            final_ms = 1000 * dt  # the last poll loads the result: once per run, not per preview event
            break
        polls.append(dt)
        if "labels" in seen[n:] or preview_stamp() != stamp:  # an event arrived or the preview was updated
            per_event.append(dt)
        time.sleep(0.02)
    assert job.state == "done", job.error
    record = {"input": list(volume.GetImageData().GetDimensions()), "steps": a.steps, "every": a.every,
              "preview_polls": len(per_event), "gui_ms_per_preview_poll": [round(1000 * t, 1) for t in per_event],
              "max_ms": round(1000 * max(per_event), 1), "mean_ms": round(1000 * sum(per_event) / len(per_event), 1),
              "max_ms_any_poll_during_run": round(1000 * max(polls), 1), "final_poll_ms": round(final_ms, 1),
              "machine": f"{platform.machine()}, {platform.python_version()}, slicer-core"}
    print(json.dumps(record))
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
