"""`metaseg batch`: segment a cohort into one output folder and a volumes table; resumable, sharded.

Each scan is run by `pipeline.segment_scan`, the code of `metaseg segment`, with one `Segmenter` per
process (weights and template loaded once) and the batch's own `SegmentOptions`. Outputs: `OUT/<id>/labels.nii.gz` and `report.json` (plus the
optional preview, .seg.nrrd, uncertainty and fitted INR), and `OUT/volumes.tsv` (cohort_table.py).

The per-scan report is the record of a finished scan: a rerun skips scans whose report and outputs
are all there and redoes the others (a crash can leave a scan partial; its files are replaced).
The table is rebuilt from those records and rewritten atomically after every scan, so it is valid
whenever the run stops; scans not run yet are `pending` in it. The first Ctrl-C or SIGTERM cancels
the running scans (nothing of them is written) and ends with a valid table (exit 3); a second
Ctrl-C stops at once. A scan that fails gets a `failed` row with its error and the cohort goes on.

Workers: one process by default; `--devices cuda:0,cuda:1` or `--jobs K` run one worker process per
device (or K) with Python's ProcessPoolExecutor, each loading the model once. Across machines:
`--shard I/N` (or `auto` from job-array variables) takes every N-th scan; `--merge` joins the tables.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..version import __version__
from ..io.batch_progress import BatchProgress, ScanReporter
from .cohort import Scan, find_scans, parse_shard, shard_of
from .cohort_table import (Row, failed_row, lock_table, merge_shards, merge_warnings, ok_row, pending_row, status_counts,
                           table_name, write_table)
from ..method.device import pick_device
from ..io.atomic import OutputExistsError
from ..method.fit import FitCancelled
from ..io.readers import InputError
from ..options import OPTIONAL_OUTPUTS, BatchSettings, Outputs, SegmentOptions
from ..io.output_paths import check_name_lengths, check_output_dir
from ..exit_codes import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from ..pipeline import segment_scan
from ..io.progress import Reporter
from ..segmenter import Segmenter
from ..method.weights import WeightsError

# a scan's files in OUT/<id>/; the keys are those of the report's "outputs"
OUTPUT_FILES = {"labels": "labels.nii.gz", "report": "report.json", "preview": "preview.png",
                "seg_nrrd": "labels.seg.nrrd", "uncertainty": "uncertainty.nii.gz", "inr": "fitted.safetensors"}
@dataclass(frozen=True)
class Job:
    scan: Scan
    outputs: Outputs  # the scan's files in OUT/<id>/


@dataclass(frozen=True)
class Outcome:
    status: str  # ok, failed or cancelled
    report: Optional[Dict[str, Any]] = None
    error: str = ""
    seconds: float = 0.0


def run_batch(b: BatchSettings) -> int:
    """`metaseg batch`; returns the exit code."""
    rep = Reporter(b.progress)
    if b.merge:
        return _merge(b, rep)
    try:
        b.options.checked()
        shard = parse_shard(b.shard)
        scans = shard_of(find_scans(b.inputs, b.path_column, b.id_column), shard)
        out = check_output_dir(Path(b.output), "-o")
        for s in scans:  # an id too long for a folder name is refused now, not as a failed write after the lock
            check_name_lengths(out / s.id / OUTPUT_FILES["seg_nrrd"], f"scan {s.index + 1} (id {s.id[:24]!r}...: ids "
                               "name the output folders; set a shorter one in a manifest's id column)")
        wanted = ["labels", "report"] + [k for k in OPTIONAL_OUTPUTS if k in b.extras]
        devices = worker_devices(b.options.device, b.devices, b.jobs)
        lock = lock_table(out / table_name(shard))
    except (InputError, ValueError) as e:
        rep.emit("error", message=str(e), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    with lock:  # held, and its file removed, until this run ends however it ends
        return _run_locked(b, rep, scans, out, shard, wanted, devices)


def _run_locked(b: BatchSettings, rep: Reporter, scans: List[Scan], out: Path, shard: Optional[Tuple[int, int]],
                wanted: List[str], devices: List[str]) -> int:
    """The batch once its table is locked: rows of finished scans, the others segmented, the table kept current."""
    try:
        rows: Dict[int, Row] = {}
        jobs: List[Job] = []
        for s in scans:
            report = None if b.force else finished_report(out / s.id, s, wanted, b.options)
            rows[s.index] = ok_row(s, report) if report else pending_row(s)
            if not report:
                jobs.append(Job(s, scan_outputs(out / s.id, wanted, force=b.force or (out / s.id).exists())))
    except (InputError, ValueError) as e:
        rep.emit("error", message=str(e), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    table = out / table_name(shard)
    write_table(table, rows.values())
    progress = BatchProgress(rep, total=len(scans), skipped=len(scans) - len(jobs))
    workers = min(len(devices), max(1, len(jobs)))
    if rep.mode == "json":
        rep.emit("batch", scans=len(scans), todo=len(jobs), skipped=len(scans) - len(jobs), workers=workers,
                 table=str(table), shard=None if shard is None else f"{shard[0]}/{shard[1]}")
    progress.say(f"{len(jobs)} of {len(scans)} scans to segment ({len(scans) - len(jobs)} already done), "
                 f"{workers} worker(s) on {', '.join(devices[:workers])}; table: {table}")

    def record(job: Job, outcome: Outcome) -> None:
        s = job.scan
        if outcome.status == "ok":
            rows[s.index] = ok_row(s, outcome.report)
        elif outcome.status == "failed":
            rows[s.index] = failed_row(s, outcome.error, outcome.seconds, __version__)
        write_table(table, rows.values())
        progress.finished(s.id, s.index, outcome.status, outcome.seconds, outcome.error)

    run = _run_here if workers == 1 else _run_in_pool
    code = EXIT_OK
    try:
        cancelled = run(jobs, devices[:workers], b.options, progress, record)
    except KeyboardInterrupt:
        cancelled = True
    except WeightsError as e:
        rep.emit("error", message=str(e), exit_code=EXIT_USAGE)
        code = EXIT_USAGE
    except BrokenProcessPool as e:
        rep.emit("error", message=f"a worker process died ({e}); rerun the same command to finish the batch",
                 exit_code=EXIT_ERROR)
        code = EXIT_ERROR
    write_table(table, rows.values())
    counts = status_counts(list(rows.values()))
    if code != EXIT_OK:
        return code
    if rep.mode == "json":
        rep.emit("done", table=str(table), **counts)
    progress.say(f"wrote {table}: {counts['ok']} ok, {counts['failed']} failed, {counts['pending']} pending")
    if cancelled:
        rep.emit("error", message=f"cancelled; {counts['pending']} scan(s) left pending in {table}: rerun the same "
                 "command to continue", exit_code=EXIT_CANCELLED)
        return EXIT_CANCELLED
    return EXIT_USAGE if counts["failed"] else EXIT_OK


def _merge(b: BatchSettings, rep: Reporter) -> int:
    try:
        if b.inputs:
            raise InputError("--merge joins the shard tables in the output folder (-o); it takes no inputs")
        path, rows = merge_shards(Path(b.output), b.force)
    except InputError as e:
        rep.emit("error", message=str(e), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    for msg in merge_warnings(rows):
        rep.emit("warning", message=msg)
    counts = status_counts(rows)
    if counts["pending"]:
        rep.emit("warning", message=f"{counts['pending']} scan(s) are still pending: rerun their shards, then merge again")
    if rep.mode == "json":
        rep.emit("done", table=str(path), **counts)
    elif rep.mode == "bar":
        print(f"wrote {path}: {counts['ok']} ok, {counts['failed']} failed, {counts['pending']} pending", file=rep.stream)
    return EXIT_OK


def worker_devices(device: str, devices: Optional[str], jobs: Optional[int]) -> List[str]:
    """One device name per worker: `--devices` (cycled to `--jobs` workers if given), else `--jobs` x `--device`."""
    import torch

    names = [d.strip() for d in devices.split(",") if d.strip()] if devices else [device]
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs must be at least 1 (got {jobs})")
    n = jobs or (len(names) if devices else 1)
    for d in names:
        if d.startswith("cuda:") and d[5:].isdigit() and torch.cuda.is_available() and int(d[5:]) >= torch.cuda.device_count():
            raise InputError(f"device {d}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        pick_device(d)  # an absent accelerator is refused now, not once per scan
    return [names[k % len(names)] for k in range(n)]


def finished_report(folder: Path, scan: Scan, wanted: List[str], options: SegmentOptions) -> Optional[Dict[str, Any]]:
    """The report of a scan finished earlier with every wanted output present, else None (to be redone).

    A finished scan made from another input or with other fit settings is refused: it would mix results.
    """
    try:
        report = json.loads((folder / OUTPUT_FILES["report"]).read_text(encoding="utf-8"))
        made = report["outputs"]
        fit = report["fit"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(k in made and (folder / OUTPUT_FILES[k]).is_file() for k in wanted):
        return None
    other = []
    if report.get("input") != str(scan.path):
        other.append(f"input {report.get('input')}")
    if fit.get("seed") != options.seed:
        other.append(f"--seed {fit.get('seed')}")
    if options.steps is not None and fit.get("steps") != options.steps:
        other.append(f"--steps {fit.get('steps')}")
    if fit.get("quality", "fast") != options.quality:
        other.append(f"--quality {fit.get('quality', 'fast')}")
    if other:
        raise InputError(f"{folder} holds results made with {', '.join(other)}; use another output folder, "
                         "or --force to redo every scan")
    return report


def scan_outputs(folder: Path, wanted: List[str], force: bool) -> Outputs:
    """One scan's output files: the wanted ones of OUTPUT_FILES in `folder`."""
    return Outputs(**{k: folder / OUTPUT_FILES[k] for k in wanted}, force=force)


