"""Full continual runs on a tiny random LLaMA with real rows from the benchmark: outputs, stock-PEFT reload,
resume after an interruption between tasks, and the ``accelerate launch`` entry point."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from deal_train.config import TrainConfig
from deal_train.data import Encoder, load_task
from deal_train.train.evaluation import generate_predictions
from deal_train.train.loop import run
from deal_train.model.loading import load_model

from conftest import forget_last_task

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(model="tiny-random-llama", tasks=["dbpedia", "amazon"], max_train_samples=12, max_test_samples=6,
            per_device_train_batch_size=4, max_source_length=128, max_new_tokens=4, per_device_eval_batch_size=4,
            learning_rate=5e-3, deal_learning_rate=5e-3, lora_rank=4, deal_mlp_hidden=8, deal_lambda_drift=0.1)


def _run(tmp_path, method, **kw):
    cfg = TrainConfig(method=method, output_dir=str(tmp_path / method), **{**TINY, **kw})
    return cfg, run(cfg)


def _scalars(logdir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.out") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.mark.parametrize("method", ["seq_lora", "deal"])
def test_two_task_run_writes_everything(tmp_path, tokenizer, method):
    cfg, metrics = _run(tmp_path, method)
    out = pathlib.Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished"] and saved["tasks"] == ["dbpedia", "amazon"]
    acc = saved["accuracy_matrix"]
    assert acc[1][0] is None and all(isinstance(acc[i][1], float) for i in range(2)) and isinstance(acc[0][0], float)
    assert saved["average_accuracy"] == pytest.approx((acc[0][1] + acc[1][1]) / 2)
    assert saved["backward_transfer"] == pytest.approx(acc[0][1] - acc[0][0])
    assert saved["rouge1_matrix"][1][0] is None and saved["average_rouge1"] is not None
    assert saved["config"]["method"] == method
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    assert (out / "predictions" / "after_2-amazon" / "1-dbpedia.jsonl").is_file()
    # the first task's loss went down (the model learns at all)
    assert saved["per_task"][0]["final_loss"] < saved["per_task"][0]["mean_loss"] * 1.5
    # TensorBoard scalars
    tags = _scalars(str(out / "tensorboard"))
    assert {"train/loss", "train/learning_rate/lora", "train/samples_per_second", "eval/average_accuracy",
            "eval/dbpedia/exact_match"} <= tags
    if method == "deal":
        assert "deal/reg_update" in tags and "deal/drift" in tags
        assert {"train/learning_rate/deal", "train/learning_rate/residual"} <= tags  # task 2's groups, by name
        assert "deal/relative_change/delta_w" in tags
        # task 2 trains the residuals R (LoRA's own shapes: task 1's count) plus the filter and MLP
        assert saved["per_task"][1]["trainable_parameters"] > saved["per_task"][0]["trainable_parameters"]
    # adapters: plain PEFT, loadable by stock PEFT, task 2 differs from task 1, and reproduce the predictions
    a1, a2 = out / "adapters" / "1-dbpedia", out / "adapters" / "2-amazon"
    from safetensors.torch import load_file

    w1, w2 = load_file(a1 / "adapter_model.safetensors"), load_file(a2 / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not any("parametriz" in k for k in w2)
    base = load_model("tiny-random-llama", tokenizer)
    peft_model = PeftModel.from_pretrained(base, str(a2))
    enc = Encoder(tokenizer, cfg.max_source_length, cfg.max_target_length, True)
    from deal_train.train.loop import prepare_data

    datas = prepare_data(cfg)
    feats, _ = enc.eval_features(load_task(cfg.resolved_data_dir(), "dbpedia"), datas[0].test_rows)
    preds = generate_predictions(peft_model, tokenizer, feats, cfg.per_device_eval_batch_size, cfg.max_new_tokens)
    saved_preds = [json.loads(x) for x in (out / "predictions" / "after_2-amazon" / "1-dbpedia.jsonl").read_text()
                   .splitlines()]
    assert [p["prediction"] for p in preds] == [p["prediction"] for p in saved_preds]


def test_finished_run_is_not_overwritten(tmp_path):
    from deal_train.config import ConfigError

    cfg, _ = _run(tmp_path, "seq_lora", tasks=["agnews"])
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run(cfg)


def test_overwrite_starts_over_without_the_old_runs_later_tasks(tmp_path):
    """A two-task run overwritten by a one-task run leaves no adapter or predictions of the old task 2."""
    import dataclasses

    cfg, _ = _run(tmp_path, "seq_lora")
    out = pathlib.Path(cfg.output_dir)
    assert (out / "adapters" / "2-amazon").is_dir()
    metrics = run(dataclasses.replace(cfg, tasks=["dbpedia"], overwrite_output_dir=True))
    assert metrics["tasks"] == ["dbpedia"] and metrics["finished"]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["1-dbpedia"]
    assert not any("amazon" in p.name for p in (out / "predictions").iterdir())


def test_resume_after_interruption_gives_identical_results(tmp_path):
    cfg, metrics = _run(tmp_path, "deal")
    out = pathlib.Path(cfg.output_dir)
    final = forget_last_task(out)  # a crash during task 2
    resumed = run(cfg)
    assert (out / "adapters" / "2-amazon" / "adapter_model.safetensors").read_bytes() == final
    assert resumed["accuracy_matrix"] == metrics["accuracy_matrix"]


def test_accelerate_launch_entry_point(tmp_path):
    out = tmp_path / "launch"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / "cpu.yaml"), "-m", "deal_train", "--model", "tiny-random-llama",
           "--method", "deal", "--tasks", "agnews,amazon", "--max_train_samples", "8", "--max_test_samples", "4",
           "--per_device_train_batch_size", "4", "--max_source_length", "128", "--max_new_tokens", "3",
           "--lora_rank", "4", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Average accuracy" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["finished"]
