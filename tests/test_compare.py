"""``python -m deal_train.compare``: runs the methods not yet finished (in-process), reads back finished ones, and
writes comparison.md / comparison.json / comparison.png with one row per method."""

from __future__ import annotations

import json

import yaml

from deal_train.train import loop as loop_module
from deal_train.tools.compare import main
from conftest import TINY_RUN


def _argv(config_file, root, methods: str) -> list[str]:
    return ["--config", str(config_file), "--methods", methods, "--output_dir", str(root)]


def test_compare_runs_missing_methods_and_writes_one_row_each(finished_run, tmp_path, monkeypatch):
    finished_run("per_task")  # already finished under the shared root: read back, not rerun
    root = finished_run.root
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump({**TINY_RUN, "method": "deal", "output_dir": "ignored"}))
    ran = []
    real_run = loop_module.run  # compare imports it when it runs
    monkeypatch.setattr(loop_module, "run", lambda cfg: ran.append(cfg.method) or real_run(cfg))
    assert main(_argv(config_file, root, "per_task,seq_lora")) == 0
    assert ran == ["seq_lora"]

    result = json.loads((root / "comparison.json").read_text())
    assert result["tasks"] == ["dbpedia", "amazon"]
    assert [r["method"] for r in result["methods"]] == ["per_task", "seq_lora"]
    for row in result["methods"]:
        metrics = json.loads((root / row["method"] / "metrics.json").read_text())
        assert metrics["config"]["tasks"] == TINY_RUN["tasks"] and metrics["config"]["method"] == row["method"]
        assert row["average_accuracy"] == metrics["average_accuracy"]
        assert row["backward_transfer"] == metrics["backward_transfer"]
        assert row["average_rouge1"] == metrics["average_rouge1"]
        assert row["trainable_parameters"] == max(p["trainable_parameters"] for p in metrics["per_task"])
        assert row["peak_rss_bytes"] == max(p["peak_rss_bytes"] for p in metrics["per_task"]) > 0
        assert row["wall_seconds"] == metrics["wall_seconds"]
        assert row["average_accuracy_after_task"] == [p["average_accuracy_so_far"] for p in metrics["per_task"]]
    md = (root / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Method | AA (%) [95% CI] | BWT (%) [95% CI] | ROUGE-1 (%) | Trainable params |")
    for row, line in zip(result["methods"], table[1:3]):
        lo, hi = row["average_accuracy_ci"]
        assert lo <= row["average_accuracy"] <= hi and row["backward_transfer_ci"] is not None
        assert f"[{lo:.1f}, {hi:.1f}]" in line.split(" | ")[1]
    assert [line.split(" | ")[0] for line in table[1:3]] == ["| per_task", "| seq_lora"]
    assert "![" in md and (root / "comparison.png").stat().st_size > 1000

    # a second call reruns nothing; --method (singular) and unknown names are refused with exit code 2
    ran.clear()
    assert main(_argv(config_file, root, "seq_lora")) == 0 and ran == []
    assert main(_argv(config_file, root, "seq_lora") + ["--method", "deal"]) == 2
    assert main(_argv(config_file, root, "seq_lora,nope")) == 2


def test_compare_refuses_a_finished_run_with_other_settings(finished_run, tmp_path, capsys):
    finished_run("per_task")
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump({**TINY_RUN, "learning_rate": 1e-3}))
    assert main(_argv(config_file, finished_run.root, "per_task")) == 2
    assert "learning_rate" in capsys.readouterr().err
