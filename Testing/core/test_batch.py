"""`metaseg batch` on 3 real scans, one corrupted: a row each, resumable after a kill, shards + merge, workers.

The scans are 2D slices (the bundled ecog slice, sub-01's slice from ../shared/data, and sub-02's slice
truncated to its first 200 bytes, as an interrupted download leaves it), segmented with the shipped
2D weights (~1 s each), so the whole file runs in well under a minute on 2 CPU cores.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.cli import main
from metaseg.cohort.cohort import find_scans, parse_shard, scan_id, shard_of
from metaseg.cohort.cohort_table import TIMING_COLUMNS, read_table
from metaseg.io.readers import InputError

from testdata import SAMPLE


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data):
    """Three scan files: two real slices and a truncated (corrupted) one."""
    d = tmp_path_factory.mktemp("cohort")
    shutil.copy(SAMPLE / "ecog_slice_t1.nii.gz", d / "ecog.nii.gz")
    shutil.copy(shared_data / "sub-01" / "slice_norm.nii.gz", d / "sub-01.nii.gz")
    (d / "sub-02.nii.gz").write_bytes((shared_data / "sub-02" / "slice_norm.nii.gz").read_bytes()[:200])
    return d


def _batch_args(cohort, out, weights, *extra):
    return ["batch", str(cohort), "-o", str(out), "--weights", str(weights), "--device", "cpu", "--progress", "none",
            "--preview", *extra]


@pytest.fixture(scope="module")
def uninterrupted(cohort, weights_2d, tmp_path_factory):
    """One plain run of the cohort: (exit code, output folder)."""
    out = tmp_path_factory.mktemp("whole") / "out"
    return main(_batch_args(cohort, out, weights_2d)), out


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def test_a_row_per_scan_the_corrupted_one_with_its_error(uninterrupted, cohort, weights_2d, tmp_path):
    rc, out = uninterrupted
    assert rc == 2  # some scan failed: said by the exit code, the rest of the cohort done
    rows = read_table(out / "volumes.tsv")
    assert [(r["index"], r["id"], r["status"]) for r in rows] == [("0", "ecog", "ok"), ("1", "sub-01", "ok"),
                                                                   ("2", "sub-02", "failed")]
    assert "truncated or corrupt" in rows[2]["error"] and rows[2]["input"] == str(cohort / "sub-02.nii.gz")
    assert not (out / "sub-02").exists()  # nothing written for the failed scan
    for r in rows[:2]:
        # the table's areas are those of the labelmap written beside it
        lab = sitk.ReadImage(str(out / r["id"] / "labels.nii.gz"))
        counts = np.bincount(sitk.GetArrayFromImage(lab).ravel(), minlength=5)
        cell = float(np.prod(lab.GetSpacing()[:2]))
        assert float(r["white_matter_mm2"]) == pytest.approx(counts[3] * cell)
        assert float(r["brain_mm2"]) == pytest.approx(counts[1:].sum() * cell)
        assert float(r["psnr_db"]) > 16 and r["device"] == "cpu" and len(r["weights_sha256"]) == 64
        assert (out / r["id"] / "preview.png").is_file()
    # a batch scan is exactly what `metaseg segment` makes of it
    single = tmp_path / "ecog.nii.gz"
    assert main(["segment", str(cohort / "ecog.nii.gz"), "-o", str(single), "--weights", str(weights_2d),
                 "--device", "cpu", "--progress", "none"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(single))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ecog" / "labels.nii.gz"))))


def test_a_rerun_skips_finished_scans_and_redoes_partial_ones(uninterrupted, cohort, weights_2d, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    (out / "sub-01" / "report.json").unlink()  # as if killed between writing the labels and the report
    (out / "ecog" / "labels.nii.gz").touch()
    before = {p: p.stat().st_mtime_ns for p in (out / "ecog" / "report.json", out / "sub-01" / "labels.nii.gz")}
    assert main(_batch_args(cohort, out, weights_2d)) == 2
    assert (out / "ecog" / "report.json").stat().st_mtime_ns == before[out / "ecog" / "report.json"]  # skipped
    assert (out / "sub-01" / "labels.nii.gz").stat().st_mtime_ns != before[out / "sub-01" / "labels.nii.gz"]  # redone
    assert _without_timing(read_table(out / "volumes.tsv")) == _without_timing(read_table(uninterrupted[1] / "volumes.tsv"))


def _start(cohort, out, weights):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _batch_args(cohort, out, weights)
    args[args.index("--progress") + 1] = "json"
    return subprocess.Popen([sys.executable, "-m", "metaseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_first_scan(p):
    events = []
    for line in p.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "scan":
            return events
    raise AssertionError(f"the batch ended before finishing a scan: {p.stderr.read()}")


def test_killed_run_then_rerun_gives_the_same_table(uninterrupted, cohort, weights_2d, tmp_path):
    out = tmp_path / "out"
    p = _start(cohort, out, weights_2d)
    events = _wait_for_first_scan(p)
    p.kill()  # SIGKILL: no chance to clean up
    p.wait(timeout=60)
    assert events[0]["event"] == "batch" and events[-1]["status"] == "ok" and events[-1]["total"] == 3
    assert any(e["event"] == "progress" and e["scan"] == "ecog" for e in events)  # each scan's fit progress
    rows = read_table(out / "volumes.tsv")  # whatever the moment of the kill, the table is whole
    assert [r["id"] for r in rows] == ["ecog", "sub-01", "sub-02"] and rows[0]["status"] == "ok"
    assert main(_batch_args(cohort, out, weights_2d)) == 2
    assert _without_timing(read_table(out / "volumes.tsv")) == _without_timing(read_table(uninterrupted[1] / "volumes.tsv"))


def test_sigterm_abandons_the_running_scan_and_leaves_a_valid_table(cohort, weights_2d, tmp_path):
    out = tmp_path / "out"
    p = _start(cohort, out, weights_2d)
    _wait_for_first_scan(p)
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    last = json.loads(rest.splitlines()[-1])
    assert last["event"] == "error" and last["exit_code"] == 3 and "rerun" in last["message"]
    rows = read_table(out / "volumes.tsv")
    assert rows[0]["status"] == "ok" and len(rows) == 3
    pending = [r["id"] for r in rows if r["status"] == "pending"]
    for i in pending:
        assert not (out / i / "labels.nii.gz").exists()  # an abandoned scan leaves nothing


def test_two_shards_then_merge_give_the_table_of_one_run(uninterrupted, cohort, weights_2d, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_batch_args(cohort, out, weights_2d, "--shard", "1/2")) == 2  # ecog and the corrupted scan
    assert main(["batch", "--merge", "-o", str(out)]) == 2  # shard 2 missing: refused, nothing written
    assert "shard(s) 2 of 2 have no table" in capsys.readouterr().err and not (out / "volumes.tsv").exists()
    assert main(_batch_args(cohort, out, weights_2d, "--shard", "2/2")) == 0
    assert [r["id"] for r in read_table(out / "volumes.shard-2-of-2.tsv")] == ["sub-01"]
    assert main(["batch", "--merge", "-o", str(out), "--progress", "none"]) == 0
    assert _without_timing(read_table(out / "volumes.tsv")) == _without_timing(read_table(uninterrupted[1] / "volumes.tsv"))


def test_worker_processes_give_the_same_table(uninterrupted, cohort, weights_2d, tmp_path):
    out = tmp_path / "out"
    assert main(_batch_args(cohort, out, weights_2d, "--devices", "cpu,cpu")) == 2
    assert _without_timing(read_table(out / "volumes.tsv")) == _without_timing(read_table(uninterrupted[1] / "volumes.tsv"))


def test_results_of_other_settings_are_not_mixed(uninterrupted, cohort, weights_2d, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    assert main(_batch_args(cohort, out, weights_2d, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "made with --seed 0" in err and "--force" in err


# ---- which scans, which ids, which shard: no fitting ----

def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_bids_dataset_ids(tmp_path):
    _touch(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _touch(tmp_path / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_T1w.nii.gz")
    _touch(tmp_path / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_T2w.nii.gz")  # not a T1w
    _touch(tmp_path / "participants.tsv")
    assert [(s.index, s.id) for s in find_scans([str(tmp_path)])] == [(0, "sub-01"), (1, "sub-02_ses-b")]
    assert scan_id(tmp_path / "sub-03" / "ses-1" / "anat" / "t1.nii") == "sub-03_ses-1"


def test_folder_glob_and_clashing_names(tmp_path):
    for s in ("a", "b"):
        _touch(tmp_path / s / "slice_norm.nii.gz")
    _touch(tmp_path / "a" / "notes.txt")
    assert [s.id for s in find_scans([str(tmp_path / "*" / "slice_norm.nii.gz")])] == ["a_slice_norm", "b_slice_norm"]
    assert [s.path.name for s in find_scans([str(tmp_path / "a")])] == ["slice_norm.nii.gz"]
    with pytest.raises(InputError, match="no image file matches"):
        find_scans([str(tmp_path / "*.mgz")])


def test_manifest_paths_ids_and_masks(tmp_path):
    _touch(tmp_path / "data" / "x.nii.gz")
    (tmp_path / "m.csv").write_text("subject,path,mask\nP1,data/x.nii.gz,data/m.nii.gz\nP2,/abs/absent.nii,\n")
    scans = find_scans([str(tmp_path / "m.csv")], id_column="subject")
    assert [(s.id, s.mask) for s in scans] == [("P1", tmp_path / "data" / "m.nii.gz"), ("P2", None)]
    assert scans[0].path == tmp_path / "data" / "x.nii.gz"  # relative to the manifest
    assert str(scans[1].path) == "/abs/absent.nii"  # a missing scan becomes a failed row, not a refusal here
    (tmp_path / "t.tsv").write_text("file\tid\nx.nii.gz\tP1\n")
    with pytest.raises(InputError, match="no 'path' column .*--path-column"):
        find_scans([str(tmp_path / "t.tsv")])
    (tmp_path / "d.csv").write_text("path,id\ndata/x.nii.gz,P1\ndata/x.nii.gz,P1\n")
    with pytest.raises(InputError, match="several scans have the id P1"):
        find_scans([str(tmp_path / "d.csv")])


def test_shard_from_arguments_and_job_arrays():
    assert parse_shard("2/8", {}) == (2, 8) and parse_shard(None, {}) is None
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert parse_shard("auto", slurm) == (5, 8)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) == (1, 4)
    assert parse_shard("auto", {"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "4", "SGE_TASK_STEPSIZE": "1"}) == (3, 4)
    assert parse_shard("auto/6", {"JOB_COMPLETION_INDEX": "0"}) == (1, 6)
    for bad, msg in (("9/8", "1 <= I <= N"), ("x", "expected I/N"), ("auto", "no job-array index")):
        with pytest.raises(InputError, match=msg):
            parse_shard(bad, {})
    with pytest.raises(InputError, match="not in the environment"):
        parse_shard("auto", {"JOB_COMPLETION_INDEX": "2"})
    with pytest.raises(InputError, match="has 8 tasks, not 4"):
        parse_shard("auto/4", slurm)
    scans = list(range(7))
    parts = [shard_of(scans, (i, 3)) for i in (1, 2, 3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]


def test_a_3d_scan_gets_volumes_in_ml_and_its_registration_quality(tmp_path):
    """The one 3D scan of this file (the bundled native T1, 2 fit steps: the table, not the accuracy)
    beside a 2D slice: mL columns for the volume, mm2 for the slice, the registration's NCC."""
    from testdata import SAMPLE_T1

    out = tmp_path / "out"
    assert main(["batch", str(SAMPLE_T1), str(SAMPLE / "ecog_slice_t1.nii.gz"), "-o", str(out), "--steps", "2",
                 "--device", "cpu", "--progress", "none"]) == 0
    vol, sl = read_table(out / "volumes.tsv")
    assert (vol["id"], sl["id"]) == ("ecog_t1", "ecog_slice_t1")
    assert float(vol["registration_ncc"]) > 0.85 and float(vol["registration_ncc_interior"]) > 0.78
    parts = [float(vol[f"{c}_ml"]) for c in ("cortical_gray_matter", "subcortical_gray_matter", "white_matter",
                                             "cerebrospinal_fluid")]
    assert float(vol["brain_ml"]) == pytest.approx(sum(parts), abs=0.01) and 500 < float(vol["brain_ml"]) < 1800  # 2 fit steps: some brain voxels stay background
    assert vol["brain_mm2"] == "" and sl["brain_ml"] == "" and float(sl["brain_mm2"]) > 0
    assert sl["registration_ncc"] == ""  # 2D slices are not registered


