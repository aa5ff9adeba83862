"""Run the MetaSeg core in a child process and follow its JSON-lines progress.

Why a process: a crash in torch cannot take Slicer down, GPU memory is returned when the
process ends, and a run can be cancelled at any moment. MRML and Qt are never touched
here: the caller polls for events on its main thread (a QTimer in Slicer, a loop in
scripts and tests).

- `JsonLinesProcess` runs any command whose stdout carries protocol events, reads stdout and
  stderr on two threads (a full pipe can never block the child), and queues the events;
  `poll()` returns them without blocking, `cancel()` ends the whole process tree, `wait()`
  blocks until the end, `error_message()` explains a failure.
- `SegmentProcess` builds the `python -m metaseg segment ...` command in a private run folder
  (`rundirs`) and removes that folder in `cleanup()`; `ResliceProcess` does the same for
  `python -m metaseg reslice` (cross-sections of a fitted 3D network).

The child runs in its own session (POSIX) or process group (Windows) so that cancelling
kills it together with any process it started, never only the launcher.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence

from . import rundirs
from .protocol import Event, ProtocolError, parse_line

log = logging.getLogger(__name__)

EXIT_CANCELLED = 3  # the core's exit code for a cancelled run (metaseg/pipeline.py)
IS_WINDOWS = os.name == "nt"


class ProcessError(RuntimeError):
    """The child process could not be started or did not produce a result."""


class JsonLinesProcess:
    """A child process whose stdout is a stream of protocol events (see `protocol.py`)."""

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 tail_lines: int = 200):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self._proc: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[Event]" = queue.Queue()
        self._stderr: Deque[str] = collections.deque(maxlen=tail_lines)
        self._noise: Deque[str] = collections.deque(maxlen=tail_lines)  # stdout lines that were not events
        self._readers: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._last_error: Optional[Event] = None
        self._done: Optional[Event] = None
        self._cancelled = False
        self._killer: Optional[threading.Thread] = None
        self._reaped = False
        self.start_time: Optional[float] = None
        self.end_time: Optional[float] = None

    # ------------------------------------------------------------------ start
    def start(self) -> "JsonLinesProcess":
        if self._proc is not None:
            raise ProcessError("the process was already started")
        kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if IS_WINDOWS:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session and process group: cancel kills the whole tree
        try:
            self._proc = subprocess.Popen(self.args, **kwargs)
        except OSError as e:
            raise ProcessError(f"cannot start {self.args[0]}: {e}") from e
        self.start_time = time.monotonic()
        for target, stream in ((self._read_stdout, self._proc.stdout), (self._read_stderr, self._proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True, name=f"MetaSeg-{target.__name__}")
            t.start()
            self._readers.append(t)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    # ---------------------------------------------------------------- readers
    def _read_stdout(self, stream) -> None:
        try:
            for line in stream:
                try:
                    event = parse_line(line)
                except ProtocolError as e:
                    self._noise.append(line.rstrip("\n"))
                    log.debug("MetaSeg: ignored stdout line (%s)", e)
                    continue
                if event is None:
                    continue
                with self._lock:
                    if event.kind == "error":
                        self._last_error = event
                    elif event.kind == "done":
                        self._done = event
                self._events.put(event)
        except (OSError, ValueError):  # stream closed under us
            pass
        finally:
            stream.close()

    def _read_stderr(self, stream) -> None:
        try:
            for line in stream:
                self._stderr.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    # ------------------------------------------------------------------ state
    @property
    def returncode(self) -> Optional[int]:
        if self._proc is None:
            return None
        rc = self._proc.poll()
        if rc is not None:
            self._on_exit()
        return rc

    @property
    def running(self) -> bool:
        return self._proc is not None and self.returncode is None

    @property
    def finished(self) -> bool:
        """The process has exited, all of its output was read, and every event was polled."""
        return (self._proc is not None and self.returncode is not None
                and not any(t.is_alive() for t in self._readers) and self._events.empty())

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done_event(self) -> Optional[Event]:
        with self._lock:
            return self._done

    @property
    def last_error(self) -> Optional[Event]:
        with self._lock:
            return self._last_error

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def poll(self) -> List[Event]:
        """Every event received since the last call, without blocking."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                break
        self.returncode  # noqa: B018  (notices the exit, cleans up stragglers)
        return out

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the process has exited and its output is read; return the exit code.

        Events stay queued for `poll()`. Raises TimeoutError after `timeout` seconds.
        """
        if self._proc is None:
            raise ProcessError("the process was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the process {self.pid} is still running after {timeout} s") from None
        self._on_exit()
        for t in self._readers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left if left is not None else 10.0)
        return rc

    def _on_exit(self) -> None:
        if self._reaped:
            return
        self._reaped = True
        self.end_time = time.monotonic()
        # Anything the child left running in its group goes with it (and closes our pipes).
        self._kill_tree(signal.SIGKILL if not IS_WINDOWS else None)

    # ----------------------------------------------------------------- cancel
    def cancel(self, grace: float = 3.0) -> None:
        """Stop the run and every process it started; returns at once.

        POSIX: SIGTERM to the process group (the core stops between two fit steps and
        exits with code 3, writing nothing), then SIGKILL to the group after `grace`
        seconds whatever happened. Windows: `taskkill /T /F` on the tree.
        """
        if self._proc is None or self._cancelled:
            return
        self._cancelled = True
        if IS_WINDOWS:
            self._kill_tree(None)
            return
        if self._proc.poll() is None:
            self._kill_tree(signal.SIGTERM)

        def finish() -> None:
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            self._kill_tree(signal.SIGKILL)

        self._killer = threading.Thread(target=finish, daemon=True, name="MetaSeg-cancel")
        self._killer.start()

    def _kill_tree(self, sig) -> None:
        if self._proc is None:
            return
        if IS_WINDOWS:
            if self._proc.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], capture_output=True,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            return
        try:
            os.killpg(self._proc.pid, sig)  # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass

    # ----------------------------------------------------------------- errors
    def error_message(self) -> Optional[str]:
        """None after a successful run; otherwise one clear message (the core's own if it sent one)."""
        rc = self.returncode
        if rc is None:
            return None
        if self._cancelled:
            return "cancelled"
        if rc == 0 and self.done_event is not None:
            return None
        err = self.last_error
        if err is not None:
            return err["message"]
        if rc < 0:
            try:
                what = f"was killed by signal {signal.Signals(-rc).name}"
            except ValueError:
                what = f"was killed by signal {-rc}"
        elif rc == 0:
            what = "ended without reporting a result"
        else:
            what = f"exited with code {rc}"
        tail = self.stderr_tail() or "\n".join(list(self._noise)[-20:])
        msg = f"The MetaSeg process {what}."
        if tail:
            msg += "\n" + tail
        return msg


def python_executable(in_slicer: bool = False) -> str:
    """The interpreter for the child.

    Inside the Slicer application: `PythonSlicer` (on PATH there; it sets up Slicer's Python
    environment, as `slicer.util.pip_install` relies on too). Elsewhere: this interpreter.
    """
    if in_slicer:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        beside = Path(sys.executable).with_name("PythonSlicer" + (".exe" if IS_WINDOWS else ""))
        if beside.is_file():
            return str(beside)
        raise ProcessError("the PythonSlicer executable was not found on PATH")
    return sys.executable


class WorkdirProcess(JsonLinesProcess):
    """A core command run in a private run folder (`rundirs`) that `cleanup()` removes.

    The child gets this process's environment plus `python_path` in front of PYTHONPATH (the
    core's folder: Slicer's own Python does not have it).
    """

    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 python_path: Optional[Sequence[str]] = None, temp_root: Optional[str] = None):
        self.workdir = rundirs.make_run_dir(Path(temp_root) if temp_root else rundirs.default_root())
        self.set_paths(self.workdir)
        self.python = python or python_executable()
        env = dict(os.environ if env is None else env)
        if python_path:
            parts = [str(p) for p in python_path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            env["PYTHONPATH"] = os.pathsep.join(parts)
        env.setdefault("PYTHONIOENCODING", "utf-8")
        env["PYTHONUNBUFFERED"] = "1"
        super().__init__(self.command(), env=env, cwd=str(self.workdir))

    def set_paths(self, workdir: Path) -> None:
        """Name the files of the run inside `workdir` (subclasses)."""

    def command(self) -> List[str]:
        raise NotImplementedError

    def start(self) -> "WorkdirProcess":
        self.args = self.command()
        super().start()
        return self

    def cleanup(self) -> None:
        """Remove the run folder; stops the process first if it still runs."""
        if self._proc is not None and self.returncode is None:
            self.cancel(grace=0.5)
            try:
                self.wait(5.0)
            except TimeoutError:
                log.warning("MetaSeg: process %s did not stop; %s is left behind", self.pid, self.workdir)
                return
        rundirs.remove(self.workdir)


class SegmentProcess(WorkdirProcess):
    """`python -m metaseg segment` on `input_path` with every output in a private run folder.

    Create it, write the input image to `input_path`, then `start()`. After the run,
    `cleanup()` removes the folder (the caller loads the outputs first).
    """

    def __init__(self, python: Optional[str] = None, weights: Optional[str] = None, device: str = "auto",
                 seed: int = 0, steps: Optional[int] = None, live_every: int = 0, save_inr: bool = False,
                 uncertainty: bool = False, brain_extraction: str = "auto", brain_mask: bool = False,
                 quality: str = "fast", env: Optional[Dict[str, str]] = None, python_path: Optional[Sequence[str]] = None,
                 temp_root: Optional[str] = None, labels: str = "tissues"):
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be at least 1 (got {steps})")
        if live_every < 0:
            raise ValueError(f"live_every must be >= 0 (got {live_every})")
        self.save_inr, self.uncertainty = save_inr, uncertainty
        self.brain_extraction, self.brain_mask = brain_extraction, brain_mask  # 3D: auto/on/off; keep the mask used
        self.quality = quality  # 3D: fast (one fit) or best (3 fits averaged)
        self.labels = labels  # tissues (the core's default) or structures (`--labels`, where the core has it)
        self.weights, self.device, self.seed, self.steps, self.live_every = weights, device, int(seed), steps, int(live_every)
        super().__init__(python, env, python_path, temp_root)

    def set_paths(self, workdir: Path) -> None:
        self.input_path = workdir / "input.nrrd"
        self.labels_path = workdir / "labels.nrrd"
        self.segmentation_path = workdir / "segmentation.seg.nrrd"
        self.report_path = workdir / "report.json"
        self.live_dir = workdir / "live"
        self.fitted_path = workdir / "fitted.safetensors" if self.save_inr else None  # 3D: for cross-sections later
        self.uncertainty_path = workdir / "uncertainty.nrrd" if self.uncertainty else None  # 3D: entropy map
        self.brain_mask_path = workdir / "brain_mask.nrrd" if self.brain_mask else None  # 3D: the brain used

    def command(self) -> List[str]:
        cmd = [self.python, "-m", "metaseg", "segment", str(self.input_path),
               "-o", str(self.labels_path), "--seg-nrrd", str(self.segmentation_path),
               "--progress", "json", "--report", str(self.report_path),
               "--device", self.device, "--seed", str(self.seed), "--force"]
        if self.steps is not None:
            cmd += ["--steps", str(int(self.steps))]
        if self.live_every > 0:
            cmd += ["--live-dir", str(self.live_dir), "--live-every", str(self.live_every)]
        if self.weights:
            cmd += ["--weights", str(self.weights)]
        if self.fitted_path is not None:
            cmd += ["--save-inr", str(self.fitted_path)]
        if self.uncertainty_path is not None:
            cmd += ["--uncertainty", str(self.uncertainty_path)]
        if self.brain_extraction != "auto":
            cmd += ["--brain-extraction", self.brain_extraction]
        if self.brain_mask_path is not None:
            cmd += ["--brain-mask", str(self.brain_mask_path)]
        if self.quality != "fast":
            cmd += ["--quality", self.quality]
        if self.labels != "tissues":  # the default is not passed: a core without --labels still runs tissues
            cmd += ["--labels", self.labels]
        return cmd

    def start(self) -> "SegmentProcess":
        if not self.input_path.is_file():
            raise ProcessError(f"the input image was not written to {self.input_path}")
        return super().start()


class ResliceProcess(WorkdirProcess):
    """`python -m metaseg reslice`: a fitted 3D network rendered on one plane (given in LPS mm).

    Torch runs in this child, never in Slicer's GUI thread, and a crash there is an error
    message here. The command writes no progress events: success is exit code 0 and the
    output file; a failure's message is the core's `error: ...` line.
    """

    def __init__(self, fitted: str, centre: Sequence[float], u: Sequence[float], v: Sequence[float],
                 extent_mm: float, spacing_mm: float, what: str = "labels", device: str = "cpu",
                 python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 python_path: Optional[Sequence[str]] = None, temp_root: Optional[str] = None):
        self.fitted, self.what, self.device = str(fitted), what, device
        self.centre, self.u, self.v = ([float(x) for x in p] for p in (centre, u, v))
        self.extent_mm, self.spacing_mm = float(extent_mm), float(spacing_mm)
        super().__init__(python, env, python_path, temp_root)

    def set_paths(self, workdir: Path) -> None:
        self.output_path = workdir / f"plane-{self.what}.nrrd"

    def command(self) -> List[str]:
        def num(x: float) -> str:  # fixed-point: argparse takes "-1e-05" for an option, "-0.0000100000" not
            return f"{x:.10f}"

        cmd = [self.python, "-m", "metaseg", "reslice", self.fitted, "-o", str(self.output_path),
               "--what", self.what, "--device", self.device,
               "--extent", num(self.extent_mm), "--spacing", num(self.spacing_mm), "--origin"]
        cmd += [num(x) for x in self.centre] + ["--u"] + [num(x) for x in self.u] + ["--v"] + [num(x) for x in self.v]
        return cmd

    def error_message(self) -> Optional[str]:
        rc = self.returncode
        if rc == 0 and not self._cancelled:
            return None if self.output_path.is_file() else "The MetaSeg process wrote no cross-section."
        core = [line[len("error: "):] for line in self._stderr if line.startswith("error: ")]
        if core and not self._cancelled:
            return core[-1]
        return super().error_message()
