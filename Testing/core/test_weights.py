import json
import math

import pytest
import torch

from metaseg.io import safefile
from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitPlan
from metaseg.method.model import MetaSegNet
from metaseg.method.weights import LABELS, Weights, WeightsError, load_weights, save_weights, sha256_of

CFG = ModelConfig(width=16, hidden_layers=1)


def _weights(dtype=None):
    torch.manual_seed(0)
    net = MetaSegNet(CFG)
    card = {"labels": LABELS, "fit": FitPlan(steps=3, batch_size=64).to_dict(), "input": {"dims": 2, "canvas": [8, 8]}}
    state = net.state_dict() if dtype is None else {k: v.to(dtype) for k, v in net.state_dict().items()}
    return Weights(CFG, state, torch.full((3, len(net.inr_parameter_names())), math.log(1e-3)), card)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float64, torch.bfloat16])
def test_round_trip_keeps_tensors_card_and_hash(tmp_path, dtype):
    w = _weights(dtype)
    path = tmp_path / "m.safetensors"
    digest = save_weights(w, path)
    assert (tmp_path / "m.safetensors.sha256").read_text(encoding="utf-8").split()[0] == digest == sha256_of(path)
    back = load_weights(path)
    assert back.sha256 == digest and back.config == CFG
    assert back.plan == FitPlan(steps=3, batch_size=64) and back.canvas == (8, 8)
    for k, v in w.state.items():
        assert torch.equal(back.state[k], v) and back.state[k].dtype == v.dtype
    assert torch.equal(back.log_lr, w.log_lr)
    assert back.card["labels"][3]["name"] == "White matter"
    net = back.build()
    assert isinstance(net, MetaSegNet) and not net.training


