"""Issue 25, point 1: a training run's files are safetensors too (checkpoint, best stage 1, weights), and a run
resumes from its checkpoint and starts from a stage-1 result or a weights file (--init). A tiny 2D run on two
subjects of ../shared/data (skips where absent)."""
from __future__ import annotations

import json

from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitPlan
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
                     "metaseg.safetensors.sha256", "train.log"]
    assert not any(looks_like_pickle((run / n).read_bytes()[:8]) for n in names if n.endswith(".safetensors"))
    assert load_weights(first).card["training"]["stage1_best_step"] in (1, 2)
    again = meta_train(TrainSettings(out_dir=str(run), outer_steps=3, **kw))  # resumes at step 2
    assert load_weights(again).card["training"]["settings"]["outer_steps"] == 3
    for name, init in (("from_stage1", run / "best_stage1.safetensors"), ("from_weights", again)):
        out = meta_train(TrainSettings(out_dir=str(tmp_path / name), outer_steps=0, init=str(init), **kw))
        assert load_weights(out).config == ModelConfig(width=16, hidden_layers=1)
