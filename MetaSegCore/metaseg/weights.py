"""Weights files: tensors + a JSON card, loaded without executing code and checked by sha256.

A file is a `torch.save` of plain tensors and strings, read back with `weights_only=True`
(no pickle code runs). Next to it, `<file>.sha256` holds the expected hash; a file whose
hash differs is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .config import ModelConfig
from .labelsets import TISSUES
from .fit import FitPlan
from .atomic import write_all
from .file_limits import oversize, read_sidecar
from .model import MetaSegNet
from .prior import SpatialPrior, coarse_shape

FORMAT = "metaseg-weights/1"

LABELS = TISSUES.card_labels()  # the tissue models' classes (metaseg.labelsets)


class WeightsError(ValueError):
    """A weights file is missing, corrupt, tampered with or of an unknown format."""


@dataclass
class Weights:
    """A meta-learned MetaSeg model: network parameters, inner learning rates and the card."""

    config: ModelConfig
    state: Dict[str, torch.Tensor]
    log_lr: torch.Tensor  # (steps, n_inr_tensors) meta-learned log learning rates of the fit
    card: Dict[str, Any] = field(default_factory=dict)
    sha256: Optional[str] = None
    prior: Optional[torch.Tensor] = None  # uint8 (classes, d, h, w): the spatial prior of a `head_prior` model

    @property
    def spatial_prior(self) -> Optional[SpatialPrior]:
        return None if self.prior is None else SpatialPrior.from_uint8(self.prior)

    @property
    def plan(self) -> FitPlan:
        return FitPlan(**self.card["fit"])

    @property
    def canvas(self):
        return tuple(self.card["input"]["canvas"])

    def build(self, device: torch.device = torch.device("cpu")) -> MetaSegNet:
        net = MetaSegNet(self.config)
        net.load_state_dict(self.state)
        net.prior = None if self.spatial_prior is None else self.spatial_prior.to(device)
        return net.to(device).eval()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checked_writers(blob: Dict[str, Any], path: Path) -> list:
    """(path, writer) pairs for `io.write_all`: the torch.save'd `blob` and its `.sha256` sidecar.

    The blob is serialized once in memory, so the file and its hash are published together.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    return [(path, lambda tmp: Path(tmp).write_bytes(data)),
            (Path(str(path) + ".sha256"), lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n", encoding="utf-8"))]


def save_checked(blob: Dict[str, Any], path: Path) -> str:
    """torch.save `blob` (tensors, strings, numbers only) with a `.sha256` sidecar, atomically; return the hash."""
    writers = checked_writers(blob, path)
    write_all(writers)
    return Path(writers[1][0]).read_text(encoding="utf-8").split()[0]


def load_checked(path: Path, fmt: str, expected_sha256: Optional[str] = None, what: str = "weights") -> tuple:
    """Verify the sha256 (argument or sidecar), load without executing code, check the format: (blob, digest)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} file not found: {path}")
    too_large = oversize(path, what)  # before a byte is read: a padded file is not hashed or loaded whole
    if too_large:
        raise WeightsError(too_large)
    if expected_sha256 is None:
        side = Path(str(path) + ".sha256")
        if not side.is_file():
            raise WeightsError(f"no checksum for {path}: expected {side.name} beside it (or pass the sha256 explicitly)")
        expected_sha256 = read_sidecar(side)
    digest = sha256_of(path)
    if digest != expected_sha256.lower():
        raise WeightsError(
            f"checksum mismatch for {path}: file has sha256 {digest[:16]}..., expected {expected_sha256[:16]}...; "
            f"the file is corrupt or was modified: restore the original {what}"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a hash-valid file that does not parse: wrong kind of file. torch's own text is not
        # shown: it is many lines, and for a file holding code it advises loading it unsafely
        raise WeightsError(f"cannot read {what} {path}: it is not a MetaSeg {what} file or it is damaged (it does not "
                           "load as plain tensors and text; MetaSeg never runs code from a file); restore the "
                           "original file") from e
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise WeightsError(f"{path} is not a MetaSeg {what} file (format {found!r}, expected {fmt!r})")
    return blob, digest


def save_weights(w: Weights, path: Path) -> str:
    """Write the file and its `.sha256` sidecar atomically; return the hash."""
    card = dict(w.card, config=w.config.to_dict(), format=FORMAT)
    blob = {
        "format": FORMAT,
        "card_json": json.dumps(card, sort_keys=True),
        "state": {k: v.detach().cpu().contiguous() for k, v in w.state.items()},
        "log_lr": w.log_lr.detach().cpu().contiguous(),
    }
    if w.prior is not None:
        blob["prior"] = w.prior.detach().cpu().to(torch.uint8).contiguous()
    return save_checked(blob, path)


def load_weights(path: Path, expected_sha256: Optional[str] = None) -> Weights:
    """Load and verify a weights file; the expected hash comes from the argument or the sidecar."""
    blob, digest = load_checked(path, FORMAT, expected_sha256)
    try:
        card = json.loads(blob["card_json"])
        config = ModelConfig.from_dict(card.pop("config"))
        w = Weights(config, dict(blob["state"]), blob["log_lr"], card, digest, blob.get("prior"))
    except Exception as e:
        raise WeightsError(f"cannot read weights {path}: {_what(e)}") from e
    problem = weights_problem(w)
    if problem:
        raise WeightsError(f"weights {path} are damaged or incomplete: {problem}; restore the original weights")
    return w


def weights_problem(w: Weights) -> Optional[str]:
    """What is wrong with weights whose file parsed (a hash proves only that the file is the one hashed):
    the card's keys, tensor shapes against the configuration, non-finite values; None if nothing."""
    for key in ("labels", "fit", "input"):
        if key not in w.card:
            return f"the card has no {key!r} entry"
    try:
        plan = w.plan
        dims, canvas = int(w.card["input"]["dims"]), [int(c) for c in w.card["input"]["canvas"]]
        values = [int(lab["value"]) for lab in w.card["labels"]]
        [(str(lab["name"]), [int(c) for c in lab["color"]]) for lab in w.card["labels"]]
    except (KeyError, TypeError, ValueError) as e:
        return f"the card is malformed ({_what(e)})"
    if plan.steps < 1 or plan.batch_size < 1:
        return f"the card's fit plan {plan.to_dict()} has no steps or no batch"
    if dims not in (2, 3) or dims != w.config.in_dim or len(canvas) != dims or min(canvas) < 1:
        return f"the card's input (dims {dims}, canvas {canvas}) does not match a {w.config.in_dim}D network"
    if values != list(w.config.values):
        return f"the card's labels {values} do not match the network's classes {list(w.config.values)}"
    expected = MetaSegNet(w.config).state_dict()
    for name, ref in expected.items():
        got = w.state.get(name)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else "missing"
            return f"tensor {name} has shape {shape}, expected {tuple(ref.shape)}"
        if not torch.isfinite(got).all():
            return f"tensor {name} holds NaN or infinite values"
    extra = set(w.state) - set(expected)
    if extra:
        return f"unexpected tensors {sorted(extra)}"
    if w.config.uses_prior:
        want = (w.config.n_classes,) + coarse_shape(canvas)
        if not isinstance(w.prior, torch.Tensor) or tuple(w.prior.shape) != want or w.prior.dtype != torch.uint8:
            return f"the spatial prior has shape {tuple(getattr(w.prior, 'shape', ()))}, expected {want} (uint8)"
    elif w.prior is not None:
        return "the file holds a spatial prior but the network does not read one"
    n_inr = len(MetaSegNet(w.config).inr_parameter_names())
    if not isinstance(w.log_lr, torch.Tensor) or w.log_lr.dim() != 2 or w.log_lr.shape[1] != n_inr \
            or not torch.isfinite(w.log_lr).all():
        return f"the learning rates have shape {tuple(getattr(w.log_lr, 'shape', ()))}, expected (steps, {n_inr}), finite"
    return None


def _what(e: Exception) -> str:
    """An exception as a short phrase: KeyError('x') reads 'x', not "'x'" alone."""
    return f"missing entry {e}" if isinstance(e, KeyError) else str(e)
