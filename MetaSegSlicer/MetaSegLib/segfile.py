"""Stable segment IDs for the core's `.seg.nrrd`: each segment's ID becomes its name.

Slicer keeps a segment's ID from the file (`SegmentN_ID` in the NRRD header). Naming the IDs
after the segments (as TotalSegmentator does) makes them the same on every run over the same
input, whatever the core or slicerio chose, so scripts can use `GetSegment("White matter")`.
Only header lines change; the (possibly compressed) voxel data is copied byte for byte.
No Qt, no MRML here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

_FIELD = re.compile(rb"^Segment(\d+)_(ID|Name):=(.*)$")


def name_ids(path: Path) -> List[str]:
    """Rewrite the segment IDs of a `.seg.nrrd` (attached header) to the segments' names; returns
    the IDs in segment order. A segment without a name, or whose name an earlier one took, keeps its ID."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"\n\n")
    if not data.startswith(b"NRRD") or end < 0:
        raise ValueError(f"{path} is not an NRRD file with an attached header")
    lines = data[:end].split(b"\n")
    names: Dict[int, bytes] = {}
    ids: Dict[int, int] = {}  # segment index -> line index of its ID
    for i, line in enumerate(lines):
        m = _FIELD.match(line)
        if m and m.group(2) == b"Name":
            names[int(m.group(1))] = m.group(3).strip()
        elif m:
            ids[int(m.group(1))] = i
    taken = set()
    result = []
    for index in sorted(ids):
        line_no = ids[index]
        name = names.get(index, b"")
        if name and name not in taken:
            lines[line_no] = b"Segment%d_ID:=" % index + name
        taken.add(_FIELD.match(lines[line_no]).group(3).strip())
        result.append(_FIELD.match(lines[line_no]).group(3).strip().decode("utf-8"))
    path.write_bytes(b"\n".join(lines) + data[end:])
    return result
