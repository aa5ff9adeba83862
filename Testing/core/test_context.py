"""Issue 28: the head reads the image around each point (`ModelConfig.head_context`, metaseg/method/context.py).
The columns describe the neighbourhood (flat where the image is flat, signed across an edge), a network with them
labels only with its image, and a fitted network keeps them through its file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metaseg.method.config import ModelConfig
from metaseg.method.context import SIGMAS, ImageContext, n_columns
from metaseg.method.fit import FittedINR
from metaseg.method.model import MetaSegNet
from metaseg.method.preprocess import grid_coords
from metaseg.space.fitted import FittedVolume

SHAPE = (40, 36, 32)


def _at_voxels(ctx: ImageContext, voxels) -> torch.Tensor:
    flat = np.ravel_multi_index(np.asarray(voxels).T, SHAPE)
    return ctx.at(grid_coords(SHAPE, torch.from_numpy(flat)))


def test_a_flat_image_has_its_value_and_no_differences_inside():
    ctx = ImageContext(torch.full(SHAPE, 0.6))
    cols = _at_voxels(ctx, [(20, 18, 16), (17, 20, 14)])
    assert cols.shape == (2, n_columns(3))
    torch.testing.assert_close(cols[:, : len(SIGMAS)], torch.full((2, len(SIGMAS)), 0.6))
    torch.testing.assert_close(cols[:, len(SIGMAS):], torch.zeros(2, n_columns(3) - len(SIGMAS)), atol=1e-6, rtol=0)


def test_an_edge_shows_in_the_differences_along_its_axis_only():
    img = torch.zeros(SHAPE)
    img[20:] = 1.0  # brighter from row 20 on, along the first axis
    cols = _at_voxels(ImageContext(img), [(19, 18, 16)])[0]
    diffs = cols[len(SIGMAS):].reshape(2, 3, 2)  # (1-voxel at 2 / 2-voxel at 4) x axis x (-, +)
    assert (diffs[:, 0, 1] > 0.1).all() and (diffs[:, 0, 0] < 0.1).all()
    assert diffs[:, 0, 1].min() > diffs[:, 0, 0].max()
    torch.testing.assert_close(diffs[:, 1:, 0], diffs[:, 1:, 1])  # nothing changes across the other axes


def test_a_slice_has_the_columns_of_its_two_axes():
    """In 2D the context is the same idea on the slice: the blurs, and the differences along its two axes; a slice
    of a volume whose edge runs across it has the volume's columns for those axes."""
    img = torch.zeros(SHAPE)
    img[20:] = 1.0
    vol = _at_voxels(ImageContext(img), [(19, 18, 16)])[0]
    sl = img[:, :, 16]
    flat = torch.tensor([19 * SHAPE[1] + 18])
    cols = ImageContext(sl).at(grid_coords(SHAPE[:2], flat))[0]
    assert cols.shape == (n_columns(2),) == (11,)
    diffs = cols[len(SIGMAS):].reshape(2, 2, 2)
    assert (diffs[:, 0, 1] > 0.1).all() and (diffs[:, 0, 0] < 0.1).all()
    torch.testing.assert_close(diffs[:, 1, 0], diffs[:, 1, 1])
    # a flat image along the third axis: the slice's blurs in-plane are the volume's
    torch.testing.assert_close(diffs[:, 0], vol[len(SIGMAS):].reshape(2, 3, 2)[:, 0], atol=1e-5, rtol=0)


def _net() -> MetaSegNet:
    torch.manual_seed(0)
    return MetaSegNet(ModelConfig(in_dim=3, width=8, hidden_layers=1, n_classes=4, head_intensity=True,
                                  head_context=True))


def test_a_context_head_needs_its_image_and_reads_it():
    net = _net()
    assert net.head_in_features == 8 + 1 + n_columns(3)
    assert ModelConfig.from_dict(net.config.to_dict()) == net.config
    assert "head_context" not in ModelConfig(in_dim=3).to_dict()  # files of models without it stay as they were
    with pytest.raises(ValueError, match="pass the fitted image"):
        FittedINR(net, dict(net.named_parameters()))
    assert MetaSegNet(ModelConfig(in_dim=2, width=8, hidden_layers=1, n_classes=4, head_context=True)).head_in_features \
        == 8 + n_columns(2)
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(SHAPE, generator=gen)
    coords = grid_coords(SHAPE)[::97]
    a = FittedINR(net, dict(net.named_parameters()), image=img).probabilities(coords)
    b = FittedINR(net, dict(net.named_parameters()), image=img.flip(0)).probabilities(coords)
    assert not torch.allclose(a, b)


def test_a_fitted_context_network_labels_the_same_after_its_file():
    net = _net()
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    mask = x ** 2 + y ** 2 + z ** 2 < 0.7
    image = torch.from_numpy((np.rint(255 * (0.5 + 0.4 * np.sin(4 * x) * y)) * mask / 255).astype(np.float32))
    ref = {"size": list(SHAPE), "spacing": [1.0] * 3, "origin": [0.0] * 3, "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    vol = FittedVolume(FittedINR(net, dict(net.named_parameters()), image=image), np.eye(4), mask, {"reference": ref})
    back = FittedVolume.from_bytes(vol.to_bytes())
    coords = grid_coords(SHAPE)[torch.from_numpy(mask.reshape(-1))]
    assert back.inr.model.config.head_context
    # the file keeps the parameters a little rounded (docs/results.md, stored fitted networks), the image exactly
    torch.testing.assert_close(back.inr.image, vol.inr.image)
    torch.testing.assert_close(back.inr.probabilities(coords), vol.inr.probabilities(coords), atol=1e-3, rtol=0)


def test_training_reads_each_images_context_and_refuses_augmentation(tmp_path):
    """Stage 2 gives each training image's head the context of that image (`TaskPoints.context`); augmentation,
    which moves the points off their voxels, is refused with what to do."""
    from metaseg.io.data import LabeledImage
    from metaseg.train.meta_train import TaskPoints, meta_train, settings_for

    s = settings_for(3, model=_net().config, canvas=SHAPE, augment=False, out_dir=str(tmp_path / "run"))
    points = TaskPoints(s, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    images = [LabeledImage(n, torch.rand(SHAPE, generator=gen), torch.zeros(SHAPE, dtype=torch.uint8)) for n in "ab"]
    coords = grid_coords(SHAPE)[::53]
    for t in images + images[:1]:
        torch.testing.assert_close(points.context(t, coords), ImageContext(t.image).at(coords))
    plain = settings_for(3, canvas=SHAPE)
    assert TaskPoints(plain, torch.device("cpu")).context(images[0], coords) is None
    from dataclasses import replace

    with pytest.raises(SystemExit, match="--head-context needs --no-augment"):
        meta_train(replace(s, augment=True))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_columns_are_the_same_whatever_the_number_of_threads():
    """A cross-section rendered by another process (other thread count) must label the same voxels: the blurs add
    their terms in one order (`prior.smooth`), so the columns are bit for bit the same."""
    img = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))
    coords = grid_coords(SHAPE)[::31] + 0.004
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ImageContext(img).at(coords)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(ImageContext(img).at(coords), one)
    finally:
        torch.set_num_threads(threads)
