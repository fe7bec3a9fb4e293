"""The validation split, the adapter-movement measurement, DEAL's residual update and the profiles."""

from __future__ import annotations

import json

import pytest
import torch

from deal_train.train import adapter_change
from deal_train.cli import build_parser, config_from_args
from deal_train.config import PAPER_PROFILE, ConfigError, TrainConfig, validate
from deal_train.data import load_task, read_rows, split_validation
from deal_train.train.loop import comparable_config, prepare_data
from deal_train.methods.adapters import lora_layers
from deal_train.tools.sweep import parse_grid, point_configs
from test_deal_maths import _cfg, _history_model, _logits


# --- validation split -------------------------------------------------------------------------------
def test_validation_rows_are_fixed_per_task_and_never_trained_on(data_dir):
    rows = read_rows(load_task(data_dir, "yahoo"), "train")
    val, rest = split_validation(rows, 50, "yahoo")
    assert len(val) == 50 and len(rest) == len(rows) - 50
    key = lambda r: (r["sentence"], r["label"])  # noqa: E731
    assert not {key(r) for r in val} & {key(r) for r in rest} or len({key(r) for r in rows}) < len(rows)
    assert split_validation(rows, 50, "yahoo") == (val, rest)  # deterministic
    assert split_validation(rows, 50, "agnews")[0] != val      # a different draw per task
    with pytest.raises(ConfigError, match="validation_rows = 661 leaves no training rows"):
        split_validation(rows, len(rows), "yahoo")

    common = dict(tasks=["yahoo", "agnews"], max_train_samples=0, max_test_samples=7, validation_rows=30,
                  data_dir=data_dir)
    a = prepare_data(TrainConfig(seed=1, **common))
    b = prepare_data(TrainConfig(seed=2, eval_split="validation", **common))
    for da, db in zip(a, b):
        train_ids = {id(r) for r in da.train_rows}
        assert len(da.train_rows) == len(read_rows(da.task, "train")) - 30  # every row but the validation ones
        assert len(da.test_rows) == 7                                       # test split: max_test_samples
        assert len(db.test_rows) == 30                                      # validation split: all 30 rows
        assert not train_ids & {id(r) for r in db.test_rows}
        val, _ = split_validation(read_rows(da.task, "train"), 30, da.task.name)
        assert db.test_rows == val                                          # same rows whatever the seed
        assert sorted(map(key, da.train_rows)) == sorted(map(key, db.train_rows))  # all 970 / 631 either way


def test_validation_split_needs_rows():
    with pytest.raises(ConfigError, match="validation_rows is 0"):
        validate(TrainConfig(eval_split="validation", validation_rows=0))


def test_runs_saved_before_the_split_compare_as_without_it():
    old = TrainConfig().to_dict()
    for key in ("validation_rows", "deal_residual_update", "eval_split", "deal_profile"):
        del old[key]
    assert comparable_config(old)["validation_rows"] == 0
    assert comparable_config(old) != comparable_config(TrainConfig().to_dict())
    assert comparable_config(old) == comparable_config(TrainConfig(validation_rows=0, deal_residual_update=False).to_dict())


# --- relative change --------------------------------------------------------------------------------
def test_relative_change_matches_the_direct_computation(tiny_model):
    cfg = _cfg()
    method, model = _history_model(tiny_model, cfg)
    start = adapter_change.snapshot(model, "default")
    assert adapter_change.relative_change(model, start) == {"A": 0.0, "B": 0.0, "delta_w": 0.0}
    layers = lora_layers(model)
    old = [(l.lora_A["default"].weight.detach().double().clone(), l.lora_B["default"].weight.detach().double().clone())
           for _, l in layers]
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_A["default"].weight.add_(0.05 * torch.randn_like(layer.lora_A["default"].weight))
            layer.lora_B["default"].weight.mul_(0.7)
    got = adapter_change.relative_change(model, start)
    new = [(l.lora_A["default"].weight.detach().double(), l.lora_B["default"].weight.detach().double())
           for _, l in layers]
    num = sum(((b @ a) - (b0 @ a0)).pow(2).sum() for (a, b), (a0, b0) in zip(new, old))
    den = sum((b0 @ a0).pow(2).sum() for a0, b0 in old)
    assert got["delta_w"] == pytest.approx(float((num / den).sqrt()), rel=1e-9)
    assert got["B"] == pytest.approx(0.3, rel=1e-6)  # B scaled by 0.7: it moved by 30% of its norm
    want_a = (sum((a - a0).pow(2).sum() for (a, _), (a0, _) in zip(new, old)) /
              sum(a0.pow(2).sum() for a0, _ in old)).sqrt()
    assert got["A"] == pytest.approx(float(want_a), rel=1e-9)
    assert set(adapter_change.change_logs(got)) == {"deal/relative_change/A", "deal/relative_change/B",
                                                    "deal/relative_change/delta_w"}


def test_first_task_has_no_b_ratio(tiny_model):
    from deal_train.methods import DEAL

    model = DEAL(_cfg()).wrap(tiny_model)
    start = adapter_change.snapshot(model, "default")
    change = adapter_change.relative_change(model, start)
    assert change["B"] is None and change["delta_w"] is None and change["A"] == 0.0


