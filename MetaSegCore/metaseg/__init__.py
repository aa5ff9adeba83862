"""MetaSeg: segment brain MRI by fitting only its pixels (Vyas et al., MICCAI 2025).

    import metaseg
    seg = metaseg.segment("scan.nii.gz")          # a path, SimpleITK image, nibabel image or numpy array
    seg.labels, seg.volumes, seg.warnings          # labels on the scan's grid (LPS mm), mL per tissue
    seg.save("labels.nii.gz", seg_nrrd="labels.seg.nrrd")

`Segmenter` loads the model once for many images; `reslice` and `standard_plane` draw planes of a fitted
3D network. The names are imported on first use, so `import metaseg` alone loads neither torch nor SimpleITK.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.1"

# public name -> the module that defines it
_EXPORTS = {
    "segment": "segmenter", "Segmenter": "segmenter", "Segmentation": "segmentation",
    "SegmentOptions": "options", "Outputs": "options",
    "reslice": "reslice", "standard_plane": "reslice", "Plane": "reslice", "FittedVolume": "fitted",
    "InputError": "io", "WeightsError": "weights", "OutputExistsError": "atomic", "Cancelled": "fit",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .atomic import OutputExistsError
    from .fit import FitCancelled as Cancelled
    from .fitted import FittedVolume
    from .io import InputError
    from .options import Outputs, SegmentOptions
    from .reslice import Plane, reslice, standard_plane
    from .segmentation import Segmentation
    from .segmenter import Segmenter, segment
    from .weights import WeightsError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metaseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), "FitCancelled" if name == "Cancelled" else name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list:
    return sorted(__all__)