def run_job(job: Job, segmenter: Segmenter, options: SegmentOptions, cancel,
            sink: Callable[[str, Dict[str, Any]], None]) -> Outcome:
    """Segment one scan; its failure becomes an Outcome, except for weights that cannot load (every scan would fail)."""
    t0 = time.perf_counter()
    if cancel.is_set():
        return Outcome("cancelled")
    try:
        report = segment_scan(job.scan.path, job.outputs, options, segmenter, ScanReporter(sink), cancel,
                              mask=job.scan.mask)
        return Outcome("ok", report, seconds=time.perf_counter() - t0)
    except FitCancelled:
        return Outcome("cancelled", seconds=time.perf_counter() - t0)
    except WeightsError:
        raise
    except (InputError, FileNotFoundError, OutputExistsError, ValueError) as e:
        return Outcome("failed", error=str(e), seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - one scan's crash must not stop the cohort; its row says what happened
        return Outcome("failed", error=f"unexpected error: {type(e).__name__}: {e}", seconds=time.perf_counter() - t0)


def _run_here(jobs: List[Job], devices: List[str], options: SegmentOptions, progress: BatchProgress,
              record: Callable[[Job, Outcome], None]) -> bool:
    """Every job in this process, one after the other; True if cancelled."""
    cancel = threading.Event()
    options = dataclasses.replace(options, device=devices[0])
    segmenter = Segmenter(options.device, options.weights, options.labels)
    with _CancelOnSignals(cancel.set, progress):
        for job in jobs:
            if cancel.is_set():
                break
            progress.started(job.scan.id)
            outcome = run_job(job, segmenter, options, cancel,
                              lambda event, fields, sid=job.scan.id: progress.scan_event(sid, event, fields))
            record(job, outcome)
    return cancel.is_set()


def _run_in_pool(jobs: List[Job], devices: List[str], options: SegmentOptions, progress: BatchProgress,
                 record: Callable[[Job, Outcome], None]) -> bool:
    """The jobs on one worker process per device; their events and outcomes come back on a queue. True if cancelled."""
    ctx = mp.get_context("spawn")  # no fork of a process that has torch threads
    cancel, events, slots = ctx.Event(), ctx.Queue(), ctx.Queue()
    for d in devices:
        slots.put(d)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    by_index = {job.scan.index: job for job in jobs}
    with _CancelOnSignals(cancel.set, progress), ProcessPoolExecutor(
            len(devices), mp_context=ctx, initializer=_worker_init,
            initargs=(slots, cancel, events, threads, options)) as pool:
        running = {job.scan.index: pool.submit(_worker_run, job) for job in jobs}
        stopping = False
        while running:
            try:
                kind, index, payload = events.get(timeout=0.2)
            except queue.Empty:
                kind = None
            if kind == "start":
                progress.started(by_index[index].scan.id)
            elif kind == "event":
                progress.scan_event(by_index[index].scan.id, *payload)
            elif kind == "result":
                running.pop(index, None)
                record(by_index[index], payload)
            for index, f in list(running.items()):
                if f.cancelled():
                    running.pop(index)
                elif f.done() and f.exception() is not None:
                    raise f.exception()  # weights that cannot load, or a worker that died
            if cancel.is_set() and not stopping:
                stopping = True
                pool.shutdown(wait=False, cancel_futures=True)
    return cancel.is_set()


class _CancelOnSignals:
    """Within the block, the first Ctrl-C or SIGTERM calls `cancel`; a second Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, cancel: Callable[[], None], progress: BatchProgress):
        self.cancel, self.progress, self.seen, self.previous = cancel, progress, False, {}

    def _handle(self, signum, frame) -> None:
        if self.seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.seen = True
        self.cancel()
        self.progress.say("stopping: the running scans are abandoned, the table is kept (Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


_WORKER: Dict[str, Any] = {}


def _worker_init(slots, cancel, events, threads: int, options: SegmentOptions) -> None:
    """A worker process: its device, its own Segmenter (models loaded on first use), the shared cancel flag."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the batch process decides, and sets `cancel`
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    torch.set_num_threads(threads)
    options = dataclasses.replace(options, device=slots.get())
    _WORKER.update(segmenter=Segmenter(options.device, options.weights, options.labels), options=options,
                   cancel=cancel, events=events)


def _worker_run(job: Job) -> None:
    events, index = _WORKER["events"], job.scan.index
    events.put(("start", index, None))
    outcome = run_job(job, _WORKER["segmenter"], _WORKER["options"], _WORKER["cancel"],
                      lambda event, fields: events.put(("event", index, (event, fields))))
    events.put(("result", index, outcome))
