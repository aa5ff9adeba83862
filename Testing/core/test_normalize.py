"""Intensity normalization of 3D scans: scanner noise must not change the brain's scale."""
import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.method.preprocess import normalize_intensity
from testdata import SAMPLE_SEG, SAMPLE_T1


@pytest.fixture(scope="module")
def scan():
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1))).astype(np.float32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_SEG)))
    return img, seg


def _wm_level(norm: np.ndarray, seg: np.ndarray) -> float:
    return float(np.median(norm[seg == 3]))


def test_noise_leaves_the_denoised_scale_of_white_matter(scan):
    img, seg = scan
    brain = img > 0
    hi = np.percentile(img[brain], 99)
    noisy = np.where(brain, np.clip(img + np.random.default_rng(0).normal(0, 0.04 * hi, img.shape), 1e-3, None), 0)
    clean_wm = _wm_level(normalize_intensity(img, denoise=True), seg)
    # the plain 99th percentile rises with the noise and darkens white matter by several %
    assert _wm_level(normalize_intensity(noisy), seg) < 0.96 * _wm_level(normalize_intensity(img), seg)
    # taken on the median-filtered copy it moves less than half as much
    plain_shift = 1 - _wm_level(normalize_intensity(noisy), seg) / _wm_level(normalize_intensity(img), seg)
    denoised_shift = 1 - _wm_level(normalize_intensity(noisy, denoise=True), seg) / clean_wm
    assert 0 <= denoised_shift < 0.5 * plain_shift


def test_denoised_normalization_keeps_range_and_background(scan):
    img, _ = scan
    out = normalize_intensity(img, denoise=True)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.array_equal(out > 0, img > 0)
    with pytest.raises(ValueError, match="no foreground"):
        normalize_intensity(np.zeros((8, 8, 8), np.float32), denoise=True)
