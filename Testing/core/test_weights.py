import json
import math

import pytest
import torch

from metaseg.config import ModelConfig
from metaseg.fit import FitPlan
from metaseg.model import MetaSegNet
from metaseg.weights import LABELS, Weights, WeightsError, load_weights, save_weights

CFG = ModelConfig(width=16, hidden_layers=1)


def _weights():
    torch.manual_seed(0)
    net = MetaSegNet(CFG)
    card = {"labels": LABELS, "fit": FitPlan(steps=3, batch_size=64).to_dict(), "input": {"dims": 2, "canvas": [8, 8]}}
    return Weights(CFG, net.state_dict(), torch.full((3, len(net.inr_parameter_names())), math.log(1e-3)), card)


def test_round_trip_keeps_tensors_card_and_hash(tmp_path):
    w = _weights()
    path = tmp_path / "m.pt"
    digest = save_weights(w, path)
    assert (tmp_path / "m.pt.sha256").read_text(encoding="utf-8").split()[0] == digest
    back = load_weights(path)
    assert back.sha256 == digest and back.config == CFG
    assert back.plan == FitPlan(steps=3, batch_size=64) and back.canvas == (8, 8)
    for k, v in w.state.items():
        assert torch.equal(back.state[k], v)
    assert torch.equal(back.log_lr, w.log_lr)
    assert back.card["labels"][3]["name"] == "White matter"
    net = back.build()
    assert isinstance(net, MetaSegNet) and not net.training


def test_tampered_file_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_weights(_weights(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch.*restore the original"):
        load_weights(path)


def test_missing_checksum_and_missing_file(tmp_path):
    path = tmp_path / "m.pt"
    save_weights(_weights(), path)
    (tmp_path / "m.pt.sha256").unlink()
    with pytest.raises(WeightsError, match="no checksum"):
        load_weights(path)
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "absent.pt")


def test_a_pickle_with_code_is_never_executed(tmp_path):
    """A file whose hash is right but which holds arbitrary objects is refused by weights_only loading."""

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "metaseg-weights/1", "x": Evil()}, path)
    from metaseg.weights import sha256_of

    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(path, expected_sha256=sha256_of(path))
    assert not (tmp_path / "pwned").exists()


def test_other_torch_file_is_named_as_such(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state": {}}, path)
    from metaseg.weights import sha256_of

    with pytest.raises(WeightsError, match="not a MetaSeg weights file"):
        load_weights(path, expected_sha256=sha256_of(path))


def test_card_is_plain_json(tmp_path):
    path = tmp_path / "m.pt"
    save_weights(_weights(), path)
    blob = torch.load(path, weights_only=True)
    card = json.loads(blob["card_json"])
    assert card["config"] == CFG.to_dict() and card["format"] == "metaseg-weights/1"
