"""The progress protocol parser and the process runner, with real child processes."""
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from MetaSegLib import paths
from MetaSegLib.process import JsonLinesProcess, SegmentProcess
from MetaSegLib.protocol import Event, ProtocolError, format_progress, format_seconds, parse_line
from MetaSegLib.report import format_report

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ protocol
def test_parse_every_event_kind():
    lines = [
        '{"event": "stage", "stage": "fit", "message": "fitting 10 steps on cpu (torch 2.3)", "device": "cpu"}',
        '{"event": "progress", "step": 3, "steps": 10, "loss": 0.01, "psnr": 24.5, "elapsed_s": 0.3, "remaining_s": 0.7}',
        '{"event": "labels", "step": 4, "path": "/tmp/live_00004.nii.gz"}',
        '{"event": "warning", "message": "poor fit"}',
        '{"event": "done", "outputs": {"labels": "a.nrrd"}, "report": {"device": "cpu"}}',
        '{"event": "error", "message": "bad input", "exit_code": 2}',
    ]
    events = [parse_line(line) for line in lines]
    assert [e.kind for e in events] == ["stage", "progress", "labels", "warning", "done", "error"]
    assert events[0]["device"] == "cpu"  # extra fields are kept
    assert events[1].fraction == pytest.approx(0.3)
    assert events[5].get("exit_code") == 2
    assert "event" not in events[2].data


def test_parse_blank_and_invalid_lines():
    assert parse_line("") is None and parse_line("   \n") is None
    bad = {
        "Traceback (most recent call last):": "not a JSON object",
        "{not json": "invalid JSON",
        "[1, 2]": "not a JSON object",
        '{"step": 1}': "no string 'event'",
        '{"event": "teleport"}': "unknown event",
        '{"event": "progress", "step": 1, "steps": 10, "psnr": 20, "elapsed_s": 1}': "remaining_s",
        '{"event": "progress", "step": "1", "steps": 10, "psnr": 20, "elapsed_s": 1, "remaining_s": 1}': "should be int",
        '{"event": "progress", "step": 11, "steps": 10, "psnr": 20, "elapsed_s": 1, "remaining_s": 1}': "out of range",
        '{"event": "progress", "step": true, "steps": 10, "psnr": 20, "elapsed_s": 1, "remaining_s": 1}': "should be int",
        '{"event": "labels", "step": 1, "path": ""}': "empty path",
        '{"event": "done", "outputs": [], "report": {}}': "should be dict",
        '{"event": "error"}': "without 'message'",
    }
    for line, why in bad.items():
        with pytest.raises(ProtocolError, match=why):
            parse_line(line)


def test_parse_infinite_psnr_and_formatting():
    e = parse_line('{"event": "progress", "step": 10, "steps": 10, "loss": 0, "psnr": Infinity, '
                   '"elapsed_s": 2.0, "remaining_s": 0.0}')
    assert math.isinf(e["psnr"])
    assert format_progress(e) == "step 10/10 · PSNR ∞ · done"
    e = parse_line('{"event": "progress", "step": 2, "steps": 10, "loss": 0.1, "psnr": 21.44, '
                   '"elapsed_s": 2.0, "remaining_s": 125.0}')
    assert format_progress(e) == "step 2/10 · PSNR 21.4 dB · ~2 min 05 s left"
    assert format_seconds(3725) == "1 h 02 min" and format_seconds(float("nan")) == "?"
    with pytest.raises(ValueError):
        format_progress(Event("stage", {"stage": "fit", "message": ""}))


def test_report_text():
    report = {"device": "cuda", "versions": {"torch": "2.3.1"}, "fit": {"steps": 10, "psnr_db": 31.2},
              "timings_s": {"total": 1.234}, "weights": "w.pt", "weights_sha256": "ab" * 32,
              "classes": [{"value": 0, "name": "Background", "voxels": 5, "area_mm2": 5.0},
                          {"value": 1, "name": "Cortical gray matter", "voxels": 7, "area_mm2": 7.0}],
              "warnings": ["little white matter"]}
    text = format_report(report)
    assert "Cortical gray matter: 7 mm² (7 voxels)" in text and "Background" not in text
    assert "on cuda (torch 2.3.1)" in text and "Warning: little white matter" in text
    assert "sha256" not in text and "w.pt" not in text  # file names and checksums: details (issue 25, section 7)
    assert "weights w.pt (sha256 abababababab…)" in format_report(report, weights=True)
    # several fits (quality best): each volume with the range the run measured between its fits
    report["classes"] = [{"value": 17, "name": "Left-Hippocampus", "voxels": 3500, "volume_ml": 3.5,
                          "volume_ml_fits": [3.4, 3.5, 3.6], "spread_pct": 5.71}]
    assert "Left-Hippocampus: 3.50 mL (fits 3.40–3.60) (3500 voxels)" in format_report(report)


