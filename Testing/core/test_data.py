import numpy as np
from metaseg.io.data import LABEL_GROUPS, PAPER_SLICE, coronal_slices, load_slice, load_splits, subject_dir
from testdata import SHARED_DATA


def test_splits_are_disjoint_and_hold_the_sample_out():
    s = load_splits()
    train, val, test = set(s["train"]), set(s["validation"]), set(s["test"])
    assert not (train & val) and not (train & test) and not (val & test)
    assert {"ecog", "ws01"} <= val  # bundled sample and the norm.mgz-prepared subject are unseen
    assert {"sub-05"} <= test


def test_every_split_holds_both_label_protocols():
    """Judged on both groups: FreeSurfer-labelled brains/ and manually labelled oasis-nmm/ subjects."""
    root = SHARED_DATA.parent
    if not root.is_dir():
        import pytest
        pytest.skip("../shared/data not present")
    for name, subjects in load_splits().items():
        groups = {subject_dir(root, s).parent.name for s in subjects}
        assert groups == set(LABEL_GROUPS), (name, groups)


def test_paper_slice_is_coronal_slice_109_of_the_volume(shared_data):
    d = shared_data / "ecog"
    s = load_slice(d)
    (c,) = coronal_slices(d, [PAPER_SLICE])
    assert s.image.shape == (192, 160)
    assert np.array_equal(s.image, c.image) and np.array_equal(s.labels, c.labels)
    assert set(np.unique(s.labels)) <= {0, 1, 2, 3, 4}
