"""Lossless coding of an 8-bit image inside a known mask (the fitted image a stored fitted network keeps).

The voxels are sent coarse to fine (as in interpolative and wavelet-like lossless coders): first the voxels
on a lattice of step 2 * TOP, then, for each step s = TOP, TOP / 2, ..., 1 and each axis in turn, the voxels
halfway between known ones along that axis. Each new voxel is predicted from known neighbours on both sides
(a template of up to 10 neighbours, its integer weights fitted to this image by least squares and stored);
only the prediction's error is kept, mod 256, and only inside the mask, which the decoder already has. The
errors are split by the spread of the neighbours (a flat region predicts well, an edge does not) and each
group is deflated separately, so each gets its own code table. Interpolating between neighbours on both
sides averages the scanner noise instead of adding it up, as a one-sided prediction (the finite difference
the format stored before) does: on the bundled scan's fitted image this takes the image from 1.32 MB to
docs/results.md's figure.

Everything the decoder needs to size its buffers it computes from the mask and the canvas, never from the
coded data: every group's length is a count of mask voxels, so a crafted stream cannot make it inflate more.
Only numpy and zlib; no tensors, no model.
"""
from __future__ import annotations

import zlib
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

CODING = "uint8 round(x*255) in the mask, coarse-to-fine interpolation, least-squares weights, zlib by context"
TOP = 8  # the coarsest refinement step: the first lattice has step 16
SHIFT = 12  # weights are integers / 2^SHIFT
EDGES = (1, 2, 4, 8, 16, 32, 64)  # spread of the known neighbours (max - min) that splits the errors into groups
MAX_WEIGHT = 1 << 16  # a stored weight's magnitude is at most this (a crafted one cannot overflow int64 sums)


def _template(axis: int) -> List[Tuple[int, int, int]]:
    """The neighbours (offsets in units of the step) known when the voxels halfway along `axis` are sent: the
    two along the axis, and those beside them along the axes already refined at this step."""
    offsets = []
    for side in (-1, 1):
        base = [0, 0, 0]
        base[axis] = side
        offsets.append(tuple(base))
        for other in range(axis):  # refined at this step: neighbours one step away are known
            for d in (-1, 1):
                o = list(base)
                o[other] = d
                offsets.append(tuple(o))
    return offsets


def _passes(top: int) -> Iterator[Tuple[int, int]]:
    s = top
    while s >= 1:
        for axis in range(3):
            yield s, axis
        s //= 2


def _new_slices(s: int, axis: int) -> Tuple[slice, ...]:
    return tuple(slice(0, None, s) if a < axis else slice(s if a == axis else 0, None, 2 * s) for a in range(3))


class _Grid:
    """The canvas padded by the largest step, so every neighbour lookup is in range (padding = outside the mask)."""

    def __init__(self, shape: Sequence[int], mask: np.ndarray):
        self.pad = 2 * TOP
        self.shape = tuple(int(n) + 2 * self.pad for n in shape)
        self.values = np.zeros(self.shape, np.int64)
        self.mask = np.zeros(self.shape, bool)
        self.mask[self.inner] = mask
        self.strides = np.array([self.shape[1] * self.shape[2], self.shape[2], 1])

    @property
    def inner(self) -> Tuple[slice, ...]:
        return tuple(slice(self.pad, n - self.pad) for n in self.shape)

    def new_voxels(self, s: int, axis: int) -> np.ndarray:
        """Flat indices (in the padded canvas) of the mask voxels sent in this pass, in C order."""
        sel = np.zeros(self.shape, bool)
        sel[self.inner][_new_slices(s, axis)] = True
        return np.flatnonzero(sel & self.mask)

    def neighbours(self, flat: np.ndarray, s: int, axis: int) -> Tuple[np.ndarray, np.ndarray]:
        """(values, inside mask) of the template's neighbours: (N, taps) each."""
        offs = np.array([int(np.dot(np.array(o) * s, self.strides)) for o in _template(axis)])
        idx = flat[:, None] + offs[None, :]
        return self.values.reshape(-1)[idx], self.mask.reshape(-1)[idx]


