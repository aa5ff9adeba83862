"""Meta-training (MAML) of the INR initialization and the segmentation head, then stage 2.

Stage 1: for a training image, run the fit (`fit.adapt`: Adam steps on the intensity MSE only;
unlike the paper's inner loop there is no label loss, since test time has no labels) from the
current initialization, score the adapted network on the joint loss (MSE + focal loss of the
head's labels) and update the initialization, the head and the per-step learning rates.
Stage 2: fit the chosen initialization to every training image with the *test-time* plan
(`TrainSettings.test_plan`, which may be longer than the inner loop) and fine-tune the head
alone on the resulting features, so the head reads exactly the features it will see.
Checkpoints are kept by validation Dice.

Distributed stage 1: launched by torchrun with several processes (`torchrun --nproc_per_node N
-m metaseg train ...`, WORLD_SIZE > 1), every rank draws the same `meta_batch` task indices per
outer step and runs the tasks whose slot is its rank modulo N; the gradients are summed over the
ranks (gloo on the CPU, nccl on CUDA) before the step, so every rank takes the update one process
would take on all the tasks. The random draws inside a task come from a generator seeded by
(seed, step, slot) alone (`task_generator`), hence the result does not depend on N. Rank 0 alone
logs, validates, checkpoints and runs stage 2. One process (no torchrun) is the default.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..version import __version__
from ..method.config import ModelConfig
from ..io.data import PAPER_SLICE, LabeledImage, coronal_slices, load_splits, load_volume
from ..method.device import pick_device
from ..method.fit import FitPlan, FixedSchedule, adapt, fit, weighted_mse
from ..metrics import foreground_dice, generalized_dice
from ..method.context import ImageContext
from ..method.model import MetaSegNet
from ..method.prior import SpatialPrior, class_fractions
from ..method.preprocess import add_noise, augment_2d, augment_points, grid_coords, normalize_intensity, pad_to_canvas
from ..method.segment import segment_array
from ..io.atomic import write_all
from ..labelsets import LabelSet, label_set as get_label_set
from .legacy import CHECKPOINT_FORMAT, STAGE1_FORMAT
from ..io.safefile import dumps_tree, load_tree, loads, loads_tree, pickle_message, read_bytes
from ..method.weights import FORMAT as WEIGHTS_FORMAT, Weights, WeightsError, load_weights, save_weights


@dataclass
class TrainSettings:
    """Everything that defines a meta-training run; written into the checkpoint and the card."""

    data_root: str = "../shared/data/brains"  # a folder of subjects, or a pack from data.pack_volumes (3D)
    out_dir: str = "runs/metaseg2d"
    dims: int = 2  # 2: coronal slices on a 192x192 canvas; 3: whole aligned volumes
    model: ModelConfig = field(default_factory=ModelConfig)
    canvas: tuple = (192, 192)
    train_slices: tuple = tuple(range(95, 124, 2))  # coronal slices around the paper's 109
    val_slices: tuple = (105, PAPER_SLICE, 113)
    plan: FitPlan = field(default_factory=FitPlan)  # the inner loop of meta-training
    test_steps: int = 100  # test-time fit steps (0: the inner loop's); stage 2 and the card use them
    test_batch: int = 4096  # coordinates per test-time step (0: the inner loop's)
    test_lr: float = 1e-4  # constant test-time learning rate (0: the meta-learned per-step rates)
    test_average: int = 0  # the test-time fit decodes the mean of its parameters over its last N steps (FitPlan)
    test_schedule: str = "random"  # the test-time fit's batches: random, or the canvas's fixed sequence (FitPlan)
    inner_lr: float = 3e-4  # initial value of the meta-learned per-step learning rates
    learn_inner_lr: bool = True
    first_order: bool = True  # first-order learned faster per CPU-minute than second-order in our runs
    warm_steps: int = 300  # first outer steps without the inner fit: the init learns the population first
    outer_steps: int = 1250
    outer_lr: float = 1e-4
    lr_lr: float = 1e-2
    meta_batch: int = 1
    outer_points: int = 16384  # pixels scoring the outer loss per task (random subset)
    focal_gamma: float = 1.0
    image_only: bool = False  # ablation: outer loss is the MSE alone (no labels in stage 1)
    augment: bool = True
    noise: float = 0.0  # > 0: Gaussian noise up to this sigma on every training image's brain (add_noise)
    val_every: int = 100
    ckpt_every: int = 50
    head_steps: int = 4000
    head_lr: float = 1e-3
    head_fits_per_image: int = 1
    head_points: int = 8192
    head_balance: float = 0.0  # stage 2 samples a point of class frequency f with probability ~ f^-head_balance
    # then adds head_adjust * head_balance * log f to the head's output bias: the sampling taught it a prior ~ f^(1-B),
    # and this moves the share head_adjust of the way back to the true one, so small structures are over-called less
    head_adjust: float = 0.0
    # > 0: the head kept is the exponential moving average of its weights with this decay (0.999: about its last 1000
    # steps), which varies less from one training run to the next than its last weights
    head_ema: float = 0.0
    seed: int = 0
    label_set: str = "tissues"  # what the head outputs (metaseg.labelsets): tissues or structures
    splits: str = ""  # a splits JSON like metaseg/splits.json (train/validation lists); "" = the package's
    init: str = ""  # a best_stage1.safetensors (or weights file) to start from instead of the SIREN init (with outer_steps 0: stage 2 only)
    device: str = "auto"
    command: str = ""

    @property
    def test_plan(self) -> FitPlan:
        """The fit run at test time (and for stage 2): the inner loop's unless overridden."""
        return FitPlan(steps=self.test_steps or self.plan.steps, batch_size=self.test_batch or self.plan.batch_size,
                       bg_weight=self.plan.bg_weight, foreground_only=self.plan.foreground_only,
                       average_last=self.test_average, schedule=self.test_schedule)

    def test_log_lr(self, log_lr: torch.Tensor) -> torch.Tensor:
        """Test-time log learning rates: a constant `test_lr`, or the meta-learned ones."""
        if self.test_lr > 0:
            return torch.full((1, log_lr.shape[1]), math.log(self.test_lr))
        return log_lr.detach().clone()

    @property
    def labels(self) -> LabelSet:
        return get_label_set(self.label_set)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["plan"] = self.plan.to_dict()
        return d