# --- residual update --------------------------------------------------------------------------------
def test_residual_trains_at_the_lora_learning_rate_and_is_held_by_drift(tiny_model):
    cfg = _cfg(deal_residual_update=True, learning_rate=2e-4, deal_learning_rate=1e-3, deal_lambda_drift=1.0)
    method, model = _history_model(tiny_model, cfg)
    ids = torch.randint(0, 1000, (2, 10))
    before = _logits(model, ids)
    method.before_task(model, 1)
    assert torch.equal(_logits(model, ids), before)  # R = 0: identity at start
    groups = method.param_groups(model)
    assert [g["lr"] for g in groups] == [1e-3, 2e-4]
    residuals = groups[1]["params"]
    assert len(residuals) == 2 * len(lora_layers(model))  # one per factor (A and B of every layer)
    assert all(r.shape == f.history.shape for r, f in zip(residuals, method.factors))
    out = model(input_ids=ids)
    extra, logs = method.extra_loss(model, None, out)
    assert logs["deal/drift"] == 0.0
    (out.logits.float().pow(2).mean() + extra).backward()
    assert all(r.grad is not None for r in residuals) and any(r.grad.abs().sum() > 0 for r in residuals)
    with torch.no_grad():
        residuals[0].add_(0.1)
    _, logs = method.extra_loss(model, None, model(input_ids=ids))
    assert logs["deal/drift"] > 0  # the drift penalty sees the residual
    from deal_train.model.loading import load_model, load_tokenizer

    without = _cfg(deal_residual_update=False)
    m2, model2 = _history_model(load_model("tiny-random-llama", load_tokenizer("tiny-random-llama")), without)
    m2.before_task(model2, 1)
    assert len(m2.param_groups(model2)) == 1 and not m2.residual_parameters()


# --- profiles ---------------------------------------------------------------------------------------
def _cli(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_paper_profile_fills_unset_deal_keys_only():
    paper = _cli("--deal_profile", "paper")
    for key, value in PAPER_PROFILE.items():
        assert getattr(paper, key) == value, key
    tuned = _cli()
    assert any(getattr(tuned, k) != v for k, v in PAPER_PROFILE.items())  # the profiles really differ
    own = _cli("--deal_profile", "paper", "--deal_lambda_drift", "0.5")
    assert own.deal_lambda_drift == 0.5 and own.deal_reg_target == "raw"


def test_paper_profile_in_a_sweep_grid(tmp_path):
    base = TrainConfig(deal_lambda_drift=3.0, output_dir=str(tmp_path))
    points = point_configs(base, parse_grid(["deal_profile=tuned,paper"]))
    by_name = {name: cfg for name, _s, cfg in points}
    assert by_name["deal_profile=tuned"].deal_lambda_drift == 3.0
    assert by_name["deal_profile=paper"].deal_lambda_drift == 0.0
    assert by_name["deal_profile=paper"].deal_reg_target == "raw"


def test_relative_change_lands_in_metrics(finished_run):
    cfg, metrics, _ = finished_run("deal")
    changes = [p["relative_change"] for p in metrics["per_task"]]
    assert changes[0]["B"] is None and changes[0]["A"] > 0   # task 1 trains LoRA from its random A
    assert changes[1]["A"] > 0 and changes[1]["B"] > 0 and changes[1]["delta_w"] > 0
    saved = json.load(open(f"{cfg.output_dir}/metrics.json"))
    assert saved["per_task"][1]["relative_change"] == pytest.approx(changes[1])


def test_compare_takes_a_deal_profile_entry(tmp_path):
    from deal_train.tools.compare import method_config, parse_methods

    assert parse_methods("deal,deal:paper,seq_lora") == ["deal", "deal:paper", "seq_lora"]
    for bad in ("deal:nope", "seq_lora:paper"):
        with pytest.raises(ConfigError, match="deal:<profile>"):
            parse_methods(bad)
    base = TrainConfig(deal_lambda_drift=2.0, output_dir=str(tmp_path))
    paper = method_config(base, "deal:paper")
    assert (paper.method, paper.deal_profile, paper.deal_lambda_drift, paper.deal_reg_target) == \
        ("deal", "paper", 0.0, "raw")
    assert paper.output_dir == str(tmp_path / "deal-paper")
    assert method_config(base, "deal").deal_lambda_drift == 2.0


def test_other_methods_keys_do_not_make_a_run_stale():
    seq = TrainConfig(method="seq_lora").to_dict()
    assert comparable_config(seq) == comparable_config({**seq, "deal_lambda_drift": 5.0, "ewc_lambda": 1.0})
    assert comparable_config(seq) != comparable_config({**seq, "learning_rate": 1.0})
    deal = TrainConfig(method="deal").to_dict()
    assert comparable_config(deal) != comparable_config({**deal, "deal_lambda_drift": 5.0})
    assert comparable_config(deal) == comparable_config({**deal, "ewc_lambda": 1.0})


def test_code_defaults_match_the_search_winner():
    """docs/deal_defaults.md is generated by scripts/search_deal_defaults.py; its winner must be TrainConfig's default."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "deal_defaults.md").read_text(encoding="utf-8")
    block = re.search(r"## Winner.*?```json\n(.*?)```", doc, re.S)
    assert block, "docs/deal_defaults.md has no winner block; rerun scripts/search_deal_defaults.py"
    winner = json.loads(block.group(1))
    assert winner, "the search fixed no setting"
    defaults = TrainConfig()
    for key, value in winner.items():
        assert getattr(defaults, key) == value, f"{key}: code default {getattr(defaults, key)!r}, search {value!r}"
