"""Brain extraction on real whole-head scans (deepbet): the mask against FreeSurfer's, the auto decision
both ways, the CLI's --brain-mask output and its refusals. One deepbet extraction is ~10 s on 2 cores:
the module extracts the ecog head once and reuses it."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.space.bias import n4_correct
from metaseg.space.brain import decide_skull, extract_brain, prepare_brain
from metaseg.cli import main
from metaseg.space.volume import THICK_SLICE_MM, spacing_warnings
from testdata import SAMPLE, SAMPLE_T1, WEIGHTS_3D

pytest.importorskip("deepbet")
SAMPLE_HEAD = SAMPLE / "ecog_head.nii.gz"  # ecog's whole head with skull (cropped, uint8)


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def head(shared_data) -> sitk.Image:
    return sitk.ReadImage(str(shared_data / "ecog" / "native_head.nii.gz"))


@pytest.fixture(scope="module")
def extracted(head):
    return extract_brain(head)


def test_extraction_of_a_whole_head_matches_freesurfers_brain_mask(head, extracted, shared_data):
    freesurfer = arr(sitk.ReadImage(str(shared_data / "ecog" / "native_t1.nii.gz"))) > 0  # brainmask.mgz > 0
    mask = extracted.mask
    assert mask.GetSize() == head.GetSize() and mask.GetOrigin() == head.GetOrigin()
    assert mask.GetSpacing() == head.GetSpacing() and mask.GetDirection() == head.GetDirection()
    assert dice(arr(mask) > 0, freesurfer) >= 0.90
    assert 1000 < extracted.volume_ml < 1600  # the reported intracranial estimate is one adult brain


def test_auto_extracts_from_a_head_with_skull(head, extracted):
    decision, reused = decide_skull(head, lambda _img: extracted)  # deepbet's mask from the fixture
    assert decision.extract and reused is extracted
    assert "skull present" in decision.reason and decision.outside_fraction > 0.3


def test_auto_keeps_a_skull_stripped_scan_as_it_is_without_deepbet():
    def no_extractor(_img):
        raise AssertionError("a skull-stripped scan must not need deepbet")

    scan = sitk.ReadImage(str(SAMPLE_T1))
    decision, mask = decide_skull(scan, no_extractor)
    assert not decision.extract and mask is None and "skull-stripped" in decision.reason
    # auto hands segment_volume no mask: the very same inputs as --brain-extraction off, so the same labels
    bm, info = prepare_brain(scan, "auto")
    assert bm is None and info["extracted"] is False


def test_thick_slices_warn_above_the_measured_spacing():
    img = sitk.Image([64, 64, 20], sitk.sitkFloat32)
    assert spacing_warnings(img) == []
    img.SetSpacing((1.0, 1.0, THICK_SLICE_MM + 1))
    assert "thick slices" in spacing_warnings(img)[0]


def test_n4_removes_most_of_a_smooth_bias_field():
    scan = sitk.Cast(sitk.ReadImage(str(SAMPLE_T1)), sitk.sitkFloat32)
    x = arr(scan)
    brain = x > 0
    z, y, _ = np.indices(x.shape, dtype=np.float32)
    field = np.exp(0.3 * (z - 128) / 80 - 0.2 * ((y - 128) / 80) ** 2).astype(np.float32)
    biased = sitk.GetImageFromArray(x * field)
    biased.CopyInformation(scan)
    corrected = arr(n4_correct(biased, biased > 0))

    def spread(v):  # coefficient of variation of the ratio to the unbiased scan
        r = v[brain] / x[brain]
        return float(r.std() / r.mean())

    assert spread(corrected) < 0.5 * spread(x * field)
    assert (corrected[~brain] == 0).all()


def test_cli_whole_head_writes_the_brain_mask_on_the_scans_grid(tmp_path):
    out = tmp_path / "labels.nii.gz"
    m = tmp_path / "brain.nii.gz"
    r = tmp_path / "report.json"
    rc = main(["segment", str(SAMPLE_HEAD), "-o", str(out), "--brain-mask", str(m), "--report", str(r),
               "--weights", str(WEIGHTS_3D), "--steps", "2", "--device", "cpu", "--progress", "none"])
    assert rc == 0
    head, mask, labels = (sitk.ReadImage(str(p)) for p in (SAMPLE_HEAD, m, out))
    for img in (mask, labels):
        assert img.GetSize() == head.GetSize() and np.allclose(img.GetOrigin(), head.GetOrigin())
        assert np.allclose(img.GetSpacing(), head.GetSpacing()) and np.allclose(img.GetDirection(), head.GetDirection())
    inside = arr(mask) > 0
    assert set(np.unique(arr(mask))) == {0, 1}
    assert (arr(labels)[~inside] == 0).all() and (arr(labels)[inside] > 0).mean() > 0.5  # labels only in the brain
    report = json.loads(r.read_text())
    be = report["brain_extraction"]
    assert be["mode"] == "auto" and be["extracted"] and "skull present" in be["reason"]
    assert be["mask_volume_ml"] == pytest.approx(inside.sum() * np.prod(head.GetSpacing()) / 1000, rel=1e-3)
    assert report["timings_s"]["brain_extraction"] > 0 and report["bias_correction"] == "n4"  # auto: N4 for a head


def two_heads(tmp_path: Path) -> Path:
    """Two copies of the sample head side by side in one field of view (every second voxel, 2 mm)."""
    head = sitk.ReadImage(str(SAMPLE_HEAD))
    x = arr(head)[::2, ::2, ::2]
    both = np.zeros((x.shape[0], x.shape[1], 2 * x.shape[2] + 4), x.dtype)
    both[:, :, : x.shape[2]] = x
    both[:, :, x.shape[2] + 4:] = x
    img = sitk.GetImageFromArray(both)
    img.SetSpacing([2.0, 2.0, 2.0])
    img.SetDirection(head.GetDirection())
    p = tmp_path / "two_heads.nii.gz"
    sitk.WriteImage(img, str(p))
    return p


def test_cli_refuses_a_head_with_a_second_brain_like_component(tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    rc = main(["segment", str(two_heads(tmp_path)), "-o", str(out), "--brain-mask", str(tmp_path / "m.nii.gz"),
               "--weights", str(WEIGHTS_3D), "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "second brain-like component" in err and "Crop it to one head" in err
    assert not out.exists() and not (tmp_path / "m.nii.gz").exists()


@pytest.mark.parametrize("extra, message", [
    (["--brain-extraction", "on", "--mask", str(SAMPLE_T1)], "--mask gives the brain already"),
    (["--brain-mask", "m.nii.gz"], "--brain-mask needs a 3D volume"),
])
def test_cli_brain_option_conflicts_exit_2(tmp_path, capsys, extra, message):
    scan = str(SAMPLE_T1) if "--mask" in extra else str(SAMPLE / "ecog_slice_t1.nii.gz")
    extra = [str(tmp_path / e) if e == "m.nii.gz" else e for e in extra]
    rc = main(["segment", scan, "-o", str(tmp_path / "l.nii.gz"), "--device", "cpu", "--progress", "none", *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_head_whose_extraction_yields_almost_no_brain(tmp_path, capsys):
    top = sitk.ReadImage(str(SAMPLE_HEAD))[:, :50, :]  # the top 50 mm of the head (LIA: j runs inferior)
    scan = tmp_path / "vertex.nii.gz"
    sitk.WriteImage(top, str(scan))
    out = tmp_path / "labels.nii.gz"
    rc = main(["segment", str(scan), "-o", str(out), "--brain-extraction", "on", "--report", str(tmp_path / "r.json"),
               "--weights", str(WEIGHTS_3D), "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "almost no brain" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vertex.nii.gz"]


def test_a_ct_head_in_hounsfield_units_is_refused(tmp_path, capsys):
    """A CT-like copy of the sample head: air -1000 HU, soft tissue 40-90 HU."""
    head = sitk.ReadImage(str(SAMPLE_HEAD), sitk.sitkFloat32)
    a = arr(head)
    ct = np.where(a > 12, 40 + 0.2 * a, -1000).astype(np.float32)
    img = sitk.GetImageFromArray(ct)
    img.CopyInformation(head)
    scan = tmp_path / "ct.nii.gz"
    sitk.WriteImage(img, str(scan))
    rc = main(["segment", str(scan), "-o", str(tmp_path / "l.nii.gz"), "--weights", str(WEIGHTS_3D),
               "--device", "cpu", "--progress", "none"])
    assert rc == 2 and "looks like a CT" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
