"""`metaseg prepare`: labelled scans in any geometry become a training pack on the model grid.

Real subjects of both label protocols (FreeSurfer: ../shared/data/brains, manual OASIS labels:
../shared/data/oasis-nmm); a corrupted and an unlabelled subject are refused with no pack written."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.cli import main
from metaseg.io.data import coronal_slices, load_volume, pack_subjects
from metaseg.metrics import foreground_dice
from metaseg.space.volume import model_reference
from testdata import SHARED_DATA

OASIS = SHARED_DATA.parent / "oasis-nmm"
SUBJECTS = [SHARED_DATA / "ecog", SHARED_DATA / "sub-05", OASIS / "oas1-0040", OASIS / "oas1-0236"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    if not all(d.is_dir() for d in SUBJECTS):
        pytest.skip("../shared/data subjects not present")
    out = tmp_path_factory.mktemp("prepare") / "pack.npz"
    qc = out.with_name("qc.tsv")
    assert main(["prepare", *map(str, SUBJECTS), "-o", str(out), "--qc", str(qc)]) == 0
    return out, qc


def _moved_labels(subject: Path, matrix) -> np.ndarray:
    """The subject's labels resampled independently onto the model grid with the pack's transform."""
    m = np.array(matrix)
    t = sitk.AffineTransform(3)
    t.SetMatrix(m[:3, :3].ravel().tolist())
    t.SetTranslation(m[:3, 3].tolist())
    lab = sitk.ReadImage(str(subject / "native_seg4.nii.gz"), sitk.sitkUInt8)
    ref = model_reference((224, 192, 160))
    return sitk.GetArrayFromImage(sitk.Resample(lab, ref, t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def test_pack_labels_line_up_with_the_transform(pack):
    out, qc = pack
    assert pack_subjects(out) == sorted(d.name for d in SUBJECTS)
    with np.load(out) as z:
        meta = json.loads(str(z["_meta"]))
    for d in SUBJECTS:
        v = load_volume(out / d.name)
        assert v.image.shape == v.labels.shape == (224, 192, 160)
        moved = _moved_labels(d, meta["subjects"][d.name]["model_to_scan"])
        moved[v.image <= 0] = 0  # the pack keeps labels on brain voxels only
        assert foreground_dice(v.labels, moved) == 1.0
        # and the image lines up with them: tissue contrast of a T1 (WM > cortex > CSF)
        means = [v.image[v.labels == c].mean() for c in (3, 1, 4)]
        assert means[0] > means[1] > means[2], (d.name, means)


def test_qc_table_reports_registration_and_volumes(pack):
    _, qc = pack
    rows = [line.split("\t") for line in qc.read_text().splitlines()]
    head, body = rows[0], rows[1:]
    assert {"id", "status", "ncc", "wm_ml_before", "wm_ml_after", "max_change_pct"} <= set(head)
    for r in body:
        row = dict(zip(head, r))
        assert row["status"] == "ok" and float(row["ncc"]) > 0.8
        assert float(row["max_change_pct"]) < 5.0  # resampling keeps every class's volume (affine Jacobian applied)


def test_pack_gives_the_2d_task_slices(pack):
    out, _ = pack
    sl = coronal_slices(out / "oas1-0040", [109])[0]
    assert sl.image.shape == (192, 160) and (sl.labels == 3).sum() > 1000


def _copy_subject(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("native_t1.nii.gz", "native_seg4.nii.gz"):
        shutil.copy(src / f, dst / f)
    return dst


def test_corrupted_subject_refused_and_no_pack(tmp_path, capsys):
    if not OASIS.is_dir():
        pytest.skip("../shared/data/oasis-nmm not present")
    good = _copy_subject(OASIS / "oas1-0040", tmp_path / "good")
    bad = _copy_subject(OASIS / "oas1-0236", tmp_path / "bad")
    data = (bad / "native_t1.nii.gz").read_bytes()
    (bad / "native_t1.nii.gz").write_bytes(data[: len(data) // 3])  # a truncated download
    out = tmp_path / "pack.npz"
    assert main(["prepare", str(good), str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad" in err and "refused" in err and "no pack written" in err
    assert not out.exists() and not list(tmp_path.glob("*.part*"))


def test_unlabelled_subject_refused(tmp_path, capsys):
    if not OASIS.is_dir():
        pytest.skip("../shared/data/oasis-nmm not present")
    subj = _copy_subject(OASIS / "oas1-0040", tmp_path / "empty")
    lab = sitk.ReadImage(str(subj / "native_seg4.nii.gz"))
    zero = sitk.Image(lab.GetSize(), lab.GetPixelID())
    zero.CopyInformation(lab)
    sitk.WriteImage(zero, str(subj / "native_seg4.nii.gz"))
    out = tmp_path / "pack.npz"
    assert main(["prepare", str(subj), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unlabelled" in err and not out.exists()


def test_labels_outside_the_classes_refused(tmp_path, capsys):
    if not OASIS.is_dir():
        pytest.skip("../shared/data/oasis-nmm not present")
    subj = tmp_path / "nmm"
    subj.mkdir()
    shutil.copy(OASIS / "oas1-0040" / "native_t1.nii.gz", subj / "native_t1.nii.gz")
    shutil.copy(OASIS / "oas1-0040" / "native_nmm.nii.gz", subj / "native_seg4.nii.gz")  # raw manual labels, not mapped
    assert main(["prepare", str(subj), "-o", str(tmp_path / "p.npz")]) == 2
    assert "outside the tissues label set" in capsys.readouterr().err


def test_missing_files_named_before_any_work(tmp_path, capsys):
    (tmp_path / "s1").mkdir()
    assert main(["prepare", str(tmp_path / "s1"), "-o", str(tmp_path / "p.npz")]) == 2
    assert "native_t1.nii*" in capsys.readouterr().err
