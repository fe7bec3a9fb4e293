"""Encoder-decoder models on a tiny random T5 (``tiny-random-t5``, SmolLM2's tokenizer) and every method on both
model kinds: LoRA targets by model type, seq2seq collation and loss (checked against T5's own loss), generation,
EWC's Fisher and LwF's teacher, and two-task continual runs whose saved adapters stock PEFT reloads."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from peft import PeftModel, PeftModelForSeq2SeqLM
from transformers import LlamaForCausalLM, PretrainedConfig, T5ForConditionalGeneration

from deal_train.train import loop
from deal_train.config import ConfigError, TrainConfig
from deal_train.data import IGNORE_INDEX, Seq2SeqEncoder, collate_train, encoder_for, load_task
from deal_train.train.evaluation import generate_predictions
from deal_train.model.losses import answer_forward, token_cross_entropy_sum
from deal_train.methods.adapters import lora_layers
from deal_train.methods.lwf import TEACHER_ADAPTER
from deal_train.model.loading import default_target_modules, load_model, model_config, with_model_defaults

METHODS = ["seq_lora", "deal", "o_lora", "per_task", "replay", "ewc", "lwf"]  # osf: its own T5 run in test_osf.py (it trains a residual subspace, not r)
BASELINES = ["o_lora", "per_task", "replay", "ewc", "lwf"]
# rank 4 on q and v (64 -> 64 each): 2 encoder layers x (q, v) + 2 decoder layers x (self q, v + cross q, v)
T5_LORA = 12 * 4 * (64 + 64)
# rank 4 on q_proj (64 -> 64) and v_proj (64 -> 32), 2 layers
LLAMA_LORA = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


def _randomise_b(model, adapter: str = "default", seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, layer in lora_layers(model, adapter):
            w = layer.lora_B[adapter].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)


def test_tiny_t5_alias_and_target_modules_by_model_type(tokenizer):
    t5 = load_model("tiny-random-t5", tokenizer)
    assert isinstance(t5, T5ForConditionalGeneration) and t5.config.is_encoder_decoder
    assert t5.config.vocab_size == len(tokenizer) == 49152
    assert t5.config.decoder_start_token_id == t5.config.pad_token_id == tokenizer.pad_token_id
    assert default_target_modules(model_config("tiny-random-t5")) == ["q", "v"]
    assert default_target_modules(model_config("tiny-random-llama")) == ["q_proj", "v_proj"]
    assert with_model_defaults(TrainConfig(model="tiny-random-t5")).target_modules == ["q", "v"]
    assert with_model_defaults(TrainConfig(model="tiny-random-t5", target_modules=["k"])).target_modules == ["k"]
    with pytest.raises(ConfigError, match="set target_modules"):
        default_target_modules(PretrainedConfig())


def test_t5_wrap_targets_q_v_with_seq2seq_task_type(tiny_method):
    cfg, datas, method, model = tiny_method("seq_lora", model="tiny-random-t5")
    assert isinstance(model, PeftModelForSeq2SeqLM)
    assert model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 12 and {n.rsplit(".", 1)[1] for n in names} == {"q", "v"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == T5_LORA
    _c, _d, llama_method, llama = tiny_method("seq_lora")
    assert llama.peft_config["default"].task_type == "CAUSAL_LM"
    assert {n.rsplit(".", 1)[1] for n, _ in lora_layers(llama)} == {"q_proj", "v_proj"}


def test_seq2seq_collation_and_loss_equal_t5_own_loss(tokenizer, data_dir):
    model = load_model("tiny-random-t5", tokenizer)
    enc = encoder_for(model.config, tokenizer, 128, 50, chat_template=True)
    assert isinstance(enc, Seq2SeqEncoder) and not enc.chat_template  # no chat template for encoder-decoders
    task = load_task(data_dir, "agnews")
    rows = loop.prepare_data(TrainConfig(tasks=["agnews"], max_train_samples=3, max_test_samples=1))[0].train_rows
    feats, _ = enc.train_features(task, rows)
    batch = collate_train([feats[i] for i in range(3)], tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert labels.shape == dec.shape and (labels[:, 0] == IGNORE_INDEX).all()
    assert (dec[:, 0] == model.config.decoder_start_token_id).all()
    for i, row in enumerate(rows):
        answer = tokenizer(row["label"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = len(answer)
        assert labels[i, 1:n + 1].tolist() == answer == dec[i, 1:n + 1].tolist()
        assert (labels[i, n + 1:] == IGNORE_INDEX).all() and (batch["decoder_attention_mask"][i, n + 1:] == 0).all()
        prompt = tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])
        assert prompt.startswith("Task:TC\nDataset:agnews\n") and prompt.endswith("\nAnswer:")
    # our decoder-sequence loss is T5's own label loss (which shifts the labels right itself)
    with torch.no_grad():
        ce, n_tokens = token_cross_entropy_sum(answer_forward(model, batch).logits, labels)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels[:, 1:].contiguous()).loss
    assert n_tokens == int((labels != IGNORE_INDEX).sum())
    assert float(ce / n_tokens) == pytest.approx(float(own), abs=1e-5)


def test_t5_generation_decodes_the_decoder_tokens(tokenizer, tiny_method):
    """Predictions are the decoder's tokens after its start token, not the tail of a (decoder-only) prompt echo."""
    cfg, datas, method, model = tiny_method("seq_lora", model="tiny-random-t5")
    _randomise_b(model)
    feats = datas[0].test_features
    preds = generate_predictions(model, tokenizer, feats, 2, 4)
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([feats[0]["input_ids"]]), max_new_tokens=4, do_sample=False)
    assert int(gen[0, 0]) == model.config.decoder_start_token_id and gen.shape[1] > 1
    assert preds[0]["prediction"] == tokenizer.decode(gen[0, 1:], skip_special_tokens=True).strip() != ""
    assert [p["label"] for p in preds] == [r["label"] for r in datas[0].test_rows]