INPUT_DESCRIPTION = {
    2: "one coronal slice of a skull-stripped T1 brain MRI, affinely aligned to Talairach space and cropped "
    "like neurite-oasis (160x192, 1 mm); centred on the canvas",
    3: "a skull-stripped T1 brain MRI volume, affinely aligned to Talairach space and cropped like "
    "neurite-oasis (160x192x224, 1 mm, FreeSurfer LIA voxel order); only its nonzero voxels are fitted",
}


def settings_for(dims: int, **overrides) -> TrainSettings:
    """The default training settings for 2D slices or 3D volumes, with `overrides` applied."""
    if dims == 3:
        base = dict(
            dims=3, out_dir="runs/metaseg3d", model=ModelConfig(in_dim=3, width=128, hidden_layers=4),
            canvas=(224, 192, 160), plan=FitPlan(steps=20, batch_size=8192, foreground_only=True),
            test_steps=400, test_batch=8192, outer_steps=2000, outer_points=16384, head_fits_per_image=4,
            head_points=16384,
        )
    elif dims == 2:
        base = dict(plan=FitPlan(steps=10, batch_size=2048), outer_points=8192)
    else:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    s = TrainSettings(**{**base, **overrides})
    labels = s.labels  # the head's classes follow the label set (tissue models keep value = class index)
    values = labels.values if labels.values != tuple(range(len(labels))) else ()
    return replace(s, model=replace(s.model, n_classes=len(labels), label_values=values))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    logp = F.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    return torch.mean(-((1 - logp.exp()) ** gamma) * logp)


def prepare_tasks(root: Path, subjects: List[str], s: "TrainSettings", slices=()) -> List[LabeledImage]:
    """Normalized, canvas-padded images (torch tensors) of the given subjects: the coronal
    `slices` of each in 2D, the whole aligned volume in 3D."""
    out = []
    for subj in subjects:
        images = coronal_slices(root / subj, slices) if s.dims == 2 else [load_volume(root / subj)]
        lut = np.asarray(s.labels.index_lut(), np.int16)
        for im in images:
            if not (im.image > 0).any():
                continue
            classes = lut[im.labels]  # label values -> the network's class indices
            if (classes < 0).any():
                bad = sorted(set(np.unique(im.labels[classes < 0]).tolist()))
                raise SystemExit(f"{im.name}: label values {bad[:5]} are not in the {s.label_set} label set; "
                                 "prepare the pack with the matching --label-set")
            img, _ = pad_to_canvas(normalize_intensity(im.image), s.canvas)
            lab, _ = pad_to_canvas(classes.astype(np.uint8), s.canvas)
            out.append(LabeledImage(im.name, torch.from_numpy(img), torch.from_numpy(lab)))
    return out


