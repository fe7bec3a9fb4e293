"""The efficiency benchmark runs end to end on tiny models (through the trainer's ``train_task``: a decoder-only
model, and a tiny T5 registered as an architecture) and writes bench.json of the right shape. The ratios themselves are not asserted: benchmarks are not timed tests."""

from __future__ import annotations

import json
import os

import pytest
from torch.nn.utils import parametrize
from transformers import T5Config

from deal_train.model import architectures
from deal_train.tools.bench import BENCH_JSON, Bench, BenchOptions, format_table
from deal_train.tools.bench_cli import bench, main
from deal_train.config import TrainConfig
from deal_train.methods.adapters import lora_layers

RATIO_KEYS = {"train_time_per_step", "train_samples_per_second", "train_peak_memory", "train_peak_memory_delta",
              "inference_latency_folded", "inference_latency_folded_batch", "inference_latency_wrapped",
              "inference_peak_memory_folded"}
TINY = dict(per_device_train_batch_size=2, max_source_length=128, lora_rank=4, deal_mlp_hidden=8)
OPTS = dict(repeats=2, warmup=0, train_steps=1, inference_samples=2, inference_batch_size=2, fix_malloc=False)


def _check_shape(result: dict, repeats: int) -> None:
    assert set(result["repeats"]) == {"lora", "deal", "deal_folded", "deal_wrapped"}
    assert all(len(v) == repeats for v in result["repeats"].values())
    for variant in ("lora", "deal"):
        for rep in result["repeats"][variant]:
            assert rep["optimizer_steps"] == 1 and rep["time_per_step"] > 0 and rep["samples_per_second"] > 0
            assert rep["tokens_per_second"] > rep["samples_per_second"]
            assert rep["memory"]["peak_bytes"] >= rep["memory"]["start_bytes"] > 0
    for variant in ("lora", "deal_folded", "deal_wrapped"):
        for rep in result["repeats"][variant]:
            assert rep["batch_1"]["latency"] > 0 and rep["batch_2"]["latency"] > 0
    assert RATIO_KEYS <= set(result["ratios"])
    for r in result["ratios"].values():
        assert len(r["per_repeat"]) == repeats and r["min"] <= r["median"] <= r["max"] and r["min"] > 0
    lora, deal = result["repeats"]["lora"][0], result["repeats"]["deal"][0]
    # DEAL trains its filter and MLP, not the LoRA factors; its SVD runs once per task
    assert deal["trainable_parameters"] != lora["trainable_parameters"] and deal["setup_seconds"] > 0
    s = result["summary"]["lora"]["time_per_step"]
    assert s["min"] <= s["median"] <= s["max"] and s["n"] == repeats


def test_bench_decoder_only_writes_bench_json(tmp_path, data_dir):
    cfg = TrainConfig(model="tiny-random-llama", output_dir=str(tmp_path), **TINY)
    result = bench(cfg, BenchOptions(**OPTS))
    with open(os.path.join(tmp_path, BENCH_JSON), encoding="utf-8") as fh:
        saved = json.load(fh)
    assert saved == json.loads(json.dumps(result))
    _check_shape(saved, repeats=2)
    assert saved["settings"]["train_rows_per_repeat"] == 2 and not saved["random_token_ids"]
    # LoRA on a decoder-only model: one LoRA step trains r (d_in + d_out) per q/v projection of 2 layers
    assert saved["repeats"]["lora"][0]["trainable_parameters"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    table = format_table(saved)
    assert "DEAL / LoRA" in table and "train_time_per_step" in table and "deal_folded" in table


def test_bench_seq2seq_path_on_a_tiny_t5(tmp_path, data_dir, monkeypatch):
    tiny_t5 = lambda: T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    monkeypatch.setitem(architectures.ARCHITECTURES, "t5-test-arch", tiny_t5)
    cfg = TrainConfig(model="t5-test-arch", output_dir=str(tmp_path), **TINY)
    b = Bench(cfg, BenchOptions(**OPTS))
    assert b.encoder_decoder and b.data.random_ids and b.cfg.target_modules == ["q", "v"]
    assert max(max(x) for x in b.data.train["input_ids"]) < 512  # random ids within the vocabulary
    b.opts = BenchOptions(**{**OPTS, "repeats": 1})
    _check_shape(b.run(), repeats=1)
    # after the DEAL repeats every parametrization is folded away: a plain LoRA adapter is left
    assert not any(parametrize.is_parametrized(layer.lora_A["default"]) or
                   parametrize.is_parametrized(layer.lora_B["default"]) for _, layer in lora_layers(b.model))


@pytest.mark.parametrize("argv", [["--methods", "lora,foo"], ["--repeats", "0"], ["--methods", "deal,deal"]])
def test_bench_bad_options_exit_2(argv, capsys):
    assert main(["--model", "tiny-random-llama", *argv]) == 2
    assert "error:" in capsys.readouterr().err
