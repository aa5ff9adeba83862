"""Give shipped 2D weights a full-batch test-time fit: every canvas pixel at every step (metaseg 0.10.0).

The fit's plan is part of the model (the card's `fit`). A 2D fit drew 4096 random pixels per step of its 20, so
its labels depended on the seed; fitting all 36,864 pixels of the 192x192 canvas at every step takes the same 20
steps and the meta-learned learning rates, depends on nothing random, and scored higher on the validation slices
(docs/results.md, part 6). The tensors are copied unchanged; the card gets the new plan and a record of the change.

  PYTHONPATH=MetaSegCore .venv/bin/python campaign/full_batch_fit.py Resources/Weights/metaseg2d.safetensors OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from metaseg.method.weights import load_weights, save_weights


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    w = load_weights(a.weights)
    if w.config.in_dim != 2:
        print(f"{a.weights}: a 3D model (its fit is foreground-only with a fixed schedule); nothing done", file=sys.stderr)
        return 2
    pixels = math.prod(w.canvas)
    before = w.plan
    after = dataclasses.replace(before, batch_size=pixels)
    card = dict(w.card, fit=after.to_dict())
    card["fit_change"] = {"from": before.to_dict(), "to": after.to_dict(), "source_sha256": w.sha256,
                          "why": "full-batch fit: every canvas pixel at every step, no random draw (metaseg 0.10.0)",
                          "command": "campaign/full_batch_fit.py"}
    digest = save_weights(dataclasses.replace(w, card=card, sha256=None), a.out)
    print(f"{a.out}: fit {before.batch_size} -> {after.batch_size} points per step; sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
