"""Pieces shared by the exploration scripts: the heads they train, the fits they run and the
voxels they sample."""
import numpy as np
import torch


def mlp_head(n_in: int, hidden: int = 128, layers: int = 1, n_classes: int = 5) -> torch.nn.Sequential:
    """The stage-2 head's shape (Linear-LeakyReLU, `layers` times, then Linear to the classes)."""
    mods = [torch.nn.Linear(n_in, hidden), torch.nn.LeakyReLU(0.01)]
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.LeakyReLU(0.01)]
    return torch.nn.Sequential(*mods, torch.nn.Linear(hidden, n_classes))


def train_head_2d(X: torch.Tensor, labels: torch.Tensor, steps: int = 4000, hidden: int = 128,
                  layers: int = 1, seed: int = 0) -> torch.nn.Sequential:
    """A head on inputs `X` (N, n_in) trained like stage 2: Adam 1e-3, batches of 8192, focal gamma 1."""
    from metaseg.train.meta_train import focal_loss

    torch.manual_seed(seed)
    head = mlp_head(X.shape[1], hidden, layers)
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (8192,))
        loss = focal_loss(head(X[idx].float()), labels[idx], 1.0)
        opt.zero_grad(); loss.backward(); opt.step()
    return head


def fit_features_2d(net, w, grid: torch.Tensor, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fit `net`'s initialization to the canvas image `img` with weights `w`'s plan; the fitted
    network's head features at every point of `grid`."""
    from metaseg.method.fit import adapt

    init = {k: p.detach() for k, p in net.named_parameters()}
    fast = init
    for _, _, fast in adapt(net, init, grid, img.reshape(-1), w.plan, w.log_lr, generator=gen):
        pass
    with torch.no_grad():
        return torch.func.functional_call(net, fast, (grid,))[1]


def pick_voxels(img: np.ndarray, n, seed: int) -> np.ndarray:
    """Flat indices of `n` distinct brain (nonzero) voxels drawn with `seed`; all of them if n is None."""
    flat = np.flatnonzero(img.reshape(-1) > 0)
    return flat if n is None else np.random.default_rng(seed).choice(flat, n, replace=False)


def fitted_samples(net, w, subj: str, n, fits: int = 1):
    """For each of `fits` seeds k: fit `subj`'s aligned volume with weights `w` (seed k) and pick
    `n` brain voxels (seed k). Yields (fit result, normalized image, labels, flat indices, coords)."""
    from pathlib import Path
    from metaseg.io.data import load_volume
    from metaseg.method.preprocess import grid_coords, normalize_intensity
    from metaseg.method.segment import segment_array

    v = load_volume(Path("../shared/data/brains") / subj)
    img = normalize_intensity(v.image)
    for k in range(fits):
        res = segment_array(net, w.log_lr, w.plan, v.image, w.canvas, decode=False, seed=k)
        sel = pick_voxels(img, n, k)
        yield res, img, v.labels, sel, grid_coords(w.canvas, torch.from_numpy(sel))
