"""The baselines of docs/design.md section 4 (o_lora, per_task, replay, ewc, lwf) on a tiny random LLaMA with real rows:
two-task runs end to end with stock-PEFT-loadable adapters, O-LoRA's concatenated adapter and penalty, PerTaskFT's
adapter switch, the rows Replay trains on, EWC's penalty and state, LwF's teacher, and exact resume."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from deal_train.train import loop
from deal_train.config import TrainConfig
from deal_train.data import Encoder, collate_train
from deal_train.model.losses import answer_forward, token_cross_entropy_sum
from deal_train.methods.adapters import lora_layers
from deal_train.methods.lwf import TEACHER_ADAPTER
from deal_train.methods.adapters import CAT_ADAPTER
from deal_train.model.loading import load_model

from conftest import forget_last_task, saved_predictions, predictions_on_test_rows

BASELINES = ["o_lora", "per_task", "replay", "ewc", "lwf"]
LORA_PARAMS = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # rank 4 on q_proj (64 -> 64) and v_proj (64 -> 32), 2 layers


def _scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.out") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def _stock_predictions(tokenizer, cfg, adapter_dir, task_index: int) -> list[str]:
    """Predictions on task ``task_index``'s test rows from stock ``PeftModel.from_pretrained`` of ``adapter_dir``."""
    model = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), str(adapter_dir))
    return predictions_on_test_rows(model, tokenizer, cfg, task_index)


