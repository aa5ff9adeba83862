"""`--live-dir`: label snapshots written while the fit runs, under the rules of every other output.

Nothing that exists is replaced without `--force`, an input never (not even with `--force`), and the clean-up
after a failed or cancelled run removes only the snapshots this run created: a file of the user's that it
replaced with `--force` is a replaced output, like `-o`, not a temporary file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from .io.atomic import write_all
from .io.readers import InputError
from .io.output_paths import check_output_dir, same_file

PATTERN = re.compile(r"^live_\d{5,}\.nii\.gz$")


def snapshot_path(live_dir: Path, step: int) -> Path:
    return Path(live_dir) / f"live_{step:05d}.nii.gz"


def check_live_dir(live_dir: Path, inputs: Iterable[Optional[Path]], force: bool) -> Path:
    """Before the input is read: a usable folder, holding no snapshot of an earlier run unless `force`, and no
    input of this run under a snapshot's name (it would be overwritten) even with `force`."""
    folder = check_output_dir(Path(live_dir), "--live-dir")
    if not folder.is_dir():
        return folder
    taken = sorted(p for p in folder.iterdir() if PATTERN.match(p.name))
    for inp in inputs:
        if inp is not None and any(same_file(p, Path(inp)) for p in taken):
            raise InputError(f"--live-dir {folder} holds an input of this run under a snapshot's name ({inp}); live "
                             "snapshots would overwrite it: choose another --live-dir")
    if taken and not force:
        shown = ", ".join(p.name for p in taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise InputError(f"--live-dir {folder} already holds {len(taken)} snapshot file(s) ({shown}); pass --force to "
                         "replace them, or choose an empty folder")
    return folder


def write_snapshot(path: Path, writer: Callable[[str], None], force: bool, inputs: Iterable[Optional[Path]],
                   created: List[Path]) -> None:
    """Write one snapshot; list it in `created` only if this run made it (the clean-up removes just those)."""
    if any(inp is not None and same_file(path, Path(inp)) for inp in inputs):
        raise InputError(f"live snapshot {path} is an input of this run; choose another --live-dir")
    existed = path.exists()
    if existed and not force:
        raise InputError(f"live snapshot {path} exists (another run writing into the same --live-dir?); it was kept: "
                         "choose another --live-dir, or pass --force")
    write_all([(path, writer)], overwrite=force)
    if not existed and path not in created:
        created.append(path)
