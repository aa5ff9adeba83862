"""`metaseg convert-weights`: a trusted PyTorch pickle (.pt) of metaseg <= 0.4.0 to the safetensors format.

This is the only place where MetaSeg unpickles anything, and only on explicit request, for a file
whose sha256 is trusted before a byte of it is unpickled:
- the four weights files metaseg 0.4.0 shipped (their sha256, from the former
  Resources/Weights/*.pt.sha256, are in SHIPPED_PT below), or
- a file whose sha256 the user states (`--sha256 HASH`): e.g. a training run's metaseg.pt, whose hash
  the run printed and wrote to train.log, or a fitted INR whose hash its report recorded.
The bytes are read once, hashed, and unpickled from memory (`torch.load(weights_only=True)`), so the
file cannot be swapped between the check and the load. Weights, fitted INRs (`--save-inr`) and a
training run's best_stage1.pt / checkpoint.pt are converted.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..io.safefile import SUFFIX, WeightsError, dumps_tree, looks_like_pickle

# sha256 of the weights files shipped as torch.save pickles up to metaseg 0.4.0 (Resources/Weights/*.pt.sha256)
SHIPPED_PT: Dict[str, str] = {
    "98204aa2fb586fc3edcedca9b29e025149725dbb21fb0baca1e7b2a0e8947bf8": "metaseg2d.pt",
    "f93dee597655d6fc5ae157858a02b959a88886d4a7ebcdf2680d858fe1808cad": "metaseg2d_structures.pt",
    "03c37bd23e03e8759f17e282d417b46c854ff4761b25d293931c8693d1182c72": "metaseg3d.pt",
    "a011800f2b94350f027ce70359835a307d28848ea9b53f8b5de2b0538a0e334d": "metaseg3d_structures.pt",
}
STAGE1_FORMAT = "metaseg-stage1/1"  # a training run's best stage-1 state: {"net": state dict, "log_lr": tensor}
CHECKPOINT_FORMAT = "metaseg-checkpoint/1"  # a training run's resumable checkpoint (meta_train.py)


def trusted_bytes(path: Path, sha256: Optional[str]) -> bytes:
    """The file's bytes if their hash is a shipped file's or `sha256`; WeightsError otherwise (nothing unpickled)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None:
        if digest != sha256.strip().lower():
            raise WeightsError(f"{path} has sha256 {digest}, not the {sha256.strip()} given: it is not the file you "
                               "trust; nothing was converted")
    elif digest not in SHIPPED_PT:
        raise WeightsError(f"{path} (sha256 {digest}) is not one of the weights files MetaSeg shipped; if you trust it "
                           "(e.g. your own training run's metaseg.pt: the hash is in its train.log), pass "
                           f"--sha256 {digest[:8]}... in full to convert it")
    return data


def convert(old: Path, new: Path, sha256: Optional[str] = None) -> Dict[str, Any]:
    """Convert the trusted pickle `old` into `new` (.safetensors, with a .sha256 sidecar, atomically).
    Returns {"kind", "sha256", "path"}."""
    from ..io.atomic import write_all
    from ..method.weights import checked_writers

    old, new = Path(old), Path(new)
    if not new.name.endswith(SUFFIX):
        raise WeightsError(f"{new}: the converted file must be named {SUFFIX}")
    if not old.is_file():
        raise WeightsError(f"no such file: {old}")
    data = trusted_bytes(old, sha256)
    if not looks_like_pickle(data):
        raise WeightsError(f"{old} is not a PyTorch pickle file: there is nothing to convert")
    try:  # weights_only: even a trusted file may hold only tensors and plain values
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (an unpickler's refusal or a damaged archive)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot convert {old}: it holds more than tensors and plain values ({first})") from None
    kind, content = _convert_blob(blob, old)
    write_all(checked_writers(content, new))
    return {"kind": kind, "sha256": hashlib.sha256(content).hexdigest(), "path": str(new)}


def _convert_blob(blob: Any, source: Path) -> tuple:
    from ..space.fitted import FittedVolume
    from ..method.weights import Weights, weights_bytes, weights_problem

    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt == "metaseg-weights/1":
        from ..method.config import ModelConfig

        card = json.loads(blob["card_json"])
        config = ModelConfig.from_dict(card.pop("config"))
        card.pop("format", None)
        w = Weights(config, dict(blob["state"]), blob["log_lr"], card)
        problem = weights_problem(w)
        if problem:
            raise WeightsError(f"{source}: {problem}")
        return "weights", weights_bytes(w)
    if fmt == "metaseg-fitted/1":
        return "fitted INR", _fitted_from_v1(blob).to_bytes()
    if isinstance(blob, dict) and set(blob) == {"net", "log_lr"}:
        return "stage-1 result", dumps_tree(blob, STAGE1_FORMAT)
    if isinstance(blob, dict) and {"net", "log_lr", "opt", "gen", "state", "settings_core"} <= set(blob):
        return "training checkpoint", dumps_tree(blob, CHECKPOINT_FORMAT)
    raise WeightsError(f"{source} is not a MetaSeg weights, fitted INR, stage-1 or checkpoint file (format {fmt!r})")


def _fitted_from_v1(blob: Dict[str, Any]):
    """A FittedVolume from the dict metaseg <= 0.4.0 saved (format "metaseg-fitted/1")."""
    from ..method.config import ModelConfig
    from ..method.fit import FittedINR
    from ..space.fitted import FittedVolume
    from ..method.model import MetaSegNet

    config = ModelConfig.from_dict(json.loads(blob["config_json"]))
    net = MetaSegNet(config).eval()
    mask = None
    if "mask_bits" in blob:
        shape = tuple(int(x) for x in blob["mask_shape"])
        mask = np.unpackbits(blob["mask_bits"].numpy(), count=int(np.prod(shape))).astype(bool).reshape(shape)
    image = blob.get("image")
    if image is not None and mask is not None:
        image = torch.zeros(mask.shape).index_put_((torch.from_numpy(mask),), image.float())
    inr = FittedINR(net, dict(blob["state"]), image=image)
    return FittedVolume(inr, blob["physical_to_model"].numpy(), mask, json.loads(blob["info_json"]))
