"""Keeping each one-piece structure's largest connected piece: worth it on 3D labels? (docs/results.md, part 6)

1. `pieces`: on the training subjects' reference labels (`native_structures.nii.gz`), the share of each structure's
   voxels in its largest face-connected piece: which structures are one piece in every brain.
2. `clean DIR`: labels saved by `benchmarks/eval_groups.py 3d --labels structures --save DIR` (no new fit), scored as
   they are and with every piece but the largest of each one-piece structure given to the label most of its labelled
   neighbours carry (filled from the piece's border inwards).

  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/exploration/largest_piece_3d.py pieces
  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/exploration/largest_piece_3d.py clean DIR
Not shipped: the stray pieces are a few hundred voxels per scan and the Dice moved by < 0.001.
"""
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from metaseg.evaluate import score
from metaseg.io.data import label_group, subject_dir
from metaseg.labelsets import STRUCTURES

DATA = Path("../shared/data")
SPLITS = json.loads(Path("campaign/splits_synth.json").read_text())
# one piece in >= 20 of the 21 training references on both sides (the `pieces` output)
SEVERAL = {"Lateral-Ventricle", "Inf-Lat-Vent", "3rd-Ventricle", "4th-Ventricle"}
ONE_PIECE = [lab.value for lab in STRUCTURES.labels[1:] if lab.name.replace("Left-", "").replace("Right-", "") not in SEVERAL]


def pieces(mask: np.ndarray) -> np.ndarray:
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True),
                               sortByObjectSize=True)
    return sitk.GetArrayFromImage(cc)


def fill(labels: np.ndarray, holes: np.ndarray) -> np.ndarray:
    out, todo = labels.copy(), holes.copy()
    for _ in range(64):
        idx = np.flatnonzero(todo)
        if idx.size == 0:
            break
        where = np.unravel_index(idx, labels.shape)
        votes = []
        for axis in range(labels.ndim):
            for step in (-1, 1):
                pos = list(where)
                inside = (pos[axis] + step >= 0) & (pos[axis] + step < labels.shape[axis])
                pos[axis] = np.clip(pos[axis] + step, 0, labels.shape[axis] - 1)
                nb = out[tuple(pos)].astype(np.int64)
                votes.append(np.where(inside & ~todo[tuple(pos)] & (nb > 0), nb, -1))
        votes = np.stack(votes, 1)
        best, n_best = np.full(idx.size, -1), np.zeros(idx.size, int)
        for v in np.unique(votes[votes >= 0]):
            n = (votes == v).sum(1)
            best, n_best = np.where(n > n_best, v, best), np.maximum(n, n_best)
        if not (best >= 0).any():
            break
        out.reshape(-1)[idx[best >= 0]] = best[best >= 0]
        todo.reshape(-1)[idx[best >= 0]] = False
    return out


def summary(s: dict) -> dict:
    d = {k: v for k, v in s["dice"].items() if not np.isnan(v)}
    return {"mean": float(np.mean(list(d.values()))), "hippocampus": float(d["Left-Hippocampus"] + d["Right-Hippocampus"]) / 2}


if sys.argv[1] == "pieces":
    share = {}
    for s in [s for s in SPLITS["train"] if "synth" not in s]:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(subject_dir(DATA, s) / "native_structures.nii.gz")))
        for lab in STRUCTURES.labels[1:]:
            n = np.bincount(pieces(ref == lab.value).reshape(-1))[1:]
            if n.sum():
                share.setdefault(lab.name, []).append(n[0] / n.sum())
    for name, v in share.items():
        print(f"{name:30s} lowest {min(v):.3f}  brains below 0.99: {sum(x < 0.99 for x in v)}/{len(v)}")
else:
    groups = {}
    for f in sorted(Path(sys.argv[2]).glob("*.nii.gz")):
        subject = f.name[: -len(".nii.gz")]
        img = sitk.ReadImage(str(f))
        pred = sitk.GetArrayFromImage(img)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(subject_dir(DATA, subject) / "native_structures.nii.gz")))
        holes = np.zeros(pred.shape, bool)
        for v in ONE_PIECE:
            holes |= pieces(pred == v) > 1
        ml = float(np.prod(img.GetSpacing())) / 1000
        before, after = summary(score(pred, ref, STRUCTURES, ml)), summary(score(fill(pred, holes), ref, STRUCTURES, ml))
        groups.setdefault(label_group(subject_dir(DATA, subject)), []).append((before, after))
        print(subject, int(holes.sum()), "voxels moved", {k: (round(before[k], 4), round(after[k], 4)) for k in before})
    for g, rows in sorted(groups.items()):
        print(g, {k: (round(float(np.mean([b[k] for b, _ in rows])), 4), round(float(np.mean([a[k] for _, a in rows])), 4))
                  for k in ("mean", "hippocampus")})