def test_ewc_fisher_and_lwf_teacher_on_t5(tokenizer, tiny_method):
    cfg, datas, method, model = tiny_method("ewc", model="tiny-random-t5")
    method.before_task(model, 0)
    _randomise_b(model)
    batches = [collate_train([datas[0].train_features[i] for i in range(j, j + 4)], tokenizer.pad_token_id)
               for j in (0, 4)]
    method.after_task(model, 0, batches)
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(method.fisher) == lora and len(lora) == 24
    assert all(torch.isfinite(f).all() for f in method.fisher.values())
    assert sum(float(f.sum()) for f in method.fisher.values()) > 0

    cfg, datas, method, model = tiny_method("lwf", model="tiny-random-t5")
    method.before_task(model, 0)
    _randomise_b(model)
    batch = collate_train([datas[1].train_features[i] for i in range(4)], tokenizer.pad_token_id)
    with torch.no_grad():
        old = answer_forward(model, batch).logits
    method.before_task(model, 1)
    assert TEACHER_ADAPTER in model.peft_config
    assert model.peft_config[TEACHER_ADAPTER].task_type == "SEQ_2_SEQ_LM"
    torch.testing.assert_close(method.teacher_logits(model, batch), old, atol=1e-6, rtol=0)  # a copied adapter
    params = method.param_groups(model)[0]["params"]
    opt = torch.optim.AdamW(params, lr=1e-2)
    outputs = answer_forward(model, batch)
    extra, logs = method.extra_loss(model, batch, outputs)
    assert logs["lwf/kl"] == 0.0
    ce, n = token_cross_entropy_sum(outputs.logits, batch["labels"])
    (ce / n + extra).backward()
    opt.step()
    _extra, logs = method.extra_loss(model, batch, answer_forward(model, batch))
    assert logs["lwf/kl"] > 0
    torch.testing.assert_close(method.teacher_logits(model, batch), old, atol=1e-6, rtol=0)  # the teacher did not move


def _deal_parameters(n_factors: int, cfg: TrainConfig, width: int) -> int:
    """DEAL's trainable parameters per task after the first: per LoRA factor (``width`` x r), gains J x r and
    centres J of the heat filter, the update MLP's W1 (h x r), b1 (h), W2 (r x h), b2 (r), and with
    ``deal_residual_update`` the residual R (width x r)."""
    j, r, h = cfg.deal_scales, cfg.lora_rank, cfg.deal_mlp_hidden
    residual = width * r if cfg.deal_residual_update else 0
    return n_factors * (j * r + j + 2 * h * r + h + r + residual)


@pytest.mark.parametrize("kind,method", [("t5", m) for m in METHODS] + [("llama", m) for m in BASELINES])
def test_every_method_two_task_run(kind, method, finished_run, finished_t5_run, tokenizer):
    """Tiny T5: every method. Tiny LLaMA: the baselines' runs shared with test_baselines.py (seq_lora and deal
    run on it in test_end_to_end_tiny.py)."""
    cfg, metrics, _ = (finished_t5_run if kind == "t5" else finished_run)(method)
    out = pathlib.Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished"] and saved["config"]["model"] == cfg.model
    assert saved["config"]["target_modules"] == (["q", "v"] if kind == "t5" else ["q_proj", "v_proj"])
    acc = saved["accuracy_matrix"]
    assert acc[1][0] is None and all(isinstance(acc[i][1], float) for i in range(2))
    lora = T5_LORA if kind == "t5" else LLAMA_LORA
    trainable = [p["trainable_parameters"] for p in saved["per_task"]]
    if method == "deal":
        assert trainable == [lora, _deal_parameters(2 * 12, cfg, width=64)]  # q, v of d_model 64: A and B are 64 x r
    else:
        assert trainable == [lora, lora]
    # the adapter saved after task 2 is plain PEFT for this model kind and reproduces the run's task-2 answers
    adapter = out / "adapters" / "2-amazon"
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == ("SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM")
    base = load_model(cfg.model, tokenizer)
    assert isinstance(base, T5ForConditionalGeneration if kind == "t5" else LlamaForCausalLM)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    data = loop.prepare_data(cfg)[1]
    enc = encoder_for(base.config, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.chat_template)
    feats, _ = enc.eval_features(data.task, data.test_rows)
    preds = generate_predictions(peft_model, tokenizer, feats, cfg.per_device_eval_batch_size, cfg.max_new_tokens)
    saved_preds = [json.loads(x)["prediction"] for x in
                   (out / "predictions" / "after_2-amazon" / "2-amazon.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == saved_preds
    if method == "seq_lora":  # the run recorded the resolved modules; a rerun of the same command matches it
        from deal_train.tools.compare import finished_metrics

        assert cfg.target_modules == [] and finished_metrics(cfg)["finished"]
