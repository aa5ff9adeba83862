"""Issue 22: hostile inputs, second round. One test per class of problem, then a sweep over every
subcommand's hostile arguments: exit 2, one message, nothing half-written, no traceback. All stop before
any fit (tiny files, tiny weights), except the 2D NaN case (a 2-step fit with tiny weights)."""
import errno
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.io import atomic
from metaseg.io.atomic import OutputWriteError, write_all
from metaseg.cli import main
from metaseg.cohort.cohort_table import lock_table
from metaseg.live import snapshot_path, write_snapshot
from metaseg.pipeline import _remove
from test_hostile_inputs import SLICE, files_in, run
from testdata import WEIGHTS_3D, small_fitted_file


# ---- inputs the readers must refuse or flag ----

def complex_volume(t: Path) -> Path:
    a = (np.random.default_rng(0).random((40, 40, 40)) + 1j).astype(np.complex64)
    sitk.WriteImage(sitk.GetImageFromArray(a), str(t / "complex.nii.gz"))
    return t / "complex.nii.gz"


def huge_mgz(t: Path) -> Path:
    """An MGZ whose header claims 10^4 x 10^4 x 10^4 = 10^12 voxels (reading it used to end in a MemoryError)."""
    header = struct.pack(">7ih", 1, 10000, 10000, 10000, 1, 3, 0, 0)
    with gzip.open(t / "huge.mgz", "wb") as f:
        f.write(header + b"\0" * (284 - len(header) + 1000))
    return t / "huge.mgz"


def test_complex_voxels_and_absurd_mgz_headers_are_refused(tmp_path, capsys):
    for make, message in ((complex_volume, "complex voxels"), (huge_mgz, "header claims 10000x10000x10000")):
        rc, err = run(["segment", make(tmp_path), "-o", tmp_path / "out" / "l.nii.gz"], capsys)
        assert rc == 2 and message in err, err
    assert files_in(tmp_path / "out") == []


def test_nan_voxels_become_background_with_a_warning(tiny_weights, tmp_path, capsys):
    """ITK reads NaN in a NIfTI as 0 without a word: the run now says how many and how they were treated."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SLICE), sitk.sitkFloat32))
    arr[0, 100:102, 80:83] = np.nan
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(sitk.ReadImage(str(SLICE)))
    sitk.WriteImage(img, str(tmp_path / "nan.nii.gz"))
    rc, err = run(["segment", tmp_path / "nan.nii.gz", "-o", tmp_path / "l.nii.gz", "--report", tmp_path / "r.json",
                   "--weights", tiny_weights], capsys)
    assert rc == 0, err
    warned = [w for w in json.loads((tmp_path / "r.json").read_text())["warnings"] if "NaN" in w]
    assert len(warned) == 1 and "6 NaN or infinite voxels" in warned[0] and "treated as background" in warned[0]
    assert "6 NaN" in err


def dicom_series(folder: Path, positions, n_rows=48) -> Path:
    """A small DICOM series (axial slices 1 mm apart unless `positions` says otherwise)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    uid = "1.2.826.0.1.3680043.2.1125.22"
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for k, z in enumerate(positions):
        sl = sitk.GetImageFromArray((rng.random((n_rows, n_rows)) * 100 + 1).astype(np.int16))
        for tag, v in {"0008|0060": "MR", "0020|000d": uid + ".1", "0020|000e": uid + ".2", "0008|0018": f"{uid}.3.{k}",
                       "0020|0032": f"0\\0\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
                       "0028|0030": "1\\1"}.items():
            sl.SetMetaData(tag, v)
        w.SetFileName(str(folder / f"s{k:04d}.dcm"))
        w.Execute(sl)
    return folder


def missing_slices(t: Path) -> Path:
    d = dicom_series(t / "missing", range(40))
    for k in (10, 11, 12):
        os.remove(d / f"s{k:04d}.dcm")
    return d


