"""For every method: what the optimizer trains is exactly what has requires_grad, and everything frozen (the base
model, earlier adapters, DEAL's history factors, LwF's teacher) is bit-identical after two optimizer steps of the
second task, run through the loop's own ``train_task`` on a tiny random LLaMA with real rows."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from deal_train.train.task import train_task
from deal_train.methods import METHODS

# names of the parameters each method may train on the second task
TRAINED_ON_TASK_2 = {
    "seq_lora": ".default.", "replay": ".default.", "ewc": ".default.", "lwf": ".default.",
    "o_lora": ".task_1.", "per_task": ".task_1.", "deal": ".parametrizations.weight.0.",
    "osf": ".osf_svd_params.default.",  # the base weights change only between tasks (the merge in before_task)
}


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that snapshots the model's parameters and flags when built and after its second step."""

    model: torch.nn.Module = None
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.ids = {n: id(p) for n, p in self.model.named_parameters()}
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.after = None
        self.steps = 0
        RecordingAdamW.made.append(self)

    def step(self, closure=None):
        out = super().step(closure)
        self.steps += 1
        if self.steps == 2:
            self.after = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return out


def test_every_method_is_checked():
    assert set(TRAINED_ON_TASK_2) == set(METHODS)


@pytest.mark.parametrize("name", sorted(TRAINED_ON_TASK_2))
def test_frozen_parameters_stay_bit_identical(name, tokenizer, tiny_method, monkeypatch):
    cfg, datas, method, model = tiny_method(name)
    monkeypatch.setattr(RecordingAdamW, "model", model)
    monkeypatch.setattr(RecordingAdamW, "made", [])
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    accelerator = Accelerator()
    step = 0
    for t in range(2):
        step, _ = train_task(accelerator, model, method, datas[t], cfg, t, step, tokenizer.pad_token_id)
    assert len(RecordingAdamW.made) == 2
    for t, opt in enumerate(RecordingAdamW.made):
        assert opt.after is not None, "fewer than two optimizer steps"
        trainable = {n for n, flag in opt.flags.items() if flag}
        in_optimizer = [id(p) for g in opt.param_groups for p in g["params"]]
        # the optimizer holds exactly the parameters that had requires_grad when it was built, each once
        assert sorted(in_optimizer) == sorted(opt.ids[n] for n in trainable)
        frozen = [n for n, flag in opt.flags.items() if not flag]
        assert frozen and trainable
        changed = [n for n in frozen if not torch.equal(opt.before[n], opt.after[n])]
        assert not changed, f"task {t + 1}: frozen parameters changed: {changed[:5]}"
        assert any(not torch.equal(opt.before[n], opt.after[n]) for n in trainable), f"task {t + 1}: nothing trained"
        # the base model is frozen on every task
        base = [n for n in opt.flags if "lora_" not in n and "osf_svd_params" not in n]
        assert base and not any(opt.flags[n] for n in base)
        if t == 1:
            wrong = sorted(n for n in trainable if TRAINED_ON_TASK_2[name] not in n)
            assert not wrong, f"task 2 trains parameters it should not: {wrong[:5]}"
            if name in ("o_lora", "per_task"):
                earlier = [n for n in opt.flags if ".task_0." in n]
                assert earlier and not any(opt.flags[n] for n in earlier)
            if name == "deal":
                history = [n for n in opt.flags if n.endswith("parametrizations.weight.original")]
                assert history and not any(opt.flags[n] for n in history)