def _predict(vals: np.ndarray, inside: np.ndarray, weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(prediction, context) per voxel: the weighted template where all its neighbours are in the mask, else the
    mean of the two along the axis that are (0 if neither); the context is the group of the neighbours' spread."""
    full = inside.all(1)
    pred = (vals @ weights + (1 << (SHIFT - 1))) >> SHIFT
    half = vals.shape[1] // 2  # the template lists the lower side, then the upper: [0] and [half] lie on the axis
    lo, hi, mlo, mhi = vals[:, 0], vals[:, half], inside[:, 0], inside[:, half]
    n = mlo.astype(np.int64) + mhi
    simple = np.where(n == 2, (lo + hi + 1) // 2, lo * mlo + hi * mhi)
    pred = np.clip(np.where(full, pred, simple), 0, 255)
    masked = np.where(inside, vals, 0)
    spread = np.where(inside, vals, 255).min(1)
    spread = np.where(inside.any(1), masked.max(1) - spread, 255)
    return pred, np.searchsorted(np.array(EDGES), spread, side="left")


def _fit_weights(vals: np.ndarray, inside: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares weights (integers / 2^SHIFT) of the template on the voxels whose neighbours are all inside."""
    taps = vals.shape[1]
    half = taps // 2
    plain = np.zeros(taps, np.int64)
    plain[0] = plain[half] = 1 << (SHIFT - 1)
    full = inside.all(1)
    if full.sum() < 8 * taps:
        return plain
    a, b = vals[full].astype(np.float64), target[full].astype(np.float64)
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    w = np.clip(np.rint(w * (1 << SHIFT)), -MAX_WEIGHT, MAX_WEIGHT).astype(np.int64)
    return w


def _deflate(data: bytes) -> bytes:
    best = None
    for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_RLE, zlib.Z_HUFFMAN_ONLY):
        packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, strategy)
        out = packer.compress(data) + packer.flush()
        best = out if best is None or len(out) < len(best) else best
    return best


def _group_names() -> List[str]:
    return [f"{s}/{axis}/{c}" for s, axis in _passes(TOP) for c in range(len(EDGES) + 1)]


def encode(image: np.ndarray, mask: np.ndarray) -> Tuple[bytes, Dict]:
    """(data, spec): `image` (uint8 values, 3D) inside `mask` (bool, same shape), losslessly. `spec` (JSON-able)
    holds the weights and each group's deflated length; `decode` needs it, the mask and nothing else."""
    image = np.asarray(image)
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be one 3D shape")
    g = _Grid(image.shape, mask)
    g.values[g.inner] = np.where(mask, image.astype(np.int64), 0)
    first = np.zeros(g.shape, bool)
    first[g.inner][::2 * TOP, ::2 * TOP, ::2 * TOP] = True
    groups: Dict[str, bytes] = {"base": g.values.reshape(-1)[np.flatnonzero(first & g.mask)].astype(np.uint8).tobytes()}
    weights = []
    for s, axis in _passes(TOP):
        flat = g.new_voxels(s, axis)
        vals, inside = g.neighbours(flat, s, axis)
        target = g.values.reshape(-1)[flat]
        w = _fit_weights(vals, inside, target)
        weights.append(w.tolist())
        pred, ctx = _predict(vals, inside, w)
        err = ((target - pred) % 256).astype(np.uint8)
        for c in range(len(EDGES) + 1):
            groups[f"{s}/{axis}/{c}"] = err[ctx == c].tobytes()
    names = ["base"] + _group_names()
    packed = [_deflate(groups[n]) for n in names]
    return b"".join(packed), {"coding": CODING, "top": TOP, "weights": weights, "lengths": [len(p) for p in packed]}


def decode(data: bytes, spec: Dict, mask: np.ndarray, inflate) -> np.ndarray:
    """The uint8 image `encode` coded (0 outside the mask). `inflate(data, size, what)` inflates exactly `size`
    bytes (the caller's bounded inflater); ValueError if the spec or the data do not fit the mask."""
    names = ["base"] + _group_names()
    lengths, weights = spec.get("lengths"), spec.get("weights")
    if spec.get("coding") != CODING or spec.get("top") != TOP:
        raise ValueError(f"its image is coded as {spec.get('coding')!r}, which this version does not read")
    templates = [len(_template(axis)) for _, axis in _passes(TOP)]
    if not (isinstance(lengths, list) and len(lengths) == len(names)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths)
            and sum(lengths) == len(data)):
        raise ValueError("its image's group lengths do not match its data")
    if not (isinstance(weights, list) and len(weights) == len(templates) and all(
            isinstance(w, list) and len(w) == t and all(isinstance(v, int) and not isinstance(v, bool)
                                                        and abs(v) <= MAX_WEIGHT for v in w)
            for w, t in zip(weights, templates))):
        raise ValueError("its image's predictor weights are malformed")
    ends = np.cumsum([0] + lengths)
    chunk = {n: data[ends[i]:ends[i + 1]] for i, n in enumerate(names)}
    g = _Grid(mask.shape, mask)
    first = np.zeros(g.shape, bool)
    first[g.inner][::2 * TOP, ::2 * TOP, ::2 * TOP] = True
    flat = np.flatnonzero(first & g.mask)
    g.values.reshape(-1)[flat] = np.frombuffer(inflate(chunk["base"], flat.size, "image"), np.uint8)
    for (s, axis), w in zip(_passes(TOP), weights):
        flat = g.new_voxels(s, axis)
        vals, inside = g.neighbours(flat, s, axis)
        pred, ctx = _predict(vals, inside, np.array(w, np.int64))
        err = np.zeros(flat.size, np.int64)
        for c in range(len(EDGES) + 1):
            where = ctx == c
            err[where] = np.frombuffer(inflate(chunk[f"{s}/{axis}/{c}"], int(where.sum()), "image"), np.uint8)
        g.values.reshape(-1)[flat] = (pred + err) % 256
    return g.values[g.inner].astype(np.uint8)