class TaskPoints:
    """A training image as the points a fit sees: coordinates, intensities and labels.

    With a foreground-only plan (3D) these are the brain's voxels alone, as at test time.
    Augmentation: the slice itself is warped in 2D (`augment_2d`); in 3D the coordinates are
    (`augment_points`), which is exact and needs no resampling of the volume.
    """

    def __init__(self, s: "TrainSettings", device: torch.device):
        self.s, self.device = s, device
        self.grid = grid_coords(s.canvas).to(device)
        self.cache: Dict[str, tuple] = {}
        self.priors: Dict[str, SpatialPrior] = {}  # with a prior head: each training image's leave-one-out prior
        self._context, self._context_of = None, None

    def prior(self, t: LabeledImage) -> Optional[SpatialPrior]:
        """The spatial prior this image's head reads in training: the other training brains' (None without one)."""
        return self.priors.get(t.name)

    def context(self, t: LabeledImage, coords: torch.Tensor) -> Optional[torch.Tensor]:
        """The image around `coords` of image `t` for a head that reads it (`ImageContext`; None otherwise). Made
        from the clean image: smoothing leaves little of the fit's 2 % noise, and a scan's own noise is in it too."""
        if not self.s.model.head_context:
            return None
        if self._context_of != t.name:  # one image's blurs at a time (80 MB in 3D)
            self._context, self._context_of = ImageContext(t.image.to(self.device)), t.name
        return self._context.at(coords)

    def __call__(self, t: LabeledImage, gen: torch.Generator, augment: bool) -> tuple:
        coords, values, labels = self._points(t, gen, augment)
        if self.s.noise > 0:
            values = add_noise(values, self.s.noise, gen)
        return coords, values, labels

    def schedule(self, t: LabeledImage, plan: FitPlan, member: int) -> Optional[FixedSchedule]:
        """The fixed batches of fit `member` of a 3D image as at test time (None: the plan draws them at random)."""
        if plan.schedule != "fixed" or self.s.dims != 3:
            return None
        self._points(t, None, False)  # fills the cache
        return FixedSchedule.for_plan(plan, self.cache[t.name][3], t.image.numel(), member)

    def _points(self, t: LabeledImage, gen: torch.Generator, augment: bool) -> tuple:
        if self.s.dims == 2:
            img, lab = augment_2d(t.image, t.labels, gen) if augment else (t.image, t.labels)
            return self.grid, img.reshape(-1).to(self.device), lab.reshape(-1).long().to(self.device)
        if t.name not in self.cache:
            flat = t.image.reshape(-1)
            idx = torch.nonzero(flat > 0).squeeze(1) if self.s.plan.foreground_only else torch.arange(flat.numel())
            self.cache[t.name] = tuple(x.to(self.device) for x in
                                       (grid_coords(self.s.canvas, idx), flat[idx], t.labels.reshape(-1)[idx].long(), idx))
        coords, values, labels, _ = self.cache[t.name]
        if augment:
            coords, values = augment_points(coords, values, gen)
        return coords, values, labels


def validate(net: MetaSegNet, log_lr: torch.Tensor, plan: FitPlan, tasks, canvas, seed: int = 0) -> Dict[str, float]:
    """Segment each task exactly as at test time and return mean fg-Dice (over the label set's
    foreground labels present) and paper-GDS (on class indices)."""
    fg, gds = [], []
    values = np.asarray(net.config.values)
    index = np.zeros(256, np.int64)
    index[values] = np.arange(len(values))
    for t in tasks:
        r = segment_array(net, log_lr.detach(), plan, t.image.numpy(), canvas, seed=seed, normalize=False)
        ref = t.labels.numpy()
        fg.append(foreground_dice(r.labels, values[ref], classes=tuple(values[1:])))
        gds.append(generalized_dice(index[r.labels], ref, len(values)))
    return {"fg_dice": float(np.mean(fg)), "gds": float(np.mean(gds)), "per_image": [round(x, 4) for x in fg]}


class Log:
    """Appends JSON lines to `train.log` and prints a one-line progress bar."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **rec) -> None:
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    @staticmethod
    def bar(step: int, total: int, t0: float, extra: str) -> None:
        done = step / total
        el = time.time() - t0
        eta = el / max(done, 1e-9) - el
        sys.stderr.write(f"\r[{'#' * int(30 * done):<30}] {step}/{total} {extra} eta {eta/60:.1f} min ")
        sys.stderr.flush()


def build_model(s: TrainSettings, dev: torch.device) -> tuple:
    """A fresh network, its per-step log learning rates and the outer Adam over both (the
    rates only when they are learned); seeded by the caller's `torch.manual_seed`."""
    net = MetaSegNet(s.model).to(dev)
    names = net.inr_parameter_names()
    log_lr = torch.nn.Parameter(torch.full((s.plan.steps, len(names)), math.log(s.inner_lr), device=dev))
    groups = [{"params": list(net.parameters()), "lr": s.outer_lr}]
    if s.learn_inner_lr:
        groups.append({"params": [log_lr], "lr": s.lr_lr})
    return net, log_lr, torch.optim.Adam(groups)


