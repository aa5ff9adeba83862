"""`metaseg synth`: T1-like training subjects drawn from label maps (metaseg/train/synth.py).

A toy map (all 31 structures in a 40^3 box) runs everywhere; one of SynthSeg's real maps, halved to 2 mm,
runs where ../shared/data/synthseg-labels is present and is skipped elsewhere (CI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metaseg.cli import main
from metaseg.io.readers import InputError
from metaseg.labelsets import STRUCTURES
from metaseg.train.prepare import find_subjects
from metaseg.train.synth import FILES, GENERATION_LABELS, T1_CLASSES, Priors, check_label_map, synthesize, to_structures
from testdata import SYNTHSEG_LABELS

WM, CORTEX, VENTRICLES = (2, 41), (3, 42), (4, 43)


def toy_map() -> np.ndarray:
    """40^3, 1 mm: CSF around the brain (24), cortex and white matter per side, ventricles, the other 25
    structures as 2^3 cubes in the white matter, and a lesion (25) touching a ventricle."""
    z, y, x = np.indices((40, 40, 40))
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    left = x < 20
    lab = np.zeros((40, 40, 40), np.int16)
    lab[r < 19] = 24
    lab[r < 17] = np.where(left, 3, 42)[r < 17]
    lab[r < 14] = np.where(left, 2, 41)[r < 14]
    lab[(r < 4) & left] = 4
    lab[(r < 4) & ~left] = 43
    others = [v for v in STRUCTURES.foreground if v not in WM + CORTEX + VENTRICLES]
    grid = range(8, 32, 4)
    spots = [(zz, yy, xx) for zz in grid for yy in grid for xx in grid
             if 6 < np.sqrt(sum((c + 0.5 - 20) ** 2 for c in (zz, yy, xx))) < 12]
    for v, (zz, yy, xx) in zip(others, spots):
        lab[zz:zz + 2, yy:yy + 2, xx:xx + 2] = v
    assert len(spots) >= len(others)
    lab[20, 20, 22] = 25
    return lab


def toy_priors() -> Priors:
    n = max(T1_CLASSES) + 1
    means = np.stack([np.full(n, 100.0), np.full(n, 5.0)])
    means[0, :4] = (5.0, 40.0, 160.0, 95.0)  # background, CSF, WM, GM: SynthSeg's T1 order
    return Priors(means, np.stack([np.full(n, 8.0), np.full(n, 2.0)]))


def mean_of(image: np.ndarray, structures: np.ndarray, values) -> float:
    return float(image[np.isin(structures, values)].mean())


@pytest.fixture(scope="module")
def real_map():
    """training_seg_01 at 2 mm (every second voxel): 128^3 with every structure, spacing in array order."""
    if not SYNTHSEG_LABELS.is_dir():
        pytest.skip("../shared/data/synthseg-labels not present")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SYNTHSEG_LABELS / "training_seg_01.nii.gz")))
    return arr[::2, ::2, ::2].copy(), (2.0, 2.0, 2.0)


def test_priors_have_one_column_per_t1_class_not_per_generation_class():
    """SynthSeg's T1 priors go with its contrast-specific classes (25), not generation_classes.npy's 48."""
    if not SYNTHSEG_LABELS.is_dir():
        pytest.skip("../shared/data/synthseg-labels not present")
    priors = Priors.load(SYNTHSEG_LABELS)
    assert priors.means.shape == priors.stds.shape == (2, 25) == (2, max(T1_CLASSES) + 1)
    assert np.load(SYNTHSEG_LABELS / "generation_classes.npy").max() + 1 == 48
    assert tuple(np.load(SYNTHSEG_LABELS / "generation_labels.npy")) == GENERATION_LABELS
    c = priors.classes
    assert c[2] == c[41] and c[4] == c[43] == c[24] == c[14] and c[3] == c[42] != c[2]
    assert priors.means[0, c[2]] > priors.means[0, c[3]] > priors.means[0, c[4]]  # T1: WM > GM > CSF


def test_real_map_gives_t1_like_images(real_map):
    labels, spacing = real_map
    for seed in (0, 1, 2):
        s = synthesize(labels, spacing, np.random.default_rng(seed), Priors.load(SYNTHSEG_LABELS))
        wm, gm, csf = (mean_of(s.image, s.structures, v) for v in (WM, CORTEX, VENTRICLES))
        assert wm > gm > csf > 0, (seed, wm, gm, csf)
        brain = (labels != 0)
        assert (s.image[brain] > 0).all() and (s.image[~brain] == 0).all()  # skull-stripped like native_t1
        assert 100 < np.percentile(s.image[brain], 99) < 120  # FreeSurfer's T1 scale, as our real scans
        assert np.array_equal(s.structures, to_structures(labels, spacing))
        assert set(np.unique(s.structures)) == {0, *STRUCTURES.foreground}


def test_structures_follow_the_aseg_rule():
    lab = toy_map()
    st = to_structures(lab, (1.0, 1.0, 1.0))
    keep = np.isin(lab, STRUCTURES.foreground)
    assert np.array_equal(st[keep], lab[keep])  # the 31 keep their value
    assert (st[lab == 24] == 0).all() and (st[lab == 0] == 0).all()  # CSF around the brain stays 0
    assert st[20, 20, 22] == 43  # the lesion inside the right ventricle takes the ventricle


def test_deterministic_for_a_seed():
    lab, pri = toy_map(), toy_priors()
    a, b, c = (synthesize(lab, (1.0, 1.0, 1.0), np.random.default_rng(s), pri) for s in (7, 7, 8))
    assert np.array_equal(a.image, b.image) and a.drawn == b.drawn
    assert not np.array_equal(a.image, c.image)
    wm, gm, csf = (mean_of(a.image, a.structures, v) for v in (WM, CORTEX, VENTRICLES))
    assert wm > gm > csf > 0
    assert np.array_equal(a.tissues, np.asarray(STRUCTURES.tissue_lut(), np.uint8)[a.structures])


def write_toy(folder: Path, lab: np.ndarray, name: str = "toy_seg") -> Path:
    """The map as a LIA 1 mm NIfTI (like SynthSeg's) and the toy priors beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(lab)
    img.SetOrigin((-20.0, 30.0, 12.0))
    img.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0))
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(img, str(path))
    pri = toy_priors()
    np.save(folder / "generation_labels.npy", np.array(GENERATION_LABELS, np.int32))
    np.save(folder / "prior_means_t1.npy", pri.means)
    np.save(folder / "prior_stds_t1.npy", pri.stds)
    return path


