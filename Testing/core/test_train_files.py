"""Issue 25, point 1: a training run's files are safetensors too (checkpoint, best stage 1, weights), and a run
resumes from its checkpoint and starts from a stage-1 result or a weights file (--init). A tiny 2D run on two
subjects of ../shared/data (skips where absent)."""
from __future__ import annotations

import json
import math

from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitPlan
import torch
from safetensors.torch import load_file, save_file

import metaseg.train.meta_train as mt
from metaseg.train.meta_train import TrainSettings, meta_train
from metaseg.io.safefile import looks_like_pickle
from metaseg.method.weights import load_weights


def test_a_run_writes_resumes_and_starts_from_safe_files(shared_data, tmp_path):
    from metaseg.io.data import load_splits

    full = load_splits()
    (tmp_path / "splits.json").write_text(json.dumps({"train": full["train"][:2], "validation": full["validation"][:1]}))
    kw = dict(data_root=str(shared_data), model=ModelConfig(width=16, hidden_layers=1), train_slices=(109,),
              val_slices=(109,), plan=FitPlan(steps=2, batch_size=256), test_steps=2, test_batch=256, warm_steps=0,
              outer_points=512, val_every=1, ckpt_every=1, head_steps=2, head_points=256,
              splits=str(tmp_path / "splits.json"), device="cpu")
    run = tmp_path / "run"
    first = meta_train(TrainSettings(out_dir=str(run), outer_steps=2, **kw))
    names = sorted(p.name for p in run.iterdir())
    assert names == ["best_stage1.safetensors", "checkpoint.safetensors", "metaseg.safetensors",
                     "metaseg.safetensors.sha256", "stage2_fits", "train.log"]
    kept = sorted((run / "stage2_fits").iterdir())
    assert len(kept) == 2 and all(p.suffix == ".safetensors" for p in kept)  # one fit per training image
    assert not any(looks_like_pickle(p.read_bytes()[:8]) for p in [run / n for n in names] + kept if p.suffix == ".safetensors")
    assert load_weights(first).card["training"]["stage1_best_step"] in (1, 2)
    again = meta_train(TrainSettings(out_dir=str(run), outer_steps=3, **kw))  # resumes at step 2
    assert load_weights(again).card["training"]["settings"]["outer_steps"] == 3
    for name, init in (("from_stage1", run / "best_stage1.safetensors"), ("from_weights", again)):
        out = meta_train(TrainSettings(out_dir=str(tmp_path / name), outer_steps=0, init=str(init), **kw))
        assert load_weights(out).config == ModelConfig(width=16, hidden_layers=1)


