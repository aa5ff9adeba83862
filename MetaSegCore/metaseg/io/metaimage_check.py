"""Is a MetaImage (`.mha` / `.mhd`) whole? ITK refuses a cut-off one with "No such file or directory", even when
every file exists, so the user would look for a missing file instead of an interrupted copy.

The check reads the text header (its `key = value` lines up to `ElementDataFile`) and the size of the data it
names: the rest of the file for `LOCAL`, else the data file beside the header. Uncompressed data must hold
DimSize x channels x element bytes; compressed data (`CompressedData = True`) must be a complete zlib stream. A
header this check does not understand (file lists, patterns, unknown element types) is left to ITK.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

from .nifti_check import TruncatedError

ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                 "MET_DOUBLE": 8}
MAX_HEADER_BYTES = 1 << 16
_CHUNK = 1 << 22


def check_metaimage_complete(path: Path) -> None:
    """Raise TruncatedError if a `.mha`/`.mhd` file's data is missing or shorter than its header promises, naming
    the data file; do nothing for other files or headers this check does not understand."""
    path = Path(path)
    if not path.name.lower().endswith((".mha", ".mhd")):
        return
    parsed = _header(path)
    if parsed is None:
        return
    fields, header_end = parsed
    need = _data_bytes(fields)
    name = fields.get("ElementDataFile", "")
    if need is None or not name or name.upper() == "LIST" or "%" in name or " " in name:
        return
    local = name.upper() == "LOCAL"
    data = path if local else path.parent / name
    if not data.is_file():
        raise TruncatedError(f"input {path}: its header names the data file {name}, which is not in {path.parent}: "
                             "copy the data file together with the header")
    start = header_end if local else 0
    what = f"input {path}" + ("" if local else f" (its data file {name})")
    if fields.get("CompressedData", "False").lower() == "true":
        if not _complete_zlib(data, start):
            raise TruncatedError(f"{what} is truncated or corrupt: its compressed data ends early or fails to "
                                 "decompress; an interrupted download or copy? Get the complete files")
        return
    have = data.stat().st_size - start
    if have < need:
        raise TruncatedError(f"{what} is truncated: its header promises {need} bytes of voxels but "
                             f"{'the file' if local else 'the data file'} holds {have} ({100.0 * have / need:.0f}%); "
                             "an interrupted download or copy? Get the complete files")


def _header(path: Path) -> Optional[Tuple[Dict[str, str], int]]:
    """(key -> value of the header lines up to ElementDataFile, byte offset just after that line), or None."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    fields: Dict[str, str] = {}
    offset = 0
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
    return None


def _data_bytes(fields: Dict[str, str]) -> Optional[int]:
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        size = ELEMENT_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return None
    if not dims or min(dims) < 1:
        return None
    for d in dims:
        size *= d
    return size


def _complete_zlib(data: Path, start: int) -> bool:
    """Whether the file holds, from `start`, a zlib stream that decompresses to its end marker."""
    inflate = zlib.decompressobj()
    try:
        with open(data, "rb") as f:
            f.seek(start)
            while not inflate.eof:
                block = f.read(_CHUNK)
                if not block:
                    return False
                inflate.decompress(block, _CHUNK)
                while inflate.unconsumed_tail and not inflate.eof:
                    inflate.decompress(inflate.unconsumed_tail, _CHUNK)
    except zlib.error:
        return False
    return True
