"""Batching must not change results: greedy predictions are the same for evaluation batch sizes 1, 3 and 8 on
prompts of very different lengths, and gradient accumulation weights every answer token as one large batch does
(batch 4 × accumulation 1 == batch 1 × accumulation 4 on answers of 2 to 15 tokens)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import Accelerator

from deal_train.data import Encoder, collate_train, load_task, read_rows
from deal_train.train.evaluation import generate_predictions
from deal_train.train.task import train_task
from deal_train.model.losses import answer_forward, token_cross_entropy_sum

from conftest import varied_tiny_llama


def test_greedy_predictions_do_not_depend_on_the_eval_batch_size(tokenizer, data_dir):
    model = varied_tiny_llama(tokenizer)  # varied tokens: padding or position errors would change the argmax
    task = load_task(data_dir, "yahoo")
    rows = sorted(read_rows(task, "test"), key=lambda r: len(r["sentence"]))
    rows = rows[:4] + rows[-4:]  # the four shortest and the four longest questions, in one batch of 8
    feats, truncated = Encoder(tokenizer, 400, 50, True).eval_features(task, rows)
    lengths = [len(ids) for ids in feats["input_ids"]]
    assert max(lengths) > 3 * min(lengths) and truncated == 4
    preds = {b: [p["prediction"] for p in generate_predictions(model, tokenizer, feats, b, 5)] for b in (1, 3, 8)}
    assert preds[1] == preds[3] == preds[8]
    assert all(preds[1]) and len(set(preds[1])) >= 4  # real, varied generations


class GradRecordingAdamW(torch.optim.AdamW):
    """AdamW that records the gradients it is asked to apply at each step (the real AdamW still steps)."""

    grads: list = []

    def step(self, closure=None):
        GradRecordingAdamW.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


LONG_LABEL = "Entertainment & Music & Film & Television & Theatre & Dance & Poetry"


@pytest.fixture()
def uneven_answers(data_dir, tmp_path):
    """A copy of yahoo whose training file holds 4 rows with answers of very different lengths (one relabelled to
    a long label added to labels.json)."""
    root = tmp_path / "data"
    shutil.copytree(f"{data_dir}/TC/yahoo", root / "TC" / "yahoo")
    rows = json.loads((root / "TC/yahoo/train.json").read_text())
    pick = [next(r for r in rows if r["label"] == label) for label in ("Health", "Sports", "Computers & Internet")]
    pick.append({**rows[0], "label": LONG_LABEL})
    (root / "TC/yahoo/train.json").write_text(json.dumps(pick))
    labels = json.loads((root / "TC/yahoo/labels.json").read_text())
    (root / "TC/yahoo/labels.json").write_text(json.dumps(labels + [LONG_LABEL]))
    return str(root)


def _one_step_gradients(tiny_method, monkeypatch, tokenizer, data_dir, batch: int, accumulation: int):
    """Gradients of the first optimizer step of ``train_task`` (and the model and task data, before that step
    changes nothing else: the returned model has taken the step)."""
    torch.manual_seed(0)  # the same LoRA initialisation in both set-ups
    cfg, datas, method, model = tiny_method("seq_lora", tasks=["yahoo"], data_dir=data_dir, max_train_samples=4,
                                            per_device_train_batch_size=batch,
                                            gradient_accumulation_steps=accumulation, max_grad_norm=0.0,
                                            max_source_length=128, validation_rows=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would leave A without gradient
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    # what weighting rows instead of tokens would give (the mean of each row's mean CE), at the same parameters
    model.train()
    for i in range(len(datas[0].train_features)):
        one = collate_train([datas[0].train_features[i]], tokenizer.pad_token_id)
        ce, n = token_cross_entropy_sum(answer_forward(model, one).logits, one["labels"])
        (ce / n / len(datas[0].train_features)).backward()
    per_row = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(GradRecordingAdamW, "grads", [])
    monkeypatch.setattr(torch.optim, "AdamW", GradRecordingAdamW)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)  # as loop.run builds it
    train_task(accelerator, model, method, datas[0], cfg, 0, 0, tokenizer.pad_token_id)
    (grads,) = GradRecordingAdamW.grads  # exactly one optimizer step
    return grads, per_row, datas[0]


def test_gradient_accumulation_weights_answer_tokens_like_one_batch(tiny_method, tokenizer, monkeypatch,
                                                                   uneven_answers):
    big, per_row, _ = _one_step_gradients(tiny_method, monkeypatch, tokenizer, uneven_answers, batch=4, accumulation=1)
    acc, _, data = _one_step_gradients(tiny_method, monkeypatch, tokenizer, uneven_answers, batch=1, accumulation=4)
    answer_tokens = sorted(sum(1 for x in f["labels"] if x != -100) for f in data.train_features)
    assert answer_tokens[-1] >= 5 * answer_tokens[0]  # 2 ... 15+ answer tokens (label + EOS)
    assert len(big) == len(acc) == len(per_row) and all(g.abs().sum() > 0 for g in big)
    for g_big, g_acc in zip(big, acc):
        # float32 round-off of a different summation order, relative to the tensor's scale (entries near 0 have none)
        torch.testing.assert_close(g_acc, g_big, rtol=1e-5, atol=1e-5 * float(g_big.abs().max()))
    # the comparison can fail: weighting rows instead of answer tokens gives clearly other gradients
    assert not all(torch.allclose(r, g, rtol=1e-2, atol=1e-6) for r, g in zip(per_row, big))
