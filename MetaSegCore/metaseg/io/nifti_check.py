"""Is a NIfTI file whole? ITK reads a truncated `.nii`/`.nii.gz` without complaint and fills the
missing voxels with zeros, so a half-downloaded scan would be segmented as half a brain.

The check reads only the header's size fields and compares the voxel bytes it promises with what
the file holds: the file length for `.nii`, the complete gzip stream (its end-of-stream marker and
CRC included) for `.nii.gz`. NRRD, MetaImage and MGZ readers refuse truncated files themselves.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Tuple

import numpy as np

_CHUNK = 1 << 22


class TruncatedError(ValueError):
    """The file holds fewer voxel bytes than its header promises; the message says how many."""


def check_nifti_complete(path: Path) -> None:
    """Raise TruncatedError if a `.nii` / `.nii.gz` file is cut short; do nothing for other files
    or for headers this check does not understand (the image reader then judges them)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return  # not gzip at all: the image reader says it cannot read it
        try:
            with gzip.open(path, "rb") as f:
                need = _needed_bytes(f.read(540))
                have = 540 + _drain(f) if need is not None else None
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            raise TruncatedError(f"input {path} is truncated or corrupt: its gzip stream ends early or fails its "
                                 f"check ({e}); an interrupted download or copy? Get the complete file") from e
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            need = _needed_bytes(f.read(540))
        have = path.stat().st_size
    else:
        return
    if need is not None and have is not None and have < need:
        raise TruncatedError(f"input {path} is truncated: its header promises {need} bytes of header and voxels but "
                             f"the file holds {have} ({100.0 * have / need:.0f}%); an interrupted download or copy? "
                             "Get the complete file")


def _drain(f: BinaryIO) -> int:
    n = 0
    while True:
        block = f.read(_CHUNK)
        if not block:
            return n
        n += len(block)


def _needed_bytes(header: bytes) -> Optional[int]:
    """vox_offset + voxel bytes from a NIfTI-1 or NIfTI-2 header, or None if it is neither."""
    parsed = _parse(header)
    if parsed is None:
        return None
    offset, dims, bitpix = parsed
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or bitpix % 8 or offset < 0:
        return None
    count = 1
    for d in dims[1 : dims[0] + 1]:
        if d < 0:
            return None
        count *= max(int(d), 1)
    return int(offset) + count * bitpix // 8


def _parse(header: bytes) -> Optional[Tuple[int, tuple, int]]:
    """(vox_offset, dim[8], bitpix) in the header's own byte order."""
    if len(header) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            return max(offset, 348), dims, bitpix
        if size == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            return max(offset, 540), dims, bitpix
    return None


# NIfTI datatype codes of floating-point voxels (the only ones that can hold NaN/Inf) -> numpy type
_FLOAT_TYPES = {16: "f4", 64: "f8"}


def count_nonfinite_nifti(path: Path) -> int:
    """NaN/Inf voxels of a float `.nii`/`.nii.gz` (ITK's reader turns them into 0 without a word); 0 for
    other files and voxel types. Reads the voxels once more, in blocks (bounded memory)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return 0
    opener = gzip.open if name.endswith(".gz") else open
    try:
        return _count_nonfinite(path, opener)
    except (OSError, EOFError, zlib.error):  # not gzip, cut short...: the image reader then says what is wrong
        return 0


def _count_nonfinite(path: Path, opener) -> int:
    with opener(path, "rb") as f:
        header = f.read(540)
    kind = _datatype(header)
    parsed = _parse(header)
    if kind is None or parsed is None or kind[1] not in _FLOAT_TYPES:
        return 0
    dtype = np.dtype(kind[0] + _FLOAT_TYPES[kind[1]])
    bad, rest = 0, b""
    with opener(path, "rb") as f:
        f.seek(parsed[0])
        while True:
            block = f.read(_CHUNK)
            if not block:
                return bad
            block = rest + block
            usable = len(block) - len(block) % dtype.itemsize
            bad += int((~np.isfinite(np.frombuffer(block[:usable], dtype))).sum())
            rest = block[usable:]


def _datatype(header: bytes) -> Optional[Tuple[str, int]]:
    """(byte order, datatype code) of a NIfTI-1 or NIfTI-2 header."""
    if len(header) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:
            return endian, struct.unpack(endian + "h", header[70:72])[0]
        if size == 540 and len(header) >= 540:
            return endian, struct.unpack(endian + "h", header[12:14])[0]
    return None


# qform and sform may both be set and disagree (e.g. one edited by a tool, the other not): the brain then lies in
# one of two places, and ITK silently picks one. Beyond this distance (mm, at the volume's corners) the user hears which.
FORM_DISAGREEMENT_MM = 1.0


def nifti_forms(path: Path) -> Optional[Tuple[np.ndarray, np.ndarray, Tuple[int, int, int]]]:
    """(qform, sform) voxel -> RAS 4x4 matrices and the grid size of a NIfTI-1 file whose header sets both; else None."""
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            h = f.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(h) < 348:
        return None
    endian = next((e for e in "<>" if struct.unpack(e + "i", h[:4])[0] == 348), None)
    if endian is None:
        return None
    u = lambda fmt, at: struct.unpack(endian + fmt, h[at : at + struct.calcsize(endian + fmt)])  # noqa: E731
    qcode, scode = u("2h", 252)
    if qcode <= 0 or scode <= 0:
        return None
    dims = u("8h", 40)
    pix = u("8f", 76)
    b, c, d = u("3f", 256)
    a = float(np.sqrt(max(0.0, 1.0 - b * b - c * c - d * d)))
    r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if pix[0] < 0 else 1.0
    q = np.eye(4)
    q[:3, :3] = r @ np.diag([pix[1], pix[2], qfac * pix[3]])
    q[:3, 3] = u("3f", 268)
    s = np.eye(4)
    s[:3] = np.array(u("12f", 280)).reshape(3, 4)
    if not (np.isfinite(q).all() and np.isfinite(s).all()):
        return None
    return q, s, (max(1, dims[1]), max(1, dims[2]), max(1, dims[3]))


def corners(affine: np.ndarray, size: Tuple[int, int, int]) -> np.ndarray:
    """RAS positions (8, 3) of a grid's corner voxels under a voxel -> RAS matrix."""
    idx = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    return (idx @ affine.T)[:, :3]