def test_cli_writes_subject_folders_like_the_real_ones(tmp_path, capsys):
    lab = toy_map()
    path = write_toy(tmp_path / "maps", lab)
    out = tmp_path / "subjects"
    assert main(["synth", str(path), "-o", str(out), "--copies", "2", "--seed", "3"]) == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["toy_seg_synth0", "toy_seg_synth1"]  # no temporary folder left
    first = out / "toy_seg_synth0"
    assert sorted(p.name for p in first.iterdir()) == sorted([*FILES.values(), "synth.json"])
    ref = sitk.ReadImage(str(path))
    t1, st, seg4 = (sitk.ReadImage(str(first / FILES[k])) for k in ("image", "structures", "tissues"))
    for img in (t1, st, seg4):
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetDirection(), ref.GetDirection())
        assert np.allclose(img.GetOrigin(), ref.GetOrigin())
    assert t1.GetPixelID() == sitk.sitkFloat32 and st.GetPixelID() == seg4.GetPixelID() == sitk.sitkUInt8
    structures = sitk.GetArrayFromImage(st)
    assert np.array_equal(structures, to_structures(lab, (1.0, 1.0, 1.0)))
    assert np.array_equal(sitk.GetArrayFromImage(seg4), np.asarray(STRUCTURES.tissue_lut(), np.uint8)[structures])
    image = sitk.GetArrayFromImage(t1)
    assert not np.array_equal(image, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "toy_seg_synth1" / FILES["image"]))))
    # `metaseg prepare` finds them with its globs, as a real subject
    subj = find_subjects([first], "native_t1.nii*", "native_structures.nii*")[0]
    assert (subj.image.name, subj.labels.name) == (FILES["image"], FILES["structures"])

    capsys.readouterr()
    assert main(["synth", str(path), "-o", str(out), "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "1 subject folder(s) exist" in err and "--force" in err
    assert np.array_equal(image, sitk.GetArrayFromImage(sitk.ReadImage(str(first / FILES["image"]))))  # kept
    assert main(["synth", str(path), "-o", str(out), "--seed", "3", "--force"]) == 0
    assert np.array_equal(image, sitk.GetArrayFromImage(sitk.ReadImage(str(first / FILES["image"]))))  # same seed
    assert sorted(p.name for p in out.iterdir()) == folders


def test_refuses_a_map_missing_a_structure_before_writing(tmp_path, capsys):
    good = write_toy(tmp_path / "a", toy_map())
    lab = toy_map()
    lab[lab == 17] = 2
    bad = write_toy(tmp_path / "b", lab, "bad_seg")
    out = tmp_path / "subjects"
    assert main(["synth", str(good), str(bad), "-o", str(out), "--priors", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "lacks 1 of the 31 structures (17 Left-Hippocampus)" in err and str(bad) in err
    assert not out.exists() or not any(out.iterdir())  # the good map was not written either


def test_refuses_unknown_labels_and_missing_priors(tmp_path, capsys):
    lab = toy_map()
    lab[2, 2, 2] = 99
    with pytest.raises(InputError, match=r"label values \[99\] outside SynthSeg's generation labels"):
        check_label_map(lab)
    path = write_toy(tmp_path / "m", toy_map())
    (tmp_path / "m" / "prior_means_t1.npy").unlink()
    assert main(["synth", str(path), "-o", str(tmp_path / "o")]) == 2
    assert "cannot read the T1 priors" in capsys.readouterr().err
    assert main(["synth", str(path), str(path), "-o", str(tmp_path / "o")]) == 2
    assert "label maps with the same name: toy_seg" in capsys.readouterr().err
    assert main(["synth", str(path), "-o", str(tmp_path / "o"), "--copies", "0"]) == 2
