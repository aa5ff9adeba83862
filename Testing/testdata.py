"""Where the tests find the repository's resources and the project's real data."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "Resources" / "Sample"
WEIGHTS_2D = ROOT / "Resources" / "Weights" / "metaseg2d.pt"
SHARED_DATA = ROOT.parent / "shared" / "data" / "brains"  # ../shared/data/brains, read-only
WEIGHTS_3D = ROOT / "Resources" / "Weights" / "metaseg3d.pt"
SAMPLE_T1 = SAMPLE / "ecog_t1.nii.gz"  # ecog's skull-stripped T1 in its scanner geometry (uint8, 256^3)
SAMPLE_SEG = SAMPLE / "ecog_seg4.nii.gz"  # its reference labels on the same grid
