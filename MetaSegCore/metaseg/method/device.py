"""Choose the torch device: CUDA, then Apple MPS, then CPU, unless the user says otherwise."""
from __future__ import annotations

from typing import Optional

import torch

SUPPORTED = ("cpu", "cuda", "mps")  # the device types MetaSeg runs on (plus "auto" and "gpu")


def pick_device(requested: Optional[str] = "auto") -> torch.device:
    """Return the device for `requested` ("auto", "cpu", "cuda", "cuda:1", "mps", "gpu").

    Raises ValueError naming the problem when an explicitly requested accelerator is absent,
    rather than silently running somewhere else.
    """
    req = (requested or "auto").strip().lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if req == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        raise ValueError("device 'gpu' requested but neither CUDA nor Apple MPS is available; use --device cpu")
    kind = req.split(":")[0]
    if kind not in SUPPORTED:
        # torch knows more device types (meta, xpu, ...): they either hold no data (meta) or are untested here
        # and fail deep in the fit; refuse them by name
        raise ValueError(f"unknown device '{requested}' (MetaSeg runs on CPUs, CUDA GPUs and Apple MPS): use auto, cpu, "
                         "cuda, cuda:N, mps or gpu")
    if req.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{requested}' requested but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if kind == "mps" and not _mps_available():
        raise ValueError("device 'mps' requested but Apple MPS is not available; use --device cpu")
    try:
        return torch.device(req)
    except RuntimeError as e:
        raise ValueError(f"unknown device '{requested}': use auto, cpu, cuda, cuda:N, mps or gpu") from e


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
