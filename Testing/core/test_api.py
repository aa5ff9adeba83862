"""The Python API (`metaseg.segment`, `Segmenter`, `Segmentation`) against `metaseg segment` on the bundled sample.

Every kind of input (path, SimpleITK image, nibabel image, numpy array with spacing= or affine=) must give the
command line's labels, bit for bit, with the same seed. The 3D cases use the bundled native T1 shrunk to 3 mm
(the same registration, fit and labelling code, a few seconds a run) with 2 fit steps; ITK runs on one thread
there, because its multi-threaded registration is not bit-reproducible from run to run (issue 22).
"""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import metaseg
from metaseg.cli import main
from metaseg.io.readers import same_geometry
from metaseg.segmenter import Segmenter
from testdata import ROOT, SAMPLE, SAMPLE_T1, WEIGHTS_2D

nib = pytest.importorskip("nibabel")
SLICE = SAMPLE / "ecog_slice_t1.nii.gz"
STEPS = {"slice": 5, "volume": 2}


@pytest.fixture(scope="module", autouse=True)
def one_itk_thread():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """kind -> file: the bundled 2D slice, and the bundled native T1 at 3 mm."""
    d = tmp_path_factory.mktemp("scans")
    sitk.WriteImage(sitk.BinShrink(sitk.ReadImage(str(SAMPLE_T1)), [3, 3, 3]), str(d / "ecog_t1_3mm.nii.gz"))
    return {"slice": SLICE, "volume": d / "ecog_t1_3mm.nii.gz"}


@pytest.fixture(scope="module")
def cli_runs(scans, tmp_path_factory):
    """kind -> folder with the command line's labels, .seg.nrrd and report of that scan."""
    runs = {}
    for kind, path in scans.items():
        out = tmp_path_factory.mktemp(f"cli-{kind}")
        assert main(["segment", str(path), "-o", str(out / "labels.nii.gz"), "--seg-nrrd", str(out / "s.seg.nrrd"),
                     "--report", str(out / "r.json"), "--steps", str(STEPS[kind]), "--seed", "0", "--device", "cpu",
                     "--progress", "none"]) == 0
        runs[kind] = out
    return runs


def _inputs(path: Path) -> dict:
    """Each kind of image the API takes, all holding `path`'s scan, with the keywords it needs."""
    img, nii = sitk.ReadImage(str(path)), nib.load(str(path))
    return {
        "path": (str(path), {}),
        "SimpleITK image": (img, {}),
        "nibabel image": (nii, {}),
        "numpy array, spacing=": (sitk.GetArrayFromImage(img), {"spacing": img.GetSpacing(), "origin": img.GetOrigin(),
                                                                "direction": img.GetDirection()}),
        "numpy array, affine=": (nii.get_fdata(), {"affine": nii.affine}),
    }


@pytest.fixture(scope="module")
def api_runs(scans):
    """(kind, input kind) -> Segmentation of fresh `metaseg.segment` calls."""
    return {(kind, name): metaseg.segment(image, steps=STEPS[kind], seed=0, device="cpu", **kw)
            for kind, path in scans.items() for name, (image, kw) in _inputs(path).items()}


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("kind", ["slice", "volume"])
def test_every_kind_of_input_gives_the_command_lines_labels(kind, scans, cli_runs, api_runs):
    cli = _labels(cli_runs[kind] / "labels.nii.gz")
    for name in _inputs(scans[kind]):
        seg = api_runs[(kind, name)]
        assert np.array_equal(sitk.GetArrayFromImage(seg.labels), cli), name
        nibabel_order = name in ("nibabel image", "numpy array, affine=")
        assert np.array_equal(seg.array, cli.T if nibabel_order else cli), name  # the caller's own axis order
        ok, why = same_geometry(seg.labels, sitk.ReadImage(str(scans[kind])), tol=1e-5)
        assert ok, (name, why)
    seg = api_runs[(kind, "path")]
    assert np.array_equal(np.asanyarray(seg.to_nibabel().dataobj), np.asanyarray(nib.load(str(cli_runs[kind] / "labels.nii.gz")).dataobj))
    assert set(seg.volumes) == {"Cortical gray matter", "Subcortical gray matter", "White matter", "Cerebrospinal fluid"}
    assert seg.report["fit"]["steps"] == STEPS[kind] and seg.report["input"] == str(scans[kind])
    assert (seg.fitted is not None) == (kind == "volume") and (seg.brain_mask is not None) == (kind == "volume")


