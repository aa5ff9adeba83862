"""All-or-nothing file output: every file of a run appears, or none does.

Kept free of SimpleITK so that meta-training and weights handling run where only torch is installed.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence, Tuple


class OutputExistsError(FileExistsError):
    """An output file appeared while the run was working (another run?) and may not be replaced."""


class OutputWriteError(ValueError):
    """An output could not be written for a reason the user can fix (disk full, quota, read-only, permissions);
    nothing was written. A ValueError, so that every subcommand reports it as bad input/arguments (exit 2)."""


# OSError numbers of writes that fail for a reason outside the program: reported as OutputWriteError
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM}
LOW_SPACE = 1 << 20  # bytes free below which a writer's failure (SimpleITK says only "could not write") is a full disk


def write_failure(path: Path, e: BaseException):
    """The OutputWriteError that `e`, raised while writing `path`, stands for; None if it is a bug, not the disk."""
    if isinstance(e, OutputWriteError):
        return e
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        reason, code = e.strerror or str(e), e.errno
    elif isinstance(e, (OSError, RuntimeError)) and _free_bytes(Path(path).parent) < LOW_SPACE:
        reason, code = "no space left on the device", errno.ENOSPC
    else:
        return None
    if code == errno.ENAMETOOLONG:
        advice = "Choose a shorter file or folder name (a batch scan's id names its folder)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "Fix the folder's permissions, or choose another output folder"
    else:
        advice = "Free some space, or choose another output folder"
    return OutputWriteError(f"cannot write {path}: {reason}; nothing was written. {advice}")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return LOW_SPACE


def write_all(outputs: Sequence[Tuple[Path, Callable[[str], None]]], overwrite: bool = True) -> None:
    """Write every (path, writer) to a temporary file beside it, then rename them all into place.

    If any writer fails, every temporary file is removed and no output appears: a run
    publishes all of its files or none (a crash between the renames is the only window).
    With `overwrite` False an output that exists at publish time, e.g. one another run wrote
    meanwhile, is kept: the files are published with an exclusive link, those this call already
    published are removed again, and OutputExistsError says which file was in the way.
    """
    temps: List[Tuple[str, Path]] = []
    published: List[Path] = []
    try:
        for path, writer in outputs:
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix(path), dir=path.parent)
                os.close(fd)
                temps.append((tmp, path))
                writer(tmp)
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
                temps[-1:-1] = detached_data(tmp, path)  # published before the header that names them
            except (OSError, RuntimeError) as e:
                failure = write_failure(path, e) if not isinstance(e, FileExistsError) else None
                if failure is None:
                    raise
                raise failure from e
        try:
            for tmp, path in temps:
                if overwrite:
                    os.replace(tmp, path)
                else:
                    _publish_new(tmp, path)
                published.append(path)
        except FileExistsError as e:
            for path in published:  # all created by this call: with overwrite False nothing was replaced
                os.remove(path)
            raise OutputExistsError(f"output {e.filename} appeared while this run was working (another run writing "
                                    "the same file?); it was kept and nothing was written: choose another name, or "
                                    "pass --force to replace it") from e
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


# Headers that name a separate data file (MetaImage .mhd, detached NRRD .nhdr) and the line that names it
DETACHED_HEADERS = {".mhd": b"ElementDataFile = ", ".nhdr": b"data file: "}


def detached_data(tmp: str, path: Path) -> List[Tuple[str, Path]]:
    """The data file that a writer put beside the header `tmp` (named after it, e.g. `.l.mhd.x.part.zraw`), paired
    with its final name beside `path` (`l.zraw`); the header is rewritten to name the final file. [] for other
    formats. Without this the published header would point to a hidden temporary name that no longer exists."""
    key = DETACHED_HEADERS.get(suffix(path))
    if key is None:
        return []
    tmp_stem = os.path.basename(tmp)[: -len(suffix(path))]
    final_stem = path.name[: -len(suffix(path))]
    header = Path(tmp).read_bytes()
    out: List[Tuple[str, Path]] = []
    lines = header.split(b"\n")
    for k, line in enumerate(lines):
        name = line[len(key):].strip().decode("utf-8", "replace") if line.startswith(key) else ""
        if name.startswith(tmp_stem) and os.path.isfile(os.path.join(os.path.dirname(tmp), name)):
            final = final_stem + name[len(tmp_stem):]
            lines[k] = key + final.encode("utf-8")
            os.chmod(os.path.join(os.path.dirname(tmp), name), 0o644)
            out.append((os.path.join(os.path.dirname(tmp), name), path.parent / final))
    if out:
        Path(tmp).write_bytes(b"\n".join(lines))
    return out


def _publish_new(tmp: str, path: Path) -> None:
    """Move `tmp` to `path` only if `path` does not exist (FileExistsError otherwise), atomically where
    the file system has hard links; elsewhere the name is claimed exclusively first."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError as e:
        raise FileExistsError(e.errno, e.strerror, str(path)) from e
    except OSError:  # no hard links here (e.g. FAT, some network shares)
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError as e:
        raise FileExistsError(e.errno, e.strerror, str(path)) from e
    os.replace(tmp, path)


def suffix(path: Path) -> str:
    """The extension writers dispatch on (".seg.nrrd" and ".nii.gz" included)."""
    name = path.name.lower()
    for s in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".json", ".safetensors"):
        if name.endswith(s):
            return s
    return path.suffix