def task_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The generator of the random draws inside task `slot` of outer step `step` (augmentation,
    coordinate sampling). It depends on nothing else, so a task sees the same numbers whichever
    rank runs it, and a resumed run the same as an uninterrupted one."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, slot]).generate_state(1)[0]))


def outer_step(net: MetaSegNet, log_lr: torch.Tensor, opt: torch.optim.Optimizer, tasks: List[LabeledImage],
               s: TrainSettings, step: int, points: TaskPoints) -> Dict[str, float]:
    """One meta-update on `tasks` (the step's meta-batch, the same list on every rank); `step`
    counts the updates done before. Each task: fit from the current initialization (none during
    the warm steps), score the joint loss on `s.outer_points` pixels, backward with weight
    1/len(tasks). In a process group each rank runs the slots equal to its rank modulo the world
    size and the gradients are summed over the ranks before `opt.step()`. Returns the mean losses."""
    rank, world = _rank_world()
    opt.zero_grad(set_to_none=True)
    totals = [0.0, 0.0]  # mse, focal summed over this rank's tasks
    warm = step < s.warm_steps
    for slot, t in enumerate(tasks):
        if slot % world != rank:
            continue
        g = task_generator(s.seed, step, slot)
        coords, values, target = points(t, g, s.augment)
        params = dict(net.named_parameters())
        fast = params
        for _, _, fast in ([] if warm else adapt(net, params, coords, values, s.plan, log_lr, create_graph=not s.first_order,
                               first_order=s.first_order, generator=g)):
            pass
        idx = torch.randint(0, coords.shape[0], (s.outer_points,), generator=g).to(coords.device)
        pred, feats = torch.func.functional_call(net, fast, (coords[idx],))
        mse = weighted_mse(pred, values[idx], s.plan.bg_weight)
        loss = mse
        if not s.image_only:
            logits = torch.func.functional_call(net.head, {k[5:]: v for k, v in fast.items() if k.startswith("head.")},
                                                (net.head_input(feats, values[idx], coords[idx], points.prior(t),
                                                                points.context(t, coords[idx])),))
            foc = focal_loss(logits, target[idx], s.focal_gamma)
            loss = loss + foc
            totals[1] += float(foc.detach())
        (loss / len(tasks)).backward()
        totals[0] += float(mse.detach())
    if world > 1:
        _all_reduce_grads([p for group in opt.param_groups for p in group["params"]])
        summed = torch.tensor(totals, device=log_lr.device)
        dist.all_reduce(summed)
        totals = summed.tolist()
    opt.step()
    return {"mse": totals[0] / len(tasks), "focal": totals[1] / len(tasks)}


def _rank_world() -> tuple:
    """(rank, world size) of this process: (0, 1) unless it is in a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist_setup(dev: torch.device) -> torch.device:
    """Join torchrun's process group when it started several processes (WORLD_SIZE > 1) and
    return the device this process trains on: nccl with the GPU of LOCAL_RANK on CUDA, gloo on
    the CPU. The timeout is long because the other ranks wait while rank 0 validates. A single
    process is left alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise SystemExit(f"distributed training runs on CUDA (nccl) or the CPU (gloo), not {dev}: use --device cpu or cuda")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return dev


