"""A run's settings as typed objects: what to segment with (`SegmentOptions`) and where its files go (`Outputs`).

The command line (`metaseg segment`, `metaseg batch`, the Slicer module's child process) and the Python API
(`metaseg.segment`, `metaseg.Segmenter`) fill the same `SegmentOptions`, so every entry point runs the same
settings through the same checks; nothing below `cli.py` sees an argparse namespace or an argv.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]

QUALITIES = ("fast", "best")
# `quality`: fits per 3D scan. best = 3 fits averaged in probability: +0.010 mean validation fg-Dice
# (5 subjects, both label groups) for 3x the fit time; 2D ensembles gained < 0.01 (docs/results.md).
QUALITY_FITS = {"fast": 1, "best": 3}
BRAIN_EXTRACTION = ("auto", "on", "off")
BIAS_CORRECTION = ("auto", "n4", "off")
# More test-time steps than this are refused: the cards ask for 20 (2D) and 400 (3D), and 10,000 3D steps
# already take about 20 minutes on a 2-core CPU; a fit far past the card overfits the intensities anyway.
MAX_STEPS = 10_000
# Seeds of the fit's sampling: torch takes 64-bit seeds; the range stays far inside it (`best` adds 1 and 2).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment one image: every setting of `metaseg segment` that is not an output file.

    `labels`: the label set ("tissues": background, cortical GM, subcortical GM, WM, CSF); it selects the
    shipped weights and must be one the weights provide. `weights`: a weights file instead of the shipped
    one (its card says its label set). `device`: auto, cpu, cuda, cuda:N, mps or gpu. `quality`: fast (one
    fit) or best (3D: 3 fits averaged in probability). `steps`: test-time fit steps (None: the weights'
    card). `seed`: seed of the fit's coordinate sampling (the fits of `best` use seed, seed + 1, ...).
    `brain_extraction` (3D): auto|on|off, deepbet's brain of a whole head. `bias_correction` (3D):
    auto|n4|off (auto: N4 only when the brain was extracted). `uncertainty` (3D): also compute the
    per-voxel entropy. `accept_poor_match`: segment an input that would be refused as not matching the model.
    """

    labels: str = "tissues"
    weights: Optional[PathLike] = None
    device: str = "auto"
    quality: str = "fast"
    steps: Optional[int] = None
    seed: int = 0
    brain_extraction: str = "auto"
    bias_correction: str = "auto"
    uncertainty: bool = False
    accept_poor_match: bool = False

    def checked(self) -> "SegmentOptions":
        """Self, after refusing (InputError, with the command line's wording) any value out of range."""
        from .io.readers import InputError  # here: the command line imports this module before SimpleITK is needed

        for name, allowed in (("quality", QUALITIES), ("brain_extraction", BRAIN_EXTRACTION),
                              ("bias_correction", BIAS_CORRECTION)):
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} (got {value!r})")
        if self.steps is not None:
            check_steps(self.steps)
        check_seed(self.seed)
        if not isinstance(self.labels, str) or not self.labels:
            raise InputError(f"labels must be the name of a label set, e.g. 'tissues' (got {self.labels!r})")
        if not isinstance(self.device, str):
            raise InputError(f"device must be a name: auto, cpu, cuda, cuda:N, mps or gpu (got {self.device!r}; the "
                             "first CUDA GPU is 'cuda:0')")
        if self.weights is not None and not isinstance(self.weights, (str, Path)):
            raise InputError(f"weights must be the path of a weights file (got {type(self.weights).__name__} "
                             f"{self.weights!r})")
        for name in ("uncertainty", "accept_poor_match"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False (got {getattr(self, name)!r})")
        return self

    @property
    def fits(self) -> int:
        return QUALITY_FITS[self.quality]


def check_steps(steps: int) -> None:
    from .io.readers import InputError

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"--steps must be between 1 and {MAX_STEPS} (got {steps!r}); the weights' card gives the "
                         "trained number (leave --steps out to use it)")


def check_seed(seed: int) -> None:
    """InputError unless `seed` is an integer from 0 to MAX_SEED (a larger one overflows torch's generator)."""
    from .io.readers import InputError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        shown = f"about 2^{seed.bit_length() - 1}" if isinstance(seed, int) and seed > MAX_SEED else repr(seed)
        raise InputError(f"--seed must be an integer from 0 to {MAX_SEED} (got {shown})")


@dataclass(frozen=True)
class Outputs:
    """The files of one run (None: not written) and whether existing ones may be replaced.

    `labels` is the labelmap (.nii.gz, .nrrd, ...; exactly the input's grid); `seg_nrrd` Slicer's segmentation;
    `preview` a PNG; `report` the JSON report; `uncertainty` (3D) the entropy map; `inr` (3D) the fitted
    network for `metaseg reslice`; `brain_mask` (3D) the brain used. `live_dir` receives the labels as they
    form every `live_every` fit steps (0: off). Without `force` no existing file is replaced.
    """

    labels: Optional[PathLike] = None
    report: Optional[PathLike] = None
    preview: Optional[PathLike] = None
    seg_nrrd: Optional[PathLike] = None
    uncertainty: Optional[PathLike] = None
    inr: Optional[PathLike] = None
    brain_mask: Optional[PathLike] = None
    live_dir: Optional[PathLike] = None
    live_every: int = 0
    force: bool = False

    def files(self) -> Dict[str, Path]:
        """The output files asked for, by kind (the report's "outputs" keys)."""
        return {f.name: Path(v) for f in fields(self) if f.name in FILE_KINDS and (v := getattr(self, f.name))}


