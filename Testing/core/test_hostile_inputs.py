"""Issue 16: hostile and unlucky inputs. Each case asserts the exit code, the message and that no file
was written; all but the registration cases stop before any fit (small inputs, tiny weights)."""
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from metaseg.io import safefile
from metaseg.io.atomic import OutputExistsError, write_all
from metaseg.cli import main
from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitProgress, FittedINR
from metaseg.method.model import MetaSegNet
from metaseg.io.outputs import preview_panels
from metaseg.space.plausibility import TRAINING_FRACTIONS, tissue_warnings
from metaseg.io.progress import Reporter
from metaseg.method.weights import save_checked
from testdata import SAMPLE, SAMPLE_T1, WEIGHTS_3D, small_fitted_file

SLICE = SAMPLE / "ecog_slice_t1.nii.gz"


def files_in(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# ---- 1. a plane that misses the tissue gives background, not a crash ----

def fitted_file(folder: Path) -> Path:
    return small_fitted_file(folder / "fitted.safetensors", mask=True)


def test_plane_outside_the_tissue_is_background(tmp_path, capsys):
    f = fitted_file(tmp_path)
    rc, err = run(["reslice", f, "-o", tmp_path / "p.nii.gz", "--offset", "80"], capsys)
    assert rc == 0, err
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz"))).any()
    rc, err = run(["reslice", f, "-o", tmp_path / "p.nrrd", "--offset", "80", "--what", "probabilities"], capsys)
    assert rc == 0, err
    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nrrd")))
    assert (probs[..., 0] == 1).all() and not probs[..., 1:].any()


def test_empty_query_keeps_dtype_and_shape():
    net = MetaSegNet(ModelConfig(in_dim=3, width=8, hidden_layers=1))
    inr = FittedINR(net, dict(net.named_parameters()))
    none = torch.zeros(0, 3)
    assert inr.labels(none).dtype == torch.uint8 and inr.labels(none).shape == (0,)
    assert inr.probabilities(none).shape == (0, 5) and inr.intensity(none).shape == (0,)


# ---- 2. truncated NIfTI files are refused ----

def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def raw_nii(tmp_path: Path) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(SLICE)), str(tmp_path / "whole.nii"))
    return truncated(tmp_path / "whole.nii", tmp_path / "half.nii")


@pytest.mark.parametrize("make", [lambda t: truncated(SAMPLE_T1, t / "half.nii.gz"), raw_nii], ids=["nii.gz", "nii"])
def test_truncated_nifti_is_refused(make, tmp_path, capsys):
    src = make(tmp_path)
    out = tmp_path / "out"
    rc, err = run(["segment", src, "-o", out / "l.nii.gz", "--progress", "none"], capsys)
    assert rc == 2 and "error:" in err and "truncated" in err and "complete file" in err
    assert files_in(out) == []


# ---- 3. an output that appears during the run is kept ----

def test_publish_keeps_a_file_that_appeared_and_writes_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"

    def other_run_writes_b(tmp):  # another process creates b while this run is still writing
        b.write_text("theirs")
        Path(tmp).write_text("mine")

    with pytest.raises(OutputExistsError, match="appeared while this run was working"):
        write_all([(a, other_run_writes_b), (b, lambda tmp: Path(tmp).write_text("mine"))], overwrite=False)
    assert files_in(tmp_path) == ["b.json"] and b.read_text() == "theirs"


