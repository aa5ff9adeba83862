"""Segment an image array with meta-learned weights: preprocess -> fit -> decode.

File reading/writing lives in `io.py` and the CLI; this module works on arrays so that
meta-training validation, the CLI, benchmarks and the Slicer module all run the same code.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .fit import FitPlan, FitProgress, FittedINR, FixedSchedule, fit, psnr_from_mse
from .model import MetaSegNet
from .preprocess import grid_coords, normalize_intensity, pad_to_canvas


@dataclass
class SegmentResult:
    labels: Optional[np.ndarray]  # uint8, same shape as the input array (None: not decoded)
    fitted: FittedINR
    region: Tuple[slice, ...]  # where the input sits on the model canvas
    psnr: float  # of the fitted intensities against the normalized input, on the input's pixels
    timings: Dict[str, float] = field(default_factory=dict)


def segment_array(
    net: MetaSegNet,
    log_lr: torch.Tensor,
    plan: FitPlan,
    image: np.ndarray,
    canvas: Tuple[int, ...],
    *,
    seed: int = 0,
    normalize: bool = True,
    progress: Optional[Callable[[FitProgress], None]] = None,
    cancel: Optional[threading.Event] = None,
    live: Optional[Callable[[int, np.ndarray], None]] = None,
    live_every: int = 0,
    decode: bool = True,
    snapshot: Optional[Callable[[int, FittedINR], None]] = None,
    member: int = 0,
) -> SegmentResult:
    """Fit the INR to `image` (on the model canvas) and decode labels for the image's pixels.

    With `plan.foreground_only` (3D) only the nonzero voxels are fitted and decoded, the rest
    is background: skull-stripped inputs have no tissue outside the brain, and a volume's
    brain is a third of its voxels. `live(step, labels)` receives the labels as they form every
    `live_every` steps, decoded on a coarse subgrid of at most LIVE_POINTS[dims] points so that the
    preview costs a small fraction of the fit. With `decode=False` only the fit runs (labels None,
    PSNR on the fit's last batches): for callers that decode elsewhere, e.g. on a scan's own grid;
    they get the fit in progress as `snapshot(step, inr)` every `live_every` steps instead of `live`.
    With `plan.schedule == "fixed"` the batches follow the canvas's fixed sequence (the seed plays no part) and
    `member` (the fit's place in an ensemble) sets where in it the fit starts.
    """
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    img = normalize_intensity(image) if normalize else np.asarray(image, np.float32)
    padded, region = pad_to_canvas(img, canvas)
    flat = torch.from_numpy(padded).reshape(-1)
    inside = torch.zeros(canvas, dtype=torch.bool)
    inside[region] = True
    if plan.foreground_only:
        out_idx = torch.nonzero(flat > 0).squeeze(1)
        fit_coords = grid_coords(canvas, out_idx).to(device)
        values = flat[out_idx].to(device)
        out_sel = slice(None)  # decode every fitted point
    else:
        fit_coords = grid_coords(canvas).to(device)
        values = flat.to(device)
        out_idx = torch.nonzero(inside.reshape(-1)).squeeze(1)
        out_sel = out_idx.to(device)
    t1 = time.perf_counter()
    params = {k: p.detach() for k, p in net.named_parameters()}
    if live is not None:
        preview = _Preview(canvas, region, inside, out_idx)
        snapshot = lambda step, inr: live(step, preview.labels(inr))  # noqa: E731
    last_loss = [float("nan")]

    def on_step(p: FitProgress) -> None:
        last_loss[0] = p.loss
        if progress is not None:
            progress(p)

    points = out_idx if plan.foreground_only else torch.arange(flat.shape[0])
    batches = FixedSchedule.for_plan(plan, points, flat.shape[0], member)
    fitted = fit(net, params, fit_coords, values, plan, log_lr.to(device), seed=seed, progress=on_step, cancel=cancel,
                 snapshot=snapshot, snapshot_every=live_every, image=torch.from_numpy(padded), batches=batches)
    t2 = time.perf_counter()
    if not decode:
        return SegmentResult(None, fitted, region, psnr_from_mse(last_loss[0]), {"preprocess_s": t1 - t0, "fit_s": t2 - t1})
    labels, inten = fitted.decode(fit_coords[out_sel])
    mse = float(torch.mean((inten - values[out_sel].cpu()) ** 2))
    full = torch.zeros(flat.shape[0], dtype=torch.uint8)
    full[out_idx] = labels
    t3 = time.perf_counter()
    return SegmentResult(
        labels=full.reshape(canvas)[region].numpy(),
        fitted=fitted,
        region=region,
        psnr=psnr_from_mse(mse),
        timings={"preprocess_s": t1 - t0, "fit_s": t2 - t1, "decode_s": t3 - t2},
    )


# Points decoded per live-preview snapshot, per dimension: a snapshot then costs about one fit step
# (2D, 8000 points ~ 35 ms) or a few (3D), so a preview every LIVE_EVERY steps slows the fit < 10 %
# (benchmarks/bench_live.py, docs/results.md).
LIVE_POINTS = {2: 8_000, 3: 40_000}


class _Preview:
    """Labels of a fit in progress on a coarse subgrid (every s-th pixel per axis), blown up to the
    image by repetition: the user sees the labels form, the fit barely slows down."""

    def __init__(self, canvas, region, inside: torch.Tensor, out_idx: torch.Tensor):
        n = out_idx.shape[0]
        self.stride = max(1, math.ceil((n / LIVE_POINTS[len(canvas)]) ** (1.0 / len(canvas))))
        s = self.stride
        self.canvas, self.region = canvas, region
        wanted = torch.zeros(inside.numel(), dtype=torch.bool)
        wanted[out_idx] = True
        coarse = tuple(slice(0, None, s) for _ in canvas)
        sub = wanted.reshape(canvas)[coarse]
        self.sub_shape = sub.shape
        grid_idx = torch.arange(inside.numel()).reshape(canvas)[coarse]
        self.sub_idx = torch.nonzero(sub.reshape(-1)).squeeze(1)
        self.coords = grid_coords(canvas, grid_idx.reshape(-1)[self.sub_idx])
        self.wanted = wanted.reshape(canvas)

    def labels(self, inr: FittedINR) -> np.ndarray:
        sub = torch.zeros(int(np.prod(self.sub_shape)), dtype=torch.uint8)
        sub[self.sub_idx] = inr.labels(self.coords)
        up = sub.reshape(self.sub_shape)
        for d in range(len(self.canvas)):
            up = up.repeat_interleave(self.stride, dim=d)
        up = up[tuple(slice(0, c) for c in self.canvas)] * self.wanted
        return up[self.region].numpy()
