"""The fitted 3D network of a result, kept in the scene as text so that File > Save keeps it.

MRML has no node for an arbitrary binary file; a `vtkMRMLTextNode` with a storage node
(`ForceCreateStorageNode = CreateStorageNodeAlways`) is written by Slicer's scene writer (and
`vtkMRMLScene.WriteToMRB`) as a `.txt` file beside the scene and read back on load. Its text
is `encode(path)`: a small JSON header (format, sha256, file name) and the `.pt` file in base64.
`materialize` turns it back into a `.pt` file with the `.sha256` sidecar the core checks, in a
session folder, decoding and checking the scene's own text every time. No Qt, no MRML here.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

FORMAT = "metaseg-fitted-network/1"
# The most text a kept network may hold: the core refuses fitted files over 128 MiB (metaseg/file_limits.py), whose
# base64 is 4/3 as long; a larger text (e.g. a scene padded with junk) is refused before it is decoded.
MAX_TEXT_CHARS = (128 << 20) * 4 // 3 + 4096


class FittedError(ValueError):
    """The kept text does not hold a usable fitted network."""


def encode(path: Path) -> str:
    """The fitted network file (with its `.sha256` sidecar) as text."""
    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    side = Path(str(path) + ".sha256")
    if side.is_file() and side.read_text(encoding="utf-8").split()[0] != digest:
        raise FittedError(f"{path} does not match its .sha256")
    header = {"format": FORMAT, "sha256": digest, "name": path.name, "bytes": len(data)}
    return json.dumps(header) + "\n" + base64.b64encode(data).decode("ascii")


def header(text: str) -> dict:
    """The JSON header of `encode`'s text (FittedError if it is not one)."""
    first = (text or "").split("\n", 1)[0]
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT or not _is_sha256(head.get("sha256")):
        raise FittedError("the text is not a MetaSeg fitted network")
    return head


def _is_sha256(value: object) -> bool:
    """64 hexadecimal digits: the only header value that becomes part of a file name."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())


def materialize(text: str, folder: Path) -> Path:
    """Write the network held in `text` to `folder/<sha256>.pt` (+ `.sha256`) and return the file. The data is
    decoded from `text` and checked against the header's hash on every call: a file already there is reused only
    if its bytes are exactly these (a header that repeats another network's hash gets no file of another scene)."""
    if len(text or "") > MAX_TEXT_CHARS:
        raise FittedError(f"the kept network is {len(text) / 2**20:.0f} MB of text, more than any MetaSeg network "
                          f"({MAX_TEXT_CHARS / 2**20:.0f} MB): the scene was changed; segment the scan again")
    head = header(text)
    digest = head["sha256"].lower()
    target = Path(folder) / f"{digest[:16]}.pt"
    side = Path(str(target) + ".sha256")
    try:
        data = base64.b64decode(text.split("\n", 1)[1], validate=True)
    except (IndexError, binascii.Error) as e:
        raise FittedError(f"the network's data is not valid base64 ({e})") from e
    if hashlib.sha256(data).hexdigest() != digest:
        raise FittedError("the network's data does not match its sha256 (the file was changed or truncated)")
    if target.is_file() and side.is_file() and target.read_bytes() == data:
        return target
    Path(folder).mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    side.write_text(f"{digest}  {target.name}\n", encoding="utf-8")
    return target
