"""Checks of output paths, run before any input is read or any fit starts.

A run must not spend minutes fitting and then fail on an output it could never write: every
output's extension, folder and writability is checked first, and no output may name an input
(not even with --force: that would destroy the scan being segmented).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from .readers import IMAGE_SUFFIXES, InputError

# what each kind of output may be called
SUFFIXES = {
    "image": IMAGE_SUFFIXES + (".seg.nrrd",),
    "segmentation": (".seg.nrrd",),
    "png": (".png",),
    "json": (".json",),
    "fitted": (".safetensors",),
    "pack": (".npz",),
    "table": (".tsv",),
}
WHAT = {"image": "an image", "segmentation": "a Slicer segmentation", "png": "a PNG picture",
        "json": "a JSON file", "fitted": "a fitted INR (safetensors)", "pack": "a training pack",
        "table": "a tab-separated table"}


def check_output(path: Path, kind: str, force: bool, inputs: Iterable[Optional[Path]] = (),
                 option: str = "output") -> Path:
    """`path` as an output of `kind` (a SUFFIXES key): known extension, not a folder, not an input,
    not existing unless `force`, and creatable (its folder exists or can be made, and is writable)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(SUFFIXES[kind]):
        raise InputError(f"{option} {path}: {WHAT[kind]} must be named {' or '.join(SUFFIXES[kind])}")
    check_name_lengths(path, option)  # first: a name over the limit makes even is_dir() fail
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    for inp in inputs:
        if inp is not None and same_file(path, Path(inp)):
            raise InputError(f"{option} {path} is an input of this run ({inp}); writing it would destroy the input: "
                             "choose another name")
    if path.exists() and not force:
        raise InputError(f"output {path} exists; pass --force to overwrite it")
    check_creatable(path.parent, f"{option} {path}")
    return path


def check_output_dir(folder: Path, option: str) -> Path:
    """A folder outputs will be written into: a folder (or creatable as one), writable."""
    folder = Path(folder)
    check_name_lengths(folder, option, temporary=False)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is a file, not a folder")
    check_creatable(folder, f"{option} {folder}")
    return folder


# atomic.write_all writes `.<name>.<8 random>.part<suffix>` beside each output first: a name this much shorter
# than the file system's limit is the longest that can be published
TEMPORARY_EXTRA = len(".") + len(".XXXXXXXX") + len(".part") + len(".seg.nrrd")


def check_name_lengths(path: Path, option: str, temporary: bool = True) -> None:
    """Every part of `path` within the file system's name limit (255 bytes on most), the whole within its path
    limit: refused here by name, not as an OSError after minutes of fitting."""
    anc = Path(os.path.abspath(path))
    while not os.path.exists(anc):  # os.path: False, not OSError, for a name over the limit
        anc = anc.parent
    try:
        name_max, path_max = os.pathconf(anc, "PC_NAME_MAX"), os.pathconf(anc, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows): the usual limits
        name_max, path_max = 255, 4096
    parts = Path(os.path.abspath(path)).parts
    for k, part in enumerate(parts):
        limit = name_max - (TEMPORARY_EXTRA if temporary and k == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            extra = f"; an output file at most {limit}, for its temporary copy" if limit != name_max else ""
            raise InputError(f"{option}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long; this file system "
                             f"allows {name_max} per name{extra}: choose a shorter name")
    if len(os.fsencode(os.path.abspath(path))) + TEMPORARY_EXTRA > path_max:
        raise InputError(f"{option}: the path is {len(os.fsencode(os.path.abspath(path)))} bytes long; this file system "
                         f"allows {path_max}: choose a shorter path")


def check_creatable(folder: Path, what: str) -> None:
    """`folder` exists or can be made, and files can be created in it: checked on its nearest existing
    ancestor with a probe file that is removed at once (permission bits do not tell: root, read-only mounts)."""
    anc = Path(os.path.abspath(folder))
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"cannot write {what}: {anc} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".metaseg-probe-", dir=anc)
    except OSError as e:
        raise InputError(f"cannot write {what}: {anc} is not writable ({e.strerror or e})") from e
    os.close(fd)
    os.remove(probe)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (links and relative paths included)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(os.path.realpath(a)) == os.path.abspath(os.path.realpath(b))
