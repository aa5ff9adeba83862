"""Tensor files that cannot run code: safetensors (raw tensors and a JSON header), never a pickle.

Every file MetaSeg reads or writes that holds tensors (shipped weights, fitted networks, training
checkpoints) is a safetensors file: 8 bytes giving the header's length, a JSON header (each tensor's
dtype, shape and byte range, plus a `__metadata__` table of strings), then the raw tensor bytes.
Reading one parses JSON and copies bytes; nothing in it is executed, whatever the file holds (the
`safetensors` package's Rust parser also checks that the byte ranges tile the data exactly). MetaSeg's
own metadata (format name, model card, configuration) is JSON in `__metadata__`, so one file and
one sha256 cover tensors and metadata together.

A PyTorch `.pt` file is a pickle: loading it can run any code, and `torch.load(weights_only=True)`
does not prevent that on every torch MetaSeg accepts (CVE-2025-32434, torch < 2.6). Such a file is
recognized by its first bytes and refused with a one-line message saying how to convert it
(`metaseg convert-weights`, metaseg/train/legacy.py); it is never unpickled here.

Nested structures (an optimizer's state in a training checkpoint) are stored as a tree: the tensors
flat, the structure as tagged JSON in the metadata (`dumps_tree`, `loads_tree`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

SUFFIX = ".safetensors"
MAX_HEADER = 64 << 20  # bytes of JSON header accepted (the metadata of a MetaSeg file is a few kB)
CONVERT_HINT = "metaseg convert-weights"


class WeightsError(ValueError):
    """A weights or fitted-network file is missing, corrupt, tampered with or of an unknown format."""


class PickleRefused(WeightsError):
    """The file is a PyTorch pickle (.pt): refused without being unpickled."""


def converted_name(path: Path) -> Path:
    """Where `metaseg convert-weights` would put the converted copy of a `.pt` file."""
    path = Path(path)
    return path.with_name(path.name[: -len(".pt")] + SUFFIX) if path.name.endswith(".pt") else \
        path.with_name(path.name + SUFFIX)


def pickle_message(source: Any, what: str = "weights") -> str:
    """The one-line refusal of a pickle file, with the command that converts it."""
    path = Path(str(source))
    return (f"{source} is a PyTorch pickle file (.pt) of an older MetaSeg; MetaSeg no longer opens pickle files, "
            f"since opening one can run any code it holds: convert the {what} once with "
            f"`{CONVERT_HINT} {path} {converted_name(path)}` (add --sha256 HASH for a file MetaSeg did not ship)")


def looks_like_pickle(data: bytes) -> bool:
    """The first bytes of a `torch.save` file: a zip archive (torch >= 1.6) or a bare pickle (protocol >= 2)."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def _header_length(data: bytes) -> Optional[int]:
    """The JSON header's length if `data` starts like a safetensors file, else None."""
    if len(data) < 10:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > MAX_HEADER or 8 + n > len(data) or data[8:9] != b"{":
        return None
    return n


def read_bytes(path: Path, what: str, limit: int) -> bytes:
    """The whole file (hashed and parsed from these same bytes, so a file changed meanwhile cannot slip through)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if size > limit:
        raise WeightsError(f"{path} has {size:,} bytes; a MetaSeg {what} file has at most {limit:,}")
    return path.read_bytes()


def check_not_pickle(data: bytes, source: Any, what: str = "weights") -> None:
    """PickleRefused if `data` is a PyTorch pickle; nothing is unpickled."""
    if _header_length(data) is None and looks_like_pickle(data):
        raise PickleRefused(pickle_message(source, what))


def dumps(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """A safetensors file's bytes: the tensors (copied to CPU, contiguous, unshared) and string metadata."""
    from safetensors.torch import save

    flat = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise TypeError(f"{name}: complex tensors cannot be stored")
        flat[name] = t.detach().to("cpu").contiguous().clone()  # clone: tensors sharing memory are allowed in
    return save(flat, metadata={str(k): str(v) for k, v in metadata.items()})


