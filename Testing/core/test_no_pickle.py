"""Issue 25, point 1: no loading path of MetaSeg runs a pickle.

A crafted pickle whose `__reduce__` creates a marker file (the control proves that unpickling it does) is
fed, with a correct `.sha256` beside it (a hash travelling with the data protects nothing), to every path
that reads a weights or fitted-network file: the weights loader, `segment --weights`, the API
(`metaseg.segment(weights=)`, `Segmenter`, `FittedVolume.load`/`from_bytes`), `metaseg train --init` and the
resume of a training checkpoint, `metaseg reslice` (in a child process, as the Slicer module runs it),
`metaseg convert-weights` without a trusted hash, and the Slicer scene's kept network (MetaSegLib.fitted:
as this version keeps it and as metaseg <= 0.4.0 kept it). Each refuses in one line, and the marker never
appears. Testing/slicer/test_slicer_save_rules.py does the same through the module's crossSection.
"""
from __future__ import annotations

import base64
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metaseg
from metaseg.cli import main
from metaseg.io.safefile import PickleRefused, WeightsError
from testdata import ROOT, SAMPLE

MODULE_DIR = ROOT / "MetaSegSlicer"


class Payload:
    """Unpickling this creates `marker`: what an attacker's file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def crafted_files(folder: Path, marker: Path) -> dict:
    """The pickle in the forms a user could be handed: a torch.save zip under either extension, a bare pickle;
    each with a correct .sha256 beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = {"format": "metaseg-weights/1", "card_json": "{}", "state": {"x": Payload(marker)},
            "log_lr": Payload(marker)}
    files = {}
    for name, write in (("evil.pt", lambda p: torch.save(blob, p)),
                        ("evil.safetensors", lambda p: torch.save(blob, p)),
                        ("bare.safetensors", lambda p: p.write_bytes(pickle.dumps(Payload(marker), protocol=4)))):
        path = folder / name
        write(path)
        Path(str(path) + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n")
        files[name] = path
    return files


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER_code_ran"


@pytest.fixture
def evil(tmp_path, marker) -> dict:
    return crafted_files(tmp_path / "files", marker)


def one_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


def test_control_the_payload_runs_when_unpickled(tmp_path):
    """Without this, the tests below could pass because the payload never worked."""
    control = tmp_path / "control"
    files = crafted_files(tmp_path / "c", control)
    pickle.loads(files["bare.safetensors"].read_bytes())
    assert control.read_text() == "code ran"


def test_weights_loader_refuses_every_form(evil, marker):
    from metaseg.method.weights import load_weights

    for path in evil.values():
        with pytest.raises(PickleRefused) as e:
            load_weights(path)
        assert "metaseg convert-weights" in one_line(e.value)
    assert not marker.exists()


def test_segment_weights_option_and_the_api(evil, marker, tmp_path, capsys):
    for path in evil.values():
        rc = main(["segment", str(SAMPLE / "ecog_slice_t1.nii.gz"), "-o", str(tmp_path / "o" / "l.nii.gz"),
                   "--weights", str(path), "--progress", "none"])
        err = capsys.readouterr().err
        assert rc == 2 and one_line(err).startswith("error: ") and "pickle" in err
        with pytest.raises(WeightsError) as e:
            metaseg.segment(str(SAMPLE / "ecog_slice_t1.nii.gz"), weights=path, device="cpu")
        one_line(e.value)
        with pytest.raises(WeightsError):
            metaseg.Segmenter(device="cpu", weights=path)(str(SAMPLE / "ecog_slice_t1.nii.gz"))
    assert not marker.exists() and not (tmp_path / "o" / "l.nii.gz").exists()


def test_fitted_volume_api(evil, marker):
    for path in evil.values():
        with pytest.raises(PickleRefused) as e:
            metaseg.FittedVolume.load(path)
        one_line(e.value)
        with pytest.raises(PickleRefused) as e:
            metaseg.FittedVolume.from_bytes(path.read_bytes())
        one_line(e.value)
    assert not marker.exists()


def test_train_init_and_checkpoint_resume(evil, marker, tmp_path):
    from metaseg.method.config import ModelConfig
    from metaseg.train.meta_train import TrainSettings, load_init, meta_train
    from metaseg.method.model import MetaSegNet

    net = MetaSegNet(ModelConfig(width=16, hidden_layers=1))
    log_lr = torch.zeros(2, len(net.inr_parameter_names()))
    for path in evil.values():
        with pytest.raises(SystemExit) as e:
            load_init(net, log_lr, path)
        assert one_line(e.value.code).startswith("--init: ") and "metaseg convert-weights" in str(e.value.code)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(evil["evil.pt"].read_bytes())  # a run folder handed over to resume
    with pytest.raises(SystemExit) as e:
        meta_train(TrainSettings(out_dir=str(run), data_root=str(tmp_path / "no-data")))
    assert "checkpoint.pt" in one_line(e.value.code) and "rerun to resume" in str(e.value.code)
    assert not marker.exists()


def test_reslice_in_a_child_process(evil, marker, tmp_path):
    """`metaseg reslice` as the Slicer module starts it: a separate interpreter reading the file."""
    for path in evil.values():
        out = subprocess.run([sys.executable, "-m", "metaseg", "reslice", str(path), "-o", str(tmp_path / "p.nrrd")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and one_line(out.stderr).startswith("error: ") and "pickle" in out.stderr
    assert not marker.exists() and not (tmp_path / "p.nrrd").exists()


def test_convert_weights_unpickles_only_a_trusted_hash(evil, marker, tmp_path, capsys):
    path = evil["evil.pt"]
    rc = main(["convert-weights", str(path), str(tmp_path / "new.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "not one of the weights files MetaSeg shipped" in one_line(err)
    rc = main(["convert-weights", str(path), str(tmp_path / "new.safetensors"), "--sha256", "0" * 64])
    assert rc == 2 and "not the file you trust" in one_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "new.safetensors").exists()
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6):
        # the user vouches for the file; torch's weights_only unpickler (safe from 2.6) still refuses the payload
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        rc = main(["convert-weights", str(path), str(tmp_path / "new.safetensors"), "--sha256", digest])
        assert rc == 2 and "cannot convert" in one_line(capsys.readouterr().err)
        assert not marker.exists()


def test_scene_text_is_never_decoded_into_a_pickle(evil, marker, tmp_path):
    """MetaSegLib.fitted: the attribute text of this version, and the text node of metaseg <= 0.4.0."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from MetaSegLib import fitted
    finally:
        sys.path.remove(str(MODULE_DIR))
    for path in evil.values():
        data = path.read_bytes()
        for text in (base64.b64encode(data).decode(),  # as this version keeps it
                     json.dumps({"format": fitted.LEGACY_FORMAT, "sha256": "../../" + "a" * 58, "name": "x.pt",
                                 "bytes": len(data)}) + "\n" + base64.b64encode(data).decode()):  # as 0.4.0 did
            with pytest.raises(fitted.FittedError) as e:
                fitted.materialize(text, tmp_path / "kept")
            assert "older MetaSeg" in one_line(e.value)
    assert not marker.exists() and not (tmp_path / "kept").exists()
