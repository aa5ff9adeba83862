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
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import SimpleITK as sitk

from .io.atomic import OutputExistsError, write_all
from .io.data import load_splits
from .method.fit import FitCancelled
from .images import InputImage
from .io.readers import InputError, image_dims, read_image, write_image
from .live import check_live_dir, snapshot_path, write_snapshot
from .options import Outputs, PathLike, SegmentOptions
from .io.output_paths import check_output
from .io.progress import Reporter
from .segmentation import check_outputs, check_volume_outputs
from .segmenter import Segmenter, reporter_hooks
from .method.weights import WeightsError

from .exit_codes import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, EXIT_USAGE  # noqa: E402,F401 (pipeline.EXIT_*)


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
        rep.emit("error", message=str(e), exit_code=EXIT_USAGE, **refusal_fields(e))
        return EXIT_USAGE
    except Exception as e:  # a fault, not a refusal: the program reading the events gets its traceback too
        _remove(live_files)
        if rep.mode == "json":
            rep.emit("error", message=f"{type(e).__name__}: {e}", exit_code=EXIT_ERROR, reason="unexpected",
                     traceback=traceback.format_exc())
        raise
    except BaseException:
        _remove(live_files)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def refusal_fields(e: BaseException) -> Dict[str, Any]:
    """An error event's machine-readable part: the refusal's `reason` and `facts` (InputError), where it has one."""
    reason = getattr(e, "reason", None)
    return {"reason": reason, "facts": dict(getattr(e, "facts", {}) or {})} if reason else {}


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
    inputs = (source, mask, options.weights)
    if outputs.live_dir and outputs.live_every > 0:
        check_live_dir(Path(outputs.live_dir), inputs, outputs.force)
    rep.emit("stage", stage="read", message=f"reading {source}")
    img = read_image(Path(source))
    dims = image_dims(img)
    check_volume_outputs(files, dims == 3, mask is not None)
    hooks = reporter_hooks(rep, segmenter.device, cancel)
    live = _live_writer(outputs, rep, segmenter.model(dims).labels, inputs, live_files)
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


def _live_writer(outputs: Outputs, rep: Reporter, segments: List[Dict[str, Any]], inputs: Sequence[Any],
                 written: List[Path]) -> Optional[Callable[[int, sitk.Image], None]]:
    """The `live` hook of --live-dir: each snapshot (an image) written as a NIfTI file under live.py's rules,
    announced, and listed in `written` if this run created it (a failed run removes just those); None if off."""
    if not (outputs.live_dir and outputs.live_every > 0):
        return None
    live_dir = Path(outputs.live_dir)

    def live(step: int, labels) -> None:
        path = snapshot_path(live_dir, step)
        write_snapshot(path, lambda tmp: write_image(labels, tmp), outputs.force, inputs, written)
        rep.emit("labels", step=step, path=str(path), segments=segments)

    return live


def evaluate_folder(data: PathLike, options: SegmentOptions, subjects: Optional[Sequence[str]] = None,
                    split: str = "validation", json_path: Optional[PathLike] = None, force: bool = False,
                    image: str = "slice_norm.nii.gz", reference: str = "slice_seg4.nii.gz") -> int:
    """`metaseg evaluate`: each subject segmented as `segment` does, scored per label and per label group
    (`evaluate.py`); returns the exit code."""
    from .evaluate import evaluate, format_row, label_table, summarize

    try:
        json_out = check_output(Path(json_path), "json", force, [Path(data)], "--json") if json_path else None
        subjects = subjects or load_splits()[split]
        segmenter = Segmenter(options.device, options.weights, options.labels)
        print(f"{len(subjects)} subject(s), label set {options.labels}, device {segmenter.device}")
        rows = evaluate(str(data), subjects, segmenter, options.checked(), image, reference,
                        on_row=lambda r: print(format_row(r), flush=True))
    except KeyError:
        print(f"error: no split {split!r} in metaseg/splits.json", file=sys.stderr)
        return EXIT_USAGE
    except (InputError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    groups = summarize(rows)
    print(label_table(groups))
    for g, v in groups.items():
        extra = f", tissues merged {v['tissue_fg_dice']:.4f}" if "tissue_fg_dice" in v else ""
        print(f"mean {g} (n={v['n']}): fg-Dice {v['fg_dice']:.4f} (lowest {v['min_fg_dice']:.4f}){extra}")
    if json_out is not None:
        summary = {"weights": rows[0]["weights"], "weights_sha256": rows[0]["weights_sha256"], "label_set": options.labels,
                   "image": image, "reference": reference, "device": str(segmenter.device), "rows": rows,
                   "groups": groups}
        try:
            write_all([(json_out, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n",
                                                                   encoding="utf-8"))], overwrite=force)
        except OutputExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK
