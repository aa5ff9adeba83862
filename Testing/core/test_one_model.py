"""Issue 28: one 3D model for both label sets. The structures model labels the tissues by summing its classes into
them (`MergedOutput`); `--labels tissues` in 3D uses it, its fitted files reslice as tissues, and a model whose
classes do not merge into the asked set is refused with what to do."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metaseg.labelsets import STRUCTURES, TISSUES
from metaseg.method.config import ModelConfig
from metaseg.method.fit import FittedINR
from metaseg.method.model import MergedOutput, MetaSegNet
from metaseg.method.weights import load_weights, merge_output
from metaseg.resources import default_weights
from metaseg.space.fitted import FittedVolume
from testdata import WEIGHTS_3D


def test_merged_logits_give_the_summed_probabilities_exactly():
    groups = STRUCTURES.merges_into(TISSUES)
    assert groups[0] == 0 and sorted(set(groups)) == [0, 1, 2, 3, 4]
    assert groups[STRUCTURES.values.index(17)] == TISSUES.values.index(2)  # left hippocampus: subcortical GM
    logits = torch.randn(1000, len(STRUCTURES)) * 4
    merged = MergedOutput(groups, TISSUES.values)(logits)
    fine = torch.softmax(logits, 1)
    summed = torch.stack([fine[:, [i for i, g in enumerate(groups) if g == c]].sum(1) for c in range(5)], 1)
    torch.testing.assert_close(torch.softmax(merged, 1), summed, rtol=1e-5, atol=1e-6)
    assert TISSUES.merges_into(STRUCTURES) is None  # tissues do not split into structures


def test_the_3d_tissues_come_from_the_structures_model():
    path = default_weights(3, "tissues")
    assert path == default_weights(3, "structures")
    w = load_weights(path)
    net = w.build(labels="tissues")
    assert net.values == TISSUES.values and w.build().values == STRUCTURES.values
    with pytest.raises(ValueError, match="cannot label 'structures'"):
        load_weights(WEIGHTS_3D).build(labels="structures")


def test_the_tissue_model_refuses_structures_with_what_to_do(tmp_path):
    from metaseg.io.readers import InputError
    from metaseg.segmenter import Segmenter

    seg = Segmenter(device="cpu", weights=WEIGHTS_3D, labels="structures")
    with pytest.raises(InputError, match="ask for labels='tissues' or give other weights"):
        seg.model(3)


def _fitted(tmp_path, labels):
    torch.manual_seed(0)
    net = MetaSegNet(ModelConfig(in_dim=3, width=8, hidden_layers=1, n_classes=len(STRUCTURES),
                                 label_values=STRUCTURES.values))
    m = np.diag([2 / 39, 2 / 39, 2 / 39, 1.0])
    m[:3, 3] = -1.0
    ref = {"size": [40, 40, 40], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
           "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    structures = FittedVolume(FittedINR(net, dict(net.named_parameters())), m, None, {"reference": ref})
    net = MetaSegNet(net.config)
    net.load_state_dict(structures.inr.model.state_dict())
    if labels is TISSUES:
        merge_output(net, TISSUES.values)
    path = tmp_path / "f.safetensors"
    FittedVolume(FittedINR(net, dict(net.named_parameters())), m, None,
                 {"reference": ref, "labels": labels.card_labels()}).save(path)
    return structures, path


def test_a_fitted_file_of_merged_labels_reslices_as_tissues(tmp_path):
    structures, path = _fitted(tmp_path, TISSUES)
    back = FittedVolume.load(path)
    assert back.n_classes == 5 and back.inr.model.values == TISSUES.values
    pts = np.random.default_rng(0).uniform(5, 35, (500, 3))
    probs = back.query(pts, "probabilities")
    fine = structures.query(pts, "probabilities")
    groups = np.asarray(STRUCTURES.merges_into(TISSUES))
    want = np.stack([fine[:, groups == c].sum(1) for c in range(5)], 1)
    np.testing.assert_allclose(probs, want, atol=2e-4)  # the file stores most parameters in half precision
    assert set(np.unique(back.query(pts, "labels"))) <= set(TISSUES.values)


def test_a_fitted_file_whose_labels_do_not_fit_its_network_is_refused(tmp_path):
    _, path = _fitted(tmp_path, STRUCTURES)
    assert FittedVolume.load(path).n_classes == len(STRUCTURES)  # its own labels: as it is
    import json

    from metaseg.io.safefile import WeightsError, dumps, loads

    tensors, meta = loads(path.read_bytes(), path, "fitted INR")[:2]
    info = json.loads(meta["info"])
    info["labels"] = [{"value": v, "name": str(v), "color": [0, 0, 0]} for v in (0, 1, 2)]
    with pytest.raises(WeightsError, match="labels do not match its network"):
        FittedVolume.from_bytes(dumps(tensors, dict(meta, info=json.dumps(info))))
