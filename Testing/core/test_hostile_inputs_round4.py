"""Issue 26: hostile inputs, fourth round. One test per class of problem; every refusal exits 2 with one message,
no traceback and nothing written; every warning reaches the report and the terminal. Real files throughout (the
bundled sample, SimpleITK / nibabel writers); the cases stop before any fit unless they say otherwise."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_hostile_inputs import files_in, run
from testdata import SAMPLE_T1, small_fitted_file


# ---- failures: numbers that overflow, units that shrink a head to a micron ----

def test_a_plane_too_large_to_count_is_refused_before_any_conversion(tmp_path, capsys):
    fitted = small_fitted_file(tmp_path / "f.pt", mask=True)
    for extent, spacing in (("1e308", "1e-10"), ("1e308", "1"), ("1e5", "1e-300")):
        rc, err = run(["reslice", fitted, "-o", tmp_path / "out" / "p.nii.gz", "--extent", extent, "--spacing", spacing],
                      capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and "use a larger --spacing or a smaller --extent" in err, err
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("unit, voxel", [("micron", "0.001 x 0.001 x 0.001 mm"), ("meter", "1e+03 x 1e+03 x 1e+03 mm")])
def test_nifti_units_other_than_mm_are_named_with_the_voxel_size_they_give(unit, voxel, tmp_path, capsys):
    src = nib.load(str(SAMPLE_T1))
    header = src.header.copy()
    header.set_xyzt_units(unit)
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, header), str(path))
    rc, err = run(["segment", path, "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and voxel in err and ("microns" if unit == "micron" else "metres") in err, err
    assert "set_xyzt_units('mm')" in err and "Traceback" not in err
    assert files_in(tmp_path / "out") == []


def test_metres_that_give_1_mm_voxels_are_read_as_the_standard_says(tmp_path):
    """pixdim 0.001 in metres is a 1 mm voxel: nothing to refuse."""
    from metaseg.io.readers import image_dims, read_image

    src = nib.load(str(SAMPLE_T1))
    header = src.header.copy()
    header.set_xyzt_units("meter")
    affine = src.affine.copy()
    affine[:3] /= 1000.0
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), affine, header), str(tmp_path / "m.nii.gz"))
    img = read_image(tmp_path / "m.nii.gz")
    assert np.allclose(img.GetSpacing(), 1.0, atol=1e-3) and image_dims(img) == 3


# ---- the Python API: every bad argument raises metaseg.InputError, with a message naming it ----

ARRAY = np.linspace(0.0, 1.0, 40 ** 3, dtype=np.float32).reshape(40, 40, 40)
SLICE_FILE = str(SAMPLE_T1.parent / "ecog_slice_t1.nii.gz")

API_CASES = {
    "image: 1D array": (np.ones(50, np.float32), {"spacing": (1.0,)}, "has 1 axes"),
    "image: object array": (np.array([[None] * 4] * 4, dtype=object), {"spacing": (1, 1)}, "not numbers"),
    "image: boolean array": (ARRAY > 0.5, {"spacing": (1, 1, 1)}, "boolean: a mask, not an MRI"),
    "image: 4D array with spacing": (np.ones((2, 40, 40, 40), np.float32), {"spacing": (1, 1, 1)}, "has 4 axes"),
    "image: 4D array with affine": (np.ones((40, 40, 40, 2), np.float32), {"affine": np.eye(4)}, "has 4 axes"),
    "image: a list": ([[1.0, 2.0], [3.0, 4.0]], {"spacing": (1, 1)}, "a Python list is not an image"),
    "image: two values": ((ARRAY > 0.5).astype(np.float32), {"spacing": (1, 1, 1)}, "only two values"),
    "spacing: text": (ARRAY, {"spacing": "abc"}, "spacing= must be numbers"),
    "spacing: dict": (ARRAY, {"spacing": {"x": 1}}, "spacing= must be numbers"),
    "origin: text": (ARRAY, {"spacing": (1, 1, 1), "origin": "abc"}, "origin= must be numbers"),
    "direction: dict": (ARRAY, {"spacing": (1, 1, 1), "direction": {}}, "direction= must be numbers"),
    "affine: text": (ARRAY, {"affine": "x"}, "affine= must be numbers"),
    "cancel: True": (SLICE_FILE, {"cancel": True}, "cancel= must be a threading.Event"),
    "progress: not callable": (SLICE_FILE, {"progress": 5}, "progress= must be a function"),
    "device: 0": (SLICE_FILE, {"device": 0}, "device must be a name"),
    "seed: 2^70": (SLICE_FILE, {"seed": 2 ** 70}, "--seed must be an integer from 0 to 4294967295"),
    "seed: negative": (SLICE_FILE, {"seed": -1}, "--seed must be an integer from 0"),
    "steps: text": (SLICE_FILE, {"steps": "10"}, "--steps must be between 1 and"),
    "weights: a number": (SLICE_FILE, {"weights": 5}, "weights must be the path"),
    "labels: a number": (SLICE_FILE, {"labels": 5}, "labels must be the name of a label set"),
    "uncertainty: text": (SLICE_FILE, {"uncertainty": "yes"}, "uncertainty must be True or False"),
    "accept_poor_match: text": (SLICE_FILE, {"accept_poor_match": "no"}, "accept_poor_match must be True or False"),
    "quality: None": (SLICE_FILE, {"quality": None}, "--quality must be one of"),
    "brain_extraction: yes": (SLICE_FILE, {"brain_extraction": "yes"}, "--brain-extraction must be one of"),
    "mask: a number": (ARRAY, {"spacing": (1, 1, 1), "mask": 5}, "mask= must be a file path"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_every_bad_api_argument_raises_input_error(case):
    import metaseg

    image, kw, message = API_CASES[case]
    with pytest.raises(metaseg.InputError) as e:
        metaseg.segment(image, device=kw.pop("device", "cpu"), **kw)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_plane_arguments_raise_input_error():
    import metaseg

    ref = {"size": [40, 40, 40], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
           "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    for kw in ({"orientation": "oblique"}, {"spacing": 1e-300}, {"extent_mm": float("inf")}):
        with pytest.raises(metaseg.InputError):
            metaseg.standard_plane(ref, **kw)


# ---- spreadsheets: no id runs as a formula, and batch still reads its own ids ----

FORMULA_IDS = ["=1+1", "@SUM(1+1)", "+cmd|' -c calc'!A0", "-2+3", "'quoted"]


def test_batch_ids_never_run_as_formulas_and_resume_and_merge_still_match(tiny_weights, tmp_path, capsys):
    import csv

    from metaseg.cohort.cohort_table import read_table

    manifest = tmp_path / "cohort.tsv"
    manifest.write_text("id\tpath\n" + "".join(f"{i}\t{SLICE_FILE}\n" for i in FORMULA_IDS), encoding="utf-8")
    out = tmp_path / "out"
    args = ["batch", manifest, "-o", out, "--weights", tiny_weights, "--device", "cpu", "--progress", "none"]
    assert run(args + ["--shard", "1/2"], capsys)[0] == 0 and run(args + ["--shard", "2/2"], capsys)[0] == 0
    rc, err = run(["batch", "--merge", "-o", out], capsys)
    assert rc == 0, err
    raw = (out / "volumes.tsv").read_text(encoding="utf-8")
    for line in raw.splitlines()[1:]:
        for cell in line.split("\t"):
            if cell[:1] in ("=", "+", "-", "@"):
                float(cell)  # only numbers may start so (a negative NCC), never text
    with open(out / "volumes.tsv", newline="", encoding="utf-8") as f:  # what a spreadsheet gets: quoted text
        cells = [r["id"] for r in csv.DictReader(f, delimiter="\t")]
    assert cells == ["'=1+1", "'@SUM(1+1)", "'+cmd|' -c calc'!A0", "'-2+3", "''quoted"]
    assert [r["id"] for r in read_table(out / "volumes.tsv")] == FORMULA_IDS  # batch reads the ids back
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(FORMULA_IDS)
    rc, err = run(args[:-1] + ["bar", "--shard", "1/2"], capsys)  # resume: every scan of the shard is found finished
    assert rc == 0 and "0 of 3 scans to segment" in err, err
    # the table fed back as a manifest (ids from its id column) names the same scans and folders
    rc, err = run(["batch", out / "volumes.tsv", "--path-column", "input", "-o", out, "--weights", tiny_weights,
                   "--device", "cpu", "--progress", "bar"], capsys)
    assert rc == 0 and "0 of 5 scans to segment" in err, err


# ---- DICOM: one patient per series, no patient identity in the report, series folders in a batch ----

def dicom_folder(folder: Path, volume, patients=("DOE^JANE",), uid="1.2.826.0.1.3680043.2.1125.26.2") -> Path:
    """`volume` (SimpleITK, int16) as a DICOM series, one file per slice; slice k belongs to patients[k % n]."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        sl = volume[:, :, k]
        name = patients[k * len(patients) // volume.GetDepth()]
        for tag, v in {"0008|0060": "MR", "0010|0010": name, "0010|0020": f"ID-{name[:3]}",
                       "0020|000d": uid + ".1", "0020|000e": uid, "0008|0018": f"{uid}.3.{k}",
                       "0020|0032": "\\".join(f"{x:.6f}" for x in volume.TransformIndexToPhysicalPoint((0, 0, k))),
                       "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1)}.items():
            sl.SetMetaData(tag, v)
        w.SetFileName(str(folder / f"s{k:04d}.dcm"))
        w.Execute(sl)
    return folder


def slice_volume():
    """The bundled 2D slice as a one-slice int16 volume (a DICOM series of one file)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(SLICE_FILE, sitk.sitkFloat32)
    return sitk.Cast(sitk.RescaleIntensity(img, 0, 1000), sitk.sitkInt16)


def test_a_series_of_two_patients_is_refused_without_naming_them(tmp_path, capsys):
    import SimpleITK as sitk

    vol = sitk.Image([48, 48, 40], sitk.sitkInt16) + 100
    series = dicom_folder(tmp_path / "series", vol, patients=("DOE^JANE", "ROE^RICHARD"))
    rc, err = run(["segment", series, "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and "2 different patients" in err and "s0000.dcm and s0020.dcm" in err, err
    assert "DOE" not in err and "ROE" not in err and files_in(tmp_path / "out") == []


def test_the_report_traces_a_dicom_input_by_its_series_uid_only(tiny_weights, tmp_path, capsys):
    import json

    series = dicom_folder(tmp_path / "series", slice_volume())
    rc, err = run(["segment", series, "-o", tmp_path / "l.nii.gz", "--report", tmp_path / "r.json",
                   "--weights", tiny_weights], capsys)
    assert rc == 0, err
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text)["dicom"] == {"series_instance_uid": "1.2.826.0.1.3680043.2.1125.26.2"}
    assert "DOE" not in text and "JANE" not in text and "ID-" not in text


def test_a_batch_takes_each_dicom_series_folder_as_a_scan(tiny_weights, tmp_path, capsys):
    import shutil

    from metaseg.cohort.cohort_table import read_table

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(SLICE_FILE, cohort / "a.nii.gz")
    dicom_folder(cohort / "patient1" / "1.2.3.series", slice_volume())
    mixed = dicom_folder(cohort / "two", slice_volume(), uid="1.2.826.0.1.3680043.2.1125.26.7")
    for f in dicom_folder(tmp_path / "other", slice_volume(), uid="1.2.826.0.1.3680043.2.1125.26.8").iterdir():
        shutil.copy(f, mixed / f"b{f.name}")
    rc, err = run(["batch", cohort, "-o", tmp_path / "out", "--weights", tiny_weights, "--device", "cpu",
                   "--progress", "none"], capsys)
    rows = {r["id"]: r for r in read_table(tmp_path / "out" / "volumes.tsv")}
    assert set(rows) == {"a", "1.2.3.series", "two"}, rows
    assert rows["a"]["status"] == rows["1.2.3.series"]["status"] == "ok"
    assert rows["two"]["status"] == "failed" and "holds 2 DICOM series" in rows["two"]["error"]
    assert "put each series in its own folder" in rows["two"]["error"] and rc == 2


# ---- files MetaSeg loads: bounded in size, no torch text, never advice to load unsafely ----

class _Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _with_sidecar(path: Path) -> Path:
    import hashlib

    Path(str(path) + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    return path


def test_a_malicious_fitted_file_gets_one_line_and_no_unsafe_advice(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "metaseg-fitted/1", "state": _Payload(marker)}, evil)
    rc, err = run(["reslice", _with_sidecar(evil), "-o", tmp_path / "out" / "p.nii.gz"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "no longer opens pickle files" in err, err  # refused unread (issue 25)
    assert "weights_only" not in err and "False" not in err
    assert not marker.exists() and files_in(tmp_path / "out") == []
    rc, err = run(["info", evil], capsys)  # the weights loader, the same rule
    assert rc == 2 and "weights_only" not in err and len(err.strip().splitlines()) == 1 and not marker.exists()


def test_a_padded_fitted_file_is_refused_by_its_size_without_being_read(tmp_path, capsys):
    padded = small_fitted_file(tmp_path / "padded.safetensors", mask=True)
    with open(padded, "r+b") as f:
        f.truncate(1_500_000_000)  # 1.5 GB (sparse: no disk used), its sidecar left as it was
    rc, err = run(["reslice", padded, "-o", tmp_path / "out" / "p.nii.gz"], capsys)
    assert rc == 2 and "has 1,500,000,000 bytes; a MetaSeg fitted INR file has at most" in err, err
    assert len(err.strip().splitlines()) == 1 and files_in(tmp_path / "out") == []


# ---- smaller messages ----

def test_an_rgb_mask_is_named_as_such(tmp_path, capsys):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    scan = sitk.GetImageFromArray(rng.random((48, 48, 48)).astype(np.float32))
    sitk.WriteImage(scan, str(tmp_path / "scan.nii.gz"))
    rgb = sitk.GetImageFromArray(np.zeros((48, 48, 48, 3), np.uint8), isVector=True)
    rgb.CopyInformation(scan)
    sitk.WriteImage(rgb, str(tmp_path / "mask.nrrd"))
    rc, err = run(["segment", tmp_path / "scan.nii.gz", "--mask", tmp_path / "mask.nrrd", "-o",
                   tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and "has 3 values per voxel (an RGB or vector image)" in err and "broadcast" not in err, err
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("suffix, data", [(".mhd", ".zraw"), (".nhdr", ".raw.gz")])
def test_detached_headers_name_their_published_data_file(suffix, data, tiny_weights, tmp_path, capsys):
    import SimpleITK as sitk

    rc, err = run(["segment", SLICE_FILE, "-o", tmp_path / "out" / f"labels{suffix}", "--weights", tiny_weights], capsys)
    assert rc == 0, err
    assert files_in(tmp_path / "out") == sorted([f"labels{suffix}", f"labels{data}"])
    header = (tmp_path / "out" / f"labels{suffix}").read_text()
    assert f"labels{data}" in header and ".part" not in header
    back = sitk.ReadImage(str(tmp_path / "out" / f"labels{suffix}"))
    assert back.GetSize() == sitk.ReadImage(SLICE_FILE).GetSize()


def test_a_truncated_metaimage_names_its_data_file(tmp_path, capsys):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(SLICE_FILE), str(tmp_path / "scan.mhd"), False)
    (tmp_path / "scan.mhd").rename(tmp_path / "scan.mha")  # a .mha whose voxels are in a detached scan.raw
    raw = (tmp_path / "scan.raw").read_bytes()
    (tmp_path / "scan.raw").write_bytes(raw[: len(raw) // 2])
    rc, err = run(["segment", tmp_path / "scan.mha", "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and "(its data file scan.raw) is truncated" in err and "(50%)" in err, err
    assert "No such file" not in err
    (tmp_path / "scan.raw").unlink()
    rc, err = run(["segment", tmp_path / "scan.mha", "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and "names the data file scan.raw, which is not in" in err, err


def test_a_plane_far_from_the_head_is_written_with_a_warning(tmp_path, capsys):
    import SimpleITK as sitk

    fitted = small_fitted_file(tmp_path / "f.pt", mask=True)
    rc, err = run(["reslice", fitted, "-o", tmp_path / "far.nii.gz", "--offset", "500"], capsys)
    assert rc == 0 and "warning: the plane misses the fitted brain" in err and "passes 500 mm" in err, err
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "far.nii.gz"))).any()
    rc, err = run(["reslice", fitted, "-o", tmp_path / "near.nii.gz"], capsys)
    assert rc == 0 and "warning" not in err, err


def test_a_batch_id_too_long_for_a_folder_name_is_refused_and_leaves_no_lock(tiny_weights, tmp_path, capsys):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"id\tpath\n{'x' * 300}\t{SLICE_FILE}\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, err = run(["batch", manifest, "-o", out, "--weights", tiny_weights, "--progress", "none"], capsys)
    assert rc == 2 and "is 300 bytes long" in err and "manifest's id column" in err and "space" not in err, err
    assert files_in(out) == []  # no stale .volumes.tsv.lock (rglob lists hidden files too)


def test_a_finished_batch_removes_its_lock_file_and_a_second_run_still_locks(tiny_weights, tmp_path, capsys):
    from metaseg.cohort.cohort_table import lock_table

    out = tmp_path / "out"
    args = ["batch", SLICE_FILE, "-o", out, "--weights", tiny_weights, "--device", "cpu", "--progress", "none"]
    assert run(args, capsys)[0] == 0
    assert not (out / ".volumes.tsv.lock").exists()
    with lock_table(out / "volumes.tsv"):
        rc, err = run(args, capsys)
        assert rc == 2 and "another metaseg batch is writing" in err
    assert not (out / ".volumes.tsv.lock").exists()


# ---- whole heads refused: the way forward is named (brain extraction, a crop) ----

SAMPLE_HEAD = SAMPLE_T1.parent / "ecog_head.nii.gz"


def test_a_shrunken_whole_head_is_refused_with_brain_extraction_suggested(tmp_path, capsys):
    """The sample head at 0.8x its voxel size: its foreground fits one adult brain, so auto takes it for
    skull-stripped, and registration fails; the refusal must name --brain-extraction on (one registration + flips)."""
    import SimpleITK as sitk

    head = sitk.ReadImage(str(SAMPLE_HEAD))
    head.SetSpacing([s * 0.8 for s in head.GetSpacing()])
    sitk.WriteImage(head, str(tmp_path / "small_head.nii.gz"))
    rc, err = run(["segment", tmp_path / "small_head.nii.gz", "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and "pass --brain-extraction on" in err and "Traceback" not in err, err
    assert files_in(tmp_path / "out") == []


def head_neck_shoulders(path: Path) -> Path:
    """The sample head with 150 mm of neck and shoulders below it (tissue-like noise): a 333 mm field of view."""
    import SimpleITK as sitk

    head = sitk.ReadImage(str(SAMPLE_HEAD))
    a = sitk.GetArrayFromImage(head)  # (z, y, x); +y is inferior in this LIA volume
    z, y, x = a.shape
    body = np.zeros((z, y + 150, x), a.dtype)
    body[:, :y] = a
    zz, xx = np.mgrid[0:z, 0:x]
    neck = (zz - z * 0.45) ** 2 + (xx - x / 2) ** 2 < 55 ** 2
    rng = np.random.default_rng(0)
    for j in range(y - 40, y + 150):
        where = (neck if j < y + 80 else np.ones_like(neck)) & (body[:, j] == 0)
        body[:, j][where] = np.clip(rng.normal(70, 12, int(where.sum())), 1, 255).astype(a.dtype)
    out = sitk.GetImageFromArray(body)
    out.SetSpacing(head.GetSpacing())  # the head's geometry; the grid is longer
    out.SetOrigin(head.GetOrigin())
    out.SetDirection(head.GetDirection())
    sitk.WriteImage(out, str(path))
    return path


def test_a_head_neck_shoulders_field_of_view_is_refused_with_a_crop_suggested(tmp_path, capsys):
    scan = head_neck_shoulders(tmp_path / "head_neck.nii.gz")
    rc, err = run(["segment", scan, "-o", tmp_path / "out" / "l.nii.gz", "--brain-extraction", "off"], capsys)
    assert rc == 2 and "field of view is 227 x 333 x 231 mm, more than a head" in err and "crop it" in err, err
    assert files_in(tmp_path / "out") == []


# ---- brains outside the training range; the seed's share of a volume ----

def test_no_validation_brain_lies_outside_the_training_sizes(shared_data):
    import SimpleITK as sitk

    from metaseg.io.data import load_splits
    from metaseg.space.plausibility import brain_size_warnings

    def ml(path: Path) -> float:
        img = sitk.ReadImage(str(path))
        return float((sitk.GetArrayViewFromImage(img) > 0).sum()) * float(np.prod(img.GetSpacing())) / 1000.0

    root = shared_data.parent
    for s in load_splits()["validation"]:
        d = root / ("brains" if (root / "brains" / s).is_dir() else "oasis-nmm") / s
        assert brain_size_warnings(ml(d / "native_seg4.nii.gz"), ml(d / "native_t1.nii.gz")) == [], s


def test_an_infant_sized_brain_is_warned_about_and_the_report_gives_the_seed_spread(tmp_path, capsys):
    """The sample's skull-stripped brain at 0.8x its voxel size (about half its volume): segmented (a short fit),
    with the size warning in the report and on the terminal."""
    import json

    import SimpleITK as sitk

    scan = sitk.ReadImage(str(SAMPLE_T1))
    scan.SetSpacing([s * 0.8 for s in scan.GetSpacing()])
    sitk.WriteImage(scan, str(tmp_path / "small.nii.gz"))
    rc, err = run(["segment", tmp_path / "small.nii.gz", "-o", tmp_path / "l.nii.gz", "--report", tmp_path / "r.json",
                   "--steps", "5", "--device", "cpu", "--progress", "none"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    (warned,) = [w for w in report["warnings"] if "outside the sizes the model was trained on" in w]
    assert "brain mask volume is 675 mL (training brains 1176-1887 mL)" in warned and "adult brains" in warned
    assert warned[:60] in err
    spread = report["seed_spread"]  # the 3D tissues come from the structures model, whose fit ignores the seed
    assert spread["percent"] == {} and "--seed changes nothing" in spread["note"] and spread["schedule"] == "fixed"


# ---- the sweep: this round's hostile arguments on every subcommand, from a shell ----

def test_this_rounds_arguments_on_every_subcommand_exit_2_with_one_line(tiny_weights, tmp_path, capsys):
    import subprocess
    import sys

    big = str(2 ** 70)
    fitted = small_fitted_file(tmp_path / "f.pt", mask=True)
    out = tmp_path / "out"
    cases = {
        "segment --seed 2^70": ["segment", SLICE_FILE, "-o", out / "l.nii.gz", "--seed", big],
        "batch --seed 2^70": ["batch", SLICE_FILE, "-o", out, "--seed", big],
        "evaluate --seed 2^70": ["evaluate", tmp_path, "--subjects", "x", "--seed", big, "--weights", tiny_weights],
        "train --seed 2^70": ["train", "--data", tmp_path / "none.npz", "--seed", big, "--out", out / "run"],
        "reslice overflow": ["reslice", fitted, "-o", out / "p.nii.gz", "--extent", "1e308", "--spacing", "1e-10"],
    }
    for name, args in cases.items():
        rc, err = run(args, capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and lines and lines[-1].startswith("error: "), (name, rc, err)
        assert "--seed must be an integer from 0 to 4294967295" in err or "seed" not in name, (name, err)
        assert files_in(out) == [], (name, files_in(out))
    p = subprocess.run([sys.executable, "-m", "metaseg", *map(str, cases["reslice overflow"])], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ---- the image-quality gate: ghosting, strong noise and strong bias fields are warned about ----

def _gate(img, labels) -> list:
    import SimpleITK as sitk

    from metaseg.space.image_quality import measure, quality_warnings

    return quality_warnings(measure(sitk.GetArrayFromImage(img).reshape(-1), labels.reshape(-1)))


def test_the_quality_gate_passes_clean_brains_under_their_reference_labels(shared_data):
    """The sample and the validation subjects of both label groups, each under its own reference labels."""
    import SimpleITK as sitk

    from metaseg.io.data import load_splits

    root = shared_data.parent
    pairs = [(SAMPLE_T1, SAMPLE_T1.parent / "ecog_seg4.nii.gz")]
    for s in load_splits()["validation"]:
        d = root / ("brains" if (root / "brains" / s).is_dir() else "oasis-nmm") / s
        pairs.append((d / "native_t1.nii.gz", d / "native_seg4.nii.gz"))
    for t1, seg in pairs:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        assert _gate(sitk.ReadImage(str(t1), sitk.sitkFloat32), labels) == [], t1


@pytest.mark.parametrize("artefact", ["ghosts", "noise", "gradient_bias"])
def test_the_quality_gate_fires_on_degraded_copies_of_the_sample(artefact):
    import SimpleITK as sitk

    from metaseg.train import artefacts

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1.parent / "ecog_seg4.nii.gz")))
    (warning,) = _gate(getattr(artefacts, artefact)(sitk.ReadImage(str(SAMPLE_T1), sitk.sitkFloat32)), labels)
    assert "poorly separated by their intensities" in warning and "motion ghosting" in warning


def test_a_ghosted_scan_is_segmented_with_the_quality_warning(tmp_path, capsys):
    """End to end (one whole 3D fit): the sample with 3 ghost copies at 25 %, shifted 24-48 mm."""
    import json

    import SimpleITK as sitk

    from metaseg.train.artefacts import ghosts

    sitk.WriteImage(ghosts(sitk.ReadImage(str(SAMPLE_T1), sitk.sitkFloat32)), str(tmp_path / "ghosted.nii.gz"))
    rc, err = run(["segment", tmp_path / "ghosted.nii.gz", "-o", tmp_path / "l.nii.gz", "--report", tmp_path / "r.json",
                   "--device", "cpu", "--progress", "none"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    (warned,) = [w for w in report["warnings"] if "poorly separated by their intensities" in w]
    assert warned[:80] in err and report["image_quality"]["ok"] is False
