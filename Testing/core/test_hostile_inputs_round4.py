"""Issue 26: hostile inputs, fourth round. One test per class of problem; every refusal exits 2 with one message,
no traceback and nothing written; every warning reaches the report and the terminal. Real files throughout (the
bundled sample, SimpleITK / nibabel writers); the cases stop before any fit unless they say otherwise."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_hostile_inputs import files_in, run
from testdata import SAMPLE_T1, small_fitted_file


# ---- failures: numbers that overflow, units that shrink a head to a micron ----

def test_a_plane_too_large_to_count_is_refused_before_any_conversion(tmp_path, capsys):
    fitted = small_fitted_file(tmp_path / "f.pt", mask=True)
    for extent, spacing in (("1e308", "1e-10"), ("1e308", "1"), ("1e5", "1e-300")):
        rc, err = run(["reslice", fitted, "-o", tmp_path / "out" / "p.nii.gz", "--extent", extent, "--spacing", spacing],
                      capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and "use a larger --spacing or a smaller --extent" in err, err
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("unit, voxel", [("micron", "0.001 x 0.001 x 0.001 mm"), ("meter", "1e+03 x 1e+03 x 1e+03 mm")])
def test_nifti_units_other_than_mm_are_named_with_the_voxel_size_they_give(unit, voxel, tmp_path, capsys):
    src = nib.load(str(SAMPLE_T1))
    header = src.header.copy()
    header.set_xyzt_units(unit)
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, header), str(path))
    rc, err = run(["segment", path, "-o", tmp_path / "out" / "l.nii.gz"], capsys)
    assert rc == 2 and voxel in err and ("microns" if unit == "micron" else "metres") in err, err
    assert "set_xyzt_units('mm')" in err and "Traceback" not in err
    assert files_in(tmp_path / "out") == []


def test_metres_that_give_1_mm_voxels_are_read_as_the_standard_says(tmp_path):
    """pixdim 0.001 in metres is a 1 mm voxel: nothing to refuse."""
    from metaseg.io import image_dims, read_image

    src = nib.load(str(SAMPLE_T1))
    header = src.header.copy()
    header.set_xyzt_units("meter")
    affine = src.affine.copy()
    affine[:3] /= 1000.0
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), affine, header), str(tmp_path / "m.nii.gz"))
    img = read_image(tmp_path / "m.nii.gz")
    assert np.allclose(img.GetSpacing(), 1.0, atol=1e-3) and image_dims(img) == 3
