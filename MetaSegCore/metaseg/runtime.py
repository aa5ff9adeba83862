"""What a run holds at hand besides its settings: the loaded model (`Model`) and the callbacks (`Hooks`).

Grouped so that the array and volume pipelines take a scan plus a few objects instead of a long list
of loose parameters.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .method.fit import FitPlan, FitProgress
from .method.model import MetaSegNet
from .method.weights import Weights
from .labelsets import for_values


@dataclass(frozen=True)
class Model:
    """Checked weights built into a network on a device, with the fit plan a run uses.

    `canvas` is the model grid's array shape; `labels` the output label set's table (value, name, colour, ...):
    the weights' card's, or the set the network's classes were merged into (`Weights.build`); `path` the
    weights file. The network is only read by a fit (its parameters are
    copied into the fit), so one Model serves any number of runs.
    """

    weights: Weights
    net: MetaSegNet
    device: torch.device
    plan: FitPlan
    path: Optional[Path] = None

    @classmethod
    def build(cls, weights: Weights, device: torch.device = torch.device("cpu"), path: Optional[Path] = None,
              labels: Optional[str] = None) -> "Model":
        """`labels`: the label set to output when it is not the weights' own (their classes merged into it)."""
        return cls(weights, weights.build(device, labels), device, weights.plan, path)

    @property
    def log_lr(self) -> torch.Tensor:
        return self.weights.log_lr

    @property
    def canvas(self) -> Tuple[int, ...]:
        return self.weights.canvas

    @property
    def labels(self) -> List[Dict[str, Any]]:
        if self.net.merged is not None:
            return for_values(self.net.values).card_labels()
        return self.weights.card["labels"]

    @property
    def dims(self) -> int:
        return int(self.weights.card["input"]["dims"])

    def with_steps(self, steps: Optional[int]) -> "Model":
        """The same model with `steps` test-time fit steps (None: the card's)."""
        if steps is None or steps == self.plan.steps:
            return self
        return dataclasses.replace(self, plan=dataclasses.replace(self.plan, steps=steps))


@dataclass(frozen=True)
class Hooks:
    """Callbacks of a run, all optional.

    `stage(name, message)`: a stage begins (read, brain, bias, register, fit, decode, ...).
    `progress(FitProgress)`: after every fit step. `decode_progress(done, total, elapsed_s)`: labelling
    a scan's voxels. `live(step, labels)`: the labels as they form every `live_every` steps, a SimpleITK
    image (3D: on a coarse copy of the scan's grid; 2D: on the slice's grid). `cancel`: set
    it to stop the run (FitCancelled is raised at the next check; nothing is returned). `warning(message)`:
    something unusual about the input or the result (also listed in the result's warnings).
    """

    stage: Optional[Callable[[str, str], None]] = None
    progress: Optional[Callable[[FitProgress], None]] = None
    decode_progress: Optional[Callable[[int, int, float], None]] = None
    live: Optional[Callable[[int, Any], None]] = None
    live_every: int = 0
    warning: Optional[Callable[[str], None]] = None
    cancel: Optional[threading.Event] = field(default=None, compare=False)

    def say(self, name: str, message: str) -> None:
        if self.stage is not None:
            self.stage(name, message)

    def warn(self, message: str) -> None:
        if self.warning is not None:
            self.warning(message)
