"""Scan grid <-> model grid: round trips on oblique/flipped/anisotropic geometries, memory bound,
entropy, and affine registration (a good match accepted, a bad one flagged), on real brains."""
import itertools
import time
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.space.geometry import (centred_affine, entropy_map, model_grid, oblique_direction, to_model_space,
                              to_scan_space, to_scan_space_with_entropy, with_geometry)
from metaseg.io.readers import read_image
from metaseg.metrics import dice_per_class
from metaseg.space.registration import MIN_NCC, MIN_NCC_INTERIOR, RegistrationQuality, register_affine, registration_ok

from testdata import SHARED_DATA as BRAINS
ECOG = BRAINS / "ecog"
pytestmark = pytest.mark.skipif(not (ECOG / "aligned_norm.nii.gz").exists(),
                                reason=f"real brain data not available at {BRAINS}")

N_CLASSES = 5


@pytest.fixture(scope="module")
def model_seg() -> sitk.Image:
    """ecog's labels on the model grid (aligned 160x192x224, anatomical LIA direction)."""
    return model_grid(sitk.ReadImage(str(ECOG / "aligned_seg4.nii.gz")))


@pytest.fixture(scope="module")
def scan_seg() -> sitk.Image:
    """ecog's labels in the scanner geometry, cropped to the brain (about 134x133x161)."""
    seg = sitk.ReadImage(str(ECOG / "native_seg4.nii.gz"))
    nz = np.argwhere(sitk.GetArrayViewFromImage(seg) > 0)
    lo, hi = nz.min(0) - 3, nz.max(0) + 4
    return seg[int(lo[2]):int(hi[2]), int(lo[1]):int(hi[1]), int(lo[0]):int(hi[0])]


GEOMETRIES = {
    "oblique, anisotropic": dict(direction=oblique_direction((20, -10, 30)), spacing=(1.0, 1.3, 1.15)),
    "RAS (LPS x, y flipped)": dict(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), spacing=(1.1, 1.0, 1.2)),
    "oblique, one axis flipped": dict(direction=oblique_direction((0, 25, -15), flip=(False, True, False)),
                                      spacing=(1.2, 1.0, 1.0)),
}


def _same_geometry_exactly(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (
        b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())


def _dice_ok(pred: sitk.Image, ref: sitk.Image, floor: float) -> None:
    d = dice_per_class(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref), N_CLASSES)
    assert min(d.values()) >= floor, d


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_labels_to_model_space_and_back_land_on_the_original_voxels(model_seg, scan_seg, geometry):
    scan = with_geometry(scan_seg, origin=(30.0, -20.0, 10.0), **GEOMETRIES[geometry])
    t = centred_affine(model_seg, scan, angles_deg=(10, -7, 15), shift_mm=(3, -2, 4))  # model -> scan
    on_model = to_model_space(scan, model_seg, t, sitk.sitkNearestNeighbor)
    assert on_model.GetSize() == model_seg.GetSize()
    # nothing of the brain fell outside the model grid
    assert np.count_nonzero(sitk.GetArrayViewFromImage(on_model)) > 0.9 * np.count_nonzero(
        sitk.GetArrayViewFromImage(scan)) * np.prod(scan.GetSpacing())

    # labels, nearest neighbour
    back = to_scan_space(sitk.GetArrayFromImage(on_model), model_seg, scan, t)
    assert _same_geometry_exactly(back, scan)
    _dice_ok(back, scan, 0.95)

    # probabilities (one-hot, linear both ways), argmax, and their entropy
    probs = np.stack([sitk.GetArrayFromImage(to_model_space(sitk.Cast(scan == c, sitk.sitkFloat32), model_seg, t))
                      for c in range(N_CLASSES)])
    labels, entropy = to_scan_space_with_entropy(probs, model_seg, scan, t)
    assert _same_geometry_exactly(labels, scan) and _same_geometry_exactly(entropy, scan)
    _dice_ok(labels, scan, 0.97)
    ent = sitk.GetArrayViewFromImage(entropy)
    assert ent.min() >= -1e-6 and ent.max() <= 1 + 1e-6
    # uncertain only near boundaries: deep inside a class the entropy is ~0
    inside = sitk.GetArrayViewFromImage(sitk.BinaryErode(sitk.Cast(scan == 3, sitk.sitkUInt8), [2, 2, 2])) > 0
    assert np.percentile(ent[inside], 95) < 0.05 and ent.mean() < 0.1