def test_paths_helpers(tmp_path):
    assert paths.input_dimension((160, 192, 1)) == 2
    assert paths.input_dimension((160, 1, 192)) == 2
    assert paths.input_dimension((160, 192, 100)) == 3
    module = tmp_path / "MetaSegSlicer"
    (tmp_path / "Resources" / "Weights").mkdir(parents=True)
    module.mkdir()
    assert paths.find_weights(2, module) is None
    w = tmp_path / "Resources" / "Weights" / "metaseg2d.safetensors"
    w.write_bytes(b"x")
    Path(str(w) + ".sha256").write_text("abc123  metaseg2d.safetensors\n")
    assert paths.find_weights(2, module) == w and paths.weights_sha256(w) == "abc123"
    (module / "Resources" / "Weights").mkdir(parents=True)
    (module / "Resources" / "Weights" / "metaseg2d.safetensors").write_bytes(b"y")  # installed copy wins
    assert paths.find_weights(2, module) == module / "Resources" / "Weights" / "metaseg2d.safetensors"
    assert paths.find_weights(3, module) is None
    assert paths.core_python_path(ROOT / "MetaSegSlicer") == ROOT / "MetaSegCore"


# -------------------------------------------------------------------- runner
def script(tmp_path: Path, body: str) -> list:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def drain(proc: JsonLinesProcess, timeout: float = 30.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while not proc.finished:
        events += proc.poll()
        assert time.monotonic() < deadline, "the process did not finish"
        time.sleep(0.02)
    return events + proc.poll()


def test_runner_reads_events_without_blocking(tmp_path):
    go = tmp_path / "go"  # the child prints nothing before the test has polled: no race with a busy CPU
    args = script(tmp_path, """
        import json, os, sys, time
        while not os.path.exists(GO):
            time.sleep(0.01)
        print("some library chatter that is not JSON", flush=True)
        for i in range(1, 4):
            print(json.dumps({"event": "progress", "step": i, "steps": 3, "loss": 0.1, "psnr": 20.0 + i,
                              "elapsed_s": i * 0.1, "remaining_s": (3 - i) * 0.1}), flush=True)
            time.sleep(0.2)
        sys.stderr.write("a warning on stderr\\n")
        print(json.dumps({"event": "done", "outputs": {}, "report": {"ok": True}}), flush=True)
    """.replace("GO", repr(str(go))))
    proc = JsonLinesProcess(args).start()
    t0 = time.monotonic()
    assert proc.poll() == []  # returns while the child works (it waits for `go`: a blocking read would never return)
    assert time.monotonic() - t0 < 5.0
    go.touch()
    events = drain(proc)
    assert [e.kind for e in events] == ["progress", "progress", "progress", "done"]
    assert [e["step"] for e in events[:3]] == [1, 2, 3]
    assert proc.returncode == 0 and proc.error_message() is None
    assert proc.done_event["report"] == {"ok": True}
    assert "a warning on stderr" in proc.stderr_tail()


def test_runner_crash_gives_stderr_tail(tmp_path):
    args = script(tmp_path, """
        import json
        print(json.dumps({"event": "stage", "stage": "fit", "message": "fitting"}), flush=True)
        raise RuntimeError("boom: CUDA out of memory")
    """)
    proc = JsonLinesProcess(args).start()
    drain(proc)
    msg = proc.error_message()
    assert proc.returncode == 1
    assert "exited with code 1" in msg and "boom: CUDA out of memory" in msg


def test_runner_prefers_the_error_event(tmp_path):
    args = script(tmp_path, """
        import json, sys
        print(json.dumps({"event": "error", "message": "the input is a 3D volume", "exit_code": 2}), flush=True)
        sys.exit(2)
    """)
    proc = JsonLinesProcess(args).start()
    drain(proc)
    assert proc.error_message() == "the input is a 3D volume"


def test_runner_killed_by_signal_and_missing_result(tmp_path):
    if os.name == "nt":
        pytest.skip("POSIX signals")
    args = script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    proc = JsonLinesProcess(args).start()
    drain(proc)
    assert "killed by signal SIGSEGV" in proc.error_message()
    proc = JsonLinesProcess(script(tmp_path, "print('no events at all')\n")).start()
    drain(proc)
    msg = proc.error_message()
    assert "ended without reporting a result" in msg and "no events at all" in msg


def test_runner_cannot_start_a_missing_program():
    from MetaSegLib.process import ProcessError

    with pytest.raises(ProcessError, match="cannot start"):
        JsonLinesProcess(["/nonexistent/python-xyz"]).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose (waiting for its parent to reap it)
        return Path(f"/proc/{pid}/status").read_text(encoding="utf-8").split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_cancel_kills_the_whole_process_tree(tmp_path):
    """A child that ignores SIGTERM and started a grandchild: both die on cancel."""
    if os.name == "nt":
        pytest.skip("POSIX process groups (Windows uses taskkill /T)")
    args = script(tmp_path, """
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
        print(json.dumps({"event": "stage", "stage": "fit", "message": "hanging", "grandchild": grandchild.pid}),
              flush=True)
        while True:
            time.sleep(1)
    """)
    proc = JsonLinesProcess(args).start()
    events, deadline = [], time.monotonic() + 20
    while not events:
        events = proc.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = events[0]["grandchild"]
    assert _alive(proc.pid) and _alive(grandchild)
    t0 = time.monotonic()
    proc.cancel(grace=0.5)
    assert time.monotonic() - t0 < 0.2  # cancel() does not block
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild survived the cancel"
    assert proc.cancelled and proc.error_message() == "cancelled"


def test_cancel_lets_a_cooperative_child_stop(tmp_path):
    """SIGTERM first: a child that handles it (the core does) ends by itself."""
    if os.name == "nt":
        pytest.skip("POSIX signals")
    args = script(tmp_path, """
        import json, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
        print(json.dumps({"event": "stage", "stage": "fit", "message": "working"}), flush=True)
        while True:
            time.sleep(0.05)
    """)
    proc = JsonLinesProcess(args).start()
    while not proc.poll():
        time.sleep(0.02)
    proc.cancel(grace=5.0)
    assert proc.wait(timeout=10) == 3


def test_segment_process_passes_the_cores_typed_options(tmp_path):
    """The child gets a job file: the settings under the names of metaseg.options (SegmentOptions, Outputs), read
    back by the core's own reader into those typed objects, as the command line and the API fill them."""
    from metaseg.options import Outputs, SegmentOptions, read_job

    p = SegmentProcess(python="py", weights="w.pt", device="cuda", seed=7, steps=3, live_every=2,
                       temp_root=str(tmp_path), accept_poor_match=True, brain_extraction="off", mask=True,
                       save_inr=True, quality="best", labels="structures")
    assert p.command() == ["py", "-m", "metaseg", "job", str(p.job_path)]
    p.input_path.write_bytes(b"scan")
    p.mask_path.write_bytes(b"mask")
    p.job_path.write_text(__import__("json").dumps(p.job_settings()))
    job = read_job(p.job_path)
    assert job.options == SegmentOptions(labels="structures", weights="w.pt", device="cuda", quality="best", steps=3,
                                         seed=7, brain_extraction="off", accept_poor_match=True)
    assert job.outputs == Outputs(labels=str(p.labels_path), report=str(p.report_path), seg_nrrd=str(p.segmentation_path),
                                  inr=str(p.fitted_path), live_dir=str(p.live_dir), live_every=2, force=True)
    assert job.input == str(p.input_path) and job.mask == str(p.mask_path) and job.progress == "json"
    assert p.workdir.parent == tmp_path and p.workdir.is_dir()
    p.cleanup()
    assert not p.workdir.exists()
    q = SegmentProcess(python="py", temp_root=str(tmp_path))
    settings = q.job_settings()
    assert settings["mask"] is None and settings["options"]["steps"] is None and settings["outputs"]["live_dir"] is None
    assert settings["options"]["accept_poor_match"] is False and settings["options"]["weights"] is None
    m = SegmentProcess(python="py", temp_root=str(tmp_path), mask=True)
    m.input_path.write_bytes(b"scan")
    with pytest.raises(Exception, match="brain mask was not written"):
        m.start()
    m.cleanup()
    q.cleanup()
    with pytest.raises(ValueError):
        SegmentProcess(steps=0, temp_root=str(tmp_path))


def test_the_cores_job_reader_refuses_what_it_does_not_know(tmp_path):
    from metaseg.io.readers import InputError
    from metaseg.options import read_job

    path = tmp_path / "job.json"
    for content, why in (({"format": "metaseg-job/1", "input": "a.nii", "options": {"acept_poor_match": True}},
                          "acept_poor_match is not a field of SegmentOptions"),
                         ({"format": "metaseg-job/1", "input": "a.nii", "options": {"accept_poor_match": "yes"}},
                          "must be true or false"),
                         ({"format": "metaseg-job/2", "input": "a.nii"}, "not a MetaSeg job file"),
                         ({"format": "metaseg-job/1", "input": "a.nii", "extra": 1}, "unknown entries extra")):
        path.write_text(__import__("json").dumps(content))
        with pytest.raises(InputError, match=why):
            read_job(path)


def test_segment_process_real_core_error(tmp_path):
    """The real core with a bogus weights file: its own error message, no hang, no files left."""
    p = SegmentProcess(weights=str(tmp_path / "missing.pt"), device="cpu", steps=1, temp_root=str(tmp_path),
                       python_path=[str(ROOT / "MetaSegCore")])
    p.input_path = p.workdir / "input.nii.gz"  # the core reads NIfTI as well as NRRD
    shutil.copy(ROOT / "Resources" / "Sample" / "ecog_slice_t1.nii.gz", p.input_path)
    p.start()
    assert p.wait(timeout=120) == 2
    drain(p)
    assert "weights file not found" in p.error_message()
    p.cleanup()
    assert not p.workdir.exists()
