"""The fitted 3D network of a result, kept in the scene as an attribute of its segmentation node.

Where it is kept, and why (Slicer's source, cited by file:line@tag; Testing/slicer/test_slicer_save_rules.py
follows each version's rules):
- The network is the text of the segmentation node's attribute `MetaSeg.FittedNetwork.safetensors` (see
  MetaSeg.py): a `metaseg-fitted/2` file (a safetensors file, ~1.6 MB for a 3D result of the bundled scan)
  as base85 text in an alphabet the scene file keeps verbatim (`encode_bytes`; earlier versions' base64 text
  is still read). Node attributes are written into the scene file itself by vtkMRMLNode::WriteXML
  (Libs/MRML/Core/vtkMRMLNode.cxx:495@v5.6.2, :565@v5.8.1, :685@v5.10.0) and read back by
  ReadXMLAttributes (:381@v5.6.2, :409@v5.8.1, :416@v5.10.0). The scene file is what every version's
  File > Save writes: as .mrml, qSlicerSceneWriter::writeToMRML calls vtkMRMLScene::Commit
  (Modules/Loadable/Data/qSlicerSceneWriter.cxx:145@v5.6.2, @v5.8.1, @v5.10.0); as .mrb, writeToMRB calls
  vtkMRMLScene::WriteToMRB (:190@v5.6.2, :190@v5.8.1, :189@v5.10.0), which writes the bundle's scene file
  with the same Commit (Libs/MRML/Core/vtkMRMLScene.cxx:3910 and :4321@v5.6.2, :3949 and :4359@v5.8.1,
  :3989 and :4379@v5.10.0). No storage node and no separate file are involved, so none of the save dialog's per-node rules
  apply: not the skipping of hidden nodes on 5.6.2 and 5.8.1 (qSlicerSaveDataDialog.cxx:400@v5.6.2,
  :408@v5.8.1), not the `Private/<node name>.<ext>` files written without an overwrite check on 5.10.0
  (qSlicerSaveDataDialog.cxx:869-976@v5.10.0, the folder at :931), not the per-scene `_Private` folder of
  5.12+. The network goes exactly where the result's other attributes (the cross-section info) go.
- It is removed with its segmentation node (it is part of it), copied with it when the node is cloned,
  and replaced when a new run writes into the same node.
- Earlier versions kept a base64 PyTorch pickle in a hidden text node written as `.txt` by a storage node
  (format "metaseg-fitted-network/1"); such text is refused, never decoded into a loadable file.

Nothing here trusts the scene: a scene is a file people share. The text is decoded (strict base64, size
bounded), refused if it is a pickle, and written to `<folder>/<sha256 of its bytes>.safetensors` (the file
name is computed here, never taken from the scene) with the `.sha256` the core's loader expects. The core
then reads it as safetensors, which cannot run code, and checks every tensor's shape, the configuration's
bounds and the declared sizes of the compressed parts. No Qt, no MRML here.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

FORMAT = "metaseg-fitted/2"  # the core's fitted-network file format (metaseg.space.fitted.FORMAT)
LEGACY_FORMAT = "metaseg-fitted-network/1"  # text of metaseg <= 0.4.0: a base64 PyTorch pickle
MAX_BYTES = 64 << 20  # a kept network larger than this is refused (a 3D result is ~2 MB)
LEGACY_MESSAGE = ("this result was made by an older MetaSeg, which kept its fitted network as a PyTorch pickle; "
                  "MetaSeg no longer opens those, since opening one can run any code it holds: segment the scan "
                  "again to render cross-sections")


class FittedError(ValueError):
    """The kept text does not hold a usable fitted network."""


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _looks_like_pickle(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


# The attribute text: TEXT_PREFIX, then base85 (5 characters per 4 bytes; base64 takes 6 per 4.5) in Python's
# alphabet with the five characters that a scene file would escape swapped for five it keeps as they are: Slicer
# writes an attribute's value with % and ; percent-encoded and & < > " ' as XML entities (vtkMRMLNode::WriteXML
# and XMLAttributeEncodeString, Libs/MRML/Core/vtkMRMLNode.cxx:507-508 and :1031-1041@v5.6.2, :577-578 and
# :1124-1134@v5.8.1, :697-698 and :1251-1261@v5.10.0), which would lengthen the text. Every character of the
# text is written to the scene file as one byte.
TEXT_PREFIX = "metaseg-b85:"  # ':' is no base64 character: a base64 text (earlier versions) never starts so
_ESCAPED, _KEPT = b"%&;<>", b",./[]"  # Python's b85 characters the scene would escape, and their stand-ins
_TO_TEXT = bytes.maketrans(_ESCAPED, _KEPT)
_FROM_TEXT = bytes.maketrans(_KEPT, _ESCAPED)


def encode_bytes(data: bytes) -> str:
    """A fitted network file's bytes as the attribute text (TEXT_PREFIX and scene-safe base85, one line)."""
    if not _looks_like_safetensors(data):
        raise FittedError("the fitted network is not a safetensors file")
    if len(data) > MAX_BYTES:
        raise FittedError(f"the fitted network has {len(data):,} bytes, more than {MAX_BYTES:,}")
    return TEXT_PREFIX + base64.b85encode(data).translate(_TO_TEXT).decode("ascii")