def test_concurrent_cli_run_keeps_the_other_runs_file(tiny_weights, tmp_path):
    """A real process: the output appears while it fits (its JSON progress pipe is not read meanwhile,
    so it cannot finish first); it exits 2, keeps that file and leaves no live snapshot behind."""
    out, live = tmp_path / "l.nii.gz", tmp_path / "live"
    p = subprocess.Popen([sys.executable, "-m", "metaseg", "segment", str(SLICE), "-o", str(out), "--weights",
                          str(tiny_weights), "--steps", "1500", "--progress", "json", "--live-dir", str(live),
                          "--live-every", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if json.loads(line)["event"] == "progress":
            break
    out.write_text("the other run's labels")
    rest, _ = p.communicate(timeout=300)
    assert p.returncode == 2
    error = [json.loads(x) for x in rest.splitlines()][-1]
    assert error["event"] == "error" and "appeared while this run was working" in error["message"]
    assert out.read_text() == "the other run's labels"
    assert files_in(tmp_path) == ["l.nii.gz"]  # no snapshot, no temporary file


# ---- 4. a slice that is not an aligned coronal slice ----

def sagittal_slice(folder: Path) -> Path:
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1)))  # LIA voxels: array (A, I, L)
    sag = vol[:, :, vol.shape[2] // 2].T  # (I, A): a sagittal plane
    r, c = (sag.shape[0] - 192) // 2, (sag.shape[1] - 160) // 2
    path = folder / "sagittal.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(sag[r : r + 192, c : c + 160])[None]), str(path))
    return path


def test_wrong_plane_slice_is_refused_unless_insisted(tiny_weights, tmp_path, capsys):
    src = sagittal_slice(tmp_path)
    out = tmp_path / "out"
    args = ["segment", src, "-o", out / "l.nii.gz", "--weights", tiny_weights, "--progress", "bar"]
    rc, err = run(args, capsys)
    assert rc == 2 and "does not look like an aligned coronal brain slice" in err and "--accept-poor-match" in err
    assert "fitting" not in err and files_in(out) == []
    rc, err = run(args + ["--accept-poor-match"], capsys)
    assert rc == 0 and "warning: the slice does not look like an aligned coronal" in err


def test_canvas_message_comes_before_fitting(tiny_weights, tmp_path, capsys):
    src = tmp_path / "slab.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(1, 256, 256).astype(np.float32)), str(src))
    rc, err = run(["segment", src, "-o", tmp_path / "l.nii.gz", "--weights", tiny_weights], capsys)
    assert rc == 2 and "the 2D model takes one coronal slice" in err and "160x192" in err and "fitting" not in err
    assert not (tmp_path / "l.nii.gz").exists()


# ---- 5. output paths are checked before the input is even read ----

OUTPUT_CASES = {
    # case: (arguments after the input, expected message); the input does not exist, so a message about an
    # output proves that outputs are checked first
    "parent is a file": (["-o", "AFILE/l.nii.gz"], "is a file, not a folder"),
    "preview not PNG": (["-o", "OUT/l.nii.gz", "--preview", "OUT/p.txt"], "a PNG picture must be named .png"),
    "seg-nrrd not .seg.nrrd": (["-o", "OUT/l.nii.gz", "--seg-nrrd", "OUT/s.nii"], "must be named .seg.nrrd"),
    "report not JSON": (["-o", "OUT/l.nii.gz", "--report", "OUT/r.txt"], "a JSON file must be named .json"),
    "unwritable folder": (["-o", "/proc/metaseg-test/l.nii.gz"], "is not writable"),
    "live dir is a file": (["-o", "OUT/l.nii.gz", "--live-dir", "AFILE", "--live-every", "1"], "is a file, not a folder"),
    "negative live-every": (["-o", "OUT/l.nii.gz", "--live-every", "-1"], "--live-every must be 0"),
    "absurd steps": (["-o", "OUT/l.nii.gz", "--steps", str(10**9)], "--steps must be between 1 and 10000"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_problems_are_found_before_reading_the_input(case, tmp_path, capsys):
    extra, message = OUTPUT_CASES[case]
    (tmp_path / "afile").write_text("a file")
    out = tmp_path / "out"
    extra = [x.replace("AFILE", str(tmp_path / "afile")).replace("OUT", str(out)) for x in extra]
    rc, err = run(["segment", tmp_path / "absent.nii.gz"] + extra, capsys)
    assert rc == 2 and "error:" in err and message in err, err
    assert "absent.nii.gz" not in err and "reading" not in err
    assert files_in(out) == [] and (tmp_path / "afile").read_text() == "a file"
    assert not Path("/proc/metaseg-test").exists()


@pytest.mark.parametrize("which", ["-o", "--uncertainty", "--mask"])
def test_an_output_never_replaces_an_input(which, tmp_path, capsys):
    src = tmp_path / "scan.nii.gz"
    src.write_bytes(SLICE.read_bytes())
    before = src.read_bytes()
    args = ["segment", src, "-o", tmp_path / "l.nii.gz", "--force"]
    if which == "-o":
        args[3] = src
    elif which == "--uncertainty":
        args += ["--uncertainty", src]
    else:
        mask = tmp_path / "mask.nii.gz"
        mask.write_bytes(before)
        args = ["segment", src, "-o", mask, "--mask", mask, "--force"]
    rc, err = run(args, capsys)
    assert rc == 2 and "is an input of this run" in err and "destroy" in err
    assert src.read_bytes() == before and files_in(tmp_path) in (["scan.nii.gz"], ["mask.nii.gz", "scan.nii.gz"])


def test_reslice_checks_its_output_and_never_replaces_its_input(tmp_path, capsys):
    f = fitted_file(tmp_path)
    before = f.read_bytes()
    (tmp_path / "afile").write_text("x")
    rc, err = run(["reslice", f, "-o", tmp_path / "afile" / "p.nii.gz"], capsys)
    assert rc == 2 and "is a file, not a folder" in err
    rc, err = run(["reslice", f, "-o", tmp_path / "p.txt"], capsys)
    assert rc == 2 and "an image must be named" in err
    assert f.read_bytes() == before and files_in(tmp_path) == ["afile", "fitted.safetensors", "fitted.safetensors.sha256"]


def test_evaluate_json_is_not_overwritten_without_force(tiny_weights, tmp_path, capsys):
    (tmp_path / "e.json").write_text("precious")
    rc, err = run(["evaluate", tmp_path, "--subjects", "x", "--weights", tiny_weights, "--json", tmp_path / "e.json"], capsys)
    assert rc == 2 and "exists; pass --force" in err and (tmp_path / "e.json").read_text() == "precious"


# ---- 6. malformed-but-hashed files and odd arguments: exit 2 with a message ----

def rehashed_weights(tmp_path: Path, tiny_weights: Path, change) -> Path:
    """The tiny weights with `change` applied to {"state", "log_lr", "card"}, written with a matching hash."""
    tensors, meta = safefile.loads(tiny_weights.read_bytes(), tiny_weights)
    blob = {"state": {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")},
            "log_lr": tensors["log_lr"], "card": json.loads(meta["card"])}
    change(blob)
    out = {f"state/{k}": v for k, v in blob["state"].items()}
    out["log_lr"] = blob["log_lr"]
    path = tmp_path / "bad.safetensors"
    save_checked(safefile.dumps(out, dict(meta, card=json.dumps(blob["card"]))), path)
    return path


def drop_card_key(blob):
    del blob["card"]["fit"]


def wrong_shape(blob):
    name = next(iter(blob["state"]))
    blob["state"][name] = torch.zeros(3, 3)


def nan_tensor(blob):
    name = next(iter(blob["state"]))
    blob["state"][name] = torch.full_like(blob["state"][name], float("nan"))


@pytest.mark.parametrize("change,message", [(drop_card_key, "the card has no 'fit' entry"),
                                            (wrong_shape, "has shape (3, 3), expected"),
                                            (nan_tensor, "NaN or infinite")],
                         ids=["missing card key", "wrong tensor shape", "NaN tensor"])
def test_hashed_but_malformed_weights(change, message, tiny_weights, tmp_path, capsys):
    bad = rehashed_weights(tmp_path, tiny_weights, change)
    rc, err = run(["segment", SLICE, "-o", tmp_path / "out" / "l.nii.gz", "--weights", bad], capsys)
    assert rc == 2 and "damaged or incomplete" in err and message in err
    assert files_in(tmp_path / "out") == []


def fitted_variant(tmp_path: Path, change) -> Path:
    """The small fitted file with `change` applied to (tensors, metadata), written with a matching hash."""
    src = fitted_file(tmp_path)
    tensors, meta = safefile.loads(src.read_bytes(), src)
    change(tensors, meta)
    path = tmp_path / "variant.safetensors"
    save_checked(safefile.dumps(tensors, meta), path)
    return path


def _with_config(meta, **change):
    meta["config"] = json.dumps(dict(json.loads(meta["config"]), **change))


FITTED_CASES = {
    "missing key": (lambda t, m: t.pop("physical_to_model"), "missing entry 'physical_to_model'"),
    "wrong tensor shape": (lambda t, m: t.update({next(k for k in t if k.startswith("param/")): torch.zeros(2)}),
                           "has shape (2,)"),
    "bad mask shape": (lambda t, m: m.update(mask=json.dumps({"shape": [7, 7, 7]})), "does not hold the 43 bytes"),
    "mask inflating past its shape": (lambda t, m: t.update({"mask.zlib": torch.frombuffer(bytearray(zlib.compress(
        b"\xff" * 50_000_000)), dtype=torch.uint8)}), "does not hold the 8,000 bytes"),
    "absurd mask shape": (lambda t, m: m.update(mask=json.dumps({"shape": [4096, 4096, 4096]})), "not a 3D canvas"),
    "absurd network width": (lambda t, m: _with_config(m, width=10**7), "out of range"),
    "NaN affine": (lambda t, m: t["physical_to_model"].fill_(float("nan")), "not a finite, invertible 4x4"),
    "no reference grid": (lambda t, m: m.update(info="{}"), "no 'reference' grid"),
}


@pytest.mark.parametrize("case", sorted(FITTED_CASES))
def test_hashed_but_malformed_fitted_file(case, tmp_path, capsys):
    change, message = FITTED_CASES[case]
    bad = fitted_variant(tmp_path, change)
    rc, err = run(["reslice", bad, "-o", tmp_path / "out" / "p.nrrd"], capsys)
    assert rc == 2 and "damaged or incomplete" in err and message in err, err
    assert files_in(tmp_path / "out") == []


PLANE_CASES = {
    "NaN normal": (["--origin", "0", "0", "0", "--normal", "nan", "0", "1"], "--normal must be finite"),
    "infinite extent": (["--extent", "inf"], "--extent must be finite"),
    "zero spacing": (["--spacing", "0"], "--spacing must be more than 0 mm"),
    "parallel u and v": (["--origin", "0", "0", "0", "--u", "1", "0", "0", "--v", "2", "0", "0"], "are parallel"),
}


@pytest.mark.parametrize("case", sorted(PLANE_CASES))
def test_odd_plane_arguments(case, tmp_path, capsys):
    extra, message = PLANE_CASES[case]
    rc, err = run(["reslice", fitted_file(tmp_path), "-o", tmp_path / "out" / "p.nrrd"] + extra, capsys)
    assert rc == 2 and message in err, err
    assert files_in(tmp_path / "out") == []


def test_train_on_missing_data_leaves_no_run_folder(tmp_path, capsys):
    rc, err = run(["train", "--data", tmp_path / "nonexistent", "--out", tmp_path / "run"], capsys)
    assert rc == 2 and "--data" in err and "nothing was started" in err
    assert not (tmp_path / "run").exists()


# ---- weak spots: tissue plausibility, progress, messages, preview ----

def test_tissue_fractions_of_held_out_reference_labels_are_plausible(shared_data):
    """The ranges come from the training subjects; the validation and test subjects' labels pass them."""
    for s in ("ws01", "ecog", "sub-05"):
        for name, dims in (("aligned_seg4.nii.gz", 3), ("slice_seg4.nii.gz", 2)):
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / s / name)))
            assert tissue_warnings(labels, dims) == [], (s, name)


def test_implausible_white_matter_share_is_reported():
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "ecog_slice_seg4.nii.gz")))
    corrupt = labels.copy()
    corrupt[(labels == 1) & (np.arange(labels.size).reshape(labels.shape) % 3 > 0)] = 3  # WM ~ 65 % of the tissue
    share = (corrupt == 3).sum() / (corrupt > 0).sum()
    assert share > TRAINING_FRACTIONS[2][3][1] * 1.5
    (msg,) = tissue_warnings(corrupt, 2)
    assert "white matter" in msg and "weights may be damaged" in msg