def test_each_caller_gets_its_own_copy_of_the_cached_template():
    """The template is read once per process (a batch registers every scan to it); changing a copy changes no other."""
    from metaseg.space.volume import load_template

    a, b = load_template(), load_template()
    a.SetOrigin((1.0, 2.0, 3.0))
    a[0, 0, 0] = 123.0
    assert b.GetOrigin() != (1.0, 2.0, 3.0) and b[0, 0, 0] != 123.0


@pytest.mark.parametrize("args, message", [
    (["{cohort}", "-o", "{file}"], "is a file"),
    (["{cohort}", "-o", "{out}", "--shard", "3/2"], "1 <= I <= N"),
    (["{cohort}", "-o", "{out}", "--jobs", "0"], "--jobs must be at least 1"),
    (["{out}/absent", "-o", "{out}"], "input not found"),
    (["{cohort}", "-o", "{out}", "--merge"], "takes no inputs"),
])
def test_bad_batch_arguments_are_refused_before_any_work(args, message, tmp_path, capsys):
    (tmp_path / "cohort").mkdir()
    shutil.copy(SAMPLE / "ecog_slice_t1.nii.gz", tmp_path / "cohort" / "a.nii.gz")
    (tmp_path / "f.txt").write_text("x")
    fill = {"cohort": tmp_path / "cohort", "file": tmp_path / "f.txt", "out": tmp_path / "out"}
    assert main(["batch", *[x.format(**fill) for x in args], "--progress", "none"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_absent_accelerator_is_refused_once(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["batch", str(SAMPLE / "ecog_slice_t1.nii.gz"), "-o", str(tmp_path / "o"), "--devices", "cuda:0,cuda:1",
                 "--progress", "none"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "o").exists()