def _all_reduce_grads(params: List[torch.Tensor]) -> None:
    """Sum the gradients of `params` over the ranks, in place, in one flat all-reduce.

    A parameter without a gradient on some rank (it ran no task) counts as zero there; one with
    none on every rank keeps `grad` None, as in one process, so Adam leaves it (and its step
    count) alone, e.g. the learning rates during the warm steps."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def _dist_finish() -> None:
    """At the end of stage 1: wait for every rank, then leave the process group (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def meta_train(s: TrainSettings) -> Path:
    """Run (or resume) stage 1 and stage 2; write `<out_dir>/metaseg.safetensors` and return its path."""
    if s.model.head_context and s.augment:
        # augmentation moves the points off the voxels whose surroundings the context describes
        raise SystemExit("--head-context needs --no-augment")
    torch.manual_seed(s.seed)
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "checkpoint.safetensors").exists() and (out / "checkpoint.pt").exists():
        # a run of metaseg <= 0.4.0: its checkpoint is a pickle, never opened here
        raise SystemExit(pickle_message(out / "checkpoint.pt", "checkpoint") + "; then rerun to resume")
    log = Log(out / "train.log")
    root = Path(s.data_root)
    splits = load_splits(Path(s.splits)) if s.splits else load_splits()
    train = prepare_tasks(root, splits["train"], s, s.train_slices)
    val = prepare_tasks(root, splits["validation"], s, s.val_slices)
    dev = _dist_setup(pick_device(s.device))
    lead = _rank_world()[0] == 0  # rank 0 (or the only process) logs, validates and saves
    world = _rank_world()[1]
    if lead and world > s.meta_batch:
        print(f"note: {world} processes but {s.meta_batch} task(s) per step: some processes stay idle (--meta-batch)",
              file=sys.stderr)
    points = TaskPoints(s, dev)

    net, log_lr, opt = build_model(s, dev)
    if s.model.head_prior:
        net.prior = build_priors(train, s, points, lead)
    gen = torch.Generator().manual_seed(s.seed)  # draws the task indices (and stage 2's randomness)
    state = {"step": 0, "best": -1.0, "best_step": 0, "head_loaded": True}

    ckpt = out / "checkpoint.safetensors"
    if ckpt.exists():
        c = load_tree(ckpt, CHECKPOINT_FORMAT, "training checkpoint")
        old, new = json.loads(c["settings_core"]), json.loads(_core(s))
        differ = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
        if differ:
            raise SystemExit(f"{ckpt} was written with other settings ({', '.join(differ)}); use another --out or delete it")
        net.load_state_dict(c["net"])
        log_lr.data.copy_(c["log_lr"])
        opt.load_state_dict(c["opt"])
        gen.set_state(c["gen"].cpu())  # map_location may have moved it to the GPU
        state = json.loads(c["state"])
        if lead:
            print(f"resumed from step {state['step']}", file=sys.stderr)
    else:
        if s.init:
            state["head_loaded"] = load_init(net, log_lr, Path(s.init))
        if lead:
            log.write(event="start", settings=s.to_dict(), n_train=len(train), n_val=len(val), version=__version__,
                      device=str(dev), torch=torch.__version__)

    def save_ckpt() -> None:
        blob = {
            "net": net.state_dict(), "log_lr": log_lr.detach().clone(), "opt": opt.state_dict(),
            "gen": gen.get_state(), "state": json.dumps(state), "settings": json.dumps(s.to_dict()),
            "settings_core": _core(s),
        }
        write_all([(ckpt, lambda tmp: Path(tmp).write_bytes(dumps_tree(blob, CHECKPOINT_FORMAT)))])

    def save_best() -> None:
        blob = {"net": net.state_dict(), "log_lr": log_lr.detach().clone()}
        write_all([(out / "best_stage1.safetensors", lambda tmp: Path(tmp).write_bytes(dumps_tree(blob, STAGE1_FORMAT)))])

    t0 = time.time()
    start = state["step"]
    while state["step"] < s.outer_steps:
        batch = [train[int(i)] for i in torch.randint(len(train), (s.meta_batch,), generator=gen)]
        stats = outer_step(net, log_lr, opt, batch, s, state["step"], points)
        state["step"] += 1
        step = state["step"]
        if not lead:
            continue
        if step % 10 == 0:
            log.write(event="step", step=step, **stats, lr_mean=float(log_lr.detach().exp().mean()))
        Log.bar(step - start, s.outer_steps - start, t0, f"mse {stats['mse']:.2e} focal {stats['focal']:.3f}")
        if step % s.val_every == 0 or step == s.outer_steps:
            if s.image_only:
                v = {"fg_dice": -float(stats["mse"])}  # no head yet: keep the best reconstruction
            else:  # the fit being meta-learned: inner plan, learned rates
                v = validate(net, log_lr, s.plan, val, s.canvas)
            log.write(event="val", step=step, **v)
            print(f"\nstep {step}: validation {v}", file=sys.stderr)
            if v["fg_dice"] > state["best"]:
                state["best"], state["best_step"] = v["fg_dice"], step
                save_best()
        if step % s.ckpt_every == 0 or step == s.outer_steps:
            save_ckpt()

    _dist_finish()
    if not lead:  # stage 2 and the weights are rank 0's
        return out / "metaseg.safetensors"
    if s.outer_steps == 0:  # ablation: no meta-training, the SIREN init as it is
        save_best()
    best = load_tree(out / "best_stage1.safetensors", STAGE1_FORMAT, "stage-1 result")
    net.load_state_dict(best["net"])
    log_lr.data.copy_(best["log_lr"])
    test_lr = s.test_log_lr(log_lr)
    stage1 = {"step": state["best_step"]}
    if not s.image_only and (s.outer_steps > 0 or (s.init and state.get("head_loaded", True))):
        stage1.update(validate(net, test_lr, s.test_plan, val, s.canvas))  # a new head untrained: nothing to score
    head_metrics = train_head(net, test_lr.to(dev), s, train, points, gen, log, out / "stage2_fits")
    stage2 = validate(net, test_lr, s.test_plan, val, s.canvas)
    log.write(event="stage2", **stage2)
    if "fg_dice" in stage1 and stage2["fg_dice"] < stage1["fg_dice"]:
        net.load_state_dict(best["net"])  # the fine-tuned head did not help on validation: keep stage 1's
        chosen = "stage1"
    else:
        chosen = "stage2"
    card = {
        "name": f"MetaSeg {s.dims}D, {s.labels.title}",
        "metaseg_version": __version__,
        "label_set": s.label_set,
        "labels": s.labels.card_labels(),
        "input": {
            "dims": s.dims,
            "canvas": list(s.canvas),
            "description": INPUT_DESCRIPTION[s.dims],
            "normalization": "divide by the 99th percentile of the brain (nonzero) pixels, clip to [0, 1]",
        },
        "fit": s.test_plan.to_dict(),
        "training": {
            "settings": s.to_dict(),
            "splits": splits,
            "stage1_best_step": state["best_step"],
            "head": head_metrics,
            "chosen_head": chosen,
        },
        "metrics": {"validation_stage1": stage1, "validation_final": stage2 if chosen == "stage2" else stage1},
    }
    prior = net.prior.to_uint8() if net.prior is not None else None
    w = Weights(s.model, {k: v.cpu() for k, v in net.state_dict().items()}, test_lr.cpu(), card, prior=prior)
    path = out / "metaseg.safetensors"
    digest = save_weights(w, path)
    log.write(event="done", path=str(path), sha256=digest, minutes=(time.time() - t0) / 60)
    print(f"\nwrote {path} (sha256 {digest})", file=sys.stderr)
    return path