def test_stage2_resumes_from_its_kept_fits_and_refits_stale_ones(shared_data, tmp_path, monkeypatch):
    """Stage 2 keeps each training fit (`<run>/stage2_fits`): run again, it trains the same head from them without
    fitting; a kept fit made from another initialization (its key differs) is fitted again."""
    from metaseg.io.data import load_splits

    full = load_splits()
    (tmp_path / "splits.json").write_text(json.dumps({"train": full["train"][:2], "validation": full["validation"][:1]}))
    kw = dict(data_root=str(shared_data), model=ModelConfig(width=16, hidden_layers=1), train_slices=(109,),
              val_slices=(109,), plan=FitPlan(steps=2, batch_size=256), test_steps=2, test_batch=256, warm_steps=0,
              outer_points=512, head_steps=2, head_points=256, splits=str(tmp_path / "splits.json"), device="cpu",
              outer_steps=0, noise=0.02)
    run = tmp_path / "run"
    first = load_weights(meta_train(TrainSettings(out_dir=str(run), **kw)))
    kept = sorted((run / "stage2_fits").iterdir())
    assert [p.name for p in kept] == sorted(f"{s}@109_0.safetensors" for s in full["train"][:2])

    calls = []
    real_fit = mt.fit
    monkeypatch.setattr(mt, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    for name in ("metaseg.safetensors", "metaseg.safetensors.sha256", "train.log"):
        (run / name).unlink()
    again = load_weights(meta_train(TrainSettings(out_dir=str(run), **kw)))
    assert calls == []  # every fit came from the folder
    for k in first.state:
        assert torch.equal(first.state[k], again.state[k]), k

    save_file(load_file(str(kept[0])), str(kept[0]), metadata={"key": "another initialization"})
    for name in ("metaseg.safetensors", "metaseg.safetensors.sha256"):
        (run / name).unlink()
    meta_train(TrainSettings(out_dir=str(run), **kw))
    assert calls == [1]  # the stale fit alone was made again


def test_a_deeper_balanced_head_starts_afresh_on_a_trunk_and_round_trips(shared_data, tmp_path, capsys):
    """`--head-hidden` (ModelConfig.head_hidden), `--head-balance`, `--head-adjust` and `--head-ema`: a stage-2 run
    from another run's stage-1 result keeps its trunk, says that the head of another shape starts afresh, and writes
    weights whose head has the asked layers and whose card says how its output bias was adjusted; a configuration
    with absurd head layers is refused before any network is built."""
    from dataclasses import replace

    from metaseg.io.data import load_splits
    from metaseg.method.weights import config_problem

    full = load_splits()
    (tmp_path / "splits.json").write_text(json.dumps({"train": full["train"][:2], "validation": full["validation"][:1]}))
    kw = dict(data_root=str(shared_data), train_slices=(109,), val_slices=(109,), plan=FitPlan(steps=2, batch_size=256),
              test_steps=2, test_batch=256, warm_steps=0, outer_points=512, head_steps=2, head_points=256,
              splits=str(tmp_path / "splits.json"), device="cpu")
    small = ModelConfig(width=16, hidden_layers=1)
    first = load_weights(meta_train(TrainSettings(out_dir=str(tmp_path / "a"), outer_steps=1, model=small, **kw)))
    assert "head_hidden" not in first.config.to_dict()  # files of the paper's head stay as they were
    deeper = replace(small, head_hidden=(24, 8))
    out = meta_train(TrainSettings(out_dir=str(tmp_path / "b"), outer_steps=0, model=deeper, head_balance=0.5,
                                   head_adjust=0.5, head_ema=0.5, init=str(tmp_path / "a" / "best_stage1.safetensors"), **kw))
    assert "the head starts afresh" in capsys.readouterr().err
    w = load_weights(out)
    assert w.config.head_hidden == (24, 8) and w.card["training"]["settings"]["head_balance"] == 0.5
    assert w.card["training"]["settings"]["head_ema"] == 0.5
    adjust = w.card["training"]["head"]["logit_adjustment"]  # 0.5 * 0.5 * log(share): background least lowered
    assert len(adjust) == 5 and all(a < 0 for a in adjust) and max(adjust) == adjust[0]
    assert tuple(w.state["head.2.weight"].shape) == (8, 24) and tuple(w.state["head.4.weight"].shape) == (5, 8)
    for k in ("trunk.0.linear.weight", "trunk.1.linear.weight"):
        assert torch.equal(w.state[k], first.state[k]), k  # the trunk came from the stage-1 result
    assert "head's hidden layers" in config_problem(replace(small, head_hidden=(0,)))
    assert "head's hidden layers" in config_problem(replace(small, head_hidden=(8,) * 9))


def test_the_logit_adjustment_lowers_rare_classes_by_the_asked_share():
    """Balanced sampling (B) teaches the head a prior ~ f^(1-B); `head_adjust` tau adds tau * B * log f, so the
    adjusted logits of two classes differ by tau * B * log of their frequency ratio, and nothing without it."""
    from metaseg.train.meta_train import logit_adjustment

    freq = torch.tensor([80.0, 16.0, 4.0])
    s = TrainSettings(head_balance=0.25, head_adjust=1.0)
    adj = logit_adjustment(freq, s)
    torch.testing.assert_close(adj[0] - adj[2], torch.tensor(0.25 * math.log(20.0)))
    assert torch.equal(logit_adjustment(freq, TrainSettings(head_balance=0.25)), torch.zeros(3))


def test_head_and_slice_options_out_of_range_are_refused_before_any_file(shared_data, tmp_path, capsys):
    """`--train-slices FIRST LAST STEP` (2D only, a range), `--head-ema` (a decay below 1) and `--head-adjust` (only
    with --head-balance): refused with what to give, before the run's folder is made."""
    from metaseg.cli import main

    cases = {"is for 2D training": (["--dims", "3", "--train-slices", "95", "123", "2"],
                                    ["--train-slices", "123", "95", "2"], ["--train-slices", "95", "123", "0"]),
             "--head-ema is a decay from 0 to below 1": (["--head-ema", "1"], ["--head-ema", "-0.5"]),
             "give both": (["--head-adjust", "0.5"], ["--head-adjust", "0.5", "--head-balance", "0"])}
    for message, argsets in cases.items():
        for args in argsets:
            rc = main(["train", "--data", str(shared_data), "--out", str(tmp_path / "run"), *args])
            err = capsys.readouterr().err
            assert rc == 2 and message in err, (args, err)
            assert not (tmp_path / "run").exists()
