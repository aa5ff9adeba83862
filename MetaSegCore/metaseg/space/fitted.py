"""A fitted 3D INR placed in physical space: labels, probabilities or intensity at any point.

After a fit, `FittedVolume` holds the fitted network, the affine map from physical points (LPS mm)
to model coordinates, and the brain mask the fit saw (the model knows tissue only there: it was
fitted on nonzero voxels); for a head that reads intensities, also the fitted image's brain voxels. Any set of points can then be decoded without refitting: the scan's
own voxels, a plane of any orientation, a super-resolved grid.

Saved files (format "metaseg-fitted/2") are safetensors files (metaseg/io/safefile.py: nothing in them is
executed) holding only what rebuilds the volume, compactly (a 3D result of the bundled scan: ~1.6 MB
instead of the 10.3 MB of the former pickle; docs/results.md "Stored fitted networks"):
- `param/<name>`: the fitted network's parameters in float16, except the first sine layer's
  (`trunk.0.*`, 512 numbers: omega0 = 30 multiplies their rounding error), kept in float32. Measured on
  the bundled scan: labels agree with the float32 network's at Dice 0.9998;
- `physical_to_model`: float64 4x4;
- `mask.zlib`: the brain mask's bits (numpy packbits), zlib-compressed;
- `image.zlib` (models whose head reads the intensity): the fitted image on the mask's bounding box,
  quantized to 8 bits (the image is normalized to [0, 1]; 1/255 steps), as its 3D finite difference
  (value minus the x, y, z neighbours' planar prediction; exact, undone by three cumulative sums), kept only
  where it can be nonzero (the mask and one voxel above it; SHELL_CODING), zlib-compressed. With it, reslicing
  agrees with the unquantized volume at Dice >= 0.999. Files of metaseg 0.5 (the differences on the whole box:
  IMAGE_CODING) are still read;
- `prior` (metadata; models that read a spatial prior): the sha256 of the weights that hold the prior. The
  prior (3-30 MB) is not copied into the file: loading takes it from those weights (`prior_from_weights`: the
  caller's files or folders, then the shipped weights' folders), and refuses in one line naming the sha256;
- metadata (JSON strings): format, config, info (labels, weights sha256, source, the scan's
  reference grid), mask shape, image box and coding.
Decompression is bounded by the sizes the metadata declares, so a crafted file cannot inflate.
Files are checked against their `.sha256` sidecar, like weights.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from ..method.config import ModelConfig
from ..method.fit import FittedINR
from ..method.model import MetaSegNet
from ..method.preprocess import sample_grid
from ..io.safefile import SUFFIX, WeightsError, dumps, loads, metadata_json
from ..method.prior import SpatialPrior
from ..method.weights import (checked_writers, config_problem, expected_state_shapes, load_checked, load_weights,
                              merge_output, save_checked, sha256_of)

FORMAT = "metaseg-fitted/2"  # /1 was the torch.save pickle of metaseg <= 0.4.0
WHAT = ("labels", "probabilities", "intensity")
FULL_PRECISION = ("trunk.0.",)  # parameters kept in float32 (the first sine layer); the rest float16
LEVELS = 255  # the stored image's quantization: round(image * 255) in uint8
MAX_BYTES = 512 << 20  # a fitted-network file larger than this is refused before it is read
MAX_VOXELS = 1 << 28  # a mask or image box larger than this is refused (a 1024^3 canvas is 2^30)
# the image coding of metaseg 0.5 (still read), and this version's, which keeps the differences only where they can
# be nonzero: on the mask and one voxel above it (3.5-4 % smaller on the bundled scan; docs/results.md)
IMAGE_CODING = "uint8 round(x*255) on the mask's box, 3D finite difference (z, y, x) mod 256, zlib"
SHELL_CODING = ("uint8 round(x*255) on the mask's box, 3D finite difference (z, y, x) mod 256 on the mask and "
                "the voxels one step above it, zlib")


@dataclass
class FittedVolume:
    inr: FittedINR
    physical_to_model: np.ndarray  # 4x4: physical LPS mm -> model coordinates (array axis order)
    mask: Optional[np.ndarray] = None  # bool, model canvas: where the fitted image had tissue
    info: Dict[str, Any] = field(default_factory=dict)  # labels, weights sha256, source, PSNR

    @property
    def n_classes(self) -> int:
        """The output classes (the label set its info names: a structures network may label tissues)."""
        return len(self.inr.model.values)

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
        return save_checked(self.to_bytes(), path)

    def writers(self, path: Path) -> list:
        """(path, writer) pairs of the file and its sidecar, for a run's all-or-nothing `write_all`."""
        return checked_writers(self.to_bytes(), path)

    def to_bytes(self) -> bytes:
        """The file's content (format "metaseg-fitted/2", see the module's docstring)."""
        tensors: Dict[str, torch.Tensor] = {}
        for name, t in self.inr.state_dict().items():
            keep = name.startswith(FULL_PRECISION) or not t.is_floating_point()
            tensors[f"param/{name}"] = t.float() if keep and t.is_floating_point() else (t if keep else t.half())
        tensors["physical_to_model"] = torch.from_numpy(np.asarray(self.physical_to_model, np.float64))
        metadata = {"format": FORMAT, "config": json.dumps(self.inr.model.config.to_dict()),
                    "info": json.dumps(self.info, sort_keys=True)}
        if self.inr.model.config.uses_prior:  # the prior stays in the weights: the file names them by their hash
            digest = self.info.get("weights_sha256")
            if not _is_sha256(digest):
                raise ValueError("this fitted volume's model reads a spatial prior, which is not stored with it: "
                                 "its info must name the weights' sha256 (weights_sha256)")
            metadata["prior"] = json.dumps({"from": "weights", "weights_sha256": digest})
        image = self.inr.image
        mask = self.mask
        canvas = tuple(image.shape) if image is not None else (tuple(mask.shape) if mask is not None else None)
        if mask is not None:
            metadata["mask"] = json.dumps({"shape": list(mask.shape)})
            tensors["mask.zlib"] = _bytes_tensor(zlib.compress(np.packbits(mask.reshape(-1)).tobytes(), 9))
        if image is not None:  # a head that reads intensities: keep the fitted image (its tissue voxels suffice)
            q = np.rint(np.clip(image.detach().cpu().numpy(), 0.0, 1.0) * LEVELS).astype(np.int16)
            if mask is not None:
                q[~mask] = 0
                nz = np.argwhere(mask)
                lo, hi = (nz.min(0), nz.max(0) + 1) if len(nz) else (np.zeros(3, int), np.ones(3, int))
            else:
                lo, hi = np.zeros(3, int), np.array(canvas)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            residual = q[box]
            for axis in (2, 1, 0):
                residual = np.diff(residual, axis=axis, prepend=0)
            coding = IMAGE_CODING
            if mask is not None:  # elsewhere the difference is 0: the decoder knows where from the mask
                residual, coding = residual[_difference_support(mask[box])], SHELL_CODING
            packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)  # best on these residuals (measured)
            data = packer.compress((residual % 256).astype(np.uint8).tobytes()) + packer.flush()
            tensors["image.zlib"] = _bytes_tensor(data)
            metadata["image"] = json.dumps({"shape": list(canvas), "box": [lo.tolist(), hi.tolist()],
                                            "levels": LEVELS, "coding": coding})
        return dumps(tensors, metadata)

    @classmethod
    def load(cls, path: Path, device: torch.device = torch.device("cpu"),
             expected_sha256: Optional[str] = None, weights: Sequence[Path] = ()) -> "FittedVolume":
        """Read a saved fitted volume (hash checked, no code executed); a file that parses but does not
        hold a consistent fitted volume raises WeightsError saying what is wrong. A model that reads a spatial
        prior takes it from the weights the file names by sha256: found among `weights` (files or folders)
        and the shipped weights' folders (`resources.weights_dirs`), else WeightsError saying which are needed."""
        tensors, metadata, digest = load_checked(path, FORMAT, expected_sha256, what="fitted INR", limit=MAX_BYTES)
        return cls._from_parts(tensors, metadata, digest, device, path, weights)

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device = torch.device("cpu"), source: str = "fitted INR",
                   weights: Sequence[Path] = ()) -> "FittedVolume":
        """A fitted volume from a file's bytes (no sidecar: the format is what makes it safe to read)."""
        tensors, metadata = loads(bytes(data), source, "fitted INR")
        if metadata.get("format") != FORMAT:
            raise WeightsError(f"{source} is not a MetaSeg fitted INR file (format {metadata.get('format')!r}, "
                               f"expected {FORMAT!r})")
        return cls._from_parts(tensors, metadata, hashlib.sha256(data).hexdigest(), device, source, weights)

    @classmethod
    def _from_parts(cls, tensors, metadata, digest: str, device: torch.device, source,
                    weights: Sequence[Path] = ()) -> "FittedVolume":
        try:
            return cls._build(tensors, metadata, digest, device, source, weights)
        except WeightsError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, zlib.error) as e:
            # our own checks say what is wrong; torch's and numpy's texts (TypeError, RuntimeError) are not for users
            why = (f"missing entry {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
                   if type(e) in (ValueError, zlib.error) else "its entries have the wrong types or sizes")
            raise WeightsError(f"fitted INR {source} is damaged or incomplete ({why}); segment the scan again with "
                               "--save-inr") from e

    @classmethod
    def _build(cls, tensors, metadata, digest: str, device: torch.device, source,
               weights: Sequence[Path] = ()) -> "FittedVolume":
        config = ModelConfig.from_dict(metadata_json(metadata, "config", source, "fitted INR"))
        problem = config_problem(config, dims=3)
        if problem:
            raise ValueError(problem)
        expected = expected_state_shapes(config)  # checked before any network is built
        state = {}
        for name, shape in expected.items():
            got = tensors.get(f"param/{name}")
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape or not got.is_floating_point():
                raise ValueError(f"tensor {name} has shape {tuple(got.shape) if isinstance(got, torch.Tensor) else 'missing'}, "
                                 f"expected {shape}")
            state[name] = got.float()
            if not torch.isfinite(state[name]).all():
                raise ValueError(f"tensor {name} holds NaN or infinite values")
        extra = {k for k in tensors if k.startswith("param/")} - {f"param/{k}" for k in expected}
        if extra:
            raise ValueError(f"unexpected tensors {sorted(extra)}")
        m = tensors["physical_to_model"]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (4, 4) or not m.is_floating_point() \
                or not torch.isfinite(m).all() or abs(float(torch.linalg.det(m.double()))) < 1e-12:
            raise ValueError("its physical-to-model matrix is not a finite, invertible 4x4 matrix")
        info = metadata_json(metadata, "info", source, "fitted INR")
        if not isinstance(info, dict):
            raise ValueError("its info is not a JSON object")
        info = dict(info, sha256=digest)
        _check_reference(info.get("reference"))
        mask = None
        if "mask" in metadata:
            shape = _shape(metadata_json(metadata, "mask", source, "fitted INR").get("shape"), "brain mask")
            n = int(np.prod(shape))
            bits = _inflate(tensors["mask.zlib"], -(-n // 8), "brain mask")
            mask = np.unpackbits(np.frombuffer(bits, np.uint8), count=n).astype(bool).reshape(shape)
        image = None
        if "image" in metadata:
            spec = metadata_json(metadata, "image", source, "fitted INR")
            if not isinstance(spec, dict) or spec.get("levels") != LEVELS \
                    or spec.get("coding") not in (IMAGE_CODING, SHELL_CODING):
                coding = spec.get("coding") if isinstance(spec, dict) else spec
                raise ValueError(f"its image is coded as {coding!r}, which this version does not read")
            canvas = _shape(spec.get("shape"), "image")
            if mask is not None and canvas != mask.shape:
                raise ValueError(f"its image {canvas} and brain mask {mask.shape} differ in shape")
            box = spec.get("box")
            if not (isinstance(box, list) and len(box) == 2 and all(isinstance(b, list) and len(b) == 3 for b in box)
                    and all(isinstance(v, int) and not isinstance(v, bool) for b in box for v in b)
                    and all(0 <= box[0][i] < box[1][i] <= canvas[i] for i in range(3))):
                raise ValueError(f"its image box {box!r} does not lie in the canvas {canvas}")
            lo, hi = box
            size = tuple(h - l for l, h in zip(lo, hi))
            if spec["coding"] == SHELL_CODING:  # this version's: the differences where they can be nonzero
                if mask is None:
                    raise ValueError("its image is coded on a brain mask, but the file holds no mask")
                support = _difference_support(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
                q = np.zeros(size, np.int64)
                q[support] = np.frombuffer(_inflate(tensors["image.zlib"], int(support.sum()), "image"), np.uint8)
            else:  # the files of metaseg 0.5: the differences on the whole box
                raw = _inflate(tensors["image.zlib"], int(np.prod(size)), "image")
                q = np.frombuffer(raw, np.uint8).reshape(size).astype(np.int64)
            for axis in (0, 1, 2):  # undo the finite differences
                q = np.cumsum(q, axis=axis)
            values = np.zeros(canvas, np.float32)
            values[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = (q % 256).astype(np.float32) / LEVELS
            if mask is not None:
                values[~mask] = 0.0
            image = torch.from_numpy(values)
        if (config.head_intensity or config.head_context) and image is None:
            raise ValueError("its model reads the image (intensity or context) but the file holds no image")
        if "prior" in tensors or any(k.startswith("prior") for k in tensors):
            raise ValueError("it holds a spatial prior: fitted files name the weights that hold it instead")
        net = MetaSegNet(config).to(device).eval()
        values = [lab.get("value") for lab in info.get("labels") or [] if isinstance(lab, dict)]
        if values and values != list(config.values):  # its labels are a coarser set (tissues of a structures network)
            try:
                merge_output(net, values)
            except (ValueError, TypeError) as e:
                raise ValueError(f"its info's labels do not match its network: {e}") from None
        if config.uses_prior:  # last: the file is consistent, so the message is about the weights alone
            net.prior = prior_from_weights(info.get("weights_sha256"), config, source, weights).to(device)
        inr = FittedINR(net, {k: v.to(device) for k, v in state.items()}, image=image)
        return cls(inr, m.numpy(), mask, info)


def _difference_support(mask: np.ndarray) -> np.ndarray:
    """Where the 3D finite difference of an image that is 0 outside `mask` can be nonzero: a voxel's difference
    reads it and its lower neighbours, so the mask and the voxels one step above it along any axes."""
    out = mask.copy()
    for dz, dy, dx in ((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1) if a or b or c):
        out[dz:, dy:, dx:] |= mask[: mask.shape[0] - dz, : mask.shape[1] - dy, : mask.shape[2] - dx]
    return out


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _weights_files(places: Sequence[Path]) -> Iterator[Path]:
    for place in places:
        place = Path(place)
        if place.is_dir():
            yield from sorted(place.glob("*" + SUFFIX))
        elif place.is_file():
            yield place


def prior_from_weights(digest: Any, config: ModelConfig, source: Any, weights: Sequence[Path] = ()) -> SpatialPrior:
    """The spatial prior of the weights whose sha256 is `digest`, for a fitted network of `config` made with them:
    looked for in `weights` (files or folders, the caller's) and then in the shipped weights' folders. A file is
    taken when its `.sha256` sidecar (or, for a file the caller named, its content) has that hash; it is then read
    as any weights file (hash verified, shapes checked). WeightsError in one line when none has it."""
    from ..resources import WEIGHTS_ENV, weights_dirs

    if not _is_sha256(digest):
        raise WeightsError(f"fitted INR {source} reads a spatial prior but does not name the weights that hold it "
                           "(no weights sha256 in its info); segment the scan again with --save-inr")
    named = [Path(p) for p in weights]
    for path in _weights_files(named + weights_dirs()):
        side = Path(str(path) + ".sha256")
        try:
            words = side.read_text(encoding="utf-8", errors="replace").split() if side.is_file() else []
            match = (words[:1] == [digest]) or (path in named and sha256_of(path) == digest)
        except OSError:
            continue
        if match:
            w = load_weights(path, expected_sha256=digest)
            if w.prior is None or w.config.n_classes != config.n_classes:
                raise WeightsError(f"weights {path} (sha256 {digest}) hold no spatial prior for this fitted INR")
            return w.spatial_prior
    searched = ", ".join(str(p) for p in named + weights_dirs())
    raise WeightsError(f"fitted INR {source} needs the spatial prior of the weights with sha256 {digest}, which are "
                       f"not installed (searched {searched}): install the weights the result was made with, or "
                       f"pass them with --weights FILE (API: weights=[FILE]) or put them in ${WEIGHTS_ENV}")


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _shape(value: Any, what: str) -> tuple:
    """A 3D shape read from a file: three ints >= 1, at most MAX_VOXELS in all."""
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               and 1 <= v <= 4096 for v in value)) \
            or int(np.prod(value)) > MAX_VOXELS:
        raise ValueError(f"its {what} has the shape {value!r}, not a 3D canvas")
    return tuple(value)


def _inflate(t: Any, size: int, what: str) -> bytes:
    """zlib data of exactly `size` bytes when inflated: at most size + 1 bytes are ever inflated (no zip bomb;
    max_length 0 would mean no bound)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"its {what} is not a byte string")
    unpacker = zlib.decompressobj()
    out = unpacker.decompress(t.numpy().tobytes(), size + 1)
    if len(out) != size or not unpacker.eof or unpacker.unused_data or unpacker.unconsumed_tail:
        raise ValueError(f"its {what} does not hold the {size:,} bytes its shape needs")
    return out


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