def test_empty_mask_does_not_advise_passing_a_mask(tmp_path, capsys):
    scan = sitk.ReadImage(str(SAMPLE_T1))
    mask = sitk.Image(scan.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(scan)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    rc, err = run(["segment", SAMPLE_T1, "-o", tmp_path / "out" / "l.nii.gz", "--mask", tmp_path / "mask.nii.gz"], capsys)
    assert rc == 2 and "the mask is empty or misses the brain" in err and "pass --mask" not in err
    assert files_in(tmp_path / "out") == []


def test_progress_bar_moves_with_time_and_messages_start_a_new_line():
    stream = io.StringIO()
    rep = Reporter("bar", stream)
    rep.fit_progress(FitProgress(1, 10**9, 0.1, 10.0, 1.0, 1e9))  # 1 step of 10^9: no 1/25 mark, but time passed
    assert "fit [" in stream.getvalue() and "1/1000000000" in stream.getvalue()
    rep.emit("error", message="fit cancelled")
    assert stream.getvalue().endswith("\nerror: fit cancelled\n")
    rep.task_progress("decode", 10, 10, 2.0)  # the last chunk is always drawn, and ends its line
    assert stream.getvalue().endswith("\n") and "\r  decode [####" in stream.getvalue().split("error: fit cancelled")[1]


def test_preview_panels_are_radiological_whatever_the_voxel_order():
    """A bright marker in the patient's left hemisphere appears on the right of the axial and coronal
    panels both for LPS-ordered voxels and for the same head stored RAS-ordered (flipped axes)."""
    arr = np.zeros((40, 50, 60), np.float32)  # (S, P, L) for an LPS header
    arr[10:30, 10:40, 10:50] = 1.0
    arr[18:22, 20:30, 45:50] = 5.0  # high L index = patient's left
    lps = sitk.GetImageFromArray(arr)
    ras = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, ::-1, ::-1]))  # same anatomy, voxels R->L reversed
    ras.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ras.SetOrigin(lps.TransformIndexToPhysicalPoint((59, 49, 0)))
    for img in (lps, ras):
        lab = sitk.Cast(img > 0, sitk.sitkUInt8)
        panels = {name: (im, letters) for name, im, _, letters in preview_panels(img, lab)}
        for view in ("axial", "coronal"):
            im, letters = panels[view]
            cols = np.argwhere(im == 5.0)[:, 1]
            assert letters[:2] == ("R", "L") and cols.min() > im.shape[1] / 2, view


