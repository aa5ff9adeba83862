"""A small pure-numpy reader of FreeSurfer .mgz / .mgh volumes, returning a SimpleITK image.

SimpleITK has no MGH reader and nibabel is not a dependency. The format is a 284-byte
big-endian header followed by the voxels (x fastest), gzip-compressed for .mgz:

    int32 version, width, height, depth, nframes, type, dof
    int16 goodRASflag
    float32 spacing[3], Mdc[9] (x_r x_a x_s  y_r y_a y_s  z_r z_a z_s), c_ras[3]

The voxel-to-RAS matrix is M = Mdc * diag(spacing) (Mdc's triplets are the columns), with
origin P0 = c_ras - M @ (dims / 2). MGH geometry is RAS; ITK is LPS, so the first two
rows of the direction and origin change sign.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Tuple

import numpy as np
import SimpleITK as sitk

HEADER_BYTES = 284
# A 0.25 mm whole-head volume has ~1e9 voxels; a header claiming more is corrupt, and reading it would end in
# a MemoryError (a 10^12-voxel header was tried) instead of a message.
MAX_VOXELS = 2**31
# MGH type code -> big-endian numpy dtype
MGH_TYPES = {0: ">u1", 1: ">i4", 3: ">f4", 4: ">i2"}
MGH_TYPE_NAMES = {0: "uchar", 1: "int", 3: "float", 4: "short"}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# FreeSurfer's geometry when goodRASflag is 0: coronal (LIA) 1 mm, centred on RAS 0
DEFAULT_MDC = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T


class MGHError(ValueError):
    """The file is not an MGH/MGZ volume this reader supports; the message says why."""


def read_mgh(path: Path) -> sitk.Image:
    """Read a single-frame .mgz (gzip) or .mgh volume as a SimpleITK image in LPS geometry."""
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith((".mgz", ".gz")) else open
    try:
        with opener(path, "rb") as f:
            header = f.read(HEADER_BYTES)
            dims, dtype, spacing, mdc, c_ras = _parse_header(header, path)
            count = int(np.prod(dims))
            raw = f.read(count * np.dtype(dtype).itemsize)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MGHError(f"{path}: cannot read as MGH/MGZ ({e})") from e
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise MGHError(f"{path}: truncated voxel data ({len(raw)} bytes, expected {count * np.dtype(dtype).itemsize})")
    # x fastest on disk == C order (z, y, x), SimpleITK's array order
    arr = np.frombuffer(raw, dtype=dtype).reshape(dims[::-1]).astype(np.dtype(dtype).newbyteorder("="))
    img = sitk.GetImageFromArray(arr)
    direction, origin = mgh_geometry_lps(dims, spacing, mdc, c_ras)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    img.SetOrigin(tuple(float(v) for v in origin))
    return img


def mgh_geometry_lps(
    dims: Tuple[int, int, int], spacing: np.ndarray, mdc: np.ndarray, c_ras: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """ITK direction (3x3, columns = voxel axes) and origin (LPS mm of voxel 0) of an MGH header."""
    m = mdc * np.asarray(spacing, dtype=np.float64)[None, :]
    p0 = np.asarray(c_ras, dtype=np.float64) - m @ (np.asarray(dims, dtype=np.float64) / 2.0)
    return RAS_TO_LPS @ mdc, RAS_TO_LPS @ p0


def _parse_header(header: bytes, path: Path):
    if len(header) < HEADER_BYTES:
        raise MGHError(f"{path}: file too short for an MGH header ({len(header)} bytes, expected {HEADER_BYTES})")
    version, width, height, depth, nframes, type_code, _dof = struct.unpack(">7i", header[:28])
    if version != 1:
        raise MGHError(f"{path}: not an MGH file (version field {version}, expected 1)")
    dims = (width, height, depth)
    if min(dims) < 1:
        raise MGHError(f"{path}: invalid dimensions {dims}")
    if width * height * depth > MAX_VOXELS:
        raise MGHError(f"{path}: its header claims {width}x{height}x{depth} = {width * height * depth:.3g} voxels, more "
                       f"than any MRI volume (at most {MAX_VOXELS:.3g} are read): the header is corrupt or this is not "
                       "an MGH/MGZ volume")
    if nframes != 1:
        raise MGHError(
            f"{path}: has {nframes} frames (4D); expected a single-frame 3D volume — extract one frame first"
        )
    if type_code not in MGH_TYPES:
        known = ", ".join(f"{k} ({v})" for k, v in MGH_TYPE_NAMES.items())
        raise MGHError(f"{path}: unsupported MGH voxel type {type_code}; supported: {known}")
    (good_ras,) = struct.unpack(">h", header[28:30])
    if good_ras > 0:
        spacing = np.array(struct.unpack(">3f", header[30:42]), dtype=np.float64)
        mdc = np.array(struct.unpack(">9f", header[42:78]), dtype=np.float64).reshape(3, 3).T
        c_ras = np.array(struct.unpack(">3f", header[78:90]), dtype=np.float64)
        if not np.all(np.isfinite(spacing)) or spacing.min() <= 0 or abs(abs(np.linalg.det(mdc)) - 1.0) > 1e-3:
            raise MGHError(f"{path}: invalid geometry in the header (spacing {tuple(spacing)}, direction det "
                           f"{np.linalg.det(mdc):.3f})")
    else:  # FreeSurfer's defaults for files without a valid RAS block
        spacing, mdc, c_ras = np.ones(3), DEFAULT_MDC.copy(), np.zeros(3)
    return dims, MGH_TYPES[type_code], spacing, mdc, c_ras
