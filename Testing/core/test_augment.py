"""Training-time noise (`--noise`): what the head sees of a noisy scan, on the bundled real scan."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from metaseg.io.data import LabeledImage
from metaseg.train.meta_train import TaskPoints, settings_for
from metaseg.method.preprocess import add_noise, normalize_intensity
from testdata import SAMPLE_SEG, SAMPLE_T1


@pytest.fixture(scope="module")
def brain_values() -> torch.Tensor:
    """The normalized intensities of a 64^3 block of the real sample scan, background included."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1))).astype(np.float32)[96:160, 96:160, 96:160]
    return torch.from_numpy(normalize_intensity(arr, arr > 0)).reshape(-1)


def test_noise_stays_in_the_brain_and_in_range(brain_values):
    noisy = add_noise(brain_values, 0.05, torch.Generator().manual_seed(0))
    brain = brain_values > 0
    assert brain.any() and (~brain).any()
    assert torch.equal(noisy[~brain], brain_values[~brain])  # background stays 0: the brain mask is unchanged
    assert float(noisy[brain].min()) >= 1e-3 and float(noisy[brain].max()) <= 1.0
    diff = (noisy - brain_values)[brain & (brain_values > 0.1) & (brain_values < 0.9)]  # away from the clamps
    assert 0 < float(diff.std()) <= 0.05 * 1.05


def test_noise_level_is_drawn_per_call_and_reproducible(brain_values):
    gen = torch.Generator().manual_seed(3)
    a, b = add_noise(brain_values, 0.05, gen), add_noise(brain_values, 0.05, gen)
    brain = brain_values > 0.1
    assert float((a - brain_values)[brain].std()) != pytest.approx(float((b - brain_values)[brain].std()), rel=0.01)
    assert torch.equal(a, add_noise(brain_values, 0.05, torch.Generator().manual_seed(3)))


def test_training_points_carry_noise_even_without_augmentation():
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1))).astype(np.float32)[100:132, 100:132, 100:132]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_SEG)))[100:132, 100:132, 100:132]
    task = LabeledImage("ecog", torch.from_numpy(normalize_intensity(arr, arr > 0)), torch.from_numpy(lab.astype(np.uint8)))
    clean = settings_for(3, canvas=(32, 32, 32))
    noisy = settings_for(3, canvas=(32, 32, 32), noise=0.04)
    c0, v0, l0 = TaskPoints(clean, torch.device("cpu"))(task, torch.Generator().manual_seed(0), False)
    c1, v1, l1 = TaskPoints(noisy, torch.device("cpu"))(task, torch.Generator().manual_seed(0), False)
    assert torch.equal(c0, c1) and torch.equal(l0, l1)  # the same brain voxels and labels
    assert not torch.equal(v0, v1) and float((v1 - v0).abs().max()) < 0.5
