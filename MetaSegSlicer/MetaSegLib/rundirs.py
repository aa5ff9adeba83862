"""Temporary folders of MetaSeg runs: made with an owner mark, removed when done, swept when stale.

A run folder holds the uncompressed input scan (patient data), so none may outlive the Slicer
session that made it. Each folder gets an `owner` file with the creating process's id and its
start time (`process_start_time`). The session removes its folders when a run ends, when the
module is cleaned up and at exit; a crash or a kill skips all of that, so every start-up sweeps
the folders whose owner process is gone (`sweep_stale`). A process id is reused by the system
sooner or later: a folder whose id now belongs to a process that started at another time is the
crashed session's, and is swept too. Folders of another running Slicer are left alone.

All folders live under one root: Slicer's temporary folder (`slicer.util.tempDirectory`) in the
application, the system's temporary folder elsewhere.
"""
from __future__ import annotations

import getpass
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

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
    started = process_start_time(os.getpid())
    (folder / OWNER_FILE).write_text(f"{os.getpid()}" + (f" {started}" if started is not None else ""),
                                     encoding="utf-8")
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
    return owner_mark(folder)[0]


def owner_mark(folder: Path) -> Tuple[Optional[int], Optional[str]]:
    """(process id, its start time or None) of a folder's owner mark; (None, None) if unreadable."""
    try:
        parts = (Path(folder) / OWNER_FILE).read_text(encoding="utf-8").split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def process_start_time(pid: int) -> Optional[str]:
    """When process `pid` started, as an opaque token that differs for a later process with the same id; None when
    it cannot be told (no such process, or a system where it is not read). Linux: /proc/PID/stat's start time in
    clock ticks since boot, with the boot's id; Windows: the creation time (GetProcessTimes); macOS and other
    POSIX systems: `ps -o lstart=`."""
    if pid <= 0:
        return None
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
            ticks = stat[stat.rindex(")") + 2:].split()[19]  # field 22, starttime
        except (OSError, ValueError, IndexError):
            return None
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()[:8]
        except OSError:
            boot = "boot"
        return f"{boot}-{ticks}"
    if sys.platform == "win32":
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return None
        try:
            times = [wintypes.FILETIME() for _ in range(4)]
            if not kernel32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
                return None
            return f"{times[0].dwHighDateTime:08x}{times[0].dwLowDateTime:08x}"
        finally:
            kernel32.CloseHandle(handle)
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = "".join(out.stdout.split())
    return text or None


def owner_alive(folder: Path) -> bool:
    """Whether the session that made `folder` still runs: its process exists and, where the mark has the start
    time, is the same process (not a later one that was given the same id)."""
    pid, started = owner_mark(folder)
    if pid is None or not pid_alive(pid):
        return False
    if started is None or pid == os.getpid():
        return True
    now = process_start_time(pid)
    return now is None or now == started


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
        if pid is not None and owner_alive(folder):
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
