"""What makes two runs give the same labels, and the record a reproduction needs.

On one machine the same input, options, version, device and thread count give identical labels and reports
(timings aside): every random draw of the fit comes from a generator seeded by `--seed` (fit.py), brain
extraction, N4, resampling and decoding are deterministic, and the registration's optimization runs on one
ITK thread (`itk_threads`), the one step that was not (registration.py). The torch thread count changes how
CPU sums are split, so it is part of the contract and of the record. CUDA/MPS: see `bitwise_note`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

import SimpleITK as sitk
import torch

# ITK threads of the registration's optimization (space/registration.py). With more than one, the metric's per-thread partial sums are combined
# in an order that varies from run to run: the same scan got affine parameters differing by up to 4e-3 and
# 7.5-9.8 % of its labels flipped (issue 22); with one thread they are identical, and on the 3D sample one
# thread was as fast as two (2.1 s either way on a 2-core CPU; docs/results.md).
REGISTRATION_THREADS = 1


@contextlib.contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Within the block, ITK filters and registrations created there use `n` threads; restored afterwards.

    The global default is what ITK's metrics read: `ImageRegistrationMethod.SetNumberOfThreads(1)` alone left
    the affine parameters varying by 1e-6 between runs on the 3D sample."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def bitwise_note(device: torch.device) -> str:
    """What a rerun on this device can be expected to reproduce (README, "Reproducibility")."""
    if device.type == "cpu":
        return ("identical labels and report (timings aside) for the same input, options, version and torch/ITK "
                "thread counts on this machine")
    return (f"{device.type}: registration and brain mask are identical (CPU); the fit's floating-point sums on the "
            "accelerator may differ in the last bits between runs or GPU models, so a few boundary voxels can "
            "change; use --device cpu for bitwise reruns")


def run_record(seed: int, device: torch.device) -> Dict[str, Any]:
    """The report's `reproducibility` entry: seed, threads, determinism settings and what is bitwise."""
    rec: Dict[str, Any] = {
        "seed": int(seed), "device": str(device), "torch_threads": torch.get_num_threads(),
        "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "itk_registration_threads": REGISTRATION_THREADS,
        "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "bitwise": bitwise_note(device),
    }
    if device.type == "cuda":
        rec["cuda"] = torch.version.cuda
        rec["gpu"] = torch.cuda.get_device_name(device)
        rec["cudnn"] = torch.backends.cudnn.version()
    return rec
