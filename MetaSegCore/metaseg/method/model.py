"""The MetaSeg network: a SIREN trunk with an intensity output and a segmentation head.

The head reads the trunk's features (the *penultimate* layer's in the paper; optionally every
layer's and the pixel's own intensity, see `ModelConfig`), so fitting the trunk to an image's
intensities moves the features the head decodes into labels ("fit pixels, get labels").
Everything is written so that `torch.func.functional_call` can run it with a
dictionary of parameters, which is how meta-training differentiates through the fit.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import ModelConfig
from .context import n_columns
from .prior import SpatialPrior

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


# The smallest prior probability: a class never seen at a point in the training brains keeps a small chance, so a
# clear image still wins over the prior (a scan registered a little differently, an unusual anatomy)
PRIOR_FLOOR = 1e-3


class MergedOutput:
    """The network's classes summed into coarser ones (31 structures -> 4 tissues), so one model serves both label
    sets: each coarse class's logit is the log-sum-exp of its classes' logits, hence softmax gives the summed
    probabilities exactly and argmax the most probable coarse class."""

    def __init__(self, groups: Sequence[int], values: Sequence[int]):
        self.groups = [torch.tensor([i for i, g in enumerate(groups) if g == c]) for c in range(len(values))]
        if any(len(g) == 0 for g in self.groups):
            raise ValueError("every coarse class needs at least one of the network's classes")
        self.values = tuple(int(v) for v in values)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.logsumexp(logits[:, g.to(logits.device)], 1) for g in self.groups], 1)


class MetaSegNet(nn.Module):
    """SIREN trunk -> (intensity, features); head(features) -> class logits.

    The head's features are the penultimate layer's (the paper), or with `head_all_layers`
    every sine layer's output side by side: the early layers vary slowly in space, the last
    ones quickly, so the head sees the image at several scales.
    """

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
        head, n_in = [], self.head_in_features
        for n in c.hidden:
            head += [nn.Linear(n_in, n), nn.LeakyReLU(0.01)]
            n_in = n
        self.head = nn.Sequential(*head, nn.Linear(n_in, c.n_classes))
        # With `config.head_prior`: the class frequencies the head reads beside the features. Part of the weights,
        # not a parameter: the fit never moves it, and a fitted network needs only its parameters.
        self.prior: Optional[SpatialPrior] = None
        # With a `MergedOutput`: the labels come out in a coarser label set (`values`), e.g. tissues from structures.
        self.merged: Optional[MergedOutput] = None

    @property
    def values(self) -> Tuple[int, ...]:
        """The label value of each output class, in class order: the configuration's, or the merged set's."""
        return self.merged.values if self.merged is not None else self.config.values

    @property
    def head_in_features(self) -> int:
        c = self.config
        return (c.width * (c.hidden_layers + 1 if c.head_all_layers else 1) + int(c.head_intensity)
                + (c.n_classes if c.head_prior else 0) + (n_columns(c.in_dim) if c.head_context else 0))

    def features(self, coords: torch.Tensor) -> torch.Tensor:
        """The head's trunk features at `coords` (N, in_dim) in [-1, 1]."""
        return self.forward(coords)[1]

    def forward(self, coords: torch.Tensor, features: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return (intensity (N,), features (N, width, or width * layers with `head_all_layers`)). With
        `features=False` (the fit, which only needs the intensity) the features are not gathered: None."""
        if not (self.config.head_all_layers and features):
            feats = self.trunk(coords)
            return self.intensity(feats).squeeze(-1), feats if features else None
        outs, x = [], coords
        for layer in self.trunk:
            x = layer(x)
            outs.append(x)
        return self.intensity(x).squeeze(-1), torch.cat(outs, -1)

    def head_input(self, feats: torch.Tensor, pixels: Optional[torch.Tensor], coords: Optional[torch.Tensor] = None,
                   prior: Optional[SpatialPrior] = None, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the head reads at N points: the features; with `config.head_intensity` the image's normalized
        intensity `pixels` (N,) there as one more column; with `config.head_prior` the spatial prior's class
        probabilities at the model coordinates `coords` (N, dims): `prior`, or the model's own (`self.prior`);
        with `config.head_context` the image around the points, `context` (N, `context.n_columns`; `ImageContext.at`).
        Training passes each brain the prior of the other brains."""
        cols = [feats]
        if self.config.head_intensity:
            cols.append(pixels[:, None].to(feats.dtype))
        if self.config.head_prior:
            prior = prior if prior is not None else self.prior
            if prior is None or coords is None:
                raise ValueError("this model's head reads a spatial prior: the weights carry none, or no coordinates "
                                 "were given")
            cols.append(prior.at(coords).to(feats.device, feats.dtype))
        if self.config.head_context:
            if context is None:
                raise ValueError("this model's head reads the image around each point: pass its context")
            cols.append(context.to(feats.device, feats.dtype))
        return torch.cat(cols, 1) if len(cols) > 1 else feats

    def outputs(self, logits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The head's logits at `coords` as the labels are read from them: weighed by the prior (`with_prior`),
        then merged into the output label set (`merged`)."""
        logits = self.with_prior(logits, coords)
        return self.merged(logits) if self.merged is not None else logits

    def with_prior(self, logits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The head's logits at `coords`, with `config.prior_power` > 0 shifted by power * log(prior): softmax then
        gives the head's probabilities times prior^power, renormalized."""
        if self.config.prior_power <= 0:
            return logits
        if self.prior is None:
            raise ValueError("this model weighs its labels by a spatial prior, but the weights carry none")
        p = self.prior.at(coords).to(logits.device, logits.dtype)
        return logits + self.config.prior_power * torch.log(p.clamp_min(PRIOR_FLOOR))

    def widen_prior_columns(self, weight: torch.Tensor) -> torch.Tensor:
        """The first head weight of a head without the prior's columns, with zero weights for them appended:
        the head then computes the same logits, and training teaches it to use the prior."""
        extra = self.head_in_features - weight.shape[1]
        return torch.cat([weight, weight.new_zeros(weight.shape[0], extra)], 1)

    def widen_head_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The first head weight (out, width) of a paper head (penultimate features only) placed
        in this head's layout, zero for the other inputs: this head then computes the same logits."""
        out = weight.new_zeros(weight.shape[0], self.head_in_features)
        start = self.config.width * self.config.hidden_layers if self.config.head_all_layers else 0
        out[:, start : start + weight.shape[1]] = weight
        return out

    def inr_parameter_names(self) -> list:
        """Names of the parameters a test-time fit optimizes: trunk + intensity output."""
        return [n for n, _ in self.named_parameters() if not n.startswith("head.")]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
