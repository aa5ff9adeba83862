"""Weights files: tensors + a JSON card, in a format that cannot run code, checked by sha256.

A file is a safetensors file (metaseg/io/safefile.py): the network's tensors and the learning rates as raw
tensors, the model card (configuration included) as JSON in the header's metadata. Next to it,
`<file>.sha256` holds the expected hash; a file whose hash differs is refused. The shipped files' hashes
are also in their model cards (Resources/Weights/*.md). An old PyTorch pickle (.pt) is refused, never
unpickled: `metaseg convert-weights` converts a trusted one (metaseg/train/legacy.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .config import ModelConfig
from ..labelsets import TISSUES, for_values, label_set as get_label_set
from .fit import FitPlan
from ..io.atomic import write_all
from .model import MergedOutput, MetaSegNet
from .prior import SpatialPrior, coarse_shape
from ..io.safefile import PickleRefused, WeightsError, check_not_pickle, dumps, loads, metadata_json, read_bytes  # noqa: F401

FORMAT = "metaseg-weights/2"  # /1 was the torch.save pickle of metaseg <= 0.4.0
MAX_BYTES = 1 << 30  # a weights file larger than this is refused before it is read

LABELS = TISSUES.card_labels()  # the tissue models' classes (metaseg.labelsets)


@dataclass
class Weights:
    """A meta-learned MetaSeg model: network parameters, inner learning rates and the card."""

    config: ModelConfig
    state: Dict[str, torch.Tensor]
    log_lr: torch.Tensor  # (steps, n_inr_tensors) meta-learned log learning rates of the fit
    card: Dict[str, Any] = field(default_factory=dict)
    sha256: Optional[str] = None
    prior: Optional[torch.Tensor] = None  # uint8 (classes, d, h, w): the spatial prior of a model that reads one

    @property
    def spatial_prior(self) -> Optional[SpatialPrior]:
        return None if self.prior is None else SpatialPrior.from_uint8(self.prior)

    @property
    def plan(self) -> FitPlan:
        return FitPlan(**self.card["fit"])

    @property
    def canvas(self):
        return tuple(self.card["input"]["canvas"])

    @property
    def label_set(self) -> str:
        """The label set the network was trained on (cards before label sets: tissues)."""
        return self.card.get("label_set", "tissues")

    def build(self, device: torch.device = torch.device("cpu"), labels: Optional[str] = None) -> MetaSegNet:
        """The network on `device`; with `labels` another label set than its own, its classes merged into that
        set (`merge_output`: a structures model gives tissues)."""
        net = MetaSegNet(self.config)
        net.load_state_dict(self.state)
        net.prior = None if self.prior is None else self.spatial_prior.to(device)
        if labels is not None and labels != self.label_set:
            merge_output(net, get_label_set(labels).values)
        return net.to(device).eval()


def merge_output(net: MetaSegNet, values: Sequence[int]) -> None:
    """Make `net` label in the label set with `values` by summing its own classes into them (structures ->
    tissues); ValueError if its classes do not merge into that set."""
    own, target = for_values(net.config.values), for_values(values)
    groups = own.merges_into(target)
    if groups is None:
        raise ValueError(f"a model of the label set {own.name!r} cannot label {target.name!r}")
    net.merged = None if target is own else MergedOutput(groups, target.values)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checked_writers(data: bytes, path: Path) -> list:
    """(path, writer) pairs for `io.write_all`: the file's bytes and its `.sha256` sidecar, published together."""
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    return [(path, lambda tmp: Path(tmp).write_bytes(data)),
            (Path(str(path) + ".sha256"), lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n", encoding="utf-8"))]


def save_checked(data: bytes, path: Path) -> str:
    """Write `data` with a `.sha256` sidecar, atomically; return the hash."""
    write_all(checked_writers(data, path))
    return hashlib.sha256(data).hexdigest()


def expected_hash(path: Path, expected_sha256: Optional[str]) -> str:
    """The hash a file must have: the argument, else its `.sha256` sidecar."""
    if expected_sha256 is None:
        side = Path(str(path) + ".sha256")
        if not side.is_file():
            raise WeightsError(f"no checksum for {path}: expected {side.name} beside it (or pass the sha256 explicitly)")
        words = side.read_text(encoding="utf-8", errors="replace").split()
        expected_sha256 = words[0] if words else ""
    return expected_sha256.lower()


def load_checked(path: Path, fmt: str, expected_sha256: Optional[str] = None, what: str = "weights",
                 limit: int = MAX_BYTES) -> tuple:
    """Read the file once, refuse a pickle, verify the sha256 (argument or sidecar), parse the safetensors and
    check the format: (tensors, metadata, digest). Nothing in the file is executed."""
    path = Path(path)
    data = read_bytes(path, what, limit)
    check_not_pickle(data, path, what)  # before the hash: a pickle is refused with how to convert it
    expected = expected_hash(path, expected_sha256)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise WeightsError(
            f"checksum mismatch for {path}: file has sha256 {digest[:16]}..., expected {expected[:16]}...; "
            f"the file is corrupt or was modified: restore the original {what}"
        )
    tensors, metadata = loads(data, path, what)
    if metadata.get("format") != fmt:
        raise WeightsError(f"{path} is not a MetaSeg {what} file (format {metadata.get('format')!r}, expected {fmt!r})")
    return tensors, metadata, digest


def save_weights(w: Weights, path: Path) -> str:
    """Write the file and its `.sha256` sidecar atomically; return the hash."""
    return save_checked(weights_bytes(w), path)


def weights_bytes(w: Weights) -> bytes:
    """The weights file's content: `state/<name>` tensors, `log_lr`, and the card (with the configuration)
    as JSON metadata. Every tensor keeps its dtype and shape."""
    card = dict(w.card, config=w.config.to_dict(), format=FORMAT)
    tensors = {f"state/{k}": v for k, v in w.state.items()}
    tensors["log_lr"] = w.log_lr
    if w.prior is not None:
        tensors["prior"] = w.prior.to(torch.uint8)
    return dumps(tensors, {"format": FORMAT, "card": json.dumps(card, sort_keys=True)})


def load_weights(path: Path, expected_sha256: Optional[str] = None) -> Weights:
    """Load and verify a weights file; the expected hash comes from the argument or the sidecar."""
    tensors, metadata, digest = load_checked(path, FORMAT, expected_sha256)
    try:
        card = metadata_json(metadata, "card", path, "weights")
        if not isinstance(card, dict):
            raise ValueError("the card is not a JSON object")
        config = ModelConfig.from_dict(card.pop("config"))
        problem = config_problem(config)
        if problem:
            raise ValueError(problem)
        state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
        w = Weights(config, state, tensors["log_lr"], card, digest, tensors.get("prior"))
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"cannot read weights {path}: {_what(e)}") from e
    problem = weights_problem(w)
    if problem:
        raise WeightsError(f"weights {path} are damaged or incomplete: {problem}; restore the original weights")
    return w


def config_problem(config: ModelConfig, dims: Optional[int] = None) -> Optional[str]:
    """What makes a configuration read from a file unusable or absurd (checked before any network is built,
    so a crafted width cannot allocate gigabytes); None if nothing."""
    if config.in_dim not in (2, 3) or (dims is not None and config.in_dim != dims):
        return f"the network reads {config.in_dim}D points"
    if not 1 <= config.width <= 4096 or not 0 <= config.hidden_layers <= 32:
        return f"the network's size (width {config.width}, {config.hidden_layers} hidden layers) is out of range"
    if len(config.head_hidden) > 8 or not all(1 <= n <= 4096 for n in config.head_hidden):
        return f"the head's hidden layers {list(config.head_hidden)[:9]} are out of range (at most 8, 1..4096 units)"
    if not 2 <= config.n_classes <= 256 or not all(0 <= v <= 255 for v in config.values):
        return f"the network's classes ({config.n_classes}, values {list(config.values)[:8]}) are out of range 0..255"
    if not (isinstance(config.omega0, (int, float)) and 0 < config.omega0 < 1e4):
        return f"the network's omega0 {config.omega0!r} is out of range"
    return None


def expected_state_shapes(config: ModelConfig) -> Dict[str, tuple]:
    """The tensors a network of `config` has, with their shapes, without allocating them (meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MetaSegNet(config).state_dict().items()}


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
    if dims not in (2, 3) or dims != w.config.in_dim or len(canvas) != dims or min(canvas) < 1 or max(canvas) > 1024:
        return f"the card's input (dims {dims}, canvas {canvas}) does not match a {w.config.in_dim}D network"
    if values != list(w.config.values):
        return f"the card's labels {values} do not match the network's classes {list(w.config.values)}"
    problem = config_problem(w.config)
    if problem:
        return problem
    expected = expected_state_shapes(w.config)
    for name, ref in expected.items():
        got = w.state.get(name)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != ref:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else "missing"
            return f"tensor {name} has shape {shape}, expected {ref}"
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
    with torch.device("meta"):
        n_inr = len(MetaSegNet(w.config).inr_parameter_names())
    if not isinstance(w.log_lr, torch.Tensor) or w.log_lr.dim() != 2 or w.log_lr.shape[1] != n_inr \
            or not torch.isfinite(w.log_lr).all():
        return f"the learning rates have shape {tuple(getattr(w.log_lr, 'shape', ()))}, expected (steps, {n_inr}), finite"
    return None


def _what(e: Exception) -> str:
    """An exception as a short phrase: KeyError('x') reads 'x', not "'x'" alone."""
    return f"missing entry {e}" if isinstance(e, KeyError) else str(e)