def encode(path: Path) -> str:
    """The fitted network file written by `metaseg segment --save-inr` as the attribute text."""
    return encode_bytes(Path(path).read_bytes())


def is_legacy(text: str) -> bool:
    """Text kept by metaseg <= 0.4.0 (a JSON header line, then a base64 pickle)."""
    return (text or "").lstrip().startswith("{") and LEGACY_FORMAT in (text or "").split("\n", 1)[0]


def decode(text: str) -> bytes:
    """The network file's bytes held in `text` (FittedError saying what is wrong; a pickle is never returned)."""
    if is_legacy(text):
        raise FittedError(LEGACY_MESSAGE)
    text = (text or "").strip()
    if not text:
        raise FittedError("the segmentation keeps no fitted network")
    if len(text) > MAX_BYTES * 4 // 3 + 4 + len(TEXT_PREFIX):
        raise FittedError(f"the kept network has {len(text):,} characters, more than a fitted network can have")
    if text.startswith(TEXT_PREFIX):  # this version's text
        body = text[len(TEXT_PREFIX):]
        try:
            raw = body.encode("ascii")
            if any(c in raw for c in _ESCAPED):  # strict: only the text's alphabet
                raise ValueError("characters outside its alphabet")
            data = base64.b85decode(raw.translate(_FROM_TEXT))
        except (UnicodeEncodeError, ValueError) as e:
            raise FittedError(f"the kept network is not valid base85 text ({e})") from None
    else:  # the text of MetaSeg 0.5 (base64): still read
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise FittedError(f"the kept network is not valid base64 ({e})") from None
    if _looks_like_pickle(data) and not _looks_like_safetensors(data):
        raise FittedError(LEGACY_MESSAGE)
    if not _looks_like_safetensors(data):
        raise FittedError("the kept text is not a MetaSeg fitted network (not a safetensors file)")
    return data


def materialize(text: str, folder: Path) -> Path:
    """Write the network held in `text` to `folder/<sha256>.safetensors` (+ `.sha256`), unless already there.
    The name is the hash of the decoded bytes, computed here. Returns the file."""
    data = decode(text)
    digest = hashlib.sha256(data).hexdigest()
    target = Path(folder) / f"{digest[:32]}.safetensors"
    side = Path(str(target) + ".sha256")
    if target.is_file() and side.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
        return target
    Path(folder).mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    side.write_text(f"{digest}  {target.name}\n", encoding="utf-8")
    return target


MAX_LABEL = 255  # labels are 8-bit (the core writes uint8 labelmaps): a colour table has at most 256 entries


def label_table(labels) -> list:
    """A result's labels as read from the scene, checked before they size a colour table: a list of
    {"value": int 0..255, "name": str, "color": [r, g, b] in 0..1}, each value once (FittedError otherwise)."""
    if not isinstance(labels, list) or len(labels) > MAX_LABEL + 1:
        raise FittedError("the result's label table is not a list of at most 256 labels")
    out, seen = [], set()
    for lab in labels:
        value = lab.get("value") if isinstance(lab, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LABEL or value in seen:
            raise FittedError(f"the result's label table has the value {value!r}: labels are 0..{MAX_LABEL}, each once")
        name, color = lab.get("name"), lab.get("color")
        if not isinstance(name, str) or len(name) > 256:
            raise FittedError(f"the result's label {value} has no proper name")
        if not (isinstance(color, list) and len(color) == 3 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c <= 1.0 for c in color)):
            raise FittedError(f"the result's label {value} has the colour {color!r}, not three numbers in 0..1")
        seen.add(value)
        out.append({"value": value, "name": name, "color": [float(c) for c in color]})
    return out


def read_info(text) -> dict:
    """The cross-section info kept with a result (MetaSeg.FittedInfo), checked: a JSON object whose labels
    pass `label_table`, spacing three positive numbers, size three counts, toNetwork a 4x4 matrix."""
    import json
    import math

    try:
        info = json.loads(text or "{}")
    except ValueError as e:
        raise FittedError(f"the result's cross-section info is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise FittedError("the result's cross-section info is not a JSON object")

    def numbers(key, n, ok):
        v = info.get(key)
        flat = [x for row in v for x in (row if isinstance(row, list) else [row])] if isinstance(v, list) else None
        if flat is None or len(flat) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and ok(x) for x in flat):
            raise FittedError(f"the result's cross-section info has a malformed {key!r}")

    if "labels" in info:
        info["labels"] = label_table(info["labels"])
    if "spacing" in info:
        numbers("spacing", 3, lambda x: 0 < x < 1e4)
    if "size" in info:
        numbers("size", 3, lambda x: 1 <= x <= 1e5)
    if "toNetwork" in info:
        numbers("toNetwork", 16, lambda x: abs(x) < 1e9)
    return info
