"""Distributed meta-training: 2 CPU processes (gloo) take exactly the update of one process.

Three outer steps on synthetic 2D tasks: a warm step (no inner fit, so the learning rates get no
gradient anywhere), a step with 2 tasks (one per rank) and a step with 1 task (rank 1 idle).
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaseg.method.config import ModelConfig
from metaseg.io.data import LabeledImage
from metaseg.method.fit import FitPlan
from metaseg.train.meta_train import TaskPoints, _dist_finish, build_model, outer_step, settings_for

SETTINGS = settings_for(
    2, model=ModelConfig(width=16, hidden_layers=1), canvas=(32, 32), plan=FitPlan(steps=2, batch_size=256),
    outer_points=512, warm_steps=1, meta_batch=2, outer_lr=1e-3, device="cpu",
)


def _tasks():
    """Four synthetic slices: a bright disk of random size holding two tissue labels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    out = []
    for k in range(4):
        r = np.hypot(yy - 16, xx - 16)
        radius = rng.uniform(8, 13)
        img = np.where(r < radius, rng.uniform(0.3, 1.0, (32, 32)), 0.0).astype(np.float32)
        lab = np.where(r < radius / 2, 3, np.where(r < radius, 1, 0)).astype(np.uint8)
        out.append(LabeledImage(f"t{k}", torch.from_numpy(img), torch.from_numpy(lab)))
    return out


# (step, task indices) of the three outer steps
SCHEDULE = [(0, [0, 1]), (1, [2, 3]), (2, [1])]


def _train(init: dict) -> dict:
    """Run SCHEDULE from the weights `init`, in this process or as one rank of a process group."""
    torch.set_num_threads(1)
    net, log_lr, opt = build_model(SETTINGS, torch.device("cpu"))
    net.load_state_dict(init["net"])
    log_lr.data.copy_(init["log_lr"])
    points, tasks = TaskPoints(SETTINGS, torch.device("cpu")), _tasks()
    for step, idx in SCHEDULE:
        outer_step(net, log_lr, opt, [tasks[i] for i in idx], SETTINGS, step, points)
    return {"net": {k: v.detach().clone() for k, v in net.state_dict().items()}, "log_lr": log_lr.detach().clone()}


def _worker(rank: int, world: int, init: dict, out_path: str) -> None:
    # a file rendezvous: no TCP port to race other jobs on a shared CI runner for
    dist.init_process_group("gloo", init_method=f"file://{out_path}.store", rank=rank, world_size=world)
    result = _train(init)
    torch.save(result, f"{out_path}.{rank}")
    # as `metaseg train` does: a rank that tore its group down while the other still talked to
    # it made gloo abort the process (SIGABRT, seen once in CI)
    _dist_finish()


def test_two_processes_take_the_single_process_update(tmp_path):
    torch.manual_seed(0)
    net, log_lr, _ = build_model(SETTINGS, torch.device("cpu"))
    init = {"net": {k: v.clone() for k, v in net.state_dict().items()}, "log_lr": log_lr.detach().clone()}

    threads = torch.get_num_threads()
    try:
        single = _train(init)
    finally:
        torch.set_num_threads(threads)

    mp.spawn(_worker, args=(2, init, str(tmp_path / "result")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(2)]

    # the update is real: the network and the learned rates (steps 1 and 2) moved
    assert not torch.allclose(single["log_lr"], init["log_lr"])
    assert any(not torch.allclose(single["net"][k], init["net"][k]) for k in init["net"])
    for res in ranks:  # every rank holds the single-process result
        assert torch.allclose(res["log_lr"], single["log_lr"], atol=1e-6, rtol=0)
        for k, v in single["net"].items():
            assert torch.allclose(res["net"][k], v, atol=1e-6, rtol=0), k