def test_save_writes_what_the_command_line_writes_and_never_overwrites(scans, cli_runs, api_runs, tmp_path):
    import slicerio

    seg = api_runs[("volume", "path")]
    out = tmp_path / "out"
    files = seg.save(out / "labels.nii.gz", seg_nrrd=out / "s.seg.nrrd", report=out / "r.json",
                     brain_mask=out / "brain.nii.gz", fitted=out / "fitted.safetensors")
    assert sorted(files) == ["brain_mask", "inr", "labels", "report", "seg_nrrd"]
    assert np.array_equal(_labels(out / "labels.nii.gz"), _labels(cli_runs["volume"] / "labels.nii.gz"))
    ours, cli = (slicerio.read_segmentation(str(d / "s.seg.nrrd")) for d in (out, cli_runs["volume"]))
    assert np.array_equal(ours["voxels"], cli["voxels"])
    assert [{k: v for k, v in x.items() if k != "id"} for x in ours["segments"]] == \
        [{k: v for k, v in x.items() if k != "id"} for x in cli["segments"]]  # ids are random UIDs
    np.testing.assert_array_equal(ours["ijkToLPS"], cli["ijkToLPS"])
    again = metaseg.FittedVolume.load(out / "fitted.safetensors")
    plane = metaseg.standard_plane(again.info["reference"], "axial")
    stored, full = (sitk.GetArrayFromImage(v.reslice(plane)) for v in (again, seg.fitted))
    assert np.mean(stored != full) < 0.003  # stored compactly: float16 parameters, 8-bit image

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(metaseg.InputError, match="exists; pass --force to overwrite it"):
        seg.save(out / "labels.nii.gz", seg_nrrd=out / "new.seg.nrrd")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # refused before writing anything
    seg.save(out / "labels.nii.gz", force=True)
    with pytest.raises(metaseg.InputError, match="is an input of this run"):
        seg.save(scans["volume"], force=True)
    with pytest.raises(metaseg.InputError, match="uncertainty=True"):
        seg.save(tmp_path / "x.nii.gz", uncertainty=tmp_path / "u.nii.gz")


