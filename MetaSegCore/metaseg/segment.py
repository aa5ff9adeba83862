"""Segment an image array with meta-learned weights: preprocess -> fit -> decode.

File reading/writing lives in `io.py` and the CLI; this module works on arrays so that
meta-training validation, the CLI, benchmarks and the Slicer module all run the same code.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .fit import FitPlan, FitProgress, FittedINR, fit, psnr_from_mse
from .model import MetaSegNet
from .preprocess import grid_coords, normalize_intensity, pad_to_canvas


@dataclass
class SegmentResult:
    labels: np.ndarray  # uint8, same shape as the input array
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
) -> SegmentResult:
    """Fit the INR to `image` (on the model canvas) and decode labels for the image's pixels.

    `live(step, labels)` receives the labels as they form every `live_every` steps.
    """
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    img = normalize_intensity(image) if normalize else np.asarray(image, np.float32)
    padded, region = pad_to_canvas(img, canvas)
    coords = grid_coords(canvas).to(device)
    values = torch.from_numpy(padded).reshape(-1).to(device)
    t1 = time.perf_counter()
    params = {k: p.detach() for k, p in net.named_parameters()}
    inside = torch.zeros(canvas, dtype=torch.bool)
    inside[region] = True
    inside = inside.reshape(-1).to(device)
    snapshot = None
    if live is not None:
        snapshot = lambda step, inr: live(step, inr.labels(coords[inside]).numpy().reshape(img.shape))  # noqa: E731
    fitted = fit(net, params, coords, values, plan, log_lr.to(device), seed=seed, progress=progress, cancel=cancel,
                 snapshot=snapshot, snapshot_every=live_every)
    t2 = time.perf_counter()
    labels, inten = fitted.decode(coords[inside])
    mse = float(torch.mean((inten - values[inside].cpu()) ** 2))
    t3 = time.perf_counter()
    return SegmentResult(
        labels=labels.numpy().reshape(img.shape),
        fitted=fitted,
        region=region,
        psnr=psnr_from_mse(mse),
        timings={"preprocess_s": t1 - t0, "fit_s": t2 - t1, "decode_s": t3 - t2},
    )
