"""Where the tests find the repository's resources and the project's real data."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "Resources" / "Sample"
WEIGHTS_2D = ROOT / "Resources" / "Weights" / "metaseg2d.safetensors"
SHARED_DATA = ROOT.parent / "shared" / "data" / "brains"  # ../shared/data/brains, read-only
SYNTHSEG_LABELS = ROOT.parent / "shared" / "data" / "synthseg-labels"  # SynthSeg's 20 label maps and T1 priors
WEIGHTS_3D = ROOT / "Resources" / "Weights" / "metaseg3d.safetensors"
SAMPLE_T1 = SAMPLE / "ecog_t1.nii.gz"  # ecog's skull-stripped T1 in its scanner geometry (uint8, 256^3)
SAMPLE_SEG = SAMPLE / "ecog_seg4.nii.gz"  # its reference labels on the same grid


def small_fitted_file(path: Path, mask: bool) -> Path:
    """A fitted-INR file of a tiny random network on a 40^3 1 mm grid (with an all-tissue mask or
    none): real file format and geometry for reslice cases, no fit needed."""
    import numpy as np
    import torch

    from metaseg.method.config import ModelConfig
    from metaseg.method.fit import FittedINR
    from metaseg.space.fitted import FittedVolume
    from metaseg.method.model import MetaSegNet

    torch.manual_seed(0)
    net = MetaSegNet(ModelConfig(in_dim=3, width=8, hidden_layers=1))
    ref = {"size": [40, 40, 40], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
           "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    m = np.diag([2 / 39, 2 / 39, 2 / 39, 1.0])
    m[:3, 3] = -1.0
    FittedVolume(FittedINR(net, dict(net.named_parameters())), m, np.ones((40, 40, 40), bool) if mask else None,
                 {"reference": ref}).save(path)
    return path
