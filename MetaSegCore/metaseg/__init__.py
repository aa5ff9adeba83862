"""MetaSeg: segment brain MRI by fitting only its pixels (Vyas et al., MICCAI 2025).

    import metaseg
    seg = metaseg.segment("scan.nii.gz")          # a path, SimpleITK image, nibabel image or numpy array
    seg.labels, seg.volumes, seg.warnings          # labels on the scan's grid (LPS mm), mL per tissue
    seg.save("labels.nii.gz", seg_nrrd="labels.seg.nrrd")

`Segmenter` loads the model once for many images; `reslice` and `standard_plane` draw planes of a fitted
3D network. Errors a caller may catch: InputError (the input or an argument; the command line's message),
WeightsError, OutputExistsError (a file appeared meanwhile), Cancelled.
"""
from .version import __version__

# Imported here, not on first use: `metaseg.segment` and `metaseg.reslice` are the functions (their modules are
# method/segment.py and space/reslice.py). The folders and what each may import: README.md, "Layout".
from .io.atomic import OutputExistsError  # noqa: E402
from .method.fit import FitCancelled as Cancelled  # noqa: E402
from .space.fitted import FittedVolume  # noqa: E402
from .io.readers import InputError  # noqa: E402
from .options import Outputs, SegmentOptions  # noqa: E402
from .space.reslice import Plane, reslice, standard_plane  # noqa: E402
from .segmentation import Segmentation  # noqa: E402
from .segmenter import Segmenter, segment  # noqa: E402
from .method.weights import WeightsError  # noqa: E402

__all__ = ["__version__", "segment", "Segmenter", "Segmentation", "SegmentOptions", "Outputs", "reslice",
           "standard_plane", "Plane", "FittedVolume", "InputError", "WeightsError", "OutputExistsError", "Cancelled"]