def loads(data: bytes, source: Any, what: str = "weights") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a safetensors file's bytes; WeightsError (PickleRefused for a pickle) otherwise."""
    check_not_pickle(data, source, what)
    n = _header_length(data)
    if n is None:
        raise WeightsError(f"{source} is not a MetaSeg {what} file (not a safetensors file)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("its metadata is not a table of strings")
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{source} is not a MetaSeg {what} file (unreadable header: {e})") from None
    try:
        from safetensors.torch import load
    except ImportError as e:
        raise WeightsError(f"reading {source} needs the Python package safetensors: pip install safetensors ({e})") \
            from None
    try:
        tensors = load(bytes(data))
    except Exception as e:  # noqa: BLE001 (the parser's own errors: offsets, dtypes, truncation)
        raise WeightsError(f"{source} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return tensors, dict(metadata)


def metadata_json(metadata: Dict[str, str], key: str, source: Any, what: str) -> Any:
    """A JSON value of the metadata table (WeightsError naming the key if absent or not JSON)."""
    if key not in metadata:
        raise WeightsError(f"{source} is not a complete MetaSeg {what} file (no {key!r} in its metadata)")
    try:
        return json.loads(metadata[key])
    except ValueError as e:
        raise WeightsError(f"{source}: its {key!r} metadata is not JSON ({e})") from None


# --- trees: nested dicts, lists, tuples of tensors and plain values (training checkpoints) ---

def dumps_tree(obj: Any, fmt: str) -> bytes:
    """A safetensors file holding `obj` (dicts with str/int keys, lists, tuples, tensors, str, int, float,
    bool, None), its structure as tagged JSON in the metadata under "tree", its format under "format"."""
    tensors: Dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x
            return {"T": key}
        if isinstance(x, bool):
            return {"B": x}
        if isinstance(x, int):
            return {"I": x}
        if isinstance(x, float):
            return {"F": x if math.isfinite(x) else repr(x)}
        if isinstance(x, str):
            return {"S": x}
        if x is None:
            return {"N": 0}
        if isinstance(x, dict):
            return {"D": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"L" if isinstance(x, list) else "U": [enc(v) for v in x]}
        raise TypeError(f"cannot store a {type(x).__name__} in a MetaSeg file")

    tree = enc(obj)
    return dumps(tensors, {"format": fmt, "tree": json.dumps(tree)})


def loads_tree(data: bytes, fmt: str, source: Any, what: str) -> Any:
    """The structure `dumps_tree` stored (WeightsError if the file is not of format `fmt`)."""
    tensors, metadata = loads(data, source, what)
    if metadata.get("format") != fmt:
        raise WeightsError(f"{source} is not a MetaSeg {what} file (format {metadata.get('format')!r}, expected {fmt!r})")
    tree = metadata_json(metadata, "tree", source, what)

    def dec(node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise ValueError("malformed tree node")
        (tag, v), = node.items()
        if tag == "T":
            return tensors[v]
        if tag in ("B", "I", "S"):
            if not isinstance(v, {"B": bool, "I": int, "S": str}[tag]):
                raise ValueError(f"a {tag} node holds {type(v).__name__}")
            return v
        if tag == "F":
            return float(v)
        if tag == "N":
            return None
        if tag == "D":
            return {dec(k): dec(x) for k, x in v}
        if tag in ("L", "U"):
            items = [dec(x) for x in v]
            return items if tag == "L" else tuple(items)
        raise ValueError(f"unknown tree tag {tag!r}")

    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{source} is damaged: its structure does not match its tensors ({e})") from None


def load_tree(path: Path, fmt: str, what: str, limit: int = 8 << 30) -> Any:
    """`loads_tree` of a file."""
    return loads_tree(read_bytes(path, what, limit), fmt, path, what)
