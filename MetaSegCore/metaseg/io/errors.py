"""The error of a refused input, and the input formats its messages name: below the readers, so that every reader
(dicom.py among them) can raise it without importing readers.py."""
from __future__ import annotations

from typing import Optional

INPUT_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), FreeSurfer (.mgz, .mgh), " \
    "a DICOM series folder"


class InputError(ValueError):
    """The input is missing, unreadable or not an image this model can segment; the message says why.

    The message is the command line's (it may name options such as --mask). A refusal that a program
    words for its own users (the Slicer panel) also carries `reason`, a stable name of what was refused,
    and `facts`, the numbers the message quotes; `metaseg segment --progress json` sends both with its
    error event. The reasons: see REASONS in progress.py.
    """

    def __init__(self, message: str, reason: Optional[str] = None, **facts):
        super().__init__(message)
        self.reason = reason
        self.facts = facts