def truncated_slice(t: Path) -> Path:
    d = dicom_series(t / "truncated", range(40))
    data = (d / "s0020.dcm").read_bytes()
    (d / "s0020.dcm").write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("make,message", [
    (missing_slices, "about 3 slice(s) are missing"),
    (truncated_slice, "about 1 slice(s) are missing"),
    (lambda t: dicom_series(t / "uneven", [k if k < 20 else 20 + (k - 20) * 1.5 for k in range(40)]), "unevenly spaced"),
], ids=["missing slices", "truncated slice file", "uneven spacing"])
def test_dicom_series_with_gaps_are_refused(make, message, tmp_path, capsys):
    rc, err = run(["segment", make(tmp_path), "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert files_in(tmp_path / "out") == []


def test_a_scan_on_the_training_grid_does_not_skip_the_gate(shared_data, tmp_path, capsys):
    """Inverted contrast in a file of the 160x192x224 training grid: refused like anywhere else, before the fit."""
    if not WEIGHTS_3D.exists():
        pytest.skip("shipped 3D weights not built yet")
    img = sitk.ReadImage(str(shared_data / "ws01" / "aligned_norm.nii.gz"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    inv = sitk.GetImageFromArray(np.where(arr > 0, arr.max() + 1 - arr, 0).astype(np.float32))
    inv.CopyInformation(img)
    sitk.WriteImage(inv, str(tmp_path / "inverted_on_grid.nii.gz"))
    rc, err = run(["segment", tmp_path / "inverted_on_grid.nii.gz", "-o", tmp_path / "out" / "l.nii.gz",
                   "--weights", WEIGHTS_3D], capsys)
    assert rc == 2 and "T2-weighted" in err and "fitting" not in err, err
    assert files_in(tmp_path / "out") == []


# ---- outputs: names too long, a full disk ----

def test_output_names_over_the_limit_are_refused_before_reading(tmp_path, capsys):
    long = "x" * 300
    for args in (["segment", tmp_path / "absent.nii.gz", "-o", tmp_path / f"{long}.nii.gz"],
                 ["segment", tmp_path / "absent.nii.gz", "-o", tmp_path / long / "l.nii.gz"],
                 ["batch", SLICE, "-o", tmp_path / long]):
        rc, err = run(args, capsys)
        assert rc == 2 and "choose a shorter name" in err and "not found" not in err, err
    assert files_in(tmp_path) == []


def test_a_full_disk_is_one_message_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError, match="No space left on device; nothing was written"):
        write_all([(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("a")), (tmp_path / "b.json", no_space)])
    assert files_in(tmp_path) == []

    def itk_cannot_write(tmp):  # SimpleITK says only "could not write": a nearly full disk explains it
        raise RuntimeError("ImageIO: could not write file")

    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 1000)
    with pytest.raises(OutputWriteError, match="no space left on the device"):
        write_all([(tmp_path / "l.nii.gz", itk_cannot_write)])
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 1 << 40)
    with pytest.raises(RuntimeError, match="could not write"):  # with space to spare it is a bug: not hidden
        write_all([(tmp_path / "l.nii.gz", itk_cannot_write)])
    assert files_in(tmp_path) == []


@pytest.fixture
def full_disk(tmp_path):
    """A real 256 kB file system, filled up (needs root and tmpfs; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_segment_onto_a_full_disk(full_disk, tiny_weights, capsys):
    rc, err = run(["segment", SLICE, "-o", full_disk / "out" / "l.nii.gz", "--report", full_disk / "out" / "r.json",
                   "--weights", tiny_weights, "--progress", "none"], capsys)
    assert rc == 2 and "error: cannot write" in err and ("No space left" in err or "no space left" in err), err
    assert files_in(full_disk) == ["filler"]


# ---- --live-dir: the rules of every other output ----

def test_live_dir_never_replaces_existing_files_or_inputs(tiny_weights, tmp_path, capsys):
    live = tmp_path / "live"
    live.mkdir()
    (live / "live_00010.nii.gz").write_text("the user's own file")
    args = ["segment", SLICE, "-o", tmp_path / "l.nii.gz", "--weights", tiny_weights, "--live-dir", live, "--live-every", "1"]
    rc, err = run(args, capsys)
    assert rc == 2 and "already holds 1 snapshot file(s)" in err and "--force" in err and "reading" not in err
    assert (live / "live_00010.nii.gz").read_text() == "the user's own file"
    scan = live / "live_00001.nii.gz"  # the input itself under a snapshot's name: refused even with --force
    shutil.copy(SLICE, scan)
    rc, err = run(["segment", scan, "-o", tmp_path / "l.nii.gz", "--weights", tiny_weights, "--live-dir", live,
                   "--live-every", "1", "--force"], capsys)
    assert rc == 2 and "holds an input of this run" in err
    assert scan.read_bytes() == SLICE.read_bytes() and not (tmp_path / "l.nii.gz").exists()


def test_live_cleanup_removes_only_what_the_run_created(tmp_path):
    theirs, ours = snapshot_path(tmp_path, 10), snapshot_path(tmp_path, 20)
    theirs.write_text("the user's file")
    created = []
    for path in (theirs, ours):  # with --force: the user's file is replaced, but it is not this run's to delete
        write_snapshot(path, lambda tmp: Path(tmp).write_text("snapshot"), True, [SLICE], created)
    assert created == [ours]
    _remove(created)  # what a failed run does
    assert files_in(tmp_path) == ["live_00010.nii.gz"]


# ---- batch: merging shards, concurrent runs ----

HEADER = "index\tid\tinput\tstatus\terror\tmetaseg_version\tweights_sha256\n"


def shard_tables(out: Path, second_row: str = "1\tb\tb.nii.gz\tok\t\t0.3.1\taaa\n") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "volumes.shard-1-of-2.tsv").write_text(HEADER + "0\ta\ta.nii.gz\tok\t\t0.3.1\taaa\n")
    (out / "volumes.shard-2-of-2.tsv").write_text(HEADER + second_row)
    return out


def test_merge_refuses_malformed_tables_and_keeps_an_existing_volumes_table(tmp_path, capsys):
    out = shard_tables(tmp_path / "bad", "one\tb\tb.nii.gz\tok\n")
    rc, err = run(["batch", "--merge", "-o", out, "--progress", "none"], capsys)
    assert rc == 2 and "volumes.shard-2-of-2.tsv is malformed (line 2: index 'one')" in err
    assert not (out / "volumes.tsv").exists()
    out = shard_tables(tmp_path / "kept")
    (out / "volumes.tsv").write_text("4 rows of an earlier run")
    rc, err = run(["batch", "--merge", "-o", out, "--progress", "none"], capsys)
    assert rc == 2 and "exists" in err and "--force" in err
    assert (out / "volumes.tsv").read_text() == "4 rows of an earlier run"
    assert main(["batch", "--merge", "-o", str(out), "--progress", "none", "--force"]) == 0
    assert len((out / "volumes.tsv").read_text().splitlines()) == 3


def test_merge_warns_about_shards_of_other_versions_or_weights(tmp_path, capsys):
    out = shard_tables(tmp_path / "mixed", "1\tb\tb.nii.gz\tok\t\t0.2.0\tbbb\n")
    rc, err = run(["batch", "--merge", "-o", out, "--progress", "bar"], capsys)
    assert rc == 0 and "different metaseg versions (0.2.0, 0.3.1)" in err and "different weights (aaa, bbb)" in err


def test_a_second_batch_on_the_same_table_is_refused(tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    held = lock_table(out / "volumes.tsv")  # another batch run is writing this table
    try:
        rc, err = run(["batch", SLICE, "-o", out, "--weights", tiny_weights, "--progress", "none"], capsys)
        assert rc == 2 and "another metaseg batch is writing" in err
        assert not (out / "volumes.tsv").exists()
    finally:
        held.close()
    assert main(["batch", str(SLICE), "-o", str(out), "--weights", str(tiny_weights), "--progress", "none"]) == 0


# ---- the sweep: every subcommand, hostile arguments, no traceback ----

def hostile_cases(t: Path, tiny_weights: Path) -> dict:
    long = "y" * 300
    fitted = small_fitted_file(t / "fitted.safetensors", mask=True)
    ev = t / "ev" / "s1"
    ev.mkdir(parents=True)
    shutil.copy(SLICE, ev / "slice_norm.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 5, (1, 100, 100)).astype(np.uint8)),
                    str(ev / "slice_seg4.nii.gz"))
    big = t / "ev" / "s2"
    big.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((1, 300, 300)).astype(np.float32)), str(big / "slice_norm.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 5, (1, 300, 300)).astype(np.uint8)), str(big / "slice_seg4.nii.gz"))
    (t / "empty").mkdir()
    (t / "corrupt.npz").write_bytes(b"not a zip")
    np.savez(t / "other.npz", **{"someone/image": np.zeros(3), "someone/labels": np.zeros(3)})
    subj = t / "subj" / "s1"
    subj.mkdir(parents=True)
    shutil.copy(complex_volume(t), subj / "native_t1.nii.gz")
    shutil.copy(complex_volume(t), subj / "native_seg4.nii.gz")
    out = t / "out"
    return {
        "segment complex voxels": ["segment", complex_volume(t), "-o", out / "l.nii.gz"],
        "segment MGZ of 10^12 voxels": ["segment", huge_mgz(t), "-o", out / "l.nii.gz"],
        "segment name too long": ["segment", SLICE, "-o", out / f"{long}.nii.gz"],
        "segment --device meta": ["segment", SLICE, "-o", out / "l.nii.gz", "--device", "meta"],
        "segment --device xpu": ["segment", SLICE, "-o", out / "l.nii.gz", "--device", "xpu"],
        "segment DICOM with missing slices": ["segment", missing_slices(t), "-o", out / "l.nii.gz"],
        "batch --device xpu": ["batch", SLICE, "-o", out, "--device", "xpu"],
        "batch folder name too long": ["batch", SLICE, "-o", out / long],
        "batch --merge of a malformed table": ["batch", "--merge", "-o", shard_tables(t / "shards", "1\tb\n\t\t\n")],
        "reslice --device meta": ["reslice", fitted, "-o", out / "p.nii.gz", "--device", "meta"],
        "reslice infinite extent": ["reslice", fitted, "-o", out / "p.nii.gz", "--extent", "inf"],
        "reslice absurd extent": ["reslice", fitted, "-o", out / "p.nii.gz", "--extent", "1e308"],
        "reslice name too long": ["reslice", fitted, "-o", out / f"{long}.nrrd"],
        "evaluate --device xpu": ["evaluate", t / "ev", "--subjects", "s1", "--device", "xpu", "--weights", tiny_weights],
        "evaluate sizes differ": ["evaluate", t / "ev", "--subjects", "s1", "--weights", tiny_weights],
        "evaluate slice larger than the canvas": ["evaluate", t / "ev", "--subjects", "s2", "--weights", tiny_weights],
        "prepare complex scan": ["prepare", subj, "-o", out / "pack.npz"],
        "prepare name too long": ["prepare", subj, "-o", out / f"{long}.npz"],
        "train empty data folder": ["train", "--data", t / "empty", "--out", out / "run"],
        "train corrupt pack": ["train", "--dims", "3", "--data", t / "corrupt.npz", "--out", out / "run"],
        "train pack without the training subjects": ["train", "--dims", "3", "--data", t / "other.npz", "--out", out / "run"],
        "train --device meta": ["train", "--data", t / "other.npz", "--device", "meta", "--out", out / "run"],
    }


def test_every_subcommand_answers_hostile_arguments_with_one_message(tiny_weights, tmp_path, capsys):
    cases = hostile_cases(tmp_path, tiny_weights)
    for name, args in cases.items():
        rc, err = run(args, capsys)  # an exception here (a traceback for the user) fails the test
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and lines and lines[-1].startswith("error: "), (name, rc, err)
        assert files_in(tmp_path / "out") == [], (name, files_in(tmp_path / "out"))


def test_no_traceback_reaches_the_terminal(tmp_path):
    """The same contract seen from a shell: one line on stderr, exit 2 (the case of issue 22's crash)."""
    p = subprocess.run([sys.executable, "-m", "metaseg", "segment", str(complex_volume(tmp_path)), "-o",
                        str(tmp_path / "l.nii.gz")], capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr and lines[-1].startswith("error: "), p.stderr
    assert sum(x.startswith("error: ") for x in lines) == 1


def test_disagreeing_qform_and_sform_are_named(tmp_path):
    """Two geometries in one NIfTI header put the brain in two places: the warning says which one was used."""
    from metaseg.io.readers import input_warnings, read_image

    img = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32) + 0.1)
    sitk.WriteImage(img, str(tmp_path / "a.nii"))
    h = bytearray((tmp_path / "a.nii").read_bytes())
    assert struct.unpack("<2h", h[252:256]) >= (1, 1)  # ITK writes both forms
    assert input_warnings(read_image(tmp_path / "a.nii")) == []
    h[292:296] = struct.pack("<f", struct.unpack("<f", h[292:296])[0] + 6.0)  # srow_x offset: the sform moved 6 mm
    (tmp_path / "b.nii").write_bytes(bytes(h))
    (msg,) = input_warnings(read_image(tmp_path / "b.nii"))
    assert "qform and sform disagree" in msg and "6.0 mm" in msg and ("the sform was used" in msg or "the qform was used" in msg)
