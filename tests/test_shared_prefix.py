"""The shared-prefix fast path (deal_train/model/prefix.py): the prompt prefix every row shares runs once into a
key/value cache, and the result is today's full pass up to float rounding, for every method, for replay's mixed
batches, at evaluation (identical greedy predictions), with a clear fallback under gradient checkpointing.

Tolerances: losses within 1e-5 relative and gradients within 1e-5 of their norm (float32; measured on the tiny
LLaMA: losses equal to the printed digit, gradients 4e-7 of their norm). The prefix runs at batch 1 and the
suffixes against it, so the same sums run in another blocking than in one (batch, L) pass.
A method's extra loss is compared within 1e-5 relative *or* 1e-6 of the mean per-token cross-entropy, whichever
is larger: LwF's KL is a difference of two nearly equal log-probabilities (teacher and student differ by a small
perturbation here), so its rounding error is absolute, of the order of float32 rounding of log-probabilities of
a few nats, not relative to the small KL (measured 1.0e-7 on a KL of 1.5e-3 on one CI machine, 7e-5 relative).
"""

from __future__ import annotations

import json

import pytest
import torch

from deal_train.config import TrainConfig
from deal_train.data import Encoder, collate_train, load_task, read_rows
from deal_train.methods import REGISTRY
from deal_train.model import prefix
from deal_train.model.losses import answer_forward, token_cross_entropy_sum
from deal_train.train import loop
from deal_train.train.evaluation import common_prefix_length, generate_predictions

from conftest import TINY_RUN, varied_tiny_llama

REL = 1e-5


def _features(prompts, answers):
    return [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]


def test_prefix_length_stops_at_the_first_difference_and_before_every_answer():
    shared = [11, 12, 13, 14, 15, 16]
    feats = _features([shared + [20, 21], shared + [30], shared + [40, 41, 42]], [[7, 8], [9], [7]])
    batch = collate_train(feats, pad_token_id=0, shared_prefix=True)
    assert batch["shared_prefix"] == 6  # left padding does not hide the common start
    # the second row's answer starts right after the shared tokens: the prefix must leave the position that
    # predicts its first answer token (the last shared one) to the suffix
    feats = _features([shared + [20, 21], shared, shared + [40]], [[7, 8], [9], [7]])
    assert collate_train(feats, 0, shared_prefix=True)["shared_prefix"] == 5
    # no common first token, a single row, and the switch off
    assert collate_train(_features([[1, 2], [3, 4]], [[5], [5]]), 0, shared_prefix=True)["shared_prefix"] == 0
    assert collate_train(feats[:1], 0, shared_prefix=True)["shared_prefix"] == 0
    assert "shared_prefix" not in collate_train(feats, 0)
    assert common_prefix_length([shared + [1], shared + [2, 3]]) == 6
    assert common_prefix_length([shared, shared]) == 5 and common_prefix_length([shared]) == 0


def test_split_batch_masks_each_rows_prefix_and_keeps_the_suffixes():
    feats = _features([[5, 6, 7, 1], [5, 6, 7, 2, 3, 4]], [[9], [9]])
    batch = collate_train(feats, pad_token_id=0, shared_prefix=True)
    p = batch["shared_prefix"]
    prefix_ids, suffix_ids, suffix_mask, full_mask = prefix.split_batch(batch["input_ids"], batch["attention_mask"], p)
    assert p == 3 and prefix_ids.tolist() == [[5, 6, 7]]
    assert suffix_ids.shape == (2, batch["input_ids"].shape[1] - 3)
    # the short row's real tokens after the prefix, right-aligned, the rest masked; the long row unmasked
    kept = [[t for t, m in zip(r, mr) if m] for r, mr in zip(suffix_ids.tolist(), suffix_mask.tolist())]
    assert kept == [[1, 9], [2, 3, 4, 9]]
    assert full_mask[:, :3].all() and torch.equal(full_mask[:, 3:], suffix_mask)


def _loss_and_grads(model, method, batch):
    model.zero_grad(set_to_none=True)
    outputs = answer_forward(model, batch)
    ce, n_tokens = token_cross_entropy_sum(outputs.logits, batch["labels"])
    extra, _logs = method.extra_loss(model, batch, outputs)
    loss = ce + (extra if extra is not None else 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return (float(ce.detach()), None if extra is None else float(extra.detach()), grads,
            float(ce.detach()) / max(int(n_tokens), 1))


def _assert_same(full, fast):
    assert fast[0] == pytest.approx(full[0], rel=REL)
    assert (fast[1] is None) == (full[1] is None)
    if full[1] is not None:  # absolute part: 1e-6 of a per-token log-probability (module docstring)
        assert fast[1] == pytest.approx(full[1], rel=REL, abs=1e-6 * full[3])
    assert full[2].keys() == fast[2].keys() and full[2]
    moved = 0
    for name, g in full[2].items():
        scale = float(g.norm())
        assert float((fast[2][name] - g).norm()) <= REL * scale + 1e-12, name
        moved += scale > 0
    assert moved, "no gradient reached the adapter"


def _second_task(name, tiny_method, tokenizer):
    """The method on task 2 (dbpedia trained with perturbed adapters first), and task 2's first micro batch's
    features: DEAL's parametrization, O-LoRA's penalty, EWC's Fisher and LwF's teacher are all active."""
    cfg, datas, method, model = tiny_method(name)
    torch.manual_seed(0)

    def perturb():
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))

    method.before_task(model, 0, datas[0].train_rows)
    perturb()
    own = [collate_train([datas[0].train_features[i] for i in range(j, j + 4)], tokenizer.pad_token_id)
           for j in (0, 4)]
    method.after_task(model, 0, own)
    method.before_task(model, 1, datas[1].train_rows)
    perturb()
    return method, model, datas


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fast_path_gives_the_full_pass_loss_and_gradients(name, tiny_method, tokenizer):
    method, model, datas = _second_task(name, tiny_method, tokenizer)
    model.train()
    feats = [datas[1].train_features[i] for i in range(4)]
    fast_batch = collate_train(feats, tokenizer.pad_token_id, shared_prefix=True)
    assert fast_batch["shared_prefix"] > 20  # chat template + instruction + options
    full = _loss_and_grads(model, method, collate_train(feats, tokenizer.pad_token_id))
    fast = _loss_and_grads(model, method, fast_batch)
    _assert_same(full, fast)