def test_any_tensor_round_trips_through_the_safe_format():
    """Every dtype a state dict may hold, 0-d and empty tensors, views and tensors sharing memory."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "f32": base, "f64": base.double(), "f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(5),
        "i32": torch.arange(5, dtype=torch.int32), "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 7),
        "view_t": base.t(), "view_slice": base[:, 1], "shared": base,  # shares base's memory
    }
    back, meta = safefile.loads(safefile.dumps(tensors, {"k": "v"}), "t")
    assert meta == {"k": "v"} and set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_tree_round_trip_keeps_types():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.zero_grad()
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    tree = {"opt": opt.state_dict(), "x": (1, 2.5, float("inf"), None, True, "s"), "gen": torch.Generator().get_state()}
    back = safefile.loads_tree(safefile.dumps_tree(tree, "fmt/1"), "fmt/1", "t", "tree")
    assert back["x"] == tree["x"] and isinstance(back["x"], tuple)
    assert list(back["opt"]["state"]) == [0]  # int keys stay ints
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], tree["opt"]["state"][0]["exp_avg"])
    assert torch.equal(back["gen"], tree["gen"])
    # what a resumed training run does with them (meta_train.py): the optimizer takes its state back
    again = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    again.load_state_dict(back["opt"])
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    torch.Generator().set_state(back["gen"])
    with pytest.raises(WeightsError, match="format 'fmt/1', expected 'other/1'"):
        safefile.loads_tree(safefile.dumps_tree(tree, "fmt/1"), "other/1", "t", "tree")


def test_tampered_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_weights(_weights(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch.*restore the original"):
        load_weights(path)


def test_missing_checksum_and_missing_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_weights(_weights(), path)
    (tmp_path / "m.safetensors.sha256").unlink()
    with pytest.raises(WeightsError, match="no checksum"):
        load_weights(path)
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "absent.safetensors")


def test_a_pickle_is_refused_with_how_to_convert_it(tmp_path):
    """A .pt whose hash is right is refused before anything is unpickled: one line saying how to convert it
    (Testing/core/test_no_pickle.py feeds a code-running pickle to every loading path)."""
    path = tmp_path / "old.pt"
    torch.save({"format": "metaseg-weights/1", "state": {}}, path)
    with pytest.raises(safefile.PickleRefused) as e:
        load_weights(path, expected_sha256=sha256_of(path))
    message = str(e.value)
    assert "\n" not in message and f"metaseg convert-weights {path} {tmp_path / 'old.safetensors'}" in message


def test_other_safetensors_file_is_named_as_such(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(safefile.dumps({"x": torch.zeros(2)}, {"format": "something-else"}))
    with pytest.raises(WeightsError, match="not a MetaSeg weights file"):
        load_weights(path, expected_sha256=sha256_of(path))
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(path, expected_sha256=sha256_of(path))


def test_card_is_plain_json_in_the_header(tmp_path):
    """The metadata is readable without any library: 8 bytes of length, then JSON."""
    path = tmp_path / "m.safetensors"
    save_weights(_weights(), path)
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    card = json.loads(header["__metadata__"]["card"])
    assert card["config"] == CFG.to_dict() and card["format"] == header["__metadata__"]["format"] == "metaseg-weights/2"
    assert header["log_lr"]["dtype"] == "F32" and header["state/head.2.bias"]["shape"] == [5]


def test_an_absurd_configuration_is_refused_before_any_network_is_built(tmp_path):
    """A crafted card asking for a network of 10^6 width must not allocate terabytes."""
    w = _weights()
    path = tmp_path / "m.safetensors"
    save_weights(w, path)
    tensors, meta = safefile.loads(path.read_bytes(), path)
    card = json.loads(meta["card"])
    card["config"]["width"] = 1_000_000
    path.write_bytes(safefile.dumps(tensors, dict(meta, card=json.dumps(card))))
    with pytest.raises(WeightsError, match="out of range"):
        load_weights(path, expected_sha256=sha256_of(path))


def test_convert_weights_turns_a_trusted_old_file_into_the_same_weights(tmp_path, capsys):
    """`metaseg convert-weights`: a .pt of metaseg <= 0.4.0 (weights or a fitted INR) becomes a .safetensors file
    with the same tensors and card, once its sha256 is the one given (or a shipped file's)."""
    import hashlib

    import numpy as np

    from metaseg.cli import main
    from metaseg.method.fit import FittedINR
    from metaseg.space.fitted import FittedVolume

    w = _weights()
    old = tmp_path / "old.pt"
    torch.save({"format": "metaseg-weights/1", "card_json": json.dumps(dict(w.card, config=CFG.to_dict(),
                                                                            format="metaseg-weights/1")),
                "state": w.state, "log_lr": w.log_lr}, old)
    digest = hashlib.sha256(old.read_bytes()).hexdigest()
    assert main(["convert-weights", str(old), str(tmp_path / "new.safetensors"), "--sha256", digest]) == 0
    back = load_weights(tmp_path / "new.safetensors")
    assert all(torch.equal(back.state[k], v) for k, v in w.state.items()) and torch.equal(back.log_lr, w.log_lr)
    assert {k: v for k, v in back.card.items() if k != "format"} == w.card
    assert main(["convert-weights", str(old), str(tmp_path / "new.safetensors"), "--sha256", digest]) == 2
    assert "exists; pass --force" in capsys.readouterr().err

    torch.manual_seed(0)
    net = MetaSegNet(ModelConfig(in_dim=3, width=8, hidden_layers=1))
    mask = np.zeros((6, 7, 8), bool)
    mask[1:5, 2:6, 1:7] = True
    ref = {"size": [6, 7, 8], "spacing": [1.0] * 3, "origin": [0.0] * 3, "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    fitted_old = tmp_path / "fitted.pt"
    torch.save({"format": "metaseg-fitted/1", "config_json": json.dumps(net.config.to_dict()),
                "info_json": json.dumps({"reference": ref}), "state": net.state_dict(),
                "physical_to_model": torch.eye(4, dtype=torch.float64), "mask_shape": torch.tensor(mask.shape),
                "mask_bits": torch.from_numpy(np.packbits(mask.reshape(-1)))}, fitted_old)
    digest = hashlib.sha256(fitted_old.read_bytes()).hexdigest()
    assert main(["convert-weights", str(fitted_old), str(tmp_path / "f.safetensors"), "--sha256", digest]) == 0
    vol = FittedVolume.load(tmp_path / "f.safetensors")
    assert np.array_equal(vol.mask, mask) and vol.info["reference"] == ref
    full = FittedVolume(FittedINR(net, dict(net.named_parameters())), np.eye(4), mask, {"reference": ref})
    points = np.random.default_rng(0).uniform(-1, 1, (500, 3))
    assert np.mean(vol.query(points) == full.query(points)) > 0.99
