"""Run the MetaSeg core in a child process and follow its JSON-lines progress.

Why a process: a crash in torch cannot take Slicer down, GPU memory is returned when the
process ends, and a run can be cancelled at any moment. MRML and Qt are never touched
here: the caller polls for events on its main thread (a QTimer in Slicer, a loop in
scripts and tests).

No thread of ours is involved. Slicer's main thread sits in Qt's event loop, where Python threads
need not get to run (SlicerMONAIAuto3DSeg follows its process from a QTimer for that reason), so
everything happens inside the caller's calls:

- `JsonLinesProcess` runs any command whose stdout carries protocol events. `poll()` reads what the
  child has written so far from both pipes without blocking (non-blocking file descriptors on
  POSIX; PeekNamedPipe on Windows, where Python 3.9's pipes cannot be made non-blocking), turns
  stdout lines into events, keeps stderr's tail, and escalates a cancel to SIGKILL once its grace
  time is over. Reading at every poll also keeps a chatty child from blocking on a full pipe.
  `cancel()` ends the whole process tree and returns at once, `wait()` polls until the end,
  `error_message()` explains a failure.
- `SegmentProcess` runs `python -m metaseg job job.json` in a private run folder (`rundirs`): the job
  file holds the run's settings under the names of the core's typed options (`metaseg.options`:
  SegmentOptions and Outputs, as the command line and the Python API fill them) and the input and
  brain-mask files; `cleanup()` removes the folder. `ResliceProcess` does the same for
  `python -m metaseg reslice` (cross-sections of a fitted 3D network).

The child runs in its own session (POSIX) or process group (Windows) so that cancelling
kills it together with any process it started, never only the launcher (`PythonSlicer` is a
CTK launcher that runs the real interpreter as its child and forwards no signal).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence

from . import rundirs
from .protocol import Event, ProtocolError, parse_line

log = logging.getLogger(__name__)

EXIT_CANCELLED = 3  # the core's exit code for a cancelled run (metaseg/pipeline.py)
IS_WINDOWS = os.name == "nt"
READ_CHUNK = 65536
# What CTK's launcher (PythonSlicer) prints when the interpreter it started crashed (ctkAppLauncher.cpp); it then
# exits with code 1.
LAUNCHER_CRASH = re.compile(r"^error: \[.*\] exit abnormally")


class ProcessError(RuntimeError):
    """The child process could not be started or did not produce a result."""


class PipeReader:
    """Reads one of the child's pipes without ever blocking; whole lines come out of `read_lines()`."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.fd = stream.fileno()
        self.eof = False
        self._buffer = b""
        self._handle = None
        if IS_WINDOWS:
            import msvcrt

            self._handle = msvcrt.get_osfhandle(self.fd)
        else:
            os.set_blocking(self.fd, False)

    def _available(self) -> Optional[int]:
        """Windows: bytes waiting in the pipe (0: none yet); None at the end of the stream."""
        import _winapi

        try:
            return _winapi.PeekNamedPipe(self._handle, 0)[0]
        except (BrokenPipeError, OSError):
            return None

    def read_lines(self) -> List[str]:
        """Every complete line written since the last call (and the last, unterminated one at the end)."""
        if self.eof:
            return []
        while True:
            if IS_WINDOWS:
                n = self._available()
                if n is None:
                    chunk = b""
                elif n == 0:
                    break
                else:
                    chunk = os.read(self.fd, min(n, READ_CHUNK))
            else:
                try:
                    chunk = os.read(self.fd, READ_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
            if not chunk:
                self.eof = True
                self.stream.close()
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if self.eof and self._buffer:
            lines.append(self._buffer)
            self._buffer = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def close(self) -> None:
        if not self.eof:
            self.eof = True
            self.stream.close()


class JsonLinesProcess:
    """A child process whose stdout is a stream of protocol events (see `protocol.py`)."""

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 tail_lines: int = 200):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self._proc: Optional[subprocess.Popen] = None
        self._events: Deque[Event] = collections.deque()
        self._stderr: Deque[str] = collections.deque(maxlen=tail_lines)
        self._noise: Deque[str] = collections.deque(maxlen=tail_lines)  # stdout lines that were not events
        self._out: Optional[PipeReader] = None
        self._err: Optional[PipeReader] = None
        self._last_error: Optional[Event] = None
        self._done: Optional[Event] = None
        self._cancelled = False
        self._kill_at: Optional[float] = None  # when a cancel turns into SIGKILL (POSIX)
        self._reaped = False
        self.start_time: Optional[float] = None
        self.end_time: Optional[float] = None

    # ------------------------------------------------------------------ start
    def start(self) -> "JsonLinesProcess":
        if self._proc is not None:
            raise ProcessError("the process was already started")
        kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      env=self.env, cwd=self.cwd, bufsize=0)
        if IS_WINDOWS:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session and process group: cancel kills the whole tree
        try:
            self._proc = subprocess.Popen(self.args, **kwargs)
        except OSError as e:
            raise ProcessError(f"cannot start {self.args[0]}: {e}") from e
        self.start_time = time.monotonic()
        self._out, self._err = PipeReader(self._proc.stdout), PipeReader(self._proc.stderr)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    # ---------------------------------------------------------------- reading
    def _read(self) -> None:
        """Take in whatever the child has written so far (never blocks)."""
        if self._proc is None:
            return
        for line in self._out.read_lines():
            self._stdout_line(line)
        for line in self._err.read_lines():
            self._stderr.append(line)

    def _stdout_line(self, line: str) -> None:
        try:
            event = parse_line(line)
        except ProtocolError as e:
            self._noise.append(line)
            log.debug("MetaSeg: ignored stdout line (%s)", e)
            return
        if event is None:
            return
        if event.kind == "error":
            self._last_error = event
        elif event.kind == "done":
            self._done = event
        self._events.append(event)

    # ------------------------------------------------------------------ state
    @property
    def returncode(self) -> Optional[int]:
        if self._proc is None:
            return None
        self._escalate()
        rc = self._proc.poll()
        if rc is not None:
            self._on_exit()
        return rc

    @property
    def running(self) -> bool:
        return self._proc is not None and self.returncode is None

    @property
    def output_closed(self) -> bool:
        """Both pipes are at their end: the child and everything that shared its output are gone."""
        return self._proc is not None and self._out.eof and self._err.eof

    @property
    def finished(self) -> bool:
        """The process has exited, all of its output was read, and every event was polled."""
        if self._proc is None:
            return False
        self._read()
        return self.returncode is not None and self.output_closed and not self._events

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done_event(self) -> Optional[Event]:
        return self._done

    @property
    def last_error(self) -> Optional[Event]:
        return self._last_error

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def poll(self) -> List[Event]:
        """Every event received since the last call, without blocking."""
        self._read()
        self.returncode  # noqa: B018  (notices the exit, escalates a cancel, cleans up stragglers)
        self._read()
        out = list(self._events)
        self._events.clear()
        return out

    def wait(self, timeout: Optional[float] = None) -> int:
        """Poll until the process has exited and its output is read; return the exit code.

        Events stay queued for `poll()`. Raises TimeoutError after `timeout` seconds.
        """
        if self._proc is None:
            raise ProcessError("the process was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._read()
            rc = self.returncode
            if rc is not None:
                self._read()
                if self.output_closed:
                    return rc
            if deadline is not None and time.monotonic() > deadline:
                if rc is None:
                    raise TimeoutError(f"the process {self.pid} is still running after {timeout} s")
                self._out.close()  # exited, but something kept its pipes open: stop waiting for them
                self._err.close()
                return rc
            time.sleep(0.01)

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
        exits with code 3, writing nothing), then SIGKILL to the group once `grace`
        seconds have passed, whatever happened (done by the next `poll()`, `wait()` or
        `returncode`: the caller's timer keeps calling them). Windows: `taskkill /T /F` on the tree.
        """
        if self._proc is None or self._cancelled:
            return
        self._cancelled = True
        if IS_WINDOWS:
            self._kill_tree(None)
            return
        if self._proc.poll() is None:
            self._kill_tree(signal.SIGTERM)
        self._kill_at = time.monotonic() + grace

    def _escalate(self) -> None:
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = None
            self._kill_tree(signal.SIGKILL)

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

    def failure(self) -> Optional[Dict[str, Any]]:
        """None after a successful run or a cancel; else what went wrong, for the panel (MetaSegLib.refusals):
        the core's error event (message, reason, facts, traceback) or, without one, how the process ended
        and the tail of its stderr."""
        rc = self.returncode
        if rc is None or self._cancelled or (rc == 0 and self.done_event is not None):
            return None
        err = self.last_error
        if err is not None:
            return dict(err.data)
        return {"message": self.error_message(), "crash": True, "exit_code": rc,
                "details": self.stderr_tail(60) or "\n".join(list(self._noise)[-60:])}


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
    """`python -m metaseg job job.json`: a `segment` of `input_path` with every output in a private run folder.

    Create it, write the input image to `input_path` (and, with `mask=True`, the brain mask on the same grid to
    `mask_path`), then `start()`: it writes the job file and starts the child. The job file holds the settings under
    the names of the core's typed options (`metaseg.options.SegmentOptions` and `Outputs`; `job_settings()`), which
    the core builds and checks exactly as for its command line. After the run, `cleanup()` removes the folder
    (the caller loads the outputs first).
    """

    def __init__(self, python: Optional[str] = None, weights: Optional[str] = None, device: str = "auto",
                 seed: int = 0, steps: Optional[int] = None, live_every: int = 0, save_inr: bool = False,
                 uncertainty: bool = False, brain_extraction: str = "auto", brain_mask: bool = False,
                 quality: str = "fast", env: Optional[Dict[str, str]] = None, python_path: Optional[Sequence[str]] = None,
                 temp_root: Optional[str] = None, labels: str = "tissues", accept_poor_match: bool = False,
                 mask: bool = False):
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be at least 1 (got {steps})")
        if live_every < 0:
            raise ValueError(f"live_every must be >= 0 (got {live_every})")
        self.save_inr, self.uncertainty = save_inr, uncertainty
        self.brain_extraction, self.brain_mask = brain_extraction, brain_mask  # 3D: auto/on/off; keep the mask used
        self.mask = mask  # 3D: a brain mask is given (written by the caller to mask_path): voxels outside are ignored
        self.quality = quality  # 3D: fast (one fit) or best (3 fits averaged)
        self.labels = labels  # tissues or structures
        self.accept_poor_match = bool(accept_poor_match)  # "Segment anyway": a scan refused as a poor match
        self.weights, self.device, self.seed, self.steps, self.live_every = weights, device, int(seed), steps, int(live_every)
        super().__init__(python, env, python_path, temp_root)

    def set_paths(self, workdir: Path) -> None:
        self.input_path = workdir / "input.nrrd"
        self.job_path = workdir / "job.json"
        self.labels_path = workdir / "labels.nrrd"
        self.segmentation_path = workdir / "segmentation.seg.nrrd"
        self.report_path = workdir / "report.json"
        self.live_dir = workdir / "live"
        self.fitted_path = workdir / "fitted.safetensors" if self.save_inr else None  # 3D: for cross-sections later
        self.uncertainty_path = workdir / "uncertainty.nrrd" if self.uncertainty else None  # 3D: entropy map
        self.brain_mask_path = workdir / "brain_mask.nrrd" if self.brain_mask else None  # 3D: the brain used
        self.mask_path = workdir / "mask.nrrd" if self.mask else None  # 3D: the brain mask given

    def job_settings(self) -> Dict[str, Any]:
        """The job file's content: the input, the mask, and the fields of SegmentOptions and Outputs."""
        def path(p: Optional[Path]) -> Optional[str]:
            return None if p is None else str(p)

        options = {"labels": self.labels, "weights": self.weights or None, "device": self.device,
                   "quality": self.quality, "steps": None if self.steps is None else int(self.steps),
                   "seed": self.seed, "brain_extraction": self.brain_extraction,
                   "accept_poor_match": self.accept_poor_match}
        outputs = {"labels": str(self.labels_path), "seg_nrrd": str(self.segmentation_path),
                   "report": str(self.report_path), "inr": path(self.fitted_path),
                   "uncertainty": path(self.uncertainty_path), "brain_mask": path(self.brain_mask_path),
                   "live_dir": str(self.live_dir) if self.live_every > 0 else None, "live_every": self.live_every,
                   "force": True}
        return {"format": "metaseg-job/1", "input": str(self.input_path), "mask": path(self.mask_path),
                "options": options, "outputs": outputs, "progress": "json"}

    def command(self) -> List[str]:
        return [self.python, "-m", "metaseg", "job", str(self.job_path)]

    def start(self) -> "SegmentProcess":
        if not self.input_path.is_file():
            raise ProcessError(f"the input image was not written to {self.input_path}")
        if self.mask_path is not None and not self.mask_path.is_file():
            raise ProcessError(f"the brain mask was not written to {self.mask_path}")
        self.job_path.write_text(json.dumps(self.job_settings(), indent=1), encoding="utf-8")
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
                 python_path: Optional[Sequence[str]] = None, temp_root: Optional[str] = None,
                 weights: Sequence[str] = ()):
        self.fitted, self.what, self.device = str(fitted), what, device
        self.weights = [str(w) for w in weights]  # where a model's spatial prior may be (files or folders of weights)
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
        for w in self.weights:
            cmd += ["--weights", w]
        return cmd

    def error_message(self) -> Optional[str]:
        rc = self.returncode
        if rc == 0 and not self._cancelled:
            return None if self.output_path.is_file() else "The MetaSeg process wrote no cross-section."
        core = self._core_errors()
        if core and not self._cancelled:
            return core[-1]
        return super().error_message()

    def _core_errors(self) -> List[str]:
        """The core's `error: ...` lines; not the launcher's own "error: [python-real] exit abnormally" of a crash."""
        return [line[len("error: "):] for line in self._stderr
                if line.startswith("error: ") and not LAUNCHER_CRASH.match(line)]

    def failure(self) -> Optional[Dict[str, Any]]:
        """As JsonLinesProcess.failure; `reslice` sends no events: its `error: ...` line is the core's message."""
        rc = self.returncode
        if rc is None or self._cancelled:
            return None
        if rc == 0:
            return None if self.output_path.is_file() else {"message": "The MetaSeg process wrote no cross-section.",
                                                            "crash": True, "details": self.stderr_tail(60)}
        core = self._core_errors()
        if core:
            return {"message": core[-1]}
        return super().failure()
