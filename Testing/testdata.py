"""Where the tests find the repository's resources and the project's real data."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "Resources" / "Sample"
WEIGHTS_2D = ROOT / "Resources" / "Weights" / "metaseg2d.pt"
SHARED_DATA = ROOT.parent / "shared" / "data" / "brains"  # ../shared/data/brains, read-only