def test_to_model_space_follows_the_transform_convention(model_seg, scan_seg):
    """Model voxel v takes its value from the scan at t(physical(v)): t maps model -> scan points."""
    scan = with_geometry(scan_seg, direction=oblique_direction((0, 0, 30)), spacing=(1.0, 1.0, 1.5))
    t = centred_affine(model_seg, scan, angles_deg=(0, 12, 0), shift_mm=(5, 0, 0))
    on_model = to_model_space(scan, model_seg, t, sitk.sitkNearestNeighbor)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        v = tuple(int(rng.integers(0, s)) for s in model_seg.GetSize())
        p = t.TransformPoint(model_seg.TransformIndexToPhysicalPoint(v))
        idx = scan.TransformPhysicalPointToIndex(p)
        inside = all(0 <= i < s for i, s in zip(idx, scan.GetSize()))
        hits += on_model[v] == (scan[idx] if inside else 0)
    assert hits >= 195  # a few may round to the neighbouring voxel


def test_to_scan_space_is_memory_bounded(model_seg, scan_seg):
    """One class at a time in float32: the traced peak stays far below a stack of classes."""
    scan = with_geometry(scan_seg, direction=oblique_direction((15, 0, 0)))
    t = centred_affine(model_seg, scan, angles_deg=(0, 0, 8))
    probs = np.zeros((N_CLASSES,) + tuple(reversed(model_seg.GetSize())), dtype=np.float32)
    seg = sitk.GetArrayViewFromImage(model_seg)
    for c in range(N_CLASSES):
        probs[c][seg == c] = 1.0
    n_scan, n_model = int(np.prod(scan.GetSize())), int(np.prod(model_seg.GetSize()))
    tracemalloc.start()
    labels = to_scan_space(probs, model_seg, scan, t)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # best value so far (float32) + labels (uint8) + "better" mask (bool); a model-grid class if cast
    assert peak <= 1.2 * (4 * n_model + 6 * n_scan), (peak, n_model, n_scan)
    assert peak < 4 * N_CLASSES * max(n_scan, n_model) / 2
    assert labels.GetPixelID() == sitk.sitkUInt8


def test_to_scan_space_refuses_arrays_not_on_the_model_grid(model_seg, scan_seg):
    t = sitk.AffineTransform(3)
    with pytest.raises(ValueError, match=r"expected probabilities \(C, 224, 192, 160\)"):
        to_scan_space(np.zeros((2, 10, 10, 10), np.float32), model_seg, scan_seg, t)
    with pytest.raises(ValueError, match="integer labels"):
        to_scan_space(np.zeros((224, 192, 160), np.float32), model_seg, scan_seg, t)


def test_entropy_map():
    certain = np.zeros((4, 3, 3), np.float32)
    certain[2] = 1.0
    np.testing.assert_allclose(entropy_map(certain), 0.0, atol=1e-6)
    uniform = np.full((4, 3, 3), 0.25, np.float32)
    np.testing.assert_allclose(entropy_map(uniform), 1.0, atol=1e-6)
    np.testing.assert_allclose(entropy_map(uniform, normalize=False), np.log(4), atol=1e-6)
    half = np.zeros((4, 2), np.float32)
    half[:2] = 0.5
    np.testing.assert_allclose(entropy_map(half), 0.5, atol=1e-6)
    assert entropy_map(uniform).dtype == np.float32


# ---- registration ----


