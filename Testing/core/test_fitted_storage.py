"""Stored fitted networks (metaseg/space/fitted.py): the image's lossless coding (its finite differences where they
can be nonzero), files of the former coding still read, and models that read a spatial prior, whose prior stays in
the weights."""
import json
import math
import zlib

import numpy as np
import pytest
import torch

from metaseg.io.safefile import dumps, loads
from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitPlan, FittedINR
from metaseg.method.prior import coarse_shape
from metaseg.method.weights import LABELS, Weights, WeightsError, save_weights
from metaseg.resources import WEIGHTS_ENV
from metaseg.space import fitted
from metaseg.space.fitted import FittedVolume

CANVAS = (12, 14, 10)
REF = {"size": list(CANVAS), "spacing": [1.0] * 3, "origin": [0.0] * 3, "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}


def _image_and_mask(shape=(23, 30, 17), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = x ** 2 + y ** 2 + (1.2 * z) ** 2 < 0.8
    img = 120 + 80 * np.sin(3 * x) * np.cos(2 * y) + rng.normal(0, 6, shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8) * mask, mask


@pytest.mark.parametrize("shape", [(23, 30, 17), (1, 5, 40), (33, 2, 3)])
def test_the_differences_are_zero_outside_their_support(shape):
    """The stored differences leave out only zeros: the image comes back from the support alone."""
    img, mask = _image_and_mask(shape)
    diff = img.astype(np.int16)
    for axis in (2, 1, 0):
        diff = np.diff(diff, axis=axis, prepend=0)
    support = fitted._difference_support(mask)
    assert not diff[~support].any() and support[mask].all()
    if mask.sum() > 1000:  # and it is a small part of the box
        assert support.sum() < 1.3 * mask.sum() < support.size


def test_a_bomb_in_place_of_the_image_is_refused_after_its_declared_size():
    vol = _intensity_volume()
    tensors, metadata = loads(vol.to_bytes(), "new", "fitted INR")
    tensors["image.zlib"] = torch.frombuffer(bytearray(zlib.compress(bytes(1 << 20))), dtype=torch.uint8)
    with pytest.raises(WeightsError, match="bytes its shape needs"):
        FittedVolume.from_bytes(dumps(tensors, metadata))


def _intensity_volume():
    torch.manual_seed(0)
    cfg = ModelConfig(in_dim=3, width=8, hidden_layers=1, head_intensity=True)
    from metaseg.method.model import MetaSegNet

    net = MetaSegNet(cfg)
    img, mask = _image_and_mask(CANVAS)
    image = torch.from_numpy(img.astype(np.float32) / 255)
    return FittedVolume(FittedINR(net, dict(net.named_parameters()), image=image), np.eye(4), mask,
                        {"reference": REF})


def _old_coding(vol: FittedVolume) -> bytes:
    """The file as metaseg 0.5 wrote it (the image as its 3D finite difference, zlib)."""
    tensors, metadata = loads(vol.to_bytes(), "new", "fitted INR")
    q = np.rint(vol.inr.image.numpy() * 255).astype(np.int16)
    q[~vol.mask] = 0
    nz = np.argwhere(vol.mask)
    lo, hi = nz.min(0), nz.max(0) + 1
    box = q[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    for axis in (2, 1, 0):
        box = np.diff(box, axis=axis, prepend=0)
    tensors["image.zlib"] = torch.frombuffer(bytearray(zlib.compress((box % 256).astype(np.uint8).tobytes(), 9)),
                                             dtype=torch.uint8)
    metadata["image"] = json.dumps({"shape": list(CANVAS), "box": [lo.tolist(), hi.tolist()], "levels": 255,
                                    "coding": fitted.IMAGE_CODING})
    return dumps(tensors, metadata)


def test_the_image_comes_back_exactly_and_files_of_the_former_coding_still_read():
    vol = _intensity_volume()
    points = np.random.default_rng(1).uniform(-1, 1, (400, 3))
    for data in (vol.to_bytes(), _old_coding(vol)):
        back = FittedVolume.from_bytes(data)
        assert torch.equal(back.inr.image, vol.inr.image * torch.from_numpy(vol.mask))
        assert np.mean(back.query(points) == vol.query(points)) > 0.98  # float16 parameters: a rare point flips
    spec = json.loads(loads(vol.to_bytes(), "x")[1]["image"])
    with pytest.raises(WeightsError, match="does not read"):
        tensors, metadata = loads(vol.to_bytes(), "x")
        metadata["image"] = json.dumps(dict(spec, coding="jpeg"))
        FittedVolume.from_bytes(dumps(tensors, metadata))


# --- models that read a spatial prior: the prior stays in the weights, the file names them by sha256 ---

def _prior_weights(tmp_path, seed=0):
    """A tiny 3D prior-reading model (5 tissue classes, 12x14x10 canvas) saved as weights: (Weights, file)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(in_dim=3, width=8, hidden_layers=1, head_prior=True)
    from metaseg.method.model import MetaSegNet

    net = MetaSegNet(cfg)
    with torch.no_grad():  # make the prior matter: large weights on its columns
        net.head[0].weight[:, -cfg.n_classes:] = 20 * torch.randn(net.head[0].weight.shape[0], cfg.n_classes)
    prior = torch.randint(0, 256, (cfg.n_classes,) + coarse_shape(CANVAS), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    card = {"labels": LABELS, "fit": FitPlan(steps=2, batch_size=64).to_dict(), "input": {"dims": 3, "canvas": list(CANVAS)}}
    w = Weights(cfg, net.state_dict(), torch.full((2, len(net.inr_parameter_names())), math.log(1e-3)), card,
                prior=prior)
    path = tmp_path / "weights" / "prior3d.safetensors"
    path.parent.mkdir()
    w.sha256 = save_weights(w, path)
    return w, path


def test_a_prior_reading_model_stores_no_prior_and_finds_it_by_the_weights_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    w, path = _prior_weights(tmp_path)
    net = w.build()
    mask = np.ones(CANVAS, bool)
    vol = FittedVolume(FittedINR(net, dict(net.named_parameters())), np.eye(4), mask,
                       {"reference": REF, "weights_sha256": w.sha256})
    points = np.random.default_rng(2).uniform(-1, 1, (2000, 3))
    labels = vol.query(points)
    assert len(np.unique(labels)) > 1
    out = tmp_path / "fitted.safetensors"
    vol.save(out)
    tensors, metadata = loads(out.read_bytes(), out)
    # no tensor of the prior's shape or name: the file names the weights that hold it instead
    assert not [k for k, t in tensors.items() if "prior" in k or tuple(t.shape) == tuple(w.prior.shape)]
    assert json.loads(metadata["prior"]) == {"from": "weights", "weights_sha256": w.sha256}

    # not installed anywhere: refused in one line naming the sha256 and what to do
    with pytest.raises(WeightsError) as err:
        FittedVolume.load(out)
    message = str(err.value)
    assert w.sha256 in message and "--weights" in message and "\n" not in message

    # the caller's file, the caller's folder, or a shipped-weights folder ($METASEG_WEIGHTS_DIR)
    for kwargs in ({"weights": [path]}, {"weights": [path.parent]}, {}):
        if not kwargs:
            monkeypatch.setenv(WEIGHTS_ENV, str(path.parent))
        back = FittedVolume.load(out, **kwargs)
        assert torch.equal(back.inr.model.prior.probs, w.spatial_prior.probs)
        assert np.mean(back.query(points) == labels) > 0.99  # float16 parameters: a rare point may flip

    # weights of another sha256 do not stand in, even when named
    (tmp_path / "o").mkdir()
    other, other_path = _prior_weights(tmp_path / "o", seed=1)
    monkeypatch.delenv(WEIGHTS_ENV)
    with pytest.raises(WeightsError, match=w.sha256):
        FittedVolume.load(out, weights=[other_path])

    # a prior-reading volume whose info names no weights cannot be saved (it could never be read back)
    with pytest.raises(ValueError, match="weights_sha256"):
        FittedVolume(vol.inr, np.eye(4), mask, {"reference": REF}).to_bytes()


def test_reslice_command_takes_the_weights(tmp_path, monkeypatch, capsys):
    from metaseg.cli import main

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    w, path = _prior_weights(tmp_path)
    net = w.build()
    vol = FittedVolume(FittedINR(net, dict(net.named_parameters())), np.eye(4), np.ones(CANVAS, bool),
                       {"reference": REF, "weights_sha256": w.sha256})
    vol.save(tmp_path / "f.safetensors")
    args = ["reslice", str(tmp_path / "f.safetensors"), "-o", str(tmp_path / "p.nrrd"), "--spacing", "1"]
    assert main(args) == 2
    assert w.sha256 in capsys.readouterr().err
    assert main(args + ["--weights", str(path)]) == 0
    assert (tmp_path / "p.nrrd").is_file()
