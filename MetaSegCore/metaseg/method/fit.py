"""Test-time fitting: adapt the INR to one image's intensities; the head stays frozen.

`adapt` is the single implementation of the fit. Meta-training calls it with
`create_graph=True` so that gradients flow through every inner Adam step into the
initialization; the CLI and the Slicer module call it without. Sharing one function
guarantees that what was meta-learned is exactly what runs at test time.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
from torch.func import functional_call

from ..io.progress import FitProgress  # noqa: F401 (the event type lives with the reporting)
from .context import ImageContext
from .model import MetaSegNet, Params
from .preprocess import sample_grid

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@dataclass(frozen=True)
class FitPlan:
    """How a test-time fit runs; stored in the weights' card because the steps are part of the model."""

    steps: int = 10
    batch_size: int = 4096  # coordinates sampled per step; >= pixel count means full batch
    bg_weight: float = 1.0  # weight of the MSE on background (zero-intensity) pixels
    foreground_only: bool = False  # fit and decode only nonzero voxels; the rest is background (3D)
    # > 0: the fitted network is the mean of the parameters over the fit's last `average_last` steps (as SWA does
    # in training): the random batches of those steps average out, so the labels depend less on the fit's path
    average_last: int = 0
    # "random": each step draws `batch_size` points at random (the seed decides the path); "fixed": the batches are
    # a fixed sequence of places on the model canvas (`FixedSchedule`), the same for every scan and seed, so two
    # fits of one brain, or of two scans of it registered to the template, follow the same path
    schedule: str = "random"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown fit schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, default in (("average_last", 0), ("schedule", "random")):
            if d[key] == default:  # cards and checkpoints of plans without these stay as they were
                d.pop(key)
        return d


SCHEDULES = ("random", "fixed")
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the Weyl sequence k * GOLDEN mod 1 fills [0, 1) most evenly
# A brain fills about a fifth of the 3D canvas (1.2-1.6 L of 224 x 192 x 160 mm): a fixed schedule draws
# batch_size / FOREGROUND_SHARE canvas places per step so that about batch_size of them fall in the brain
FOREGROUND_SHARE = 0.2


class FixedSchedule:
    """The batches of a fit as a fixed sequence of canvas places, whatever the scan and the seed.

    Step k takes the canvas voxels at golden-ratio (Weyl) positions k * per_step ... (k + 1) * per_step - 1
    of the flattened canvas, offset by the ensemble member's phase, and keeps those among the fitted points.
    The sequence depends on the canvas alone: a random batch makes the labels depend on the path (issue 28:
    26 % hippocampal volume between seeds), a fixed one does not, and registered repeat scans see the same
    places at the same step. Each step's places are spread over the whole canvas (a low-discrepancy sequence).
    """

    def __init__(self, point_index: torch.Tensor, canvas_size: int, batch_size: int, share: float,
                 member: int = 0):
        self.size = canvas_size
        self.per_step = min(canvas_size, max(1, int(round(batch_size / share))))
        # the Weyl step in whole voxels, made coprime with the canvas so that the sequence visits every voxel once
        # per cycle (integer arithmetic: exact on any machine)
        stride = int(round(GOLDEN * canvas_size))
        while math.gcd(stride, canvas_size) != 1:
            stride += 1
        offset = int((member * (math.sqrt(2.0) - 1.0)) % 1.0 * canvas_size)  # members of an ensemble start apart
        # each fitted point's place in the sequence, sorted once: a step's batch is then a slice
        place = ((point_index.cpu().long() - offset) % canvas_size * pow(stride, -1, canvas_size)) % canvas_size
        self.place, self.order = torch.sort(place)

    @classmethod
    def for_plan(cls, plan: "FitPlan", point_index: torch.Tensor, canvas_size: int,
                 member: int = 0) -> Optional["FixedSchedule"]:
        """The schedule of fit `member` of `plan` over the points at `point_index` of the flattened canvas (None
        when the plan draws its batches at random)."""
        if plan.schedule != "fixed":
            return None
        share = FOREGROUND_SHARE if plan.foreground_only else 1.0
        return cls(point_index, canvas_size, plan.batch_size, share, member)

    def _between(self, lo: int, hi: int) -> torch.Tensor:
        a, b = torch.searchsorted(self.place, torch.tensor([lo, hi])).tolist()
        return self.order[a:b]

    def __call__(self, step: int) -> torch.Tensor:
        lo = step * self.per_step % self.size
        hi = lo + self.per_step
        if hi <= self.size:
            return self._between(lo, hi)
        return torch.cat([self._between(lo, self.size), self._between(0, hi - self.size)])


class FitCancelled(RuntimeError):
    """Raised when the cancel event is set during a fit; nothing has been written."""


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, bg_weight: float) -> torch.Tensor:
    if bg_weight == 1.0:
        return torch.mean((pred - target) ** 2)
    w = torch.where(target > 0, torch.ones_like(target), torch.full_like(target, bg_weight))
    return torch.sum(w * (pred - target) ** 2) / torch.sum(w)


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak * peak / mse)


def step_lrs(log_lr: torch.Tensor, step: int) -> torch.Tensor:
    """Per-tensor learning rates for `step`; steps past the trained budget reuse the last row."""
    return torch.exp(log_lr[min(step, log_lr.shape[0] - 1)])


def adapt(
    model: MetaSegNet,
    params: Params,
    coords: torch.Tensor,
    values: torch.Tensor,
    plan: FitPlan,
    log_lr: torch.Tensor,
    *,
    create_graph: bool = False,
    first_order: bool = False,
    generator: Optional[torch.Generator] = None,
    batches: Optional[Callable[[int], torch.Tensor]] = None,
) -> Iterator[tuple]:
    """Run `plan.steps` Adam steps on the MSE to `values` at `coords`; yield (step, loss, params).

    Only the INR (trunk + intensity output) moves. `log_lr` holds one log learning rate per
    step and per INR tensor (meta-learned). The Adam update is written out so that it is
    differentiable: with `create_graph` (second-order MAML) gradients flow through the
    gradients themselves; with `first_order` the gradients are treated as constants but the
    result still depends on the initialization and the learning rates; with neither (test
    time) everything is detached. `batches(k)`, if given, names step k's points (a `FixedSchedule`)
    instead of `plan.batch_size` random ones.
    """
    track = create_graph or first_order
    names = model.inr_parameter_names()
    fast = dict(params)
    m = {n: torch.zeros_like(fast[n]) for n in names}
    v = {n: torch.zeros_like(fast[n]) for n in names}
    n_points = coords.shape[0]
    full = plan.batch_size >= n_points
    for k in range(plan.steps):
        if full:
            x, y = coords, values
        elif batches is not None:
            idx = batches(k).to(coords.device)
            x, y = coords[idx], values[idx]
        else:
            idx = torch.randint(0, n_points, (plan.batch_size,), generator=generator, device="cpu").to(coords.device)
            x, y = coords[idx], values[idx]
        if not track:
            for n in names:
                fast[n] = fast[n].detach().requires_grad_(True)
        with torch.enable_grad():
            pred, _ = functional_call(model, fast, (x,), {"features": False})
            loss = weighted_mse(pred, y, plan.bg_weight)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
        lrs = step_lrs(log_lr, k)
        t = k + 1
        c1, c2 = 1 - BETA1**t, 1 - BETA2**t
        with torch.set_grad_enabled(track):
            for j, (n, g) in enumerate(zip(names, grads)):
                m[n] = BETA1 * m[n] + (1 - BETA1) * g
                v[n] = BETA2 * v[n] + (1 - BETA2) * g * g
                # sqrt(v + eps^2) rather than sqrt(v) + eps: same value, finite second derivative at v = 0
                fast[n] = fast[n] - lrs[j] * (m[n] / c1) / torch.sqrt(v[n] / c2 + EPS * EPS)
        yield k + 1, loss.detach(), fast
    if not track:
        for n in names:
            fast[n] = fast[n].detach()