def build_priors(train: List[LabeledImage], s: TrainSettings, points: TaskPoints, say: bool) -> SpatialPrior:
    """The spatial prior of all training brains (validation and the weights use it) and, in `points`, each training
    brain's leave-one-out prior (its head must not read its own labels). 3D only."""
    if s.dims != 3:
        raise SystemExit("--head-prior is for 3D models (the prior lives on the 3D model grid)")
    t0 = time.time()
    n = len(s.labels)
    fractions = {t.name: class_fractions(t.labels.numpy(), n) for t in train}
    full = SpatialPrior(sum(fractions.values()) / len(fractions))
    points.priors = {name: full.without(f, len(fractions)) for name, f in fractions.items()}
    if say:
        print(f"spatial prior of {len(train)} training brains ({time.time() - t0:.0f} s)", file=sys.stderr)
    return full


def load_init(net: MetaSegNet, log_lr: torch.Tensor, path: Path) -> bool:
    """Start from another run's stage-1 result (`best_stage1.safetensors`) or from a weights file (e.g. the
    shipped `metaseg3d.safetensors`, checked by its sha256: fine-tuning on new data). A paper head
    (penultimate features only) becomes this model's wider head (`head_all_layers`,
    `head_intensity`) with zero weights for the new inputs: it starts as the old head, and stage 2
    teaches it the rest. A head for another label set is not loaded: the trunk is, and the head starts
    afresh. A weights file holds the test-time learning rates only, so the inner loop's per-step rates
    keep their initial value (`--inner-lr`) and are meta-learned again. Returns whether the head was loaded."""
    if not path.is_file():
        raise SystemExit(f"--init: no such file {path}; expected a run's best_stage1.safetensors or a weights file")
    try:  # a safetensors file (never a pickle: refused with how to convert it), weights or a stage-1 result
        data = read_bytes(path, "stage-1 or weights", 1 << 30)
        fmt = loads(data, path, "stage-1 or weights")[1].get("format")
        if fmt == WEIGHTS_FORMAT:
            blob = {"net": load_weights(path).state, "log_lr": None}
        else:
            blob = loads_tree(data, STAGE1_FORMAT, path, "stage-1 result")
    except WeightsError as e:
        raise SystemExit(f"--init: {e}") from None
    state = dict(blob["net"])
    w = state.get("head.0.weight")
    if w is not None and w.shape[1] == net.config.width != net.head_in_features:
        state["head.0.weight"] = net.widen_head_weight(w)
    elif w is not None and net.config.head_prior and w.shape[1] == net.head_in_features - net.config.n_classes:
        state["head.0.weight"] = net.widen_prior_columns(w)  # the same head, now also reading the prior
    mine = {k: v.shape for k, v in net.state_dict().items() if k.startswith("head.")}
    theirs = {k: v.shape for k, v in state.items() if k.startswith("head.")}
    head_loaded = mine == theirs
    if not head_loaded:  # another label set or head shape: keep the trunk, start a new head (stage 2 trains it)
        last = max(theirs, key=lambda k: int(k.split(".")[1])) if theirs else None
        had = f"a head for {theirs[last][0]} classes with {len(theirs) // 2 - 1} hidden layer(s)" if last else "no head"
        print(f"--init: {path} has {had}, this model {net.config.n_classes} classes with hidden layers "
              f"{list(net.config.hidden)}: its trunk is used, the head starts afresh", file=sys.stderr)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in net.state_dict().items() if k.startswith("head.")})
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"--init {path} does not fit this model ({e}); use the same --width, --dims and head options") from None
    if blob["log_lr"] is None:
        return head_loaded
    if blob["log_lr"].shape != log_lr.shape:
        raise SystemExit(f"--init {path} has learning rates for {blob['log_lr'].shape[0]} inner steps, this run "
                         f"{log_lr.shape[0]}: use the same --fit-steps")
    log_lr.data.copy_(blob["log_lr"])
    return head_loaded


