"""The `metaseg` command line: train, segment, evaluate."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional

from . import __version__


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train weights on the neurite-oasis data (stage 1 MAML + stage 2 head)",
        description="Meta-train a MetaSeg initialization and head on the training subjects of "
        "metaseg/splits.json. Resumable: rerun the same command to continue from the checkpoint in --out.",
    )
    p.add_argument("--data", default="../shared/data/brains", help="folder of subject folders (default: %(default)s)")
    p.add_argument("--out", default="runs/metaseg2d", help="run folder: checkpoint, log, weights (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1250,
                   help="outer (meta) steps; 0 = no meta-training (ablation: SIREN init + stage-2 head) (default: %(default)s)")
    p.add_argument("--fit-steps", type=int, default=10, help="inner = test-time Adam steps (default: %(default)s)")
    p.add_argument("--test-steps", type=int, default=100,
                   help="test-time fit steps, used by stage 2 and written to the card; 0: --fit-steps (default: %(default)s)")
    p.add_argument("--test-batch", type=int, default=4096, help="test-time coordinates per step; 0: --fit-batch (default: %(default)s)")
    p.add_argument("--test-lr", type=float, default=1e-4,
                   help="constant test-time learning rate; 0: the meta-learned per-step rates (default: %(default)s)")
    p.add_argument("--fit-batch", type=int, default=2048, help="coordinates per fit step (default: %(default)s)")
    p.add_argument("--inner-lr", type=float, default=3e-4, help="initial inner learning rate (default: %(default)s)")
    p.add_argument("--fixed-inner-lr", action="store_true", help="do not meta-learn the inner learning rates")
    p.add_argument("--warm-steps", type=int, default=300, help="first outer steps without the inner fit (default: %(default)s)")
    p.add_argument("--lr-lr", type=float, default=1e-2, help="outer learning rate of the log inner learning rates (default: %(default)s)")
    p.add_argument("--outer-lr", type=float, default=1e-4, help="outer Adam learning rate (default: %(default)s)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="stage-2 head learning rate (default: %(default)s)")
    p.add_argument("--head-fits", type=int, default=1, help="stage-2 fits per training image (default: %(default)s)")
    p.add_argument("--outer-points", type=int, default=8192, help="pixels scoring the outer loss (default: %(default)s)")
    p.add_argument("--second-order", action="store_true",
                   help="differentiate through the inner gradients too (slower; first-order learned faster in our runs)")
    p.add_argument("--image-only", action="store_true", help="ablation: meta-learn on intensities only; the head is trained in stage 2")
    p.add_argument("--no-augment", action="store_true", help="no intensity/affine augmentation")
    p.add_argument("--focal-gamma", type=float, default=1.0, help="focal loss gamma (default: %(default)s)")
    p.add_argument("--head-steps", type=int, default=4000, help="stage-2 head fine-tuning steps (default: %(default)s)")
    p.add_argument("--val-every", type=int, default=100, help="validate every N outer steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_train)


def _train(a: argparse.Namespace) -> int:
    import torch

    from .fit import FitPlan
    from .meta_train import TrainSettings, meta_train

    if a.threads:
        torch.set_num_threads(a.threads)
    s = TrainSettings(
        data_root=a.data, out_dir=a.out, outer_steps=a.steps, plan=FitPlan(steps=a.fit_steps, batch_size=a.fit_batch),
        test_steps=a.test_steps, test_batch=a.test_batch, test_lr=a.test_lr, inner_lr=a.inner_lr, learn_inner_lr=not a.fixed_inner_lr, warm_steps=a.warm_steps, lr_lr=a.lr_lr, outer_lr=a.outer_lr, outer_points=a.outer_points,
        first_order=not a.second_order, image_only=a.image_only, augment=not a.no_augment, focal_gamma=a.focal_gamma,
        head_steps=a.head_steps, head_lr=a.head_lr, head_fits_per_image=a.head_fits, val_every=a.val_every, seed=a.seed,
        command="metaseg " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
    )
    meta_train(s)
    return 0


def _add_segment(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image: fit the INR to its pixels, decode the labels",
        description="Segment INPUT into 0 background, 1 cortical GM, 2 subcortical GM, 3 WM, 4 CSF. "
        "The labelmap has exactly INPUT's geometry. INPUT: a skull-stripped T1 slice aligned like "
        "neurite-oasis (e.g. a 160x192x1 NIfTI). No file is written unless the whole run succeeds, and "
        "existing files are only replaced with --force.",
        epilog="exit codes: 0 done, 2 bad input/weights/arguments, 3 cancelled, 1 unexpected error",
    )
    p.add_argument("input", help="image file (.nii, .nii.gz, .nrrd, .mha, .mhd)")
    p.add_argument("-o", "--output", required=True, help="labelmap to write (.nii.gz, .nrrd, ...; .seg.nrrd for a Slicer segmentation)")
    p.add_argument("--weights", help="weights file (default: the shipped model for the input's dimension)")
    p.add_argument("--steps", type=int, help="test-time fit steps (default: the weights' card)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps or gpu (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit's coordinate sampling (default: %(default)s)")
    p.add_argument("--report", help="JSON report: timings, device, PSNR, tissue sizes, weights sha256")
    p.add_argument("--preview", help="PNG of the image with the labels overlaid")
    p.add_argument("--seg-nrrd", help="also write a Slicer .seg.nrrd segmentation (names, colours, terminology)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--live-dir", help="write the labels as they form into this folder (live preview, with --live-every)")
    p.add_argument("--live-every", type=int, default=0, help="steps between live label snapshots (default: off)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar on stderr, json lines on stdout (for programs), or none (default: %(default)s)")
    p.set_defaults(func=_segment)


def _segment(a: argparse.Namespace) -> int:
    from .pipeline import segment_file

    return segment_file(a)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice table of the 2D task for subjects with reference labels",
        description="Segment slice_norm.nii.gz of each subject folder in DATA and compare with slice_seg4.nii.gz: "
        "per-class Dice, mean foreground Dice (classes 1-4) and the paper's generalized Dice.",
    )
    p.add_argument("data", help="folder of subject folders (neurite-oasis layout)")
    p.add_argument("--subjects", nargs="+", help="subject folder names (default: --split)")
    p.add_argument("--split", default="validation", help="split of metaseg/splits.json (default: %(default)s)")
    p.add_argument("--weights", help="weights file (default: the shipped 2D model)")
    p.add_argument("--steps", type=int, help="test-time fit steps (default: the weights' card)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps or gpu (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the table as JSON here")
    p.set_defaults(func=_evaluate)


def _evaluate(a: argparse.Namespace) -> int:
    from .pipeline import evaluate_folder

    return evaluate_folder(a)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a weights file's card (after checking its sha256)",
                       description="Print the model card stored in a weights file: configuration, labels, "
                       "expected input, test-time plan, training data and command, validation metrics.")
    p.add_argument("weights", nargs="?", help="weights file (default: the shipped 2D model)")
    p.set_defaults(func=_info)


def _info(a: argparse.Namespace) -> int:
    import json

    from .resources import default_weights
    from .weights import WeightsError, load_weights

    try:
        w = load_weights(a.weights or default_weights(2))
    except (WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"sha256": w.sha256, "config": w.config.to_dict(), **w.card}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metaseg",
        description="MetaSeg: segment brain MRI by fitting only its pixels (Vyas et al., MICCAI 2025).",
    )
    p.add_argument("--version", action="version", version=f"metaseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_evaluate(sub)
    _add_train(sub)
    _add_info(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
