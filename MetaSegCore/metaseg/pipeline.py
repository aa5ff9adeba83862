"""File-level pipeline behind `metaseg segment` and `metaseg evaluate`: check outputs -> read -> segment -> write.

Errors the user can fix (bad input, weights, arguments) exit with code 2 and one clear
message; a cancelled run exits with 3; in every failure no output file is left behind.
The segmentation itself is `Segmenter.run`, the code behind the Python API.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import OutputExistsError, write_all
from .data import load_splits
from .fit import FitCancelled
from .images import InputImage
from .io import InputError, image_array_2d, image_dims, read_image, write_image
from .metrics import dice_per_class, foreground_dice, generalized_dice
from .options import Outputs, PathLike, SegmentOptions
from .output_paths import check_output, check_output_dir
from .progress import Reporter
from .segment import segment_array
from .segmentation import check_outputs, check_volume_outputs
from .segmenter import Segmenter, reporter_hooks
from .weights import WeightsError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3


def segment_file(source: PathLike, outputs: Outputs, options: SegmentOptions, progress: str = "bar",
                 mask: Optional[PathLike] = None) -> int:
    """`metaseg segment`: one scan file to its output files; returns the exit code (SIGTERM cancels)."""
    rep = Reporter(progress)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    live_files: List[Path] = []  # snapshots of this run: removed again if it fails
    try:
        segmenter = Segmenter(options.device, options.weights, options.labels)
        segment_scan(source, outputs, options, segmenter, rep, cancel, mask=mask, live_files=live_files)
        return EXIT_OK
    except FitCancelled as e:
        _remove(live_files)
        rep.emit("error", message=f"{e}; nothing was written", exit_code=EXIT_CANCELLED)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        _remove(live_files)
        rep.emit("error", message="interrupted; nothing was written", exit_code=EXIT_CANCELLED)
        return EXIT_CANCELLED
    except (InputError, WeightsError, FileNotFoundError, OutputExistsError, ValueError) as e:
        _remove(live_files)
        rep.emit("error", message=str(e), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    except BaseException:
        _remove(live_files)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove(files: List[Path]) -> None:
    for f in files:
        if f.exists():
            f.unlink()


def segment_scan(source: PathLike, outputs: Outputs, options: SegmentOptions, segmenter: Segmenter, rep: Reporter,
                 cancel: threading.Event, *, mask: Optional[PathLike] = None,
                 live_files: Optional[List[Path]] = None) -> Dict[str, Any]:
    """One scan file: check every output, read, segment, write every output at once; returns the report.
    Errors are raised (InputError and kin for what the user can fix, FitCancelled when `cancel` is set)."""
    live_files = [] if live_files is None else live_files
    t_start = time.perf_counter()
    files = check_outputs(outputs, [source, mask, options.weights])
    options.checked()
    if outputs.live_every < 0:
        raise InputError(f"--live-every must be 0 (off) or more (got {outputs.live_every})")
    if outputs.live_dir and outputs.live_every > 0:
        check_output_dir(Path(outputs.live_dir), "--live-dir")
    rep.emit("stage", stage="read", message=f"reading {source}")
    img = read_image(Path(source))
    dims = image_dims(img)
    check_volume_outputs(files, dims == 3, mask is not None)
    hooks = reporter_hooks(rep, segmenter.device, cancel)
    live = _live_writer(outputs, rep, segmenter.model(dims).labels, live_files)
    if live is not None:
        hooks = dataclasses.replace(hooks, live=live, live_every=outputs.live_every)
    options = dataclasses.replace(options, uncertainty="uncertainty" in files)
    seg = segmenter.run(InputImage(img, str(source), path=Path(source)), options, hooks, mask=mask, started=t_start)
    if cancel.is_set():
        raise FitCancelled("cancelled before writing")
    seg.report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    seg.publish(files, outputs.force)
    report = seg.report
    rep.emit("done", outputs=report["outputs"], report=report)
    if rep.mode == "bar":
        sizes = ", ".join(f"{c['name']} " + (f"{c['area_mm2']} mm2" if "area_mm2" in c else f"{c['volume_ml']} mL")
                          for c in report["classes"][1:])
        print(f"wrote {files['labels']}  (fit PSNR {report['fit']['psnr_db']:.1f} dB, {report['timings_s']['total']:.2f} s "
              f"on {report['device']}; {sizes})", file=sys.stderr)
    return report


def _live_writer(outputs: Outputs, rep: Reporter, segments: List[Dict[str, Any]],
                 written: List[Path]) -> Optional[Callable[[int, sitk.Image], None]]:
    """The `live` hook of --live-dir: each snapshot (an image) written as a NIfTI file, announced and listed
    in `written` (so that a failed run can remove them); None if off."""
    if not (outputs.live_dir and outputs.live_every > 0):
        return None
    live_dir = Path(outputs.live_dir)

    def live(step: int, labels) -> None:
        path = live_dir / f"live_{step:05d}.nii.gz"
        write_all([(path, lambda tmp: write_image(labels, tmp))])
        written.append(path)
        rep.emit("labels", step=step, path=str(path), segments=segments)

    return live


def evaluate_folder(data: PathLike, options: SegmentOptions, subjects: Optional[Sequence[str]] = None,
                    split: str = "validation", json_path: Optional[PathLike] = None, force: bool = False) -> int:
    """`metaseg evaluate`: the 2D Dice table of subject folders with reference labels; returns the exit code."""
    try:
        json_out = check_output(Path(json_path), "json", force, [Path(data)], "--json") if json_path else None
        subjects = subjects or load_splits()[split]
        model = Segmenter(options.device, options.weights, options.labels).model(2).with_steps(options.checked().steps)
    except KeyError:
        print(f"error: no split {split!r} in metaseg/splits.json", file=sys.stderr)
        return EXIT_USAGE
    except (InputError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    w, wpath, plan, dev = model.weights, model.path, model.plan, model.device
    rows = []
    names = {lab["value"]: lab["name"] for lab in w.card["labels"]}
    print(f"weights {wpath.name} ({w.sha256[:12]}), {plan.steps} steps, device {dev}")
    print(f"{'subject':<10} {'fg-Dice':>8} " + " ".join(f"{names[c][:10]:>10}" for c in range(1, 5)) + f" {'GDS':>6} {'PSNR':>6} {'s':>6}")
    for s in subjects:
        d = Path(data) / s
        try:
            img = read_image(d / "slice_norm.nii.gz")
            ref = image_array_2d(read_image(d / "slice_seg4.nii.gz")).astype(np.uint8)
            arr = image_array_2d(img)
        except InputError as e:
            print(f"error: subject {s}: {e}", file=sys.stderr)
            return EXIT_USAGE
        t0 = time.perf_counter()
        res = segment_array(model.net, w.log_lr, plan, arr, w.canvas, seed=options.seed)
        dt = time.perf_counter() - t0
        per = dice_per_class(res.labels, ref)
        row = {"subject": s, "fg_dice": foreground_dice(res.labels, ref), "gds": generalized_dice(res.labels, ref),
               "dice": {names[c]: per[c] for c in range(1, 5)}, "psnr_db": res.psnr, "seconds": dt}
        rows.append(row)
        print(f"{s:<10} {row['fg_dice']:8.4f} " + " ".join(f"{per[c]:10.4f}" for c in range(1, 5)) + f" {row['gds']:6.4f} {res.psnr:6.1f} {dt:6.2f}")
    fg = np.array([r["fg_dice"] for r in rows])
    gds = np.array([r["gds"] for r in rows])
    print(f"{'mean':<10} {fg.mean():8.4f} (sd {fg.std():.4f})  GDS {gds.mean():.4f} (sd {gds.std():.4f})")
    if json_out is not None:
        summary = {"weights": str(wpath), "weights_sha256": w.sha256, "steps": plan.steps, "device": str(dev),
                   "rows": rows, "mean_fg_dice": float(fg.mean()), "mean_gds": float(gds.mean())}
        try:
            write_all([(json_out, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"))],
                      overwrite=force)
        except OutputExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK
