"""Which scans a batch segments, under which ids, and which of them one shard takes.

Sources: image files, folders of image files and DICOM series (each folder at any depth that holds DICOM files
is one scan), BIDS datasets (`sub-*/[ses-*/]anat/*_T1w.nii[.gz]`), glob patterns, and CSV/TSV manifests (a path
column, optional id and mask columns). The list is
deterministic (folders and globs sorted, manifests in their own order), so that N machines
reading the same sources agree on it, and each takes every N-th scan without talking to the others.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from ..io.dicom import holds_dicom
from ..io.readers import IMAGE_SUFFIXES, MGH_SUFFIXES, InputError
from ..io.spreadsheet import unquote

SCAN_SUFFIXES = tuple(IMAGE_SUFFIXES) + tuple(MGH_SUFFIXES)
MANIFEST_SUFFIXES = (".csv", ".tsv")
_BIDS_NAME = re.compile(r"^(sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_[A-Za-z0-9]+$")  # entities_suffix
_BIDS_DIR = re.compile(r"^(sub|ses)-[A-Za-z0-9]+$")
_BAD_ID = re.compile(r"[/\\\t\r\n]|^\.{1,2}$|^$")


@dataclass(frozen=True)
class Scan:
    index: int  # position in the whole cohort: the table's order, the same in every shard
    id: str  # names the scan's output folder and table row
    path: Path  # absolute
    mask: Optional[Path] = None  # a brain mask from the manifest's mask column


def find_scans(sources: Sequence[str], path_column: str = "path", id_column: str = "id") -> List[Scan]:
    """Every scan named by `sources` (files, folders, BIDS datasets, globs, manifests), with unique ids."""
    entries: List[Tuple[Path, Optional[str], Optional[Path]]] = []  # (path, explicit id, mask)
    for source in sources:
        entries += _entries(source, path_column, id_column)
    if not entries:
        raise InputError("no scans given: pass a folder, a glob pattern, image files or a .csv/.tsv manifest")
    ids = _unique_ids([p for p, _, _ in entries], [i for _, i, _ in entries])
    return [Scan(k, i, p, m) for k, (i, (p, _, m)) in enumerate(zip(ids, entries))]


def _entries(source: str, path_column: str, id_column: str) -> List[Tuple[Path, Optional[str], Optional[Path]]]:
    path = Path(source)
    if not path.exists() and glob.has_magic(source):
        files = sorted(Path(f) for f in glob.glob(source, recursive=True) if _is_scan(Path(f)))
        if not files:
            raise InputError(f"no image file matches {source!r} (looked for {', '.join(SCAN_SUFFIXES)})")
        return [(f.absolute(), None, None) for f in files]
    if not path.exists():
        raise InputError(f"input not found: {source}")
    if path.is_dir():
        files = bids_scans(path) or sorted(f for f in path.iterdir() if _is_scan(f)) + dicom_folders(path)
        if not files:
            raise InputError(f"{path} holds no image files ({', '.join(SCAN_SUFFIXES)}), no DICOM series and no BIDS "
                             "sub-*/[ses-*/]anat/*_T1w.nii.gz; give a folder of scans, a glob or a manifest")
        return [(f.absolute(), None, None) for f in files]
    if path.name.lower().endswith(MANIFEST_SUFFIXES):
        return read_manifest(path, path_column, id_column)
    if _is_scan(path):
        return [(path.absolute(), None, None)]
    raise InputError(f"{path}: not an image ({', '.join(SCAN_SUFFIXES)}), a folder or a .csv/.tsv manifest")


def dicom_folders(root: Path) -> List[Path]:
    """Every folder at or below `root` (hidden ones skipped) that holds DICOM files, sorted: each is one scan, read
    as `segment` reads a DICOM folder (a folder of several series then fails with its series listed)."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if holds_dicom(Path(folder)):
            found.append(Path(folder))
    return sorted(found)


def _is_scan(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SCAN_SUFFIXES)


def bids_scans(root: Path) -> List[Path]:
    """The T1w images of a BIDS dataset (`sub-*/anat/` and `sub-*/ses-*/anat/`), sorted; [] if none."""
    found = []
    for pattern in ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*"):
        found += [p for p in root.glob(pattern) if p.is_file() and p.name.endswith((".nii", ".nii.gz"))]
    return sorted(found)


def read_manifest(path: Path, path_column: str = "path", id_column: str = "id"
                  ) -> List[Tuple[Path, Optional[str], Optional[Path]]]:
    """(scan, id or None, mask or None) per row of a CSV/TSV file; relative paths are relative to the file."""
    delimiter = "\t" if path.name.lower().endswith(".tsv") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            if path_column not in columns:
                raise InputError(f"manifest {path} has no {path_column!r} column (columns: {', '.join(columns) or 'none'}); "
                                 "name the scans' column with --path-column")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the manifest {path}: {e}") from e
    out = []
    for line, row in enumerate(rows, start=2):
        value = unquote((row.get(path_column) or "").strip())  # a table of ours, its cells quoted for spreadsheets
        if not value:
            raise InputError(f"manifest {path}, line {line}: empty {path_column!r}")
        ident = unquote((row.get(id_column) or "").strip()) or None
        mask = unquote((row.get("mask") or "").strip())
        out.append((_relative_to(path.parent, value), ident, _relative_to(path.parent, mask) if mask else None))
    if not out:
        raise InputError(f"manifest {path} lists no scans")
    return out