class FittedINR:
    """An INR fitted to one image: query labels, probabilities, intensity or features anywhere.

    Coordinates are model coordinates in [-1, 1]; queries run in chunks so memory stays
    bounded whatever the number of points. A model whose head also reads the image's intensity
    (`config.head_intensity`) or the image around each point (`config.head_context`) needs that `image`
    (normalized, on the model canvas); it is interpolated at the query points, which gives the pixel values
    themselves on the grid. `context`: the image's `ImageContext` where the caller has it already (made otherwise).
    """

    def __init__(self, model: MetaSegNet, params: Params, chunk: int = 1 << 16, image: Optional[torch.Tensor] = None,
                 context: Optional[ImageContext] = None):
        c = model.config
        if (c.head_intensity or c.head_context) and image is None:
            raise ValueError("this model's head reads the image's intensity or its surroundings: pass the fitted image")
        self.model = model
        self.params = {k: t.detach() for k, t in params.items()}
        self.chunk = chunk
        self.image = image.to(self.device, torch.float32) if (c.head_intensity or c.head_context) else None
        self._context = context

    @property
    def context(self) -> Optional[ImageContext]:
        """The image around each point, for a head that reads it (made on first use: three blurs of the canvas)."""
        if self._context is None and self.model.config.head_context:
            self._context = ImageContext(self.image)
        return self._context

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _map(self, coords: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             head: bool = False) -> torch.Tensor:
        """fn(intensity, features) per chunk; with `head`, fn(intensity, logits).

        No points still run one empty chunk, so the result has fn's dtype and trailing shape
        (a plane that misses the tissue gives empty labels, not an empty float tensor)."""
        coords = coords.to(self.device, torch.float32)
        out = []
        with torch.inference_mode():
            for s in range(0, max(coords.shape[0], 1), self.chunk):
                x = coords[s : s + self.chunk]
                inten, feats = functional_call(self.model, self.params, (x,))
                if head:
                    pixels = sample_grid(self.image, x) if self.image is not None else None
                    ctx = self.context.at(x) if self.model.config.head_context else None
                    head_in = self.model.head_input(feats, pixels, x, context=ctx)
                    feats = self.model.outputs(functional_call(self.model.head, _sub(self.params, "head."), (head_in,)), x)
                out.append(fn(inten, feats))
        return torch.cat(out)

    def decode(self, coords: torch.Tensor) -> tuple:
        """(label values uint8, intensity float32) in one pass: what segmentation needs."""
        packed = self._map(coords, lambda i, z: torch.stack([z.argmax(-1).float(), i], -1), head=True).cpu()
        return self.values[packed[:, 0].long()], packed[:, 1].contiguous()

    def labels(self, coords: torch.Tensor) -> torch.Tensor:
        """Label values (uint8): the argmax class mapped to its value (`MetaSegNet.values`)."""
        return self.values[self._map(coords, lambda i, z: z.argmax(-1), head=True).cpu()]

    @property
    def values(self) -> torch.Tensor:
        """The label value of each class (uint8), indexed by class."""
        return torch.tensor(self.model.values, dtype=torch.uint8)

    def probabilities(self, coords: torch.Tensor) -> torch.Tensor:
        return self._map(coords, lambda i, z: torch.softmax(z, -1), head=True).cpu()

    def intensity(self, coords: torch.Tensor) -> torch.Tensor:
        return self._map(coords, lambda i, f: i).cpu()

    def features(self, coords: torch.Tensor) -> torch.Tensor:
        return self._map(coords, lambda i, f: f).cpu()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: t.cpu() for k, t in self.params.items()}


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix) :]: t for k, t in params.items() if k.startswith(prefix)}


def fit(
    model: MetaSegNet,
    params: Params,
    coords: torch.Tensor,
    values: torch.Tensor,
    plan: FitPlan,
    log_lr: torch.Tensor,
    *,
    seed: int = 0,
    progress: Optional[Callable[[FitProgress], None]] = None,
    cancel: Optional[threading.Event] = None,
    snapshot: Optional[Callable[[int, FittedINR], None]] = None,
    snapshot_every: int = 0,
    image: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    batches: Optional[Callable[[int], torch.Tensor]] = None,
) -> FittedINR:
    """Fit the INR to (coords, values) from `params`; return the fitted, queryable INR.

    `progress` is called after every step; `cancel` is checked after every step and raises
    FitCancelled promptly when set. `snapshot(step, inr)` receives the INR as it is every
    `snapshot_every` steps (live preview of the labels forming). `image`: the normalized canvas
    image, for a head that reads intensities (`FittedINR`). `generator`, if given, draws the coordinate batches
    instead of one seeded by `seed` (training's shared random stream); `batches` replaces the random draws by
    a fixed sequence (`FixedSchedule`; the seed then plays no part).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    fast = params
    if cancel is not None and cancel.is_set():
        raise FitCancelled("fit cancelled before the first step")
    mean = _RunningMean(plan.steps - plan.average_last) if plan.average_last > 0 else None
    context = ImageContext(image) if model.config.head_context and image is not None else None  # once, not per snapshot
    for step, loss, fast in adapt(model, params, coords, values, plan, log_lr, generator=gen, batches=batches):
        if mean is not None:
            mean.add(step, fast)
        if progress is not None:
            elapsed = time.perf_counter() - t0
            mse = float(loss)
            progress(FitProgress(step, plan.steps, mse, psnr_from_mse(mse), elapsed, elapsed / step * (plan.steps - step)))
        if cancel is not None and cancel.is_set():
            raise FitCancelled(f"fit cancelled at step {step} of {plan.steps}")
        if snapshot is not None and snapshot_every > 0 and step % snapshot_every == 0 and step < plan.steps:
            snapshot(step, FittedINR(model, fast, image=image, context=context))
    return FittedINR(model, fast if mean is None else mean.value(), image=image, context=context)


class _RunningMean:
    """The mean of the fit's parameters over the steps after `after` (in place: one copy of the network)."""

    def __init__(self, after: int):
        self.after, self.n, self.sum = max(after, 0), 0, None

    def add(self, step: int, params: Params) -> None:
        if step <= self.after:
            return
        if self.sum is None:
            self.sum = {k: t.detach().clone() for k, t in params.items()}
        else:
            for k, t in params.items():
                self.sum[k] += t.detach()
        self.n += 1

    def value(self) -> Params:
        return {k: t / self.n for k, t in self.sum.items()}