# ---- weak spot: hopeless 3D registrations are refused before the fit, with their cause ----

def test_inverted_contrast_is_refused_as_t2_like_before_the_fit(tmp_path, capsys):
    scan = sitk.ReadImage(str(SAMPLE_T1), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(scan)
    inv = sitk.GetImageFromArray(np.where(arr > 0, arr.max() + 1 - arr, 0).astype(np.float32))
    inv.CopyInformation(scan)
    src = tmp_path / "t2like.nii.gz"
    sitk.WriteImage(inv, str(src))
    rc, err = run(["segment", src, "-o", tmp_path / "out" / "l.nii.gz", "--weights", WEIGHTS_3D, "--progress", "bar"], capsys)
    assert rc == 2 and "T2-weighted" in err and "--accept-poor-match" in err and "is it a skull-stripped" not in err
    assert "fitting" not in err and files_in(tmp_path / "out") == []


def test_flipped_header_is_named_as_such(tmp_path, capsys):
    scan = sitk.ReadImage(str(SAMPLE_T1))
    flipped = sitk.Flip(scan, [False, True, False])  # the voxels' superior-inferior axis reversed under the same header
    flipped.CopyInformation(scan)
    src = tmp_path / "flipped.nii.gz"
    sitk.WriteImage(flipped, str(src))
    rc, err = run(["segment", src, "-o", tmp_path / "out" / "l.nii.gz", "--weights", WEIGHTS_3D], capsys)
    assert rc == 2 and "header's orientation looks wrong" in err and "voxel axis j" in err
    assert files_in(tmp_path / "out") == []