def _core(s: TrainSettings) -> str:
    """The settings that must match to resume (not step counts or intervals, nor the init: the checkpoint holds the
    state it led to, and a file converted to another format keeps its content under a new name)."""
    d = s.to_dict()
    d.pop("init", None)
    for k in ("outer_steps", "val_every", "ckpt_every", "command", "out_dir", "data_root", "head_steps", "head_lr",
              "head_fits_per_image", "head_points", "head_balance", "head_adjust", "head_ema", "test_steps", "test_batch", "test_lr", "test_average", "test_schedule"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def fit_key(net: MetaSegNet, log_lr: torch.Tensor, s: TrainSettings) -> str:
    """What a stage-2 fit depends on besides its image and member: the initialization, the learning rates, the
    test-time plan, the noise and augmentation. A kept fit with another key is stale and fitted again."""
    h = hashlib.sha256(json.dumps([s.test_plan.to_dict(), s.noise, s.augment], sort_keys=True).encode())
    for name in net.inr_parameter_names():
        h.update(net.get_parameter(name).detach().cpu().float().numpy().tobytes())
    h.update(log_lr.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def fit_generator(s: TrainSettings, name: str, member: int) -> torch.Generator:
    """The random stream of one stage-2 fit (its noise draw, augmentation, random batches): a function of the
    image, the member and the seed alone, so a fit is the same whenever and in whatever order it is made."""
    return torch.Generator().manual_seed(zlib.crc32(f"{name}/{member}".encode()) ^ s.seed)


def stage2_fit(net: MetaSegNet, log_lr: torch.Tensor, s: TrainSettings, t: LabeledImage, member: int,
               points: "TaskPoints", key: str, keep: Optional[Path]) -> tuple:
    """Fit `member` of training image `t` as at test time; return (fitted INR parameters, coords, values, target).
    With `keep` (a folder) the parameters are kept there as safetensors (0.3 MB), so an interrupted stage 2
    resumes where it stopped and other heads can be trained on the same fits (benchmarks/head_lab.py)."""
    from safetensors.torch import load_file, safe_open, save_file

    gen = fit_generator(s, t.name, member)
    coords, values, target = points(t, gen, s.augment)
    path = keep / f"{t.name}_{member}.safetensors" if keep else None
    if path is not None and path.is_file():
        with safe_open(str(path), "pt") as f:
            fresh = (f.metadata() or {}).get("key") == key
        if fresh:
            return {k: v.to(coords.device) for k, v in load_file(str(path)).items()}, coords, values, target
    init = {k: p.detach() for k, p in net.named_parameters()}
    fast = fit(net, init, coords, values, s.test_plan, log_lr, image=t.image, generator=gen,
               batches=points.schedule(t, s.test_plan, member)).params
    fast = {k: v.detach() for k, v in fast.items() if not k.startswith("head.")}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_all([(path, lambda tmp: save_file({k: v.cpu().contiguous() for k, v in fast.items()}, tmp,
                                                metadata={"key": key}))])
    return fast, coords, values, target


def head_sample(target: torch.Tensor, s: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """`s.head_points` indices into a fit's points: uniform, or with `s.head_balance` > 0 a point of a class of
    frequency f drawn with probability ~ f^-head_balance, so that small structures weigh more in the head's loss."""
    if s.head_balance <= 0:
        return torch.randint(0, target.numel(), (s.head_points,), generator=gen).to(target.device)
    freq = torch.bincount(target, minlength=len(s.labels)).float().clamp_min(1)
    weight = (freq[target] ** -s.head_balance).cpu()
    return torch.multinomial(weight, s.head_points, replacement=True, generator=gen).to(target.device)


def train_head(net: MetaSegNet, log_lr, s: TrainSettings, train, points: TaskPoints, gen, log: Log,
               keep: Optional[Path] = None) -> dict:
    """Stage 2: fit the initialization to each training image exactly as at test time (plan
    `s.test_plan`, learning rates `log_lr`), then fine-tune the head alone on the features.
    The fits are kept in `keep` (see `stage2_fit`)."""
    key = fit_key(net, log_lr, s)
    head = {k: p.detach() for k, p in net.named_parameters() if k.startswith("head.")}
    n = len(train) * s.head_fits_per_image * s.head_points
    dev = next(net.parameters()).device
    # filled in place: a list joined at the end would hold every feature twice (about 10 GB each for 38 brains)
    feats = torch.empty((n, net.head_in_features), device=dev)
    targets = torch.empty(n, dtype=torch.long, device=dev)
    freq = torch.zeros(len(s.labels), device=dev)  # the classes' share of the fits' points, for head_adjust
    t0, row = time.time(), 0
    for i, t in enumerate(train):
        if i % 10 == 0:
            Log.bar(i, len(train), t0, "stage 2: fitting the training images")
        for j in range(s.head_fits_per_image):
            fast, coords, values, target = stage2_fit(net, log_lr, s, t, j, points, key, keep)
            idx = head_sample(target, s, gen)
            with torch.no_grad():
                _, f = torch.func.functional_call(net, {**fast, **head}, (coords[idx],))
                feats[row : row + len(idx)] = net.head_input(f, values[idx], coords[idx], points.prior(t),
                                                             points.context(t, coords[idx]))
            targets[row : row + len(idx)] = target[idx]
            row += len(idx)
            freq += torch.bincount(target, minlength=len(s.labels)).float() / target.numel()
    opt = torch.optim.Adam(net.head.parameters(), lr=s.head_lr)
    ema = WeightAverage(s.head_ema) if s.head_ema > 0 else None
    losses = []
    for i in range(s.head_steps):
        idx = torch.randint(0, feats.shape[0], (8192,), generator=gen).to(feats.device)
        loss = focal_loss(net.head(feats[idx]), targets[idx], s.focal_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(net.head)
        losses.append(float(loss.detach()))
        if (i + 1) % 100 == 0:
            log.write(event="head", step=i + 1, focal=float(np.mean(losses[-100:])))
    if ema is not None:
        ema.copy_to(net.head)
    adjust = logit_adjustment(freq, s)
    with torch.no_grad():
        net.head[-1].bias += adjust
    return {"points": int(feats.shape[0]), "steps": s.head_steps, "final_focal": float(np.mean(losses[-100:])),
            "logit_adjustment": [round(float(v), 4) for v in adjust], "minutes": (time.time() - t0) / 60}


class WeightAverage:
    """The exponential moving average of a module's weights (`head_ema`), from its first update on: the first update
    copies them, each later one moves the average the share 1 - decay towards them."""

    def __init__(self, decay: float):
        self.decay, self.weights = decay, None

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        if self.weights is None:
            self.weights = [p.detach().clone() for p in module.parameters()]
        else:
            for e, p in zip(self.weights, module.parameters()):
                e.lerp_(p, 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for p, e in zip(module.parameters(), self.weights or []):
            p.copy_(e)


def logit_adjustment(freq: torch.Tensor, s: TrainSettings) -> torch.Tensor:
    """What stage 2 adds to the head's output bias (Menon et al. 2021, logit adjustment): head_adjust * head_balance *
    log of each class's share `freq` of the training points (0 without balanced sampling or head_adjust)."""
    share = (freq / freq.sum().clamp_min(1e-12)).clamp_min(1e-8)
    return s.head_adjust * s.head_balance * torch.log(share)
