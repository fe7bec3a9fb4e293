"""The fast-path suite of the benchmark (``python -m deal_train.bench --suite fastpath``, issue 20) runs end to end on
the tiny LLaMA and two tasks: every variant of the table measured every repeat, the paired ratios of the table, the
fast and today training variants trained on the very same batches with equal losses, identical greedy predictions
(or near ties), and the bare loop on the same batches as ``train_task``. Timings are not asserted."""

from __future__ import annotations

import json
import os

import pytest

from deal_train.model import prefix

from deal_train.config import TrainConfig
from deal_train.tools import bench_fastpath
from deal_train.tools.bench import BENCH_JSON, BenchOptions
from deal_train.tools.bench_cli import bench, main
from deal_train.tools.bench_fastpath import RATIOS, VARIANTS, Ratio, Variant, format_fastpath_table, ratio_spread

TINY = dict(per_device_train_batch_size=2, max_source_length=128, lora_rank=4, deal_mlp_hidden=8,
            per_device_eval_batch_size=2, max_new_tokens=3)
OPTS = dict(suite="fastpath", repeats=2, warmup=0, train_steps=2, eval_samples=3, fix_malloc=False, num_threads=1)


def test_fastpath_suite_runs_every_variant_on_the_same_batches(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(bench_fastpath, "trl_available", lambda: False)  # TRL has its own test below
    cfg = TrainConfig(model="tiny-random-llama", output_dir=str(tmp_path), **TINY)
    result = bench(cfg, BenchOptions(**OPTS, tasks=("dbpedia", "amazon")))
    with open(os.path.join(tmp_path, BENCH_JSON), encoding="utf-8") as fh:
        assert json.load(fh) == json.loads(json.dumps(result))
    names = {v.name for v in VARIANTS if v.kind != "trl"}
    assert set(result["repeats"]) == names and not result["trl"] and result["threads"] == 1
    for name, reps in result["repeats"].items():
        assert len(reps) == 2 and all(r["samples_per_second"] > 0 for r in reps)
        if name.startswith(("lora", "deal", "bare")):  # 2 tasks x 2 steps x 2 rows
            assert all(r["optimizer_steps"] == 4 and r["train_samples"] == 8 for r in reps)
            if name != "bare":  # the fast path's ceiling (padded / computed positions); 1 with it off
                assert all((r["token_ratio_bound"] > 1) == ("_fast" in name) for r in reps)
                assert all(0 < r["computed_token_positions"] <= r["padded_token_positions"] for r in reps)
        else:
            assert all(r["rows"] == 6 for r in reps)
    assert set(result["ratios"]) == {r.name for r in RATIOS if "trl" not in (r.numerator, r.denominator)}
    for r in result["ratios"].values():
        assert r["min"] <= r["median"] <= r["max"] and r["spread_pct"] >= 0 and len(r["per_repeat"]) == 2
    assert "meets_target" in result["ratios"]["train_fast_today_lora"]
    checks = result["checks"]
    assert "error" not in checks
    for method in ("lora", "deal"):
        c = checks[f"loss_{method}"]
        assert c["same_batches"] and c["batches"] == 4 and c["mean_shared_prefix"] > 0
        assert c["max_rel_diff"] <= 1e-5 and c["ok"] and c["trained_mean_loss_rel_diff_max"] <= 1e-4
    assert checks["bare_same_batches"] and checks["bare_mean_loss_rel_diff_max"] <= 1e-4
    p = checks["predictions"]
    assert p["rows"] == 6 and p["identical"] + len(p["differing"]) == 6 and p["all_differing_near_ties"]
    # against today's padded positions on the same rows: the shared prefix alone, and with less padding on top
    bounds = bench_fastpath.token_bounds_vs_today(result["summary"])
    assert set(bounds) == {"lora_fast", "lora_fast_grouped", "deal_fast", "eval_fast", "eval_sorted"}
    assert all(b > 1 for name, b in bounds.items() if name != "eval_sorted") and bounds["eval_sorted"] >= 1
    assert bounds["lora_fast_grouped"] >= bounds["lora_fast"] - 1e-9  # grouping never adds padding here
    table = format_fastpath_table(result)
    assert "train_grouped_today_lora" in table and "token bound against today's path" in table
    assert "train_fast_today_lora" in table and "loop_bare_step_time" in table and "identical" in table
    assert bench_fastpath.TRL_HINT in table


def test_ratio_spread_and_the_tables_extend(data_dir, tmp_path, monkeypatch):
    s = ratio_spread([1.0, 2.0, 4.0])
    assert s["median"] == 2.0 and s["spread_pct"] == pytest.approx(100.0) and s["n"] == 3
    monkeypatch.setattr(bench_fastpath, "trl_available", lambda: False)
    cfg = TrainConfig(model="tiny-random-llama", output_dir=str(tmp_path), **TINY)
    # a two-row table: only its own variants run, ratios naming a missing variant are dropped
    variants = (Variant("a", "eval", overrides={"shared_prefix": False}),
                Variant("b", "eval", overrides={"shared_prefix": True, "max_new_tokens": 1}))
    ratios = (Ratio("b_over_a", "b", "a", "samples_per_second"), Ratio("gone", "b", "nope", "samples_per_second"))
    fp = bench_fastpath.FastpathBench(cfg, BenchOptions(**{**OPTS, "repeats": 1}), variants, ratios)
    result = fp.run()
    assert set(result["repeats"]) == {"a", "b"} and set(result["ratios"]) == {"b_over_a"}
    assert "predictions" not in result["checks"]


def test_fastpath_rejects_an_encoder_decoder(tmp_path, data_dir):
    assert main(["--model", "t5-large-arch", "--suite", "fastpath", "--output_dir", str(tmp_path)]) == 2


@pytest.mark.skipif(not bench_fastpath.trl_available(), reason="trl not installed (pip install -e '.[bench]')")
def test_trl_variant_trains_the_same_rows(tmp_path, data_dir):
    cfg = TrainConfig(model="tiny-random-llama", output_dir=str(tmp_path), **TINY)
    variants = (Variant("lora_today", "train", "lora", {"shared_prefix": False}), Variant("trl", "trl"))
    fp = bench_fastpath.FastpathBench(cfg, BenchOptions(**{**OPTS, "repeats": 1}), variants, RATIOS)
    result = fp.run()
    trl = result["repeats"]["trl"][0]
    assert trl["optimizer_steps"] == 2 and trl["train_samples"] == 4 and trl["samples_per_second"] > 0
    assert set(result["ratios"]) == {"ours_today_over_trl"}
    # TRL's defaults (activation checkpointing) must not leak into our model: the fast path still runs
    assert prefix.supported(fp.bench.model) is None


def test_prompt_token_positions_counts_the_prefill():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 7]]  # common prefix 2 (the shortest keeps its last token)
    assert bench_fastpath.prompt_token_positions(prompts, 2, False) == 2 * 5 + 1 * 3
    assert bench_fastpath.prompt_token_positions(prompts, 2, True) == 2 + 2 * 3 + 1 * 1
    order = [prompts[2], prompts[0], prompts[1]]  # row order: batches (3, 5) and (4)
    assert bench_fastpath.prompt_token_positions(order, 2, False, sort_prompts=False) == 2 * 5 + 4
    assert bench_fastpath.prompt_token_positions(order, 2, False) == 13


def test_summarise_pairs_repeats_and_skips_missing_variants():
    raw = {"lora_fast": [{"samples_per_second": 4.0, "time_per_step": 1.0}, {"samples_per_second": 6.0, "time_per_step": 1.0}],
           "lora_today": [{"samples_per_second": 2.0, "time_per_step": 2.0}, {"samples_per_second": 2.0, "time_per_step": 2.0}],
           "deal_fast": [{"samples_per_second": 1.0, "time_per_step": 3.0}]}
    ratios, summary = bench_fastpath.summarise(raw)
    assert set(ratios) == {"train_fast_today_lora", "deal_lora_step_time_fast"}
    r = ratios["train_fast_today_lora"]
    assert r["per_repeat"] == [2.0, 3.0] and r["median"] == 2.5 and r["meets_target"] and r["spread_pct"] == 20.0
    assert ratios["deal_lora_step_time_fast"]["per_repeat"] == [3.0]  # paired: only the repeats both have
    assert summary["lora_today"]["samples_per_second"]["median"] == 2.0