def _randomise_b(model, adapter: str, seed: int) -> None:
    """Give ``adapter`` non-zero B factors (a fresh PEFT adapter has B = 0), as if it had been trained."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, layer in lora_layers(model, adapter):
            w = layer.lora_B[adapter].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _batch(datas, task_index: int, pad: int, n: int = 4) -> dict:
    return collate_train([datas[task_index].train_features[i] for i in range(n)], pad)


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", BASELINES)
def test_two_task_run_and_stock_peft_adapters(finished_run, tokenizer, method):
    cfg, metrics, _ = finished_run(method)
    out = pathlib.Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished"] and saved["config"]["method"] == method
    acc = saved["accuracy_matrix"]
    assert acc[1][0] is None and all(isinstance(acc[i][1], float) for i in range(2))
    # every method trains one rank-r adapter's worth of parameters per task, the same budget as LoRA
    assert [p["trainable_parameters"] for p in saved["per_task"]] == [LORA_PARAMS, LORA_PARAMS]
    a1, a2 = out / "adapters" / "1-dbpedia", out / "adapters" / "2-amazon"
    for adapter in (a1, a2):
        assert sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []  # one plain adapter, no sub-adapters
        assert (adapter / "adapter_model.safetensors").is_file()
    config2 = json.loads((a2 / "adapter_config.json").read_text())
    if method == "o_lora":
        assert (config2["r"], config2["lora_alpha"]) == (2 * cfg.lora_rank, 2 * cfg.lora_rank)  # cat: rank 2r, scale 1
    else:
        assert (config2["r"], config2["lora_alpha"]) == (cfg.lora_rank, cfg.lora_alpha)
    # the saved adapters reproduce the predictions the run made
    if method == "per_task":
        # task i is evaluated with adapter i: adapter 1 still answers task 1 after task 2, exactly as before
        assert saved_predictions(out, "after_2-amazon", "1-dbpedia.jsonl") == \
            saved_predictions(out, "after_1-dbpedia", "1-dbpedia.jsonl")
        assert acc[0][1] == acc[0][0]
        assert _stock_predictions(tokenizer, cfg, a1, 0) == saved_predictions(out, "after_2-amazon", "1-dbpedia.jsonl")
        assert _stock_predictions(tokenizer, cfg, a2, 1) == saved_predictions(out, "after_2-amazon", "2-amazon.jsonl")
    else:
        for i, task_file in enumerate(["1-dbpedia.jsonl", "2-amazon.jsonl"]):
            assert _stock_predictions(tokenizer, cfg, a2, i) == saved_predictions(out, "after_2-amazon", task_file)


def test_o_lora_penalty_is_positive_from_the_first_step_of_task_2(finished_run):
    cfg, metrics, _ = finished_run("o_lora")
    steps_task_1 = metrics["per_task"][0]["optimizer_steps"]
    orth = _scalars(os.path.join(cfg.output_dir, "tensorboard"), "o_lora/orth_loss")
    assert orth and orth[0][0] == steps_task_1 + 1  # logged on task 2 only, from its first step
    assert all(v > 0 for _s, v in orth)


def test_ewc_penalty_zero_at_start_of_task_2_then_positive(finished_run):
    cfg, metrics, _ = finished_run("ewc")
    steps_task_1 = metrics["per_task"][0]["optimizer_steps"]
    pen = _scalars(os.path.join(cfg.output_dir, "tensorboard"), "ewc/penalty")
    assert [s for s, _v in pen] == [steps_task_1 + 1 + i for i in range(metrics["per_task"][1]["optimizer_steps"])]
    assert pen[0][1] == 0.0 and pen[-1][1] > 0
    state = load_file(os.path.join(cfg.output_dir, "adapters", "2-amazon", loop.METHOD_STATE_FILE))
    fisher = {k for k in state if k.startswith("fisher/")}
    assert len(fisher) == 8 and len(state) == 16  # A and B of q_proj and v_proj in 2 layers, plus anchors
    assert all(state[k].sum() > 0 for k in fisher)


def test_lwf_distillation_zero_at_start_of_task_2_then_positive(finished_run):
    cfg, metrics, _ = finished_run("lwf")
    kl = _scalars(os.path.join(cfg.output_dir, "tensorboard"), "lwf/kl")
    assert kl[0] == (metrics["per_task"][0]["optimizer_steps"] + 1, 0.0)  # teacher == student when the task starts
    assert kl[-1][1] > 0


def test_replay_trains_buffer_rows_of_earlier_tasks_with_their_own_prompt(finished_run, tokenizer):
    cfg, _metrics, trained = finished_run("replay")
    datas = loop.prepare_data(cfg)
    enc = Encoder(tokenizer, cfg.max_source_length, cfg.max_target_length, True)
    from deal_train.methods.replay import Replay

    buffer = Replay(cfg).buffer(0, datas[0].train_rows)
    assert len(buffer) == cfg.replay_samples_per_task and all(r in datas[0].train_rows for r in buffer)
    task1 = [list(f["input_ids"]) for f in enc.train_features(datas[0].task, datas[0].train_rows)[0]]
    task2 = [list(f["input_ids"]) for f in enc.train_features(datas[1].task, datas[1].train_rows)[0]]
    replayed = [list(f["input_ids"]) for f in enc.train_features(datas[0].task, buffer)[0]]
    n1 = len(datas[0].train_rows)
    assert sorted(trained[:n1]) == sorted(task1)  # task 1: its own rows only
    assert sorted(trained[n1:]) == sorted(task2 + replayed)  # task 2: its rows plus the buffer, dbpedia's prompt
    text = [tokenizer.decode(ids) for ids in trained[n1:]]
    assert sum("Dataset:dbpedia" in t for t in text) == cfg.replay_samples_per_task
    assert sum("Dataset:amazon" in t for t in text) == len(datas[1].train_rows)


@pytest.mark.parametrize("method", ["o_lora", "per_task", "ewc"])
def test_resume_after_task_1_gives_identical_results(finished_run, tmp_path, method):
    cfg, metrics, _ = finished_run(method)
    out = tmp_path / method
    shutil.copytree(cfg.output_dir, out)
    final = forget_last_task(out)  # a crash during task 2
    resumed = loop.run(TrainConfig(**{**cfg.to_dict(), "output_dir": str(out)}))
    assert (out / "adapters" / "2-amazon" / "adapter_model.safetensors").read_bytes() == final
    assert resumed["accuracy_matrix"] == metrics["accuracy_matrix"]


# --- O-LoRA -----------------------------------------------------------------------------------------------------

def test_o_lora_cat_adapter_reproduces_the_live_multi_adapter_model(tokenizer, tiny_method, tmp_path):
    cfg, datas, method, model = tiny_method("o_lora")
    method.before_task(model, 0)
    _randomise_b(model, "task_0", 1)
    method.before_task(model, 1)
    _randomise_b(model, "task_1", 2)
    assert model.active_adapters == ["task_0", "task_1"]
    batch = _batch(datas, 1, tokenizer.pad_token_id)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    with torch.no_grad():
        live = model(**kw).logits
    flags = _flags(model)
    method.save_adapter(model, str(tmp_path))
    # the temporary cat adapter is gone and nothing about the live model changed
    assert CAT_ADAPTER not in model.peft_config and model.active_adapters == ["task_0", "task_1"]
    assert _flags(model) == flags
    stock = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), str(tmp_path))
    assert stock.peft_config["default"].r == 2 * cfg.lora_rank
    with torch.no_grad():
        cat = stock(**kw).logits
        with model.disable_adapter():
            base = model(**kw).logits
    assert (live - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(cat, live, atol=1e-5, rtol=0)


def test_o_lora_resume_restores_earlier_adapters_frozen_and_penalises_the_new_one(tokenizer, tiny_method, tmp_path):
    cfg, datas, method, model = tiny_method("o_lora")
    method.before_task(model, 0)
    _randomise_b(model, "task_0", 1)
    method.save_adapter(model, str(tmp_path / "1"))
    method.before_task(model, 1)
    _randomise_b(model, "task_1", 2)
    method.save_adapter(model, str(tmp_path / "2"))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    _cfg, _datas, method2, model2 = tiny_method("o_lora")
    method2.load_adapter_weights(model2, [str(tmp_path / "1"), str(tmp_path / "2")])
    restored = {n: p for n, p in model2.named_parameters() if "lora_" in n}
    assert restored.keys() == trained.keys()
    assert all(torch.equal(restored[n], trained[n]) for n in trained)  # alpha / r = 8: the split is exact
    assert not any(p.requires_grad for p in model2.parameters())  # loading turns no gradient on
    assert model2.active_adapters == ["task_0", "task_1"] and CAT_ADAPTER not in model2.peft_config

    method2.before_task(model2, 2)
    assert sorted({n.split(".lora_")[1].split(".")[1] for n, p in model2.named_parameters() if p.requires_grad}) == \
        ["task_2"]
    assert model2.active_adapters == ["task_0", "task_1", "task_2"]
    batch = _batch(datas, 1, tokenizer.pad_token_id)
    extra, logs = method2.extra_loss(model2, batch, answer_forward(model2, batch))
    assert logs["o_lora/orth_loss"] > 0 and extra > 0
    assert len(method2._pairs[0][1]) == 2  # the new adapter is compared with both earlier ones
    extra.backward()
    assert all(p.grad is None for n, p in model2.named_parameters() if ".task_0." in n or ".task_1." in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model2.named_parameters() if ".task_2." in n)


# --- PerTaskFT --------------------------------------------------------------------------------------------------

def test_per_task_eval_adapter_switches_and_restores(tokenizer, tiny_method):
    cfg, datas, method, model = tiny_method("per_task")
    method.before_task(model, 0)
    _randomise_b(model, "task_0", 1)
    method.before_task(model, 1)
    _randomise_b(model, "task_1", 2)
    batch = _batch(datas, 0, tokenizer.pad_token_id)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    flags = _flags(model)
    assert model.active_adapters == ["task_1"]
    with torch.no_grad():
        with method.eval_adapter(model, 0):
            assert model.active_adapters == ["task_0"]
            assert not any(p.requires_grad for p in model.parameters())  # evaluation turns no gradient on
            logits_0 = model(**kw).logits
        logits_1 = model(**kw).logits
    assert model.active_adapters == ["task_1"] and _flags(model) == flags
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".task_0." in n)
    # adapter 0 alone gives the same logits as a model that only ever had adapter 0
    _c, _d, _method0, model0 = tiny_method("per_task")
    set_peft_model_state_dict(model0, get_peft_model_state_dict(model, adapter_name="task_0"), adapter_name="task_0")
    with torch.no_grad():  # another model object (one adapter, not two): same values, tolerance for the kernels
        torch.testing.assert_close(model0(**kw).logits, logits_0, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits_0, logits_1)


# --- LwF --------------------------------------------------------------------------------------------------------

TEACHER_TOL = 1e-6
"""The teacher is a copy of the adapter under another name, run under no_grad with the student's adapter switched
off: the same values through other module objects, so other kernels may be chosen; logits are O(1-10), and a moved
teacher (one AdamW step at lr 5e-3) differs by far more than 1e-6."""

def test_lwf_teacher_is_the_model_before_the_task(tokenizer, tiny_method):
    cfg, datas, method, model = tiny_method("lwf")
    method.before_task(model, 0)
    _randomise_b(model, "default", 1)  # as if task 1 had been trained
    batch = _batch(datas, 1, tokenizer.pad_token_id)
    with torch.no_grad():
        old = answer_forward(model, batch).logits
    method.before_task(model, 1)
    assert TEACHER_ADAPTER in model.peft_config and model.active_adapters == ["default"]
    torch.testing.assert_close(method.teacher_logits(model, batch), old, atol=TEACHER_TOL, rtol=0)
    model.train()
    params = method.param_groups(model)[0]["params"]
    assert params and not any(p.requires_grad for n, p in model.named_parameters() if TEACHER_ADAPTER in n)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    flags = _flags(model)
    outputs = answer_forward(model, batch)
    ce, n = token_cross_entropy_sum(outputs.logits, batch["labels"])
    extra, logs = method.extra_loss(model, batch, outputs)
    assert logs["lwf/kl"] == 0.0 and _flags(model) == flags and model.training
    (ce / n + extra).backward()
    assert all(p.grad is not None for p in params)  # the teacher pass's adapter switch kept the student's graph
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(method.teacher_logits(model, batch), old, atol=TEACHER_TOL, rtol=0)  # did not move
    outputs = answer_forward(model, batch)
    assert not torch.equal(outputs.logits.detach(), old)
    _extra, logs = method.extra_loss(model, batch, outputs)
    assert logs["lwf/kl"] > 0
    method.after_task(model, 1)
    assert TEACHER_ADAPTER not in model.peft_config