def _relative_to(folder: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (folder / p).absolute()


def scan_id(path: Path) -> str:
    """The BIDS entities of the file name (`sub-01_ses-2_T1w.nii.gz` -> `sub-01_ses-2`), else the
    BIDS folders holding it (`sub-01/ses-2/anat/t1.nii` -> `sub-01_ses-2`), else the name without extension."""
    stem = _stem(path)
    m = _BIDS_NAME.match(stem)
    if m:
        return m.group(1)
    folders = [p.name for p in path.parents if _BIDS_DIR.match(p.name)]
    return "_".join(reversed(folders)) if folders else stem


def _stem(path: Path) -> str:
    name = path.name
    if path.is_dir():  # a DICOM series folder: its name is its id (series folders are often named by UID, dots included)
        return name
    for s in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def _unique_ids(paths: List[Path], given: List[Optional[str]]) -> List[str]:
    """Given ids as they are; derived ids that collide become the path below the files' common folder."""
    ids = [g if g is not None else scan_id(p) for p, g in zip(paths, given)]
    counts = Counter(ids)
    clashing = [k for k, (i, g) in enumerate(zip(ids, given)) if g is None and counts[i] > 1]
    if clashing:
        root = Path(os.path.commonpath([str(paths[k].parent) for k in clashing]))
        for k in clashing:
            rel = paths[k].relative_to(root)
            ids[k] = "_".join(list(rel.parent.parts) + [_stem(paths[k])])
    for i in ids:
        if _BAD_ID.search(i):
            raise InputError(f"scan id {i!r} cannot name a folder: ids must be non-empty, without / \\ tabs or newlines")
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise InputError(f"several scans have the id {', '.join(dup[:5])}: give each a unique id (the manifest's id column)"
                         " or list each file once")
    return ids


# ---- shards: every N-th scan, the index from the command line or the job scheduler ----

def parse_shard(text: Optional[str], env: Mapping[str, str] = os.environ) -> Optional[Tuple[int, int]]:
    """`I/N` (I from 1 to N), `auto` (from SLURM or SGE array variables) or `auto/N` (the index from
    SLURM, SGE or a Kubernetes indexed job's JOB_COMPLETION_INDEX, N given): (I, N), or None for all scans."""
    if not text:
        return None
    head, _, count = text.strip().partition("/")
    try:
        n = int(count) if count else None
        i = None if head == "auto" else int(head)
    except ValueError:
        raise InputError(f"--shard {text}: expected I/N (e.g. 2/8), auto or auto/N") from None
    if head == "auto":
        i, n_env = _shard_from_env(env)
        if n is not None and n_env is not None and n != n_env:
            raise InputError(f"--shard {text}: the job array has {n_env} tasks, not {n}")
        n = n if n is not None else n_env
        if n is None:
            raise InputError(f"--shard {text}: the number of shards is not in the environment; give it: --shard auto/N")
    if n is None or n < 1 or not 1 <= i <= n:
        raise InputError(f"--shard {text}: expected I/N with 1 <= I <= N (got shard {i} of {n})")
    return i, n


def _shard_from_env(env: Mapping[str, str]) -> Tuple[int, Optional[int]]:
    """(1-based index, count or None) from the first job-array variables set."""
    def num(name: str, default: Optional[int] = None) -> Optional[int]:
        v = env.get(name, "")
        return int(v) if v.strip().lstrip("-").isdigit() else default

    if num("SLURM_ARRAY_TASK_ID") is not None:  # sbatch --array=a-b[:s]
        step = num("SLURM_ARRAY_TASK_STEP", 1) or 1
        return (num("SLURM_ARRAY_TASK_ID") - num("SLURM_ARRAY_TASK_MIN", 0)) // step + 1, num("SLURM_ARRAY_TASK_COUNT")
    if num("SGE_TASK_ID") is not None:  # qsub -t a-b[:s] (SGE, UGE)
        first, step = num("SGE_TASK_FIRST", 1), num("SGE_TASK_STEPSIZE", 1) or 1
        last = num("SGE_TASK_LAST")
        return (num("SGE_TASK_ID") - first) // step + 1, None if last is None else (last - first) // step + 1
    if num("JOB_COMPLETION_INDEX") is not None:  # Kubernetes indexed Job, 0-based
        return num("JOB_COMPLETION_INDEX") + 1, None
    raise InputError("--shard auto: no job-array index in the environment (SLURM_ARRAY_TASK_ID, SGE_TASK_ID or "
                     "JOB_COMPLETION_INDEX); give the shard as I/N")


def shard_of(scans: Sequence[Scan], shard: Optional[Tuple[int, int]]) -> List[Scan]:
    """Shard I of N takes scans I-1, I-1+N, I-1+2N, ... of the cohort."""
    if shard is None:
        return list(scans)
    i, n = shard
    return list(scans[i - 1:: n])

