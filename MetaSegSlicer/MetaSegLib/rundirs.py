"""Temporary folders of MetaSeg runs: made with an owner mark, removed when done, swept when stale.

A run folder holds the uncompressed input scan (patient data), so none may outlive the Slicer
session that made it. Each folder gets an `owner` file with the creating process's id. The
session removes its folders when a run ends, when the module is cleaned up and at exit; a
crash or a kill skips all of that, so every start-up sweeps the folders whose owner process is
gone (`sweep_stale`). Folders of another running Slicer are left alone.

All folders live under one root: Slicer's temporary folder (`slicer.util.tempDirectory`) in the
application, the system's temporary folder elsewhere.
"""
from __future__ import annotations

import getpass
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

log = logging.getLogger(__name__)

OWNER_FILE = "owner"
PREFIXES = ("run-", "kept-")  # a run's working folder; the fitted networks kept for cross-sections


def default_root() -> Path:
    """The root outside Slicer: one folder per user in the system's temporary folder."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name (some containers): still one folder, shared
        user = "user"
    return Path(tempfile.gettempdir()) / f"MetaSeg-{user}"


def make_run_dir(root: Path, prefix: str = "run-") -> Path:
    """A new, empty folder under `root`, marked as owned by this process."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=str(root)))
    (folder / OWNER_FILE).write_text(str(os.getpid()), encoding="utf-8")
    return folder


def remove(folder: Path) -> bool:
    """Remove a folder and its files; True when it is gone (Windows may hold files of a just-ended process)."""
    for attempt in range(5):
        try:
            shutil.rmtree(folder)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.2 * (attempt + 1))
    log.warning("MetaSeg: could not remove the temporary folder %s", folder)
    return False


def owner(folder: Path) -> Optional[int]:
    try:
        return int((Path(folder) / OWNER_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (never signals it)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(root: Path, min_age_s: float = 60.0) -> List[Path]:
    """Remove the run folders under `root` whose owner process has ended; returns those removed.

    A folder without a readable owner mark is removed only when older than `min_age_s` (it may
    be one being made right now by another process).
    """
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.startswith(PREFIXES):
            continue
        pid = owner(folder)
        if pid is not None and pid_alive(pid):
            continue
        if pid is None:
            try:
                if now - folder.stat().st_mtime < min_age_s:
                    continue
            except OSError:
                continue
        if remove(folder):
            removed.append(folder)
    if removed:
        log.info("MetaSeg: removed %d temporary folder(s) left by an earlier session in %s", len(removed), root)
    return removed
