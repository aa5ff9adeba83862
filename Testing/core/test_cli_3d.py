"""What users get for bad 3D input (`metaseg segment` on volumes, `metaseg reslice`): a message that
names the problem and what to do, exit code 2, and no file written. One row per case."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.cli import main
from testdata import WEIGHTS_2D, WEIGHTS_3D, small_fitted_file


def vol(t: Path, name: str, arr, **kw) -> Path:
    p = t / name
    sitk.WriteImage(sitk.GetImageFromArray(arr, **kw), str(p))
    return p


def brainish(shape=(40, 40, 40)) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(np.float32) + 0.1


def four_d(t: Path) -> Path:
    v = sitk.GetImageFromArray(brainish())
    p = t / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([v, v]), str(p))
    return p


def with_nan(t: Path) -> Path:
    return vol(t, "nan.nrrd", np.full((40, 40, 40), np.nan, np.float32))


def with_inf(t: Path) -> Path:
    return vol(t, "inf.mha", np.full((40, 40, 40), np.inf, np.float32))


@pytest.fixture(scope="module")
def fitted_file(tmp_path_factory) -> Path:
    """A small fitted-INR file (random network) for the reslice cases."""
    return small_fitted_file(tmp_path_factory.mktemp("inr") / "fitted.safetensors", mask=False)


def tampered(t: Path, fitted_file: Path) -> Path:
    data = bytearray(fitted_file.read_bytes())
    data[200] ^= 1
    (t / "bad.safetensors").write_bytes(bytes(data))
    (t / "bad.safetensors.sha256").write_text((fitted_file.parent / "fitted.safetensors.sha256").read_text())
    return t / "bad.safetensors"


SEGMENT_CASES = {
    # case: (make input, extra arguments, expected message)
    "4D series": (four_d, [], "the input is 4D"),
    "RGB volume": (lambda t: vol(t, "rgb.nrrd", np.random.rand(40, 40, 40, 3).astype(np.float32), isVector=True), [], "components per pixel"),
    # NaN/Inf voxels are read as background with a warning (test_hostile_inputs_round2.py): nothing else is nothing
    "only NaN voxels": (with_nan, [], "the input is constant (every pixel is 0.0)"),
    "only infinite voxels": (with_inf, [], "the input is constant (every pixel is 0.0)"),
    "constant volume": (lambda t: vol(t, "c.nii.gz", np.full((40, 40, 40), 7.0, np.float32)), [], "the input is constant"),
    "no positive voxel": (lambda t: vol(t, "neg.nii.gz", -brainish()), [], "no positive pixels"),
    "tiny volume": (lambda t: vol(t, "tiny.nii.gz", brainish((40, 40, 8))), [], "too small"),
    "2D weights on a volume": (lambda t: vol(t, "v.nii.gz", brainish()), ["--weights", str(WEIGHTS_2D)], "are for 2D images but the input is 3D"),
    "mask of another grid": (lambda t: vol(t, "v.nii.gz", brainish()), ["--mask", "MASK"], "does not have the scan's geometry"),
    "--save-inr not .safetensors": (lambda t: vol(t, "v.nii.gz", brainish()), ["--save-inr", "OUT/f.nii.gz"], "must be named .safetensors"),
    "--save-inr on a slice": (lambda t: vol(t, "s.nii.gz", brainish((1, 40, 40))), ["--save-inr", "OUT/f.safetensors"], "needs a 3D volume"),
    "--uncertainty on a slice": (lambda t: vol(t, "s.nii.gz", brainish((1, 40, 40))), ["--uncertainty", "OUT/u.nii.gz"], "needs a 3D volume"),
    "--mask on a slice": (lambda t: vol(t, "s.nii.gz", brainish((1, 40, 40))), ["--mask", "MASK"], "--mask needs a 3D volume"),
    "unknown output extension": (lambda t: vol(t, "v.nii.gz", brainish()), ["-o", "OUT/labels.txt"], "an image must be named .nii"),
    "two outputs, one file": (lambda t: vol(t, "v.nii.gz", brainish()), ["--uncertainty", "OUT/l.nii.gz"], "two outputs name the same file"),
}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_bad_3d_segment_input(case, tmp_path, capsys):
    make, extra, message = SEGMENT_CASES[case]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    src = make(inp)
    mask = vol(inp, "mask.nii.gz", np.ones((30, 30, 30), np.uint8))
    extra = [str(mask) if x == "MASK" else x.replace("OUT", str(out)) for x in extra]
    args = ["segment", str(src), "-o", str(out / "l.nii.gz"), "--report", str(out / "r.json"), "--progress", "bar"]
    if "-o" in extra:
        args = args[:3] + args[5:]  # the case's own -o
    rc = main(args + (["--weights", str(WEIGHTS_3D)] if "--weights" not in extra else []) + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and message in err
    assert not out.exists() or list(out.iterdir()) == []


RESLICE_CASES = {
    "probabilities as NIfTI": (lambda t, f: f, ["--what", "probabilities", "-o", "OUT/p.nii.gz"], "NIfTI loses"),
    "--normal without --origin": (lambda t, f: f, ["--normal", "0", "0", "1"], "need --origin"),
    "--origin alone": (lambda t, f: f, ["--origin", "0", "0", "0"], "give --normal, or both --u and --v"),
    "zero normal": (lambda t, f: f, ["--origin", "0", "0", "0", "--normal", "0", "0", "0"], "must not be the zero vector"),
    "huge plane": (lambda t, f: f, ["--spacing", "0.002"], "use a larger --spacing"),
    "tampered file": (tampered, [], "checksum mismatch"),
    "weights instead of a fitted INR": (lambda t, f: WEIGHTS_3D, [], "is not a MetaSeg fitted INR file"),
    "missing file": (lambda t, f: t / "absent.safetensors", [], "fitted INR file not found"),
}


@pytest.mark.parametrize("case", sorted(RESLICE_CASES))
def test_bad_reslice_input(case, fitted_file, tmp_path, capsys):
    make, extra, message = RESLICE_CASES[case]
    out = tmp_path / "out"
    src = make(tmp_path, fitted_file)
    extra = [x.replace("OUT", str(out)) for x in extra]
    args = ["reslice", str(src)] + ([] if "-o" in extra else ["-o", str(out / "plane.nrrd")]) + extra
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and message in err
    assert not out.exists() or list(out.iterdir()) == []


def test_reslice_writes_a_plane_and_keeps_an_existing_output(fitted_file, tmp_path, capsys):
    out = tmp_path / "plane.nii.gz"
    assert main(["reslice", str(fitted_file), "-o", str(out), "--orientation", "sagittal", "--angles", "10", "0", "5"]) == 0
    img = sitk.ReadImage(str(out))
    assert img.GetSize()[2] == 1 and img.GetPixelID() == sitk.sitkUInt8
    before = out.read_bytes()
    assert main(["reslice", str(fitted_file), "-o", str(out), "--orientation", "axial"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
