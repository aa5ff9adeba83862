import numpy as np
import pytest

from metaseg.metrics import dice_per_class, foreground_dice, generalized_dice


def test_dice_hand_computed():
    ref = np.array([0, 1, 1, 2, 2, 2, 3, 4])
    pred = np.array([0, 1, 2, 2, 2, 3, 3, 0])
    d = dice_per_class(pred, ref)
    assert d[0] == pytest.approx(2 * 1 / (2 + 1))  # pred {0,7}, ref {0}
    assert d[1] == pytest.approx(2 * 1 / (1 + 2))
    assert d[2] == pytest.approx(2 * 2 / (3 + 3))
    assert d[3] == pytest.approx(2 * 1 / (2 + 1))
    assert d[4] == 0.0
    assert foreground_dice(pred, ref) == pytest.approx(np.mean([2 / 3, 2 / 3, 2 / 3, 0.0]))


def test_absent_class_is_skipped_not_counted_as_zero():
    ref = np.array([0, 1, 1, 3])
    pred = np.array([0, 1, 1, 3])
    d = dice_per_class(pred, ref)
    assert np.isnan(d[2]) and np.isnan(d[4])
    assert foreground_dice(pred, ref) == 1.0


def test_generalized_dice_simple_weights():
    ref = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 1, 1])
    # w0 = 1/3, w1 = 1; num = 2*(1/3*2 + 1*1); den = 1/3*(2+3) + 1*(2+1)
    expected = 2 * (2 / 3 + 1) / (5 / 3 + 3)
    assert generalized_dice(pred, ref, n_classes=2) == pytest.approx(expected)
    assert generalized_dice(ref, ref, n_classes=5) == pytest.approx(1.0)


def test_generalized_dice_penalizes_a_class_absent_from_the_reference():
    ref = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    assert generalized_dice(pred, ref, n_classes=3) < generalized_dice(np.array([0, 0, 1, 1]), ref, n_classes=3)


def test_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in size"):
        dice_per_class(np.zeros(3), np.zeros(4))