# output -> (kind of file for `output_paths.check_output`, command-line option that names it)
FILE_KINDS: Dict[str, Tuple[str, str]] = {
    "labels": ("image", "-o"), "report": ("json", "--report"), "preview": ("png", "--preview"),
    "seg_nrrd": ("segmentation", "--seg-nrrd"), "uncertainty": ("image", "--uncertainty"),
    "inr": ("fitted", "--save-inr"), "brain_mask": ("image", "--brain-mask"),
}
# outputs that only a 3D volume has
VOLUME_ONLY = {"inr": "--save-inr", "uncertainty": "--uncertainty", "brain_mask": "--brain-mask"}

# the files a batch scan may get besides its labels and report (`metaseg batch --preview --seg-nrrd ...`)
OPTIONAL_OUTPUTS = ("preview", "seg_nrrd", "uncertainty", "inr")


@dataclass(frozen=True)
class BatchSettings:
    """`metaseg batch`: the scans (`inputs`: files, folders, BIDS datasets, globs, CSV/TSV manifests), the output
    folder, the segmentation `options` shared by every scan, the optional files each scan gets (`extras`, of
    OPTIONAL_OUTPUTS), and how the run is spread: `devices` (one worker per entry), `jobs`, `shard` ("I/N",
    "auto"), or `merge` (join the shard tables). `force` redoes every scan; `progress`: bar, json or none."""

    inputs: Sequence[str]
    output: PathLike
    options: SegmentOptions = SegmentOptions()
    extras: Tuple[str, ...] = ()
    path_column: str = "path"
    id_column: str = "id"
    devices: Optional[str] = None
    jobs: Optional[int] = None
    shard: Optional[str] = None
    merge: bool = False
    force: bool = False
    progress: str = "bar"


JOB_FORMAT = "metaseg-job/1"


@dataclass(frozen=True)
class Job:
    """`metaseg job JOB.json`: one `segment` run described by a program (the Slicer module's child process)
    instead of a command line. The file holds the same typed settings: {"format": "metaseg-job/1", "input":
    path, "mask": path or null, "options": {SegmentOptions fields}, "outputs": {Outputs fields}, "progress":
    "json" | "bar" | "none"}. A field this version does not know is refused, never ignored."""

    input: str
    options: SegmentOptions
    outputs: Outputs
    mask: Optional[str] = None
    progress: str = "json"

    def to_dict(self) -> Dict[str, Any]:
        def plain(obj) -> Dict[str, Any]:
            return {f.name: (str(v) if isinstance(v, Path) else v) for f in fields(obj)
                    for v in [getattr(obj, f.name)]}

        return {"format": JOB_FORMAT, "input": str(self.input), "mask": None if self.mask is None else str(self.mask),
                "options": plain(self.options), "outputs": plain(self.outputs), "progress": self.progress}


def typed(cls, data: Any, what: str):
    """`cls(**data)` for a dataclass of this module, refusing (InputError) what is not a field of it."""
    from .io.readers import InputError

    if not isinstance(data, Mapping):
        raise InputError(f"{what} must be a JSON object of {cls.__name__} fields (got {type(data).__name__})")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{what}: {', '.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'} "
                         f"of {cls.__name__} (known: {', '.join(sorted(known))}); is the job file newer than this core?")
    for f in fields(cls):
        if isinstance(f.default, bool) and f.name in data and not isinstance(data[f.name], bool):
            raise InputError(f"{what}: {f.name} must be true or false (got {data[f.name]!r})")
    return cls(**data)


def read_job(path: PathLike) -> Job:
    """The Job in a JSON file (see Job), checked field by field (InputError with the file's name)."""
    from .io.readers import InputError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the job file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != JOB_FORMAT:
        raise InputError(f"{path} is not a MetaSeg job file (its \"format\" must be {JOB_FORMAT!r})")
    unknown = sorted(set(data) - {"format", "input", "mask", "options", "outputs", "progress"})
    if unknown:
        raise InputError(f"{path}: unknown entries {', '.join(unknown)}")
    if not isinstance(data.get("input"), str) or not data["input"]:
        raise InputError(f"{path}: \"input\" must name the image file")
    mask = data.get("mask")
    if mask is not None and not isinstance(mask, str):
        raise InputError(f"{path}: \"mask\" must be a file name or null")
    progress = data.get("progress", "json")
    if progress not in ("bar", "json", "none"):
        raise InputError(f"{path}: \"progress\" must be bar, json or none (got {progress!r})")
    return Job(data["input"], typed(SegmentOptions, data.get("options", {}), f"{path}: options"),
               typed(Outputs, data.get("outputs", {}), f"{path}: outputs"), mask, progress)
