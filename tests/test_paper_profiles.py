"""The paper's Table 4 profiles (configs/paper/) dry-run here: the Hub ids map to the architectures written in
deal_train/model/architectures.py, built on the meta device; the plan's rows, steps, trainable parameters and memory
estimate are checked against numbers computed independently from the data files and the published shapes."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from deal_train import cli
from deal_train.cli import run_cli
from deal_train.data import BENCHMARKS

REPO = pathlib.Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "configs" / "paper").glob("*.yaml"))
TASK_DIRS = {"agnews": "TC", "dbpedia": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC", "IMDB": "SC",
             "SST-2": "SC", "MNLI": "NLI", "CB": "NLI", "RTE": "NLI", "QQP": "QQP", "BoolQA": "BoolQA",
             "MultiRC": "MultiRC", "WiC": "WiC", "COPA": "COPA"}
# published shapes: T5-large d_model 1024, 24 + 24 layers, LoRA on q, v of encoder self-, decoder self- and
# cross-attention; LLaMA-3.1-8B hidden 4096, 32 layers, q_proj 4096 -> 4096, v_proj 4096 -> 1024 (8 KV heads)
EXPECTED = {
    "t5-large": dict(arch="t5-large-arch", encdec=True, params=737.67e6, rank=16, batch=4, accum=2,
                     lora=(24 * 2 + 24 * 4) * 16 * (1024 + 1024), factors=2 * (24 * 2 + 24 * 4)),
    "llama-3.1-8b": dict(arch="llama-3.1-8b-arch", encdec=False, params=8.03e9, rank=32, batch=8, accum=4,
                         lora=32 * (32 * (4096 + 4096) + 32 * (4096 + 1024)), factors=2 * 2 * 32),
}


def _rows(data_dir: str, task: str, split: str) -> int:
    rows = json.loads((pathlib.Path(data_dir) / TASK_DIRS[task] / task / f"{split}.json").read_text())
    return sum(r["label"] != "-" for r in rows)  # rows without a gold label are dropped


def test_every_backbone_and_benchmark_has_a_profile():
    assert sorted(p.stem for p in PROFILES) == sorted(
        f"{b}_{r}" for b in EXPECTED for r in ("tc", "standard_order1", "standard_order2", "standard_order3", "long"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_paper_profile_dry_runs(path, data_dir, capsys):
    plans = []
    code = run_cli(lambda cfg: plans.append(cli.run(cfg)), ["--config", str(path), "--dry_run", "true"])
    out = capsys.readouterr().out
    assert code == 0 and len(plans) == 1
    plan = plans[0]
    exp = EXPECTED[path.stem.split("_")[0]]
    assert plan["architecture"] == exp["arch"] and plan["encoder_decoder"] is exp["encdec"]
    assert plan["base_parameters"] == pytest.approx(exp["params"], rel=5e-3)
    bench = "tc" if "_tc" in path.stem else "long" if "_long" in path.stem else "standard"
    order = int(path.stem[-1]) if bench == "standard" else 1
    names = BENCHMARKS[bench][order]
    assert [t["task"] for t in plan["tasks"]] == names and plan["data_note"] == ""
    for t in plan["tasks"]:
        assert t["train_rows"] == min(1000, _rows(data_dir, t["task"], "train"))
        assert t["test_rows"] == min(500, _rows(data_dir, t["task"], "test"))
        assert t["optimizer_steps"] == math.ceil(math.ceil(t["train_rows"] / exp["batch"]) / exp["accum"])
    r, j, h = exp["rank"], 4, 32
    deal = exp["factors"] * (j * r + j + 2 * h * r + h + r)  # per factor: gains, centres, W1, b1, W2, b2
    assert plan["trainable_parameters"]["deal"] == [exp["lora"], deal]
    # OSF trains a full-rank residual subspace (tests/test_osf.py checks its count): far more than LoRA
    assert all(plan["trainable_parameters"][m] == [exp["lora"]] * 2 for m in plan["trainable_parameters"]
               if m not in ("deal", "osf"))
    assert "osf" not in plan["trainable_parameters"] or \
        all(n > 10 * exp["lora"] for n in plan["trainable_parameters"]["osf"])
    mem = plan["memory_estimate"]["seq_lora"]
    assert mem["total_bytes"] == plan["base_parameters"] * 4 + exp["lora"] * 16
    assert "Dry run" in out and all(name in out for name in names) and f"{exp['lora']:,}" in out
    assert not (REPO / "outputs" / "paper").exists() or not any((REPO / "outputs" / "paper").iterdir())


def test_dry_run_of_an_offline_model_and_of_a_hub_source(capsys):
    from deal_train.config import TrainConfig

    plan = cli.run(TrainConfig(model="tiny-random-t5", tasks=["agnews", "CB"], lora_rank=4, data_source="hub",
                               max_train_samples=40, per_device_train_batch_size=8, dry_run=True))
    assert plan["target_modules"] == ["q", "v"] and plan["encoder_decoder"]
    assert [t["train_rows"] for t in plan["tasks"]] == [40, 40] and "not downloaded" in plan["data_note"]
    assert [t["optimizer_steps"] for t in plan["tasks"]] == [5, 5]
    assert plan["trainable_parameters"]["seq_lora"] == [12 * 4 * (64 + 64)] * 2
