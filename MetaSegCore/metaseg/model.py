"""The MetaSeg network: a SIREN trunk with an intensity output and a segmentation head.

The head reads the trunk's *penultimate* features, so fitting the trunk to an image's
intensities moves the features the head decodes into labels ("fit pixels, get labels").
Everything is written so that `torch.func.functional_call` can run it with a
dictionary of parameters, which is how meta-training differentiates through the fit.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from .config import ModelConfig

Params = Dict[str, torch.Tensor]


class SineLayer(nn.Module):
    """y = sin(omega0 * (W x + b)) with the SIREN initialization (Sitzmann et al. 2020)."""

    def __init__(self, in_features: int, out_features: int, omega0: float, first: bool):
        super().__init__()
        self.omega0 = omega0
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if first else math.sqrt(6.0 / in_features) / omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega0 * self.linear(x))


class MetaSegNet(nn.Module):
    """SIREN trunk -> (intensity, penultimate features); head(features) -> class logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        layers = [SineLayer(c.in_dim, c.width, c.omega0, first=True)]
        layers += [SineLayer(c.width, c.width, c.omega0, first=False) for _ in range(c.hidden_layers)]
        self.trunk = nn.Sequential(*layers)
        self.intensity = nn.Linear(c.width, 1)
        bound = math.sqrt(6.0 / c.width) / c.omega0
        with torch.no_grad():
            self.intensity.weight.uniform_(-bound, bound)
        self.head = nn.Sequential(
            nn.Linear(c.width + int(c.head_intensity), c.width), nn.LeakyReLU(0.01), nn.Linear(c.width, c.n_classes)
        )

    def features(self, coords: torch.Tensor) -> torch.Tensor:
        """Penultimate trunk features at `coords` (N, in_dim) in [-1, 1]."""
        return self.trunk(coords)

    def forward(self, coords: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (intensity (N,), features (N, width))."""
        feats = self.trunk(coords)
        return self.intensity(feats).squeeze(-1), feats

    def head_input(self, feats: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """What the head reads at N points: the features, and with `config.head_intensity` the
        image's normalized intensity `pixels` (N,) there as one more column."""
        return torch.cat([feats, pixels[:, None].to(feats.dtype)], 1) if self.config.head_intensity else feats

    def inr_parameter_names(self) -> list:
        """Names of the parameters a test-time fit optimizes: trunk + intensity output."""
        return [n for n, _ in self.named_parameters() if not n.startswith("head.")]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
