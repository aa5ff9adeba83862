"""Reading real scans: FreeSurfer MGZ equals its NIfTI, DICOM series round trip, every bad input refused."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.space.geometry import oblique_direction, with_geometry
from metaseg.io.dicom import dicom_series
from metaseg.io.readers import InputError, image_array_3d, read_image

from testdata import SAMPLE, SHARED_DATA as BRAINS

SAMPLE_SLICE = SAMPLE / "ecog_slice_t1.nii.gz"
SUBJECTS = sorted(p.name for p in BRAINS.glob("*") if (p / "native_t1.mgz").exists()) if BRAINS.exists() else []
needs_brains = pytest.mark.skipif(not SUBJECTS, reason=f"real brain data not available at {BRAINS}")


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(a, what)(), getattr(b, what)(), atol=tol, err_msg=what)


@pytest.fixture(scope="module")
def t1_crop() -> sitk.Image:
    """A 48x40x36 int16 crop through the middle of a real brain (ecog), in its scanner geometry."""
    if "ecog" not in SUBJECTS:
        pytest.skip(f"real brain data not available at {BRAINS}")
    t1 = sitk.ReadImage(str(BRAINS / "ecog" / "native_t1.nii.gz"))
    return sitk.Cast(t1[100:148, 90:130, 100:136], sitk.sitkInt16)


# ---- FreeSurfer MGZ ----


@needs_brains
@pytest.mark.parametrize("subject", SUBJECTS)
def test_mgz_equals_nifti_voxels_and_geometry(subject):
    mgz = read_image(BRAINS / subject / "native_t1.mgz")
    nii = sitk.ReadImage(str(BRAINS / subject / "native_t1.nii.gz"))
    assert mgz.GetPixelID() == sitk.sitkUInt8  # FreeSurfer's uchar, kept
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mgz), sitk.GetArrayViewFromImage(nii))
    _assert_same_geometry(mgz, nii)
    # a real conformed scan: LIA, not identity
    assert not np.allclose(mgz.GetDirection(), np.eye(3).ravel())


def _write_mgh(path: Path, arr_xyz: np.ndarray, type_code: int, spacing, mdc_cols: np.ndarray, c_ras,
               nframes: int = 1, version: int = 1, truncate: int = 0) -> None:
    """A minimal MGH writer for the tests (arr indexed [x, y, z]); gzip if the name ends in .mgz."""
    dtype = {0: ">u1", 1: ">i4", 3: ">f4", 4: ">i2"}.get(type_code, ">f4")
    w, h, d = arr_xyz.shape
    head = struct.pack(">7ih", version, w, h, d, nframes, type_code, 0, 1)
    head += struct.pack(">3f", *spacing) + struct.pack(">9f", *np.asarray(mdc_cols).T.ravel()) + struct.pack(">3f", *c_ras)
    head += b"\0" * (284 - len(head))
    data = np.asarray(arr_xyz).astype(dtype).ravel(order="F").tobytes() * nframes
    data = data[: len(data) - truncate]
    opener = gzip.open if path.name.endswith(".mgz") else open
    with opener(path, "wb") as f:
        f.write(head + data)


@pytest.mark.parametrize("type_code,suffix", [(0, ".mgz"), (1, ".mgh"), (3, ".mgz"), (4, ".mgh")])
def test_mgh_types_and_oblique_geometry_follow_the_vox2ras_formula(tmp_path, type_code, suffix):
    rng = np.random.default_rng(type_code)
    arr = rng.integers(0, 200, size=(6, 5, 4)).astype(np.float32)
    mdc = np.array(oblique_direction((20, -35, 10), flip=(True, False, False))).reshape(3, 3)
    spacing, c_ras = (0.8, 1.2, 2.5), (10.0, -20.0, 5.0)
    path = tmp_path / f"x{suffix}"
    _write_mgh(path, arr, type_code, spacing, mdc, c_ras)
    img = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), arr.transpose(2, 1, 0))
    # independent check: voxel ijk sits at RAS M @ ijk + P0, and voxel dims/2 at c_ras
    m = mdc * np.array(spacing)
    p0 = np.array(c_ras) - m @ (np.array(arr.shape) / 2)
    for ijk in [(0, 0, 0), (5, 4, 3), (3, 2, 2)]:
        ras = m @ np.array(ijk) + p0
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(ijk), ras * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint((3.0, 2.5, 2.0)),
                               np.array(c_ras) * [-1, -1, 1], atol=1e-4)


# ---- DICOM ----


def _write_dicom_series(vol: sitk.Image, folder: Path, series_uid: str, description: str, prefix: str = "IM") -> None:
    """One file per slice with the tags a reader needs to rebuild the volume's geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = vol.GetDirection()
    tags = {
        "0008|0060": "MR", "0008|103e": description, "0010|0010": "Test^Sample", "0010|0020": "0",
        "0008|0020": "20240101", "0008|0030": "120000",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{vol.GetSpacing()[2]:.10g}",
    }
    for i in range(vol.GetDepth()):
        sl = vol[:, :, i]
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in vol.TransformIndexToPhysicalPoint((0, 0, i))))
        sl.SetMetaData("0020|0013", str(i + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{i + 1}")
        writer.SetFileName(str(folder / f"{prefix}{i:04d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize("direction,spacing", [
    (None, None),  # the scan's own conformed geometry made right-handed below
    (oblique_direction((15, -10, 20)), (0.9, 0.9, 1.5)),  # oblique, anisotropic
])
def test_dicom_series_round_trip(t1_crop, tmp_path, direction, spacing):
    vol = with_geometry(t1_crop, direction=direction, spacing=spacing)
    if direction is None:  # DICOM slices stack along row x column: a left-handed grid comes back reordered
        vol = sitk.DICOMOrient(vol, "LPS")
    _write_dicom_series(vol, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.2", "T1 crop")
    back = read_image(tmp_path / "series")
    assert back.GetSize() == vol.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(vol))
    _assert_same_geometry(back, vol, tol=1e-6)
    # any one file of the series reads the whole series
    one = read_image(tmp_path / "series" / "IM0003.dcm")
    assert one.GetSize() == vol.GetSize()


def test_dicom_folder_with_two_series_lists_them_and_one_can_be_chosen(t1_crop, tmp_path):
    _write_dicom_series(t1_crop[:, :, :6], tmp_path, "1.2.826.0.1.3680043.2.1125.10", "first", "A")
    _write_dicom_series(t1_crop[:, :, :4], tmp_path, "1.2.826.0.1.3680043.2.1125.11", "second", "B")
    assert sorted(n for _, n, _ in dicom_series(tmp_path)) == [4, 6]
    with pytest.raises(InputError, match=r"holds 2 DICOM series: .*\.10 \(6 files, first, e\.g\. A\d+\.dcm\).*\.11 \(4 files, second, e\.g\. B\d+\.dcm\)"):
        read_image(tmp_path)
    assert read_image(tmp_path, series_id="1.2.826.0.1.3680043.2.1125.11").GetSize()[2] == 4
    with pytest.raises(InputError, match="no DICOM series '9.9'"):
        read_image(tmp_path, series_id="9.9")


# ---- other formats ----


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_itk_formats_round_trip(t1_crop, tmp_path, suffix):
    vol = with_geometry(t1_crop, direction=oblique_direction((5, 0, -30)), spacing=(1.0, 1.1, 1.3))
    path = tmp_path / f"v{suffix}"
    sitk.WriteImage(vol, str(path))
    back = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(vol))
    _assert_same_geometry(back, vol, tol=1e-5)
    arr = image_array_3d(back)
    assert arr.dtype == np.float32 and arr.shape == tuple(reversed(vol.GetSize()))


# ---- bad inputs: each refused with a message that says what was found ----


def _img(arr: np.ndarray, vector: bool = False) -> sitk.Image:
    return sitk.GetImageFromArray(arr, isVector=vector)


def _brainlike(shape=(40, 40, 40)) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(np.float32) + 0.1


def _with(arr: np.ndarray, index, value) -> np.ndarray:
    arr = arr.copy()
    arr[index] = value
    return arr


BAD_ARRAYS = {
    "4D": (lambda: sitk.Image([40, 40, 40, 3], sitk.sitkFloat32), r"is 4D \(size \(40, 40, 40, 3\)\).*expected one 3D volume"),
    "2D image": (lambda: _img(_brainlike((64, 64))), r"is a 2D slice \(size \(64, 64\)\).*expects a volume"),
    "3D with one slice": (lambda: _img(_brainlike((1, 64, 64))), r"is a 2D slice \(size \(64, 64, 1\)\)"),
    "the bundled 2D sample": (lambda: sitk.ReadImage(str(SAMPLE_SLICE)), r"is a 2D slice .*use the 2D weights"),
    "RGB": (lambda: _img(np.zeros((40, 40, 40, 3), np.uint8), vector=True), r"3 components per pixel \(vector/RGB\)"),
    "empty": (lambda: sitk.Image([0, 0, 0], sitk.sitkFloat32), r"is empty \(size \(0, 0, 0\)\)"),
    "too small": (lambda: _img(_brainlike((40, 40, 20))), r"too small \(size \(20, 40, 40\)\); expected at least 32"),
    "NaN": (lambda: _img(_with(_brainlike(), (3, 4, 5), np.nan)), r"1 NaN or infinite values"),
    "Inf": (lambda: _img(_with(_brainlike(), (slice(0, 2), 0, 0), np.inf)), r"2 NaN or infinite values"),
    "constant": (lambda: _img(np.full((40, 40, 40), 7.0, np.float32)), r"is constant \(every pixel is 7.0\)"),
    "no positive voxel": (lambda: _img(-_brainlike()), r"no positive pixels"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_image_array_3d_refuses_bad_volumes(case):
    make, message = BAD_ARRAYS[case]
    if case == "the bundled 2D sample" and not SAMPLE_SLICE.exists():
        pytest.skip(f"bundled sample missing: {SAMPLE_SLICE}")
    with pytest.raises(InputError, match=message):
        image_array_3d(make())


def test_image_array_3d_accepts_a_real_volume(t1_crop):
    arr = image_array_3d(t1_crop)
    assert arr.dtype == np.float32 and arr.shape == (36, 40, 48)
    np.testing.assert_array_equal(arr, sitk.GetArrayViewFromImage(t1_crop))


def _mgh_bad(tmp: Path, name: str, **kw) -> Path:
    args = dict(arr_xyz=np.ones((4, 4, 4)), type_code=0, spacing=(1, 1, 1), mdc_cols=np.eye(3), c_ras=(0, 0, 0))
    args.update(kw)
    _write_mgh(tmp / name, **args)
    return tmp / name


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": (lambda t: t / "nope.nii.gz", r"input not found: .*nope\.nii\.gz"),
    "empty file": (lambda t: _file(t / "e.nii.gz", b""), r"e\.nii\.gz is an empty file"),
    "garbage NIfTI": (lambda t: _file(t / "g.nii.gz", b"not an image" * 50),
                      r"cannot read .*g\.nii\.gz as an image.*supported: NIfTI"),
    "unknown format": (lambda t: _file(t / "x.txt", b"hello"), r"cannot read .*x\.txt as an image"),
    "folder without DICOM": (lambda t: (t / "d").mkdir() or t / "d", r"is a folder with no DICOM series"),
    "multi-frame MGZ": (lambda t: _mgh_bad(t, "f.mgz", nframes=2), r"f\.mgz: has 2 frames \(4D\)"),
    "unknown MGH type": (lambda t: _mgh_bad(t, "u.mgh", type_code=2), r"u\.mgh: unsupported MGH voxel type 2"),
    "truncated MGZ": (lambda t: _mgh_bad(t, "t.mgz", truncate=10), r"t\.mgz: truncated voxel data"),
    "not MGH": (lambda t: _mgh_bad(t, "v.mgz", version=7), r"v\.mgz: not an MGH file \(version field 7"),
    "MGZ not gzip": (lambda t: _file(t / "z.mgz", b"\x00" * 400), r"z\.mgz: cannot read as MGH/MGZ"),
    "short MGH": (lambda t: _file(t / "s.mgh", b"\x00" * 100), r"s\.mgh: file too short"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_image_refuses_bad_files(tmp_path, case):
    make, message = BAD_FILES[case]
    with pytest.raises(InputError, match=message):
        read_image(make(tmp_path))

