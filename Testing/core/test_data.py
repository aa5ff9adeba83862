import numpy as np
from metaseg.data import PAPER_SLICE, coronal_slices, load_slice, load_splits


def test_splits_are_disjoint_and_hold_the_sample_out():
    s = load_splits()
    train, val, test = set(s["train"]), set(s["validation"]), set(s["test"])
    assert not (train & val) and not (train & test) and not (val & test)
    assert {"ecog", "ws01"} <= val  # bundled sample and the norm.mgz-prepared subject are unseen
    assert len(train) == 7


def test_paper_slice_is_coronal_slice_109_of_the_volume(shared_data):
    d = shared_data / "ecog"
    s = load_slice(d)
    (c,) = coronal_slices(d, [PAPER_SLICE])
    assert s.image.shape == (192, 160)
    assert np.array_equal(s.image, c.image) and np.array_equal(s.labels, c.labels)
    assert set(np.unique(s.labels)) <= {0, 1, 2, 3, 4}