@pytest.fixture(scope="module")
def template_2mm() -> sitk.Image:
    """ecog's aligned T1 on the model grid, averaged down 2x (80x96x112, 2 mm) to stay fast."""
    return sitk.BinShrink(model_grid(sitk.ReadImage(str(ECOG / "aligned_norm.nii.gz"))), [2, 2, 2])


def _brain_corners(img: sitk.Image):
    nz = np.argwhere(sitk.GetArrayViewFromImage(img) > 0)
    lo, hi = nz.min(0), nz.max(0)
    return [img.TransformContinuousIndexToPhysicalPoint([float(v) for v in c[::-1]])
            for c in itertools.product(*zip(lo, hi))]


def test_registration_recovers_a_known_rotation_and_shift(template_2mm):
    truth = centred_affine(template_2mm, template_2mm, angles_deg=(12, -8, 5), shift_mm=(4, -3, 2))
    moved = sitk.Resample(template_2mm, template_2mm, truth.GetInverse(), sitk.sitkLinear, 0.0)
    start = time.time()
    found, quality = register_affine(moved, template_2mm)
    elapsed = time.time() - start
    errors = [np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
              for p in _brain_corners(template_2mm)]
    assert np.mean(errors) < 2.0 and np.max(errors) < 3.0, errors
    assert registration_ok(quality) and quality.ncc > 0.95 and quality.ncc_interior > 0.9, quality
    # the transform puts the scan back on the model grid (the convention of geometry.to_model_space)
    back = to_model_space(moved, template_2mm, found)
    a, b = sitk.GetArrayViewFromImage(back).ravel(), sitk.GetArrayViewFromImage(template_2mm).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert elapsed < 30


def test_real_scan_to_model_and_labels_back_in_its_own_geometry(model_seg):
    """The whole chain on a real file: MGZ in scanner geometry -> registered to the model grid ->
    the model-grid labels brought back land on FreeSurfer's labels in that geometry."""
    scan = read_image(ECOG / "native_t1.mgz")
    template = model_grid(sitk.ReadImage(str(ECOG / "aligned_norm.nii.gz")))
    t, quality = register_affine(scan, template)
    assert registration_ok(quality), quality
    labels = to_scan_space(sitk.GetArrayFromImage(model_seg), model_seg, scan, t)
    assert _same_geometry_exactly(labels, scan)
    _dice_ok(labels, sitk.ReadImage(str(ECOG / "native_seg4.nii.gz")), 0.95)


def _blob(like: sitk.Image) -> sitk.Image:
    """A smooth ellipsoid of brain size: the outline of a brain without its tissue contrast."""
    z, y, x = np.indices(sitk.GetArrayViewFromImage(like).shape)
    c = np.array(sitk.GetArrayViewFromImage(like).shape) / 2
    inside = (((z - c[0]) / 40) ** 2 + ((y - c[1]) / 35) ** 2 + ((x - c[2]) / 30) ** 2 < 1).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(inside), 3.0)
    img.CopyInformation(like)
    return img


def _noise(like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.random.default_rng(0).random(sitk.GetArrayViewFromImage(like).shape).astype(np.float32))
    img.CopyInformation(like)
    return img


@pytest.mark.parametrize("make", [_noise, _blob], ids=["noise", "brain-shaped blob"])
def test_registration_to_a_wrong_image_is_flagged_poor(template_2mm, make):
    _, quality = register_affine(make(template_2mm), template_2mm)
    assert not registration_ok(quality), quality


def test_registration_ok_thresholds():
    good = RegistrationQuality(metric=-0.7, ncc=0.8, ncc_interior=0.6, iterations=50, stop="")
    assert registration_ok(good)
    assert not registration_ok(RegistrationQuality(-0.5, MIN_NCC - 0.01, 0.6, 50, ""))
    assert not registration_ok(RegistrationQuality(-0.5, 0.8, MIN_NCC_INTERIOR - 0.01, 50, ""))
    assert not registration_ok(RegistrationQuality(-0.5, float("nan"), 0.6, 50, ""))
    assert set(good.to_dict()) == {"metric", "ncc", "ncc_interior", "iterations", "stop"}
