"""The `metaseg` command line: segment, batch, reslice, evaluate, prepare, synth, train, info, convert-weights."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from .version import __version__
from .options import OPTIONAL_OUTPUTS, QUALITIES, BatchSettings, Outputs, SegmentOptions


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train weights on the neurite-oasis data (stage 1 MAML + stage 2 head)",
        description="Meta-train a MetaSeg initialization and head on the training subjects of "
        "metaseg/splits.json. Resumable: rerun the same command to continue from the checkpoint in --out. "
        "Options left out take the defaults of --dims (2D: the shipped metaseg2d recipe; 3D: metaseg3d's).",
    )
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2: coronal slices; 3: aligned volumes (default: 2)")
    p.add_argument("--data", help="folder of subject folders, or a .npz pack from metaseg.io.data.pack_volumes "
                   "(default: ../shared/data/brains)")
    p.add_argument("--splits", help="JSON with 'train' and 'validation' subject lists (default: metaseg/splits.json)")
    p.add_argument("--train-slices", type=int, nargs=3, metavar=("FIRST", "LAST", "STEP"),
                   help="2D: train on the coronal slices FIRST to LAST, every STEP (default: 95 123 2, around the "
                   "paper's slice 109)")
    p.add_argument("--out", help="run folder: checkpoint, log, weights (default: runs/metaseg2d or runs/metaseg3d)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default: auto)")
    p.add_argument("--steps", type=int, help="outer (meta) steps; 0 = no meta-training (ablation: SIREN init + stage-2 head) "
                   "(2D 1250, 3D 2000)")
    p.add_argument("--width", type=int, help="SIREN width (128)")
    p.add_argument("--head-intensity", action="store_true",
                   help="the head also reads the image's intensity at each point, not only the network's features")
    p.add_argument("--head-all-layers", action="store_true",
                   help="the head reads every sine layer's output, not only the penultimate layer's")
    p.add_argument("--head-prior", action="store_true",
                   help="the head also reads the spatial prior: each class's frequency at the point across the training "
                   "brains (3D; each training brain reads the other brains' prior)")
    p.add_argument("--head-context", action="store_true",
                   help="the head also reads the image around each point: the scan smoothed at 1/2/4 voxels and its "
                   "changes 2 and 4 voxels away (with --no-augment)")
    p.add_argument("--head-hidden", type=int, nargs="+", metavar="UNITS",
                   help="the head's hidden layer sizes, e.g. 256 256 (default: one layer of --width units, the paper's)")
    p.add_argument("--init", help="start from this stage-1 result (a run's best_stage1.safetensors) or weights file instead of the SIREN "
                   "initialization; with --steps 0 only stage 2 runs (e.g. a new head for the same initialization)")
    p.add_argument("--fit-steps", type=int, help="inner Adam steps (2D 10, 3D 20)")
    p.add_argument("--fit-batch", type=int, help="coordinates per inner step (2D 2048, 3D 8192)")
    p.add_argument("--test-steps", type=int, help="test-time fit steps, used by stage 2 and written to the card; 0: --fit-steps (2D 100, 3D 400)")
    p.add_argument("--test-batch", type=int, help="test-time coordinates per step; 0: --fit-batch (2D 4096, 3D 8192)")
    p.add_argument("--test-lr", type=float, help="constant test-time learning rate; 0: the meta-learned per-step rates (1e-4)")
    p.add_argument("--test-average", type=int, help="the test-time fit decodes the mean of its parameters over its "
                   "last N steps; stage 2 and the card use it (0)")
    p.add_argument("--test-schedule", choices=("random", "fixed"), help="the test-time fit's batches: random, or the model "
                   "canvas's fixed sequence (the seed then plays no part); stage 2 and the card use it (random)")
    p.add_argument("--inner-lr", type=float, help="initial inner learning rate (3e-4)")
    p.add_argument("--fixed-inner-lr", action="store_true", help="do not meta-learn the inner learning rates")
    p.add_argument("--warm-steps", type=int, help="first outer steps without the inner fit (300)")
    p.add_argument("--lr-lr", type=float, help="outer learning rate of the log inner learning rates (1e-2)")
    p.add_argument("--outer-lr", type=float, help="outer Adam learning rate (1e-4)")
    p.add_argument("--outer-points", type=int, help="pixels scoring the outer loss (2D 8192, 3D 16384)")
    p.add_argument("--head-lr", type=float, help="stage-2 head learning rate (1e-3)")
    p.add_argument("--head-fits", type=int, help="stage-2 fits per training image (2D 1, 3D 4)")
    p.add_argument("--head-steps", type=int, help="stage-2 head fine-tuning steps (4000)")
    p.add_argument("--head-points", type=int, help="stage-2 points per fit whose features train the head (2D 8192, 3D 16384)")
    p.add_argument("--head-balance", type=float, help="stage 2 samples a point of a class with frequency f with "
                   "probability ~ f^-B, so small structures weigh more in the head's training (0: uniform)")
    p.add_argument("--head-adjust", type=float, metavar="TAU", help="with --head-balance B: add TAU * B * log f to the "
                   "head's output for a class of frequency f, moving the share TAU back to the true class frequencies "
                   "(logit adjustment; fewer small structures over-called; 0: none)")
    p.add_argument("--head-ema", type=float, metavar="DECAY", help="keep the exponential moving average of the head's "
                   "weights with this decay, e.g. 0.999 (steadier from run to run than its last weights; 0: the last)")
    p.add_argument("--second-order", action="store_true",
                   help="differentiate through the inner gradients too (slower; first-order learned faster in our runs)")
    p.add_argument("--image-only", action="store_true", help="ablation: meta-learn on intensities only; the head is trained in stage 2")
    p.add_argument("--no-augment", action="store_true", help="no intensity/affine augmentation")
    p.add_argument("--noise", type=float, help="Gaussian noise of up to this sigma (a fraction of the brain's 99th "
                   "percentile) on each training image's brain, drawn per fit, also with --no-augment (0)")
    p.add_argument("--focal-gamma", type=float, help="focal loss gamma (1.0)")
    p.add_argument("--val-every", type=int, help="validate every N outer steps (100)")
    p.add_argument("--meta-batch", type=int, help="tasks per outer step; under torchrun they are split over the processes (1)")
    p.add_argument("--seed", type=int, help="random seed (0)")
    p.add_argument("--label-set", choices=("tissues", "structures"), help="what the head outputs; the pack's "
                   "labels must hold it (`metaseg prepare --label-set`) (tissues)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_train)


# `metaseg train` option -> TrainSettings field
_TRAIN_FIELDS = {
    "data": "data_root", "splits": "splits", "out": "out_dir", "device": "device", "steps": "outer_steps", "test_steps": "test_steps",
    "test_batch": "test_batch", "test_lr": "test_lr", "test_average": "test_average", "test_schedule": "test_schedule", "inner_lr": "inner_lr", "warm_steps": "warm_steps",
    "lr_lr": "lr_lr", "outer_lr": "outer_lr", "outer_points": "outer_points", "head_lr": "head_lr",
    "head_fits": "head_fits_per_image", "head_steps": "head_steps", "head_points": "head_points", "head_balance": "head_balance", "head_adjust": "head_adjust", "head_ema": "head_ema", "focal_gamma": "focal_gamma",
    "val_every": "val_every", "seed": "seed", "meta_batch": "meta_batch", "init": "init", "noise": "noise",
    "label_set": "label_set",
}


def _train(a: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .io.data import check_training_data, load_splits
    from .method.device import pick_device
    from .io.readers import InputError
    from .train.meta_train import meta_train, settings_for
    from .options import check_seed

    try:
        if a.seed is not None:
            check_seed(a.seed)
        _check_train_data(a.data)
        if a.train_slices:
            first, last, step = a.train_slices
            if a.dims != 2 or not 0 <= first <= last or step < 1:
                raise ValueError("--train-slices FIRST LAST STEP is for 2D training (--dims 2), with "
                                 "0 <= FIRST <= LAST and STEP >= 1")
        if a.head_ema is not None and not 0 <= a.head_ema < 1:
            raise ValueError(f"--head-ema is a decay from 0 to below 1 (e.g. 0.999), got {a.head_ema}")
        if a.head_adjust and not a.head_balance:
            raise ValueError("--head-adjust corrects the prior that --head-balance teaches the head: give both")
        check_training_data(Path(a.data or settings_for(a.dims).data_root), load_splits(Path(a.splits)) if a.splits else load_splits())
        pick_device(a.device or "auto")
    except (InputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    s = settings_for(a.dims, **{f: getattr(a, k) for k, f in _TRAIN_FIELDS.items() if getattr(a, k) is not None})
    if a.train_slices:
        s = dataclasses.replace(s, train_slices=tuple(range(a.train_slices[0], a.train_slices[1] + 1, a.train_slices[2])))
    plan = {"steps": a.fit_steps, "batch_size": a.fit_batch}
    if a.width:
        s = dataclasses.replace(s, model=dataclasses.replace(s.model, width=a.width))
    if a.head_hidden:
        s = dataclasses.replace(s, model=dataclasses.replace(s.model, head_hidden=tuple(a.head_hidden)))
    if a.head_intensity or a.head_all_layers or a.head_prior or a.head_context:
        s = dataclasses.replace(s, model=dataclasses.replace(
            s.model, head_intensity=a.head_intensity, head_all_layers=a.head_all_layers, head_prior=a.head_prior,
            head_context=a.head_context))
    s = dataclasses.replace(
        s, plan=dataclasses.replace(s.plan, **{k: v for k, v in plan.items() if v is not None}),
        learn_inner_lr=not a.fixed_inner_lr, first_order=not a.second_order, image_only=a.image_only,
        augment=not a.no_augment, command="metaseg " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
    )
    meta_train(s)
    return 0


def _check_train_data(data: Optional[str]) -> None:
    """Refuse a --data that is neither a folder nor a .npz pack, before any run folder is made."""
    from .io.readers import InputError

    if data is None:
        return
    path = Path(data)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".npz")):
        raise InputError(f"--data {path}: not found, or neither a folder of subject folders nor a .npz pack; "
                         "nothing was started")


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="make a training pack from labelled scans in any geometry (for `metaseg train --data`)",
        description="Register each subject's scan to the model's template exactly as `segment` does, resample "
        "its image (linear) and labels (nearest neighbour) onto the model grid with that one transform, and write "
        "one .npz pack for `metaseg train --data`. Labels must use the label set's values: tissues 0 background, "
        "1 cortical GM, 2 subcortical GM, 3 WM, 4 CSF; structures FreeSurfer's aseg numbers (31 structures). Prints a QC table (registration NCC, class volumes before and after "
        "resampling). A subject that fails (unreadable, no labels, wrong grid, registration below the gate) is "
        "refused with the reason, and then no pack is written unless --skip-refused.",
        epilog="exit codes: 0 done, 2 bad input or a refused subject (no pack written), 1 unexpected error",
    )
    p.add_argument("subjects", nargs="+", help="one folder per subject (its name is the subject's id)")
    p.add_argument("-o", "--output", required=True, help="pack to write (.npz)")
    p.add_argument("--image-glob", default="native_t1.nii*", help="the image file in each folder (default: %(default)s)")
    p.add_argument("--labels-glob", default="native_seg4.nii*", help="the label file in each folder (default: %(default)s)")
    p.add_argument("--label-set", default="tissues", choices=("tissues", "structures"),
                   help="what the label files hold (default: %(default)s)")
    p.add_argument("--qc", help="also write the QC table here (.tsv)")
    p.add_argument("--skip-refused", action="store_true", help="write the pack without the refused subjects")
    p.add_argument("--force", action="store_true", help="replace an existing pack or QC table")
    p.set_defaults(func=_prepare)


def _prepare(a: argparse.Namespace) -> int:
    from .io.atomic import write_all
    from .io.data import pack_writer
    from .io.readers import InputError
    from .labelsets import label_set
    from .train.meta_train import settings_for
    from .io.output_paths import check_output
    from .train.prepare import find_subjects, prepare_subjects, qc_row, qc_table

    try:
        out = check_output(Path(a.output), "pack", a.force, option="-o")
        qc = check_output(Path(a.qc), "table", a.force, option="--qc") if a.qc else None
        subjects = find_subjects([Path(d) for d in a.subjects], a.image_glob, a.labels_glob)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    canvas = settings_for(3).canvas
    labels = label_set(a.label_set)
    print(f"{'subject':<14} {'status':<8} {'NCC':>5} {'inner':>5}  largest change of a label's volume by resampling",
          file=sys.stderr)

    def show(p) -> None:
        r = qc_row(p, labels)
        print(f"{p.id:<14} {r['status']:<8} {r['ncc']!s:>5} {r['ncc_interior']!s:>5}  "
              f"{p.error if p.error else str(r['max_change_pct']) + ' %'}", file=sys.stderr)

    done = prepare_subjects(subjects, canvas, on_done=show, label_set=labels)
    refused = [p for p in done if p.error]
    kept = [p for p in done if not p.error]
    if refused and not a.skip_refused:
        print(f"error: {len(refused)} subject(s) refused ({', '.join(p.id for p in refused)}); no pack written. "
              "Fix or remove them, or pass --skip-refused", file=sys.stderr)
        return 2
    if not kept:
        print("error: no subject could be prepared; no pack written", file=sys.stderr)
        return 2
    meta = {"canvas": list(canvas), "label_set": labels.name, "command": "metaseg " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
            "subjects": {p.id: p.qc for p in kept}, "refused": {p.id: p.error for p in refused}}
    writers = [(out, pack_writer({p.id: p.volume for p in kept}, meta))]  # pack and table appear together
    if qc is not None:
        table = qc_table(done, labels)
        writers.append((qc, lambda tmp: Path(tmp).write_text(table, encoding="utf-8")))
    write_all(writers)
    print(f"wrote {out}: {len(kept)} subject(s){f', {len(refused)} refused' if refused else ''}", file=sys.stderr)
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="synthesize T1-like training subjects from brain label maps (SynthSeg-style), for `metaseg prepare`",
        description="For each label map (FreeSurfer aseg numbers with SynthSeg's generation labels, e.g. "
        "../shared/data/synthseg-labels/training_seg_*.nii.gz) write --copies subject folders OUT/<map>_synth<k>/ "
        "laid out like a real subject: native_t1.nii.gz (a skull-stripped T1-like image: per-class Gaussian "
        "intensities from SynthSeg's T1 priors, a smooth bias field, the blur of a random slice thickness, noise), "
        "native_structures.nii.gz (the 31 structures), native_seg4.nii.gz (their tissues) and synth.json (what was "
        "drawn). Each folder appears whole or not at all; existing ones are replaced only with --force.",
        epilog="exit codes: 0 done, 2 bad input (a map missing structures, unknown labels, existing folders), "
        "1 unexpected error. e.g. metaseg synth ../shared/data/synthseg-labels/training_seg_*.nii.gz -o synth --seed 0",
    )
    p.add_argument("labelmaps", nargs="+", help="label maps (.nii.gz, .mgz, ...), every one holding all 31 structures")
    p.add_argument("-o", "--output", required=True, help="folder to write the subject folders into")
    p.add_argument("--copies", type=int, default=1, help="subjects per label map (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--priors", help="folder of SynthSeg's generation_labels.npy, prior_means_t1.npy and "
                   "prior_stds_t1.npy (default: the first label map's folder)")
    p.add_argument("--force", action="store_true", help="replace existing subject folders")
    p.set_defaults(func=_synth)


def _synth(a: argparse.Namespace) -> int:
    from .io.readers import InputError
    from .options import check_seed
    from .train.synth import SynthSettings, run_synth

    try:
        check_seed(a.seed)
        settings = SynthSettings(tuple(Path(m) for m in a.labelmaps), Path(a.output), a.copies, a.seed,
                                 Path(a.priors) if a.priors else None, a.force)
        run_synth(settings, say=lambda line: print(line, file=sys.stderr))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


LABEL_SETS = ("tissues", "structures")
LABELS_HELP = ("tissues: background, cortical GM, subcortical GM, WM, CSF (values 0-4); structures: 31 brain structures "
               "in FreeSurfer's aseg numbering (hippocampus 17/53, ventricles, thalamus, ...). 3D: one model gives both, its "
               "structures summed into the tissues (default: %(default)s)")
QUALITY_HELP = ("3D: best = an ensemble of 3 fits averaged in probability, +0.010 validation Dice for 3x the fit "
                "time; 2D slices have no accuracy mode (an ensemble gained < 0.01 there) (default: %(default)s)")


def _add_segment(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image: fit the INR to its pixels, decode the labels",
        description="Segment INPUT into 0 background, 1 cortical GM, 2 subcortical GM, 3 WM, 4 CSF. "
        "The labelmap has exactly INPUT's geometry. INPUT: a T1 volume in any scanner geometry, whole head "
        "or skull-stripped (the brain is extracted when a skull is present; registered to the model's template automatically; files on the training grid are used "
        "as they are), or one aligned coronal slice like neurite-oasis (e.g. a 160x192x1 NIfTI). "
        "No file is written unless the whole run succeeds, and existing files are only replaced with --force.",
        epilog="exit codes: 0 done, 2 bad input/weights/arguments, 3 cancelled, 1 unexpected error",
    )
    p.add_argument("input", help="image file (.nii, .nii.gz, .nrrd, .mha, .mhd, .mgz) or a DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="labelmap to write (.nii.gz, .nrrd, ...; .seg.nrrd for a Slicer segmentation)")
    p.add_argument("--weights", help="weights file (default: the shipped model for the input's dimension)")
    p.add_argument("--steps", type=int, help="test-time fit steps (default: the weights' card)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps or gpu (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit's coordinate sampling (default: %(default)s)")
    p.add_argument("--report", help="JSON report: timings, device, PSNR, tissue sizes, weights sha256")
    p.add_argument("--preview", help="PNG of the image with the labels overlaid")
    p.add_argument("--seg-nrrd", help="also write a Slicer .seg.nrrd segmentation (names, colours, terminology)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--mask", help="3D: brain mask in the scan's geometry (nonzero = brain); voxels outside are ignored")
    p.add_argument("--brain-extraction", choices=("auto", "on", "off"), default="auto",
                   help="3D: find the brain in a head with skull (deepbet, `pip install \"metaseg[brain]\"`): auto decides "
                   "from the image whether the skull is present and reports why (default: %(default)s)")
    p.add_argument("--brain-mask", help="3D: also write the brain mask used (1 = brain) on the scan's grid")
    p.add_argument("--bias-correction", choices=("auto", "n4", "off"), default="auto",
                   help="3D: divide the brain by SimpleITK's N4 bias field before fitting; auto: only when the brain "
                   "was extracted from a whole head (default: %(default)s)")
    p.add_argument("--uncertainty", help="3D: also write the per-voxel entropy of the class probabilities (0 certain .. 1)")
    p.add_argument("--save-inr", help="3D: save the fitted INR (.safetensors, ~2 MB) for `metaseg reslice`: new planes "
                   "without refitting")
    p.add_argument("--live-dir", help="write the labels as they form into this folder (live preview, with --live-every)")
    p.add_argument("--live-every", type=int, default=0, help="steps between live label snapshots (default: off)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar on stderr, json lines on stdout (for programs), or none (default: %(default)s)")
    p.add_argument("--accept-poor-match", action="store_true",
                   help="segment even an input that is refused as not matching the model (3D: registration far "
                   "below the gate; 2D: not an aligned coronal slice); the result is then likely wrong")
    p.add_argument("--quality", choices=QUALITIES, default="fast", help=QUALITY_HELP)
    p.add_argument("--labels", choices=LABEL_SETS, default="tissues", help=LABELS_HELP)
    p.set_defaults(func=_segment)


def _options(a: argparse.Namespace) -> SegmentOptions:
    """The typed settings of a `segment`, `batch` or `evaluate` command line (options a command lacks keep
    their defaults)."""
    names = [f.name for f in dataclasses.fields(SegmentOptions) if f.name != "uncertainty"]  # that one's a file here
    return SegmentOptions(**{n: getattr(a, n) for n in names if getattr(a, n, None) is not None})


def _segment(a: argparse.Namespace) -> int:
    from .pipeline import segment_file

    outputs = Outputs(labels=a.output, report=a.report, preview=a.preview, seg_nrrd=a.seg_nrrd,
                      uncertainty=a.uncertainty, inr=a.save_inr, brain_mask=a.brain_mask, live_dir=a.live_dir,
                      live_every=a.live_every, force=a.force)
    return segment_file(a.input, outputs, _options(a), a.progress, mask=a.mask)


def _add_job(sub) -> None:
    p = sub.add_parser(
        "job",
        help="segment as a JSON job file says (for programs: the Slicer module's child process)",
        description="Run one `segment` described by a JSON file that holds the run's typed settings under their "
        "names in metaseg.options (SegmentOptions, Outputs) instead of command-line options: {\"format\": "
        "\"metaseg-job/1\", \"input\": ..., \"mask\": ..., \"options\": {...}, \"outputs\": {...}, \"progress\": "
        "\"json\"}. Unknown fields are refused.",
        epilog="exit codes: as segment (0 done, 2 bad input/weights/arguments, 3 cancelled, 1 unexpected error)",
    )
    p.add_argument("job", help="the job file (.json)")
    p.set_defaults(func=_job)


def _job(a: argparse.Namespace) -> int:
    from .io.readers import InputError
    from .options import read_job
    from .pipeline import segment_file

    try:
        job = read_job(a.job)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return segment_file(job.input, job.outputs, job.options, job.progress, mask=job.mask)


def _add_batch(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="segment a cohort: one output folder per scan and a volumes table; resumable, sharded",
        description="Segment every scan of INPUTS (image files, folders, BIDS datasets, glob patterns, CSV/TSV "
        "manifests with a path column and optional id and mask columns) into OUT/<id>/ with the options of "
        "`segment`, loading the model once. OUT/volumes.tsv gets one row per scan (tissue volumes, QC, errors). "
        "Rerunning skips finished scans; Ctrl-C or SIGTERM leaves a valid table. --shard I/N takes every N-th scan "
        "(run N of them anywhere, then --merge).",
        epilog="exit codes: 0 every scan done, 2 bad arguments or some scans failed (see the table), 3 cancelled, "
        "1 unexpected error",
    )
    p.add_argument("inputs", nargs="*", help="scans: image files, folders, BIDS datasets, glob patterns or .csv/.tsv manifests")
    p.add_argument("-o", "--output", required=True, help="output folder: <id>/labels.nii.gz, <id>/report.json, volumes.tsv")
    p.add_argument("--path-column", default="path", help="manifest column of the scans' paths (default: %(default)s)")
    p.add_argument("--id-column", default="id", help="manifest column of the scans' ids (default: %(default)s; "
                   "without it: BIDS sub-/ses- entities, else the file name)")
    p.add_argument("--weights", help="weights file (default: the shipped model for each input's dimension)")
    p.add_argument("--steps", type=int, help="test-time fit steps (default: the weights' card)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit's coordinate sampling (default: %(default)s)")
    p.add_argument("--preview", action="store_true", help="also write <id>/preview.png")
    p.add_argument("--seg-nrrd", action="store_true", help="also write <id>/labels.seg.nrrd (Slicer segmentation)")
    p.add_argument("--uncertainty", action="store_true", help="3D: also write <id>/uncertainty.nii.gz")
    p.add_argument("--save-inr", action="store_true", help="3D: also write <id>/fitted.safetensors for `metaseg reslice`")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps or gpu (default: %(default)s)")
    p.add_argument("--devices", help="one worker process per device, e.g. cuda:0,cuda:1")
    p.add_argument("--jobs", type=int, help="worker processes (default: one per --devices entry, else 1)")
    p.add_argument("--shard", help="I/N: segment scans I, I+N, I+2N, ... only (1 <= I <= N); auto or auto/N: I (and N) "
                   "from SLURM_ARRAY_TASK_ID, SGE_TASK_ID or JOB_COMPLETION_INDEX. Table: volumes.shard-I-of-N.tsv")
    p.add_argument("--merge", action="store_true", help="join the shard tables in --output into volumes.tsv")
    p.add_argument("--accept-poor-match", action="store_true",
                   help="segment even scans refused as not matching the model (see `segment`); they get a warning")
    p.add_argument("--quality", choices=QUALITIES, default="fast", help=QUALITY_HELP)
    p.add_argument("--labels", choices=LABEL_SETS, default="tissues", help=LABELS_HELP)
    p.add_argument("--force", action="store_true", help="redo and replace every scan, finished or not")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar on stderr, json lines on stdout (for programs), or none (default: %(default)s)")
    p.set_defaults(func=_batch)


def _batch(a: argparse.Namespace) -> int:
    from .cohort.batch import run_batch

    flags = {"preview": a.preview, "seg_nrrd": a.seg_nrrd, "uncertainty": a.uncertainty, "inr": a.save_inr}
    return run_batch(BatchSettings(
        a.inputs, a.output, _options(a), tuple(k for k in OPTIONAL_OUTPUTS if flags[k]), a.path_column, a.id_column,
        a.devices, a.jobs, a.shard, a.merge, a.force, a.progress))


def _add_reslice(sub) -> None:
    p = sub.add_parser(
        "reslice",
        help="labels, probabilities or intensity of a saved fitted INR on any plane, without refitting",
        description="Render a cross-section of a fitted 3D INR (from `metaseg segment --save-inr`). The plane is "
        "a standard one through the scan's centre (--orientation, optionally tilted by --angles and moved by "
        "--offset), or given in physical LPS mm by --origin with --normal or with --u and --v. The output is a "
        "one-slice image placed on that plane.",
        epilog="exit codes: 0 done, 2 bad input/arguments, 1 unexpected error",
    )
    p.add_argument("inr", help="fitted INR file (.safetensors, with its .sha256 beside it)")
    p.add_argument("-o", "--output", required=True, help="image to write (.nii.gz, .nrrd, ...)")
    p.add_argument("--what", choices=("labels", "probabilities", "intensity"), default="labels",
                   help="what to render (default: %(default)s)")
    p.add_argument("--orientation", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="standard plane through the scan's centre (default: %(default)s)")
    p.add_argument("--angles", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                   help="tilt the standard plane by these rotations in degrees (an oblique plane)")
    p.add_argument("--offset", type=float, default=0.0, help="move the standard plane along its normal (mm)")
    p.add_argument("--origin", type=float, nargs=3, metavar=("X", "Y", "Z"), help="plane centre in physical LPS mm")
    p.add_argument("--normal", type=float, nargs=3, metavar=("X", "Y", "Z"), help="plane normal (with --origin)")
    p.add_argument("--u", type=float, nargs=3, metavar=("X", "Y", "Z"), help="in-plane column direction (with --origin, --v)")
    p.add_argument("--v", type=float, nargs=3, metavar=("X", "Y", "Z"), help="in-plane row direction (with --origin, --u)")
    p.add_argument("--extent", type=float, help="plane width and height in mm (default: the scan's longest side)")
    p.add_argument("--spacing", type=float, help="pixel spacing in mm, e.g. 0.25 for 4x super-resolution of 1 mm "
                   "(default: the scan's smallest)")
    p.add_argument("--weights", action="append", default=[], metavar="FILE_OR_FOLDER",
                   help="weights the result was made with (a file, or a folder of them; repeatable): a model that "
                   "reads a spatial prior takes it from the weights of the sha256 the fitted INR names, looked for "
                   "here and among the shipped weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=_reslice)


def _reslice(a: argparse.Namespace) -> int:
    import numpy as np

    from .io.atomic import OutputExistsError, write_all
    from .method.device import pick_device
    from .space.fitted import FittedVolume
    from .io.readers import InputError, write_image
    from .io.output_paths import check_output
    from .space.reslice import Plane, plane_warning, reslice, standard_plane
    from .method.weights import WeightsError

    try:
        out = check_output(Path(a.output), "image", a.force, [Path(a.inr), Path(a.inr + ".sha256")])
        if a.what == "probabilities" and out.name.lower().endswith((".nii", ".nii.gz")):
            raise InputError("NIfTI loses the plane's orientation for multi-component images: write the "
                             "probabilities as .nrrd or .mha")
        _check_plane_numbers(a)
        vol = FittedVolume.load(Path(a.inr), pick_device(a.device), weights=[Path(w) for w in a.weights])
        ref = vol.info["reference"]
        sp = a.spacing if a.spacing is not None else float(min(ref["spacing"]))
        extent = a.extent if a.extent is not None else float(((np.array(ref["size"]) - 1) * np.array(ref["spacing"])).max())
        if a.origin is None:
            if a.normal or a.u or a.v:
                raise InputError("--normal, --u and --v need --origin (the plane's centre in LPS mm)")
            plane = standard_plane(ref, a.orientation, sp, a.angles, a.offset, a.extent)
        elif a.normal is not None:
            plane = Plane.from_normal(a.origin, a.normal, (extent, extent), (sp, sp))
        elif a.u is not None and a.v is not None:
            plane = Plane.centred(a.origin, a.u, a.v, (extent, extent), (sp, sp))
        else:
            raise InputError("with --origin give --normal, or both --u and --v")
        img = reslice(vol, plane, a.what)
        write_all([(out, lambda tmp: write_image(img, tmp))], overwrite=a.force)
    except (InputError, WeightsError, FileNotFoundError, OutputExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = plane_warning(vol, plane, img)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {out} ({plane.size[0]}x{plane.size[1]} pixels of {sp:g} mm, {a.what})", file=sys.stderr)
    return 0


def _check_plane_numbers(a: argparse.Namespace) -> None:
    """Every number of a plane finite, spacing and extent positive: NaN or 0 must not slip into defaults."""
    import math

    from .io.readers import InputError

    for option in ("origin", "normal", "u", "v", "angles", "offset", "extent", "spacing"):
        value = getattr(a, option)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and not math.isfinite(v) for v in values):
            raise InputError(f"--{option} must be finite numbers (got {' '.join(str(v) for v in values)})")
    for option in ("extent", "spacing"):
        value = getattr(a, option)
        if value is not None and value <= 0:
            raise InputError(f"--{option} must be more than 0 mm (got {value:g})")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and volume error of every label against reference labels, per label-protocol group",
        description="Segment --image of each subject folder in DATA as `segment` does (2D slice or 3D scan, any "
        "geometry) and compare with --reference on the image's grid: Dice and absolute volume error of every "
        "label, mean foreground Dice, and for structures the tissues they merge into. Subjects are grouped by "
        "label protocol (FreeSurfer: brains/, manual: oasis-nmm/ of ../shared/data) and each group is summarized.",
        epilog="e.g. metaseg evaluate ../shared/data --labels structures --image native_t1.nii.gz "
        "--reference native_structures.nii.gz",
    )
    p.add_argument("data", help="folder of subject folders, or ../shared/data (its brains/ and oasis-nmm/ folders)")
    p.add_argument("--image", default="slice_norm.nii.gz", help="image file in each subject folder (default: %(default)s)")
    p.add_argument("--reference", default="slice_seg4.nii.gz", help="reference labels on the image's grid "
                   "(default: %(default)s)")
    p.add_argument("--labels", choices=LABEL_SETS, default="tissues", help=LABELS_HELP)
    p.add_argument("--subjects", nargs="+", help="subject folder names (default: --split)")
    p.add_argument("--split", default="validation", help="split of metaseg/splits.json (default: %(default)s)")
    p.add_argument("--weights", help="weights file (default: the shipped 2D model)")
    p.add_argument("--steps", type=int, help="test-time fit steps (default: the weights' card)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps or gpu (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the table as JSON here (.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=_evaluate)


def _evaluate(a: argparse.Namespace) -> int:
    from .pipeline import evaluate_folder

    return evaluate_folder(a.data, _options(a), a.subjects, a.split, a.json, a.force, a.image, a.reference)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a weights file's card (after checking its sha256)",
                       description="Print the model card stored in a weights file: configuration, labels, "
                       "expected input, test-time plan, training data and command, validation metrics.")
    p.add_argument("weights", nargs="?", help="weights file (default: the shipped 2D model)")
    p.set_defaults(func=_info)


def _info(a: argparse.Namespace) -> int:
    import json

    from .resources import default_weights
    from .method.weights import WeightsError, load_weights

    try:
        w = load_weights(a.weights or default_weights(2))
    except (WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"sha256": w.sha256, "config": w.config.to_dict(), **w.card}, indent=2))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert-weights",
        help="convert a trusted PyTorch pickle (.pt) of metaseg <= 0.4.0 to the safetensors format",
        description="MetaSeg no longer opens PyTorch pickle files (.pt): opening one can run any code it holds. "
        "This converts weights, a fitted INR (--save-inr), or a training run's best_stage1.pt or checkpoint.pt into "
        "a .safetensors file (with its .sha256). The .pt is unpickled only if its sha256 is that of weights MetaSeg "
        "shipped, or the one you pass with --sha256 (the hash you trust the file by, e.g. from train.log or a report).",
        epilog="exit codes: 0 converted, 2 refused or bad arguments",
    )
    p.add_argument("old", help="the .pt file")
    p.add_argument("new", help="the .safetensors file to write")
    p.add_argument("--sha256", help="the file's sha256, if it is not one of the weights MetaSeg shipped")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=_convert)


def _convert(a: argparse.Namespace) -> int:
    from .train.legacy import convert
    from .io.output_paths import check_output
    from .io.safefile import WeightsError
    from .io.readers import InputError

    try:
        if Path(a.new).exists() and not a.force:
            raise InputError(f"output {a.new} exists; pass --force to overwrite it")
        check_output(Path(a.new), "fitted", True, [Path(a.old)], "new")
        done = convert(Path(a.old), Path(a.new), a.sha256)
    except (WeightsError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {done['path']} ({done['kind']}, sha256 {done['sha256']})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metaseg",
        description="MetaSeg: segment brain MRI by fitting only its pixels (Vyas et al., MICCAI 2025).",
    )
    p.add_argument("--version", action="version", version=f"metaseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_job(sub)
    _add_batch(sub)
    _add_reslice(sub)
    _add_evaluate(sub)
    _add_prepare(sub)
    _add_synth(sub)
    _add_train(sub)
    _add_info(sub)
    _add_convert(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OSError as e:  # a full disk, a quota, a read-only folder, wherever it struck: one message, exit 2
        from .io.atomic import USER_ERRNOS, write_failure

        failure = write_failure(Path(e.filename or "."), e) if e.errno in USER_ERRNOS else None
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 2
    except ValueError as e:
        from .io.atomic import OutputWriteError

        if not isinstance(e, OutputWriteError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
