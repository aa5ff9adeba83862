"""A fitted 3D INR placed in physical space: labels, probabilities or intensity at any point.

After a fit, `FittedVolume` holds the fitted network, the affine map from physical points (LPS mm)
to model coordinates, and the brain mask the fit saw (the model knows tissue only there: it was
fitted on nonzero voxels); for a head that reads intensities, also the fitted image's brain voxels. Any set of points can then be decoded without refitting: the scan's
own voxels, a plane of any orientation, a super-resolved grid. Saved files load without executing
code and are checked against their sha256, like weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .config import ModelConfig
from .fit import FittedINR
from .model import MetaSegNet
from .preprocess import sample_grid
from .weights import WeightsError, checked_writers, load_checked, save_checked

FORMAT = "metaseg-fitted/1"
WHAT = ("labels", "probabilities", "intensity")


@dataclass
class FittedVolume:
    inr: FittedINR
    physical_to_model: np.ndarray  # 4x4: physical LPS mm -> model coordinates (array axis order)
    mask: Optional[np.ndarray] = None  # bool, model canvas: where the fitted image had tissue
    info: Dict[str, Any] = field(default_factory=dict)  # labels, weights sha256, source, PSNR

    @property
    def n_classes(self) -> int:
        return self.inr.model.config.n_classes

    def model_coords(self, points: np.ndarray) -> torch.Tensor:
        p = np.asarray(points, float).reshape(-1, 3)
        m = self.physical_to_model
        return torch.from_numpy((p @ m[:3, :3].T + m[:3, 3]).astype(np.float32))

    def _inside(self, coords: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
        """Points in the model's box and, with a mask, in the fitted tissue (trilinear mask >= 0.5)."""
        ok = (coords.abs() <= 1.0 + 1e-6).all(1)
        if self.mask is None:
            return ok
        vol = torch.from_numpy(self.mask.astype(np.float32))
        for s in range(0, coords.shape[0], chunk):
            ok[s : s + chunk] &= sample_grid(vol, coords[s : s + chunk]) >= 0.5
        return ok

    def query(self, points: np.ndarray, what: str = "labels") -> np.ndarray:
        """`what` at physical points (N, 3): labels uint8 (N,), probabilities float32 (N, C) or
        intensity float32 (N,). Outside the fitted tissue: background / 0."""
        if what not in WHAT:
            raise ValueError(f"what must be one of {', '.join(WHAT)}, got {what!r}")
        coords = self.model_coords(points)
        inside = self._inside(coords)
        sel = coords[inside]
        if what == "labels":
            out = torch.zeros(coords.shape[0], dtype=torch.uint8)
            out[inside] = self.inr.labels(sel)
        elif what == "probabilities":
            out = torch.zeros(coords.shape[0], self.n_classes)
            out[:, 0] = 1.0
            out[inside] = self.inr.probabilities(sel)
        else:
            out = torch.zeros(coords.shape[0])
            out[inside] = self.inr.intensity(sel)
        return out.numpy()

    def reslice(self, plane: Any, what: str = "labels") -> Any:
        """Labels, probabilities or intensity on `plane` (`reslice.Plane`, LPS mm): a one-slice SimpleITK image."""
        from .reslice import reslice  # reslice.py builds on this module

        return reslice(self, plane, what)

    def save(self, path: Path) -> str:
        """Write the fitted volume (+ `.sha256`) atomically; return its hash."""
        return save_checked(self.to_blob(), path)

    def writers(self, path: Path) -> list:
        """(path, writer) pairs of the file and its sidecar, for a run's all-or-nothing `write_all`."""
        return checked_writers(self.to_blob(), path)

    def to_blob(self) -> Dict[str, Any]:
        blob = {
            "format": FORMAT,
            "config_json": json.dumps(self.inr.model.config.to_dict()),
            "info_json": json.dumps(self.info, sort_keys=True),
            "state": self.inr.state_dict(),
            "physical_to_model": torch.from_numpy(np.asarray(self.physical_to_model, np.float64)),
        }
        if self.mask is not None:
            blob["mask_shape"] = torch.tensor(self.mask.shape)
            blob["mask_bits"] = torch.from_numpy(np.packbits(self.mask.reshape(-1)))
        image = self.inr.image
        if image is not None:  # a head that reads intensities: keep the fitted image (its tissue voxels suffice)
            image = image.cpu()
            blob["image"] = image[torch.from_numpy(self.mask)] if self.mask is not None else image
        return blob

    @classmethod
    def load(cls, path: Path, device: torch.device = torch.device("cpu")) -> "FittedVolume":
        """Read a saved fitted volume (hash checked, no code executed); a file that parses but does not
        hold a consistent fitted volume raises WeightsError saying what is wrong."""
        blob, digest = load_checked(path, FORMAT, what="fitted INR")
        try:
            return cls._from_blob(blob, digest, device)
        except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            # our own checks say what is wrong; torch's and numpy's texts (TypeError, RuntimeError) are not for users
            why = (f"missing entry {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
                   if type(e) in (ValueError, json.JSONDecodeError) else "its entries have the wrong types or sizes")
            raise WeightsError(f"fitted INR {path} is damaged or incomplete ({why}); segment the scan again with "
                               "--save-inr") from e

    @classmethod
    def _from_blob(cls, blob: Dict[str, Any], digest: str, device: torch.device) -> "FittedVolume":
        config = ModelConfig.from_dict(json.loads(blob["config_json"]))
        net = MetaSegNet(config).to(device).eval()
        state = blob["state"]
        expected = net.state_dict()
        for name, ref in expected.items():
            got = state.get(name) if isinstance(state, dict) else None
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
                raise ValueError(f"tensor {name} has shape {tuple(got.shape) if isinstance(got, torch.Tensor) else 'missing'}, "
                                 f"expected {tuple(ref.shape)}")
        m = blob["physical_to_model"]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (4, 4) or not torch.isfinite(m).all() \
                or abs(float(torch.linalg.det(m.double()))) < 1e-12:
            raise ValueError("its physical-to-model matrix is not a finite, invertible 4x4 matrix")
        info = dict(json.loads(blob["info_json"]), sha256=digest)
        _check_reference(info.get("reference"))
        mask = None
        if "mask_bits" in blob:
            shape = tuple(int(x) for x in blob["mask_shape"])
            if len(shape) != 3 or min(shape) < 1 or blob["mask_bits"].numel() != -(-int(np.prod(shape)) // 8):
                raise ValueError(f"its brain mask of shape {shape} does not match its {blob['mask_bits'].numel()} bytes")
            mask = np.unpackbits(blob["mask_bits"].numpy(), count=int(np.prod(shape))).astype(bool).reshape(shape)
        image = blob.get("image")
        if config.head_intensity and image is None:
            raise ValueError("its model reads the image's intensity but the file holds no image")
        if image is not None and mask is not None:
            if image.numel() != int(mask.sum()):
                raise ValueError(f"its image has {image.numel()} voxels for a mask of {int(mask.sum())}")
            image = torch.zeros(mask.shape).index_put_((torch.from_numpy(mask),), image)
        inr = FittedINR(net, {k: v.to(device) for k, v in state.items()}, image=image)
        return cls(inr, m.numpy(), mask, info)


def _check_reference(ref: Any) -> None:
    """The scan's grid (size, spacing, origin, direction) that planes are placed by: complete and finite."""
    if not isinstance(ref, dict):
        raise ValueError("its info has no 'reference' grid of the scan")
    lengths = {"size": 3, "spacing": 3, "origin": 3, "direction": 9}
    for key, n in lengths.items():
        values = ref.get(key)
        if not isinstance(values, list) or len(values) != n or not all(
                isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise ValueError(f"its reference grid's {key} is not {n} finite numbers")
    if min(ref["size"]) < 1 or min(ref["spacing"]) <= 0:
        raise ValueError("its reference grid has an empty size or a spacing <= 0")
