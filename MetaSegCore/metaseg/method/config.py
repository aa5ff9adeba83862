"""Serializable model configuration, stored inside every weights file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a MetaSeg network.

    Defaults are the paper's 2D 5-class configuration: SIREN 2 -> 128 with 4 hidden
    sine layers (6 linear layers in all) and a 128 -> 128 -> 5 head: about 83K parameters.
    Two additions of ours to the head's input, both off in the paper's configuration (measured
    in docs/results.md): `head_all_layers` gives it every sine layer's output instead of the
    penultimate one alone (coarse to fine scales of the fitted image), and `head_intensity` the
    image's own intensity at the point: the fitted network is a smoothed copy of the scan (about
    23 dB in 3D) and the exact pixel value restores what the fit has not yet captured.
    """

    in_dim: int = 2
    width: int = 128
    hidden_layers: int = 4
    omega0: float = 30.0
    n_classes: int = 5
    head_all_layers: bool = False
    head_intensity: bool = False
    # The head also reads the spatial prior (metaseg.method.prior): each class's frequency at the point across the training
    # brains, registered like the scan. It tells the head where the small structures lie, whatever the fit's path.
    head_prior: bool = False
    # The head also reads the image around the point (metaseg.method.context): the scan smoothed at three scales
    # and its changes a few voxels away, which a point's own features and intensity cannot tell.
    head_context: bool = False
    # The head's hidden layers (LeakyReLU); empty: one of `width` units (the paper's head).
    head_hidden: Tuple[int, ...] = ()
    # > 0: the head's class probabilities are multiplied by the spatial prior to this power and renormalized (a
    # Bayesian prior on the output: the labels lean towards where each structure lies in the training brains)
    prior_power: float = 0.0
    # The label value each output class stands for, in class order (a label set's values, e.g. FreeSurfer's
    # aseg numbers for structures); empty: class i is label value i (the tissue models).
    label_values: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_values", tuple(int(v) for v in self.label_values))  # JSON gives a list
        object.__setattr__(self, "head_hidden", tuple(int(v) for v in self.head_hidden))
        if self.label_values and len(self.label_values) != self.n_classes:
            raise ValueError(f"{len(self.label_values)} label values for {self.n_classes} classes")

    @property
    def uses_prior(self) -> bool:
        """Whether the network needs the spatial prior (as the head's input or on its output)."""
        return self.head_prior or self.prior_power > 0

    @property
    def hidden(self) -> Tuple[int, ...]:
        """The head's hidden layer sizes."""
        return self.head_hidden or (self.width,)

    @property
    def values(self) -> Tuple[int, ...]:
        """The label value of every output class, in class order."""
        return self.label_values or tuple(range(self.n_classes))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if not self.label_values:  # files of tissue models stay as they were
            d.pop("label_values")
        if not self.head_prior:  # likewise for models without a prior
            d.pop("head_prior")
        if not self.head_context:  # or without the image context
            d.pop("head_context")
        if not self.head_hidden:  # and with the paper's head
            d.pop("head_hidden")
        else:
            d["head_hidden"] = list(self.head_hidden)
        if not self.prior_power:
            d.pop("prior_power")
        else:
            d["label_values"] = list(self.label_values)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)} (a model of a newer metaseg? update metaseg); "
                             f"expected {sorted(known)}")
        return cls(**d)


PAPER_2D = ModelConfig()
PAPER_3D = ModelConfig(in_dim=3, width=256, hidden_layers=4)
