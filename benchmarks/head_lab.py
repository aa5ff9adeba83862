"""A laboratory for stage-2 heads (issue 28): fit once, try many heads in minutes.

Stage 2 of `metaseg train` fits the initialization to every training brain (most of its 45 minutes) and then trains
the head on the features of those fits. It keeps them (`metaseg.train.meta_train.stage2_fit`: the fitted parameters,
0.3 MB each, keyed by what they depend on); here they are made and kept the same way (`fits`; a run's
`<run>/stage2_fits` can be copied in and out), so heads of other shapes, sampling or training data can be compared on
the same fits (`head`):

  # the fits: training brains as stage 2 makes them (fixed schedule, member j, 2 % noise), validation as segment does
  python benchmarks/head_lab.py fits --pack pack/structures.npz --split train --fits 3 --noise 0.02
  python benchmarks/head_lab.py fits --pack pack/synth.npz --subjects all --fits 1 --noise 0.02
  python benchmarks/head_lab.py fits --pack pack/structures.npz --split validation --fits 1
  # heads: trained on the training fits (optionally the synthetic ones too), scored on the validation fits
  python benchmarks/head_lab.py head --hidden 128 --steps 6000          # stage 2's head, for reference
  python benchmarks/head_lab.py head --hidden 256 256 --balance 0.5 --synth pack/synth.npz
  python benchmarks/head_lab.py head --hidden 128 128 --balance 0.25 --synth pack/synth.npz --synth-fits 3 --context \
      --ema 0.999 --adjust 0.5   # 0.9.0's head (scored with and without its logit adjustment)

Dice is computed on the model grid over the validation brains' voxels (like `metaseg train`'s validation), so it is
comparable between heads, not with the native-space figures of `eval_groups.py`. Appends a record to --json.
Research tool, run by hand; nothing here is part of the package.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from metaseg.io.data import label_group, load_splits, pack_subjects, subject_dir
from metaseg.labelsets import label_set
from metaseg.method.fit import FitPlan
from metaseg.method.model import MetaSegNet
from metaseg.method.context import ImageContext, n_columns
from metaseg.method.prior import SpatialPrior, class_fractions
from metaseg.method.weights import load_weights
from metaseg.metrics import dice_per_class
from metaseg.train.meta_train import (TaskPoints, TrainSettings, WeightAverage, fit_key, focal_loss, head_sample,
                                       logit_adjustment, prepare_tasks, stage2_fit)

HIPPO = ("Left-Hippocampus", "Right-Hippocampus")


def card_settings(w, noise: float) -> TrainSettings:
    """The training settings the weights' stage 2 ran with (their card), with the fits' `noise`."""
    d = dict(w.card["training"]["settings"])
    d.update(model=w.config, plan=FitPlan(**d["plan"]), canvas=tuple(d["canvas"]), train_slices=tuple(d["train_slices"]),
             val_slices=tuple(d["val_slices"]), noise=noise, augment=False)
    return TrainSettings(**{k: v for k, v in d.items() if k in TrainSettings.__dataclass_fields__})


def pack_tasks(pack: str, names, s: TrainSettings):
    if names == ["all"]:
        names = pack_subjects(Path(pack))
    return prepare_tasks(Path(pack), list(names), s)


def kept_fits(a, w, net, s: TrainSettings, t, points: TaskPoints):
    """The `a.fits` fits of task t (made now where not kept yet): [(params, coords, values, target)]."""
    key = fit_key(net, w.log_lr, s)
    return [stage2_fit(net, w.log_lr, s, t, m, points, key, Path(a.out) / "fits") for m in range(a.fits)]


def cmd_fits(a, w, net) -> None:
    s = card_settings(w, a.noise)
    points = TaskPoints(s, torch.device("cpu"))
    for t in pack_tasks(a.pack, a.subjects or load_splits()[a.split], s):
        t0 = time.time()
        kept_fits(a, w, net, s, t, points)
        points.cache.clear()
        print(f"{t.name}: {a.fits} fit(s), {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def features(net, params: dict, coords: torch.Tensor, values: torch.Tensor, prior: SpatialPrior) -> torch.Tensor:
    """The head's input at the points (their fit's features, intensity, prior), in chunks."""
    full = {k: params.get(k, v.detach()) for k, v in net.named_parameters()}
    out = []
    with torch.no_grad():
        for c, v in zip(torch.split(coords, 1 << 16), torch.split(values, 1 << 16)):
            _, f = torch.func.functional_call(net, full, (c,))
            out.append(net.head_input(f, v, c, prior))
    return torch.cat(out)


WIDE = ((1.0, 2.0, 4.0, 8.0), ((0, 2), (1, 4), (2, 8)))


def cmd_head(a, w, net) -> None:
    def context(image: torch.Tensor) -> ImageContext:
        return ImageContext(image, *WIDE) if a.context_wide else ImageContext(image)

    labels = label_set(w.card.get("label_set", "structures"))
    n = len(labels)
    names = [lab.name for lab in labels.labels][1:]
    hip = [names.index(h) for h in HIPPO]

    def row(subject: str, lab: np.ndarray, target: torch.Tensor) -> dict:
        dc = dice_per_class(lab, target.numpy(), n)
        d = np.array([dc[c] for c in range(1, n)])
        return {"subject": subject, "mean_dice": float(np.nanmean(d)), "hippo_dice": float(np.mean(d[hip])),
                "min_dice": float(np.nanmin(d)), "per_structure": [round(float(x), 4) for x in d]}

    def summarize(rows: list) -> dict:
        per = np.mean([r["per_structure"] for r in rows], 0)
        groups = {}
        for r in rows:
            groups.setdefault(group_of[r["subject"]], []).append(r)
        by_group = {g: {k: round(float(np.mean([r[k] for r in rs])), 4) for k in ("mean_dice", "hippo_dice")}
                    for g, rs in sorted(groups.items())}
        return {"groups": by_group, "mean_dice": float(np.mean([r["mean_dice"] for r in rows])),
                "hippo_dice": float(np.mean([r["hippo_dice"] for r in rows])),
                "lowest_structure_mean": float(per.min()), "lowest_structure": names[int(per.argmin())]}
    splits = load_splits()
    # each real subject's label protocol (FreeSurfer or manual), read once: --manual-weight and the group summaries
    group_of = {s: label_group(subject_dir(Path(a.data), s)) for s in splits["train"] + splits["validation"]}
    s_train, s_val = card_settings(w, a.noise), card_settings(w, 0.0)
    train = pack_tasks(a.pack, splits["train"][: a.train or None], s_train)
    synth = pack_tasks(a.synth, ["all"], s_train) if a.synth else []
    synth_names = {t.name for t in synth}
    train += synth
    t0 = time.time()
    fractions = {t.name: class_fractions(t.labels.numpy(), n) for t in train}
    full = SpatialPrior(sum(fractions.values()) / len(fractions))
    gen = torch.Generator().manual_seed(a.seed)
    points = TaskPoints(s_train, torch.device("cpu"))
    sampling = replace(s_train, head_points=a.points, head_balance=a.balance)
    feats, targets = [], []
    counts = torch.zeros(n)  # the fits' class frequencies, for the logit adjustment (--adjust)
    for t in train:
        loo = full.without(fractions[t.name], len(fractions))
        n_fits = argparse.Namespace(**{**vars(a), "fits": a.synth_fits if t.name in synth_names else a.fits})
        ctx = context(t.image) if a.context else None  # one image's blurs serve all its fits
        weight = a.manual_weight if group_of.get(t.name) == "manual" else 1  # synthetic brains: no entry
        for params, coords, values, target in kept_fits(n_fits, w, net, s_train, t, points):
            idx = torch.cat([head_sample(target, sampling, gen) for _ in range(weight)])
            f = features(net, params, coords[idx], values[idx], loo)
            if ctx is not None:
                f = torch.cat([f, ctx.at(coords[idx])], 1)
            feats.append(f.to(torch.bfloat16))
            targets.append(target[idx])
            counts += torch.bincount(target, minlength=n).float() / target.numel()
        points.cache.clear()
    feats, targets = torch.cat(feats), torch.cat(targets)
    t_feat = time.time() - t0
    print(f"{len(train)} brains x {a.fits} fits: {feats.shape[0]} points ({t_feat:.0f} s)", file=sys.stderr, flush=True)
    torch.manual_seed(a.seed)
    # the head `--head-hidden` (and `--head-context`) trains
    head = MetaSegNet(replace(net.config, head_hidden=tuple(a.hidden), head_context=a.context)).head
    if a.context and a.context_wide:  # the experiment's wider context: more columns than the module's
        head[0] = torch.nn.Linear(head[0].in_features - n_columns(3) + n_columns(3, *WIDE), head[0].out_features)
    opt = torch.optim.Adam(head.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps) if a.cosine else None
    ema = WeightAverage(a.ema) if a.ema else None
    losses = []
    t1 = time.time()
    for i in range(a.steps):
        idx = torch.randint(0, feats.shape[0], (a.batch,), generator=gen)
        loss = focal_loss(head(feats[idx].float()), targets[idx], a.gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        if ema is not None:
            ema.update(head)
        losses.append(float(loss.detach()))
        if (i + 1) % 1000 == 0:
            print(f"  step {i + 1}: focal {np.mean(losses[-1000:]):.4f}", file=sys.stderr, flush=True)
    t_head = time.time() - t1
    del feats
    if ema is not None:  # score the average of the head's weights over its last ~1/(1-decay) steps
        ema.copy_to(head)
    # what `metaseg train --head-adjust tau` adds to the head's output bias, for each tau asked
    adjust = {tau: logit_adjustment(counts, replace(sampling, head_adjust=tau)) for tau in a.adjust}
    rows, adjusted = [], {tau: [] for tau in a.adjust}
    head.eval()
    points = TaskPoints(s_val, torch.device("cpu"))
    val_fits = argparse.Namespace(**{**vars(a), "fits": 1})
    for t in pack_tasks(a.pack, splits["validation"], s_val):
        params, coords, values, target = kept_fits(val_fits, w, net, s_val, t, points)[0]
        with torch.no_grad():
            f = features(net, params, coords, values, full)
            if a.context:
                f = torch.cat([f, context(t.image).at(coords)], 1)
            logits = torch.cat([head(x) for x in torch.split(f, 1 << 16)])
        for tau in a.adjust:
            adjusted[tau].append(row(t.name, (logits + adjust[tau]).argmax(1).numpy(), target))
        rows.append(row(t.name, logits.argmax(1).numpy(), target))
        print(f"  {t.name}: mean {rows[-1]['mean_dice']:.3f} hippocampus {rows[-1]['hippo_dice']:.3f} "
              f"lowest {rows[-1]['min_dice']:.3f}", file=sys.stderr, flush=True)
    summary = summarize(rows)
    print(json.dumps(summary))
    for tau in a.adjust:
        print(f"logit adjustment tau {tau}: {json.dumps(summarize(adjusted[tau]))}")
    rec = {"command": " ".join(sys.argv), "weights_sha256": w.sha256, "machine": platform.processor() or platform.machine(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_brains": len(train), "feature_s": round(t_feat),
           "head_s": round(t_head), "final_focal": float(np.mean(losses[-500:])) if losses else None, "summary": summary,
           "rows": rows, "adjusted": {str(tau): {"summary": summarize(r), "rows": r} for tau, r in adjusted.items()}}
    with open(a.json, "a") as f:
        f.write(json.dumps(rec) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("fits", "head"))
    ap.add_argument("--weights", default="Resources/Weights/metaseg3d_structures.safetensors",
                    help="the initialization, fit plan and learning rates (and the shipped head)")
    ap.add_argument("--pack", default="pack/structures.npz")
    ap.add_argument("--out", default="runs/head_lab")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fits", type=int, default=3, help="fits per training brain (members of the fixed schedule)")
    ap.add_argument("--noise", type=float, default=0.02, help="the training fits' noise (validation fits: give 0)")
    g = ap.add_argument_group("fits")
    g.add_argument("--split", default="train")
    g.add_argument("--subjects", nargs="+", help="these subjects instead of --split ('all': every one in the pack)")
    g = ap.add_argument_group("head")
    g.add_argument("--synth", help="a pack of synthetic brains (fitted with `fits`) to train on as well")
    g.add_argument("--train", type=int, default=0, help="the first N real training brains only (0: all; a smoke test)")
    g.add_argument("--synth-fits", type=int, default=1, help="fits per synthetic brain")
    g.add_argument("--hidden", type=int, nargs="+", default=[128])
    g.add_argument("--points", type=int, default=32768, help="points per fit")
    g.add_argument("--balance", type=float, default=0.0, help="sample points with p ~ class frequency^-balance")
    g.add_argument("--steps", type=int, default=6000)
    g.add_argument("--batch", type=int, default=8192)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 0")
    g.add_argument("--ema", type=float, default=0.0, help="score the exponential moving average of the head's "
                   "weights with this decay (e.g. 0.999) instead of its last weights")
    g.add_argument("--gamma", type=float, default=1.0, help="focal loss gamma")
    g.add_argument("--context", action="store_true", help="the head also reads the image around each point (--head-context)")
    g.add_argument("--context-wide", action="store_true", help="with --context: blurs of 1/2/4/8 voxels and offsets "
                   "2/4/8 (an experiment)")
    g.add_argument("--adjust", type=float, nargs="*", default=[0.5, 1.0],
                   help="also score the head with these logit adjustments tau (adds tau*balance*log(class frequency))")
    g.add_argument("--manual-weight", type=int, default=1, help="the manually labelled training brains give this many "
                   "times the points (their protocol's share of the head's training)")
    g.add_argument("--data", default="../shared/data", help="the subjects' folders (their label protocol)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", default="docs/head_lab.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = load_weights(Path(a.weights))
    net = w.build()
    if net.config.head_context:  # the laboratory appends the context itself (--context): its features leave it out
        plain = MetaSegNet(replace(net.config, head_context=False))
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("head.")}, strict=False)
        plain.prior, net = net.prior, plain
    (cmd_fits if a.what == "fits" else cmd_head)(a, w, net)
    return 0


if __name__ == "__main__":
    sys.exit(main())