def test_replay_batches_mixing_tasks_share_a_shorter_prefix(tiny_method, tokenizer):
    method, model, datas = _second_task("seq_lora", tiny_method, tokenizer)
    model.train()
    one_task = collate_train([datas[1].train_features[i] for i in range(4)], tokenizer.pad_token_id, True)
    feats = [datas[0].train_features[0], datas[1].train_features[0], datas[0].train_features[1],
             datas[1].train_features[1]]
    mixed = collate_train(feats, tokenizer.pad_token_id, shared_prefix=True)
    assert 0 < mixed["shared_prefix"] < one_task["shared_prefix"]  # the chat template only
    _assert_same(_loss_and_grads(model, method, collate_train(feats, tokenizer.pad_token_id)),
                 _loss_and_grads(model, method, mixed))


def test_evaluation_from_the_cached_prefix_gives_identical_predictions(tokenizer, data_dir):
    model = varied_tiny_llama(tokenizer)
    task = load_task(data_dir, "yahoo")
    rows = sorted(read_rows(task, "test"), key=lambda r: len(r["sentence"]))
    rows = rows[:5] + rows[-5:]  # short and long questions, so batches mix lengths
    feats, _ = Encoder(tokenizer, 400, 50, True).eval_features(task, rows)
    embedded = []  # token positions of each forward pass
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: embedded.append(args[0].shape))
    full = generate_predictions(model, tokenizer, feats, 4, 5)
    first_full = [s for s in embedded if s[1] > 1]
    embedded.clear()
    fast = generate_predictions(model, tokenizer, feats, 4, 5, shared_prefix=True)
    hook.remove()
    assert [r["prediction"] for r in fast] == [r["prediction"] for r in full]
    assert all(r["prediction"] for r in full) and len({r["prediction"] for r in full}) >= 4
    # the prefix ran once at batch 1, then every batch's first step ran only its suffix columns
    p = common_prefix_length(list(feats["input_ids"]))
    prompts_fast = [s for s in embedded if s[1] > 1]
    assert p > 20 and prompts_fast[0] == (1, p)
    assert [s[1] + p for s in prompts_fast[1:]] == [s[1] for s in first_full]


def test_gradient_checkpointing_falls_back_to_the_full_pass_and_says_so(tmp_path, capsys):
    settings = {**TINY_RUN, "tasks": ["dbpedia"]}
    fast = loop.run(TrainConfig(method="seq_lora", output_dir=str(tmp_path / "fast"), **settings))
    printed = capsys.readouterr().out
    saving = fast["per_task"][0]["shared_prefix_token_saving"]
    assert 0.2 < saving < 1 and f"({100 * saving:.1f} % saved)" in printed
    checkpointed = loop.run(TrainConfig(method="seq_lora", output_dir=str(tmp_path / "gc"), gradient_checkpointing=True,
                                        **settings))
    printed = capsys.readouterr().out
    assert "training uses the full forward pass with gradient checkpointing" in printed
    assert checkpointed["per_task"][0]["shared_prefix_token_saving"] is None
    # the same training either way, up to float rounding
    assert checkpointed["per_task"][0]["final_loss"] == pytest.approx(fast["per_task"][0]["final_loss"], rel=1e-4)
    full = loop.run(TrainConfig(method="seq_lora", output_dir=str(tmp_path / "full"), shared_prefix=False, **settings))
    assert full["per_task"][0]["mean_loss"] == pytest.approx(fast["per_task"][0]["mean_loss"], rel=1e-4)
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["config"]["shared_prefix"] is False


def test_encoder_decoder_models_keep_the_full_pass(tokenizer):
    from deal_train.model.loading import load_model

    t5 = load_model("tiny-random-t5", tokenizer)
    assert "encoder-decoder" in prefix.supported(t5)


def test_a_run_may_resume_with_the_switch_flipped_but_not_with_another_batch_order():
    base = TrainConfig(method="deal", **TINY_RUN)
    flipped = TrainConfig(method="deal", shared_prefix=False, **TINY_RUN)
    grouped = TrainConfig(method="deal", group_by_length=True, **TINY_RUN)
    assert loop.comparable_config(base.to_dict()) == loop.comparable_config(flipped.to_dict())
    assert loop.comparable_config(base.to_dict()) != loop.comparable_config(grouped.to_dict())