def test_a_failing_file_leaves_nothing_written(api_runs, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr("metaseg.segmentation.write_seg_nrrd", broken)
    with pytest.raises(OSError, match="disk full"):
        api_runs[("slice", "path")].save(tmp_path / "l.nii.gz", seg_nrrd=tmp_path / "s.seg.nrrd", report=tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_a_reused_segmenter_gives_the_labels_of_fresh_calls(scans, api_runs):
    mirrored = sitk.Flip(sitk.ReadImage(str(SLICE)), [True, False, False])
    segmenter = Segmenter(device="cpu")
    got = [segmenter(scans["slice"], steps=STEPS["slice"]), segmenter(scans["volume"], steps=STEPS["volume"]),
           segmenter(mirrored, steps=STEPS["slice"])]
    fresh = [api_runs[("slice", "path")], api_runs[("volume", "path")], metaseg.segment(mirrored, steps=STEPS["slice"], device="cpu")]
    for a, b in zip(got, fresh):
        assert np.array_equal(a.array, b.array)
    assert not np.array_equal(got[0].array, got[2].array)


def _cli_error(args, capsys) -> str:
    assert main(["segment", *args, "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1][len("error: "):]


def _volume(t: Path, arr: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(t / "v.nii.gz"))
    return t / "v.nii.gz"


BAD = {
    # case: (make the input file, command-line arguments, API keywords)
    "missing file": (lambda t: t / "absent.nii.gz", [], {}),
    "constant volume": (lambda t: _volume(t, np.full((40, 40, 40), 7.0, np.float32)), [], {}),
    "NaN voxel": (lambda t: _volume(t, np.where(np.eye(40)[None] > 0, np.nan, 1.0).repeat(40, 0).astype(np.float32)), [], {}),
    "3D scan, 2D weights": (lambda t: _volume(t, np.random.default_rng(0).random((40, 40, 40), np.float32) + 0.1),
                            ["--weights", str(WEIGHTS_2D)], {"weights": WEIGHTS_2D}),
    "steps out of range": (lambda t: SLICE, ["--steps", "0"], {"steps": 0}),
    "mask on a slice": (lambda t: SLICE, ["--mask", str(SLICE)], {"mask": SLICE}),
    "absent accelerator": (lambda t: SLICE, ["--device", "cuda:7"], {"device": "cuda:7"}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_the_command_lines_message(case, tmp_path, capsys):
    make, args, kw = BAD[case]
    if case == "absent accelerator":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    src = make(tmp_path)
    message = _cli_error([str(src), "-o", str(tmp_path / "out" / "l.nii.gz"), *args], capsys)
    with pytest.raises((metaseg.InputError, metaseg.WeightsError)) as e:
        metaseg.segment(src, **kw)
    assert str(e.value) == message and not (tmp_path / "out").exists()


@pytest.mark.parametrize("image, kw, message", [
    (np.ones((40, 40, 40), np.float32), {}, "a numpy array needs its voxel size"),
    (np.ones((40, 40, 40), np.float32), {"spacing": (1, 1)}, "spacing= must be 3 finite numbers"),
    (np.ones((40, 40, 40), np.float32), {"spacing": (1, 0, 1)}, "more than 0 mm"),
    (np.ones((40, 40, 40), np.float32), {"spacing": (1, 1, 1), "affine": np.eye(4)}, "either affine="),
    (str(SLICE), {"spacing": (1, 1, 1)}, "for numpy arrays only"),
    ([[1, 2], [3, 4]], {}, "a Python list is not an image"),
    (str(SLICE), {"quality": "great"}, "--quality must be one of fast, best"),
    (str(SLICE), {"labels": "organs"}, "unknown label set 'organs'"),
])
def test_bad_api_arguments_say_what_to_do(image, kw, message):
    with pytest.raises(metaseg.InputError, match=re.escape(message)):
        metaseg.segment(image, **kw)


def test_cancel_raises_cancelled():
    import threading

    cancel = threading.Event()
    cancel.set()
    events = []
    with pytest.raises(metaseg.Cancelled):
        metaseg.segment(SLICE, cancel=cancel, progress=lambda event, fields: events.append(event), device="cpu")
    assert events and events[0] == "stage"


def _readme_python_blocks() -> list:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readmes_python_section_runs(scans, tmp_path, monkeypatch):
    """The README's code, as it is shown, in a folder where its sample files are small stand-ins (the 3 mm
    scan for both 3D files, two copies of the slice in scans/) and every fit takes 2 steps."""
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no python block under ### Python"
    (tmp_path / "Resources" / "Sample").mkdir(parents=True)
    for name in ("ecog_head.nii.gz", "ecog_t1.nii.gz"):
        shutil.copy(scans["volume"], tmp_path / "Resources" / "Sample" / name)
    (tmp_path / "scans").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(SLICE, tmp_path / "scans" / name)
    call = Segmenter.__call__

    def short(self, image, **kw):
        kw["steps"] = kw.get("steps") or 2
        return call(self, image, **kw)

    monkeypatch.setattr(Segmenter, "__call__", short)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"ecog_labels.nii.gz", "ecog.seg.nrrd", "a_labels.nii.gz", "b_labels.nii.gz", "b_report.json"} <= names
