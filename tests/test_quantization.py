"""bitsandbytes on the CPU (bitsandbytes >= 0.45): LLM.int8 and NF4 bases under LoRA, the 8-bit AdamW, and a
whole DEAL run on an 8-bit base. (That the console stays free of bitsandbytes' CPU import warnings is checked on
the launched runs of test_distributed.py.)"""

from __future__ import annotations


import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from deal_train.config import ConfigError, TrainConfig
from deal_train.data import collate_train
from deal_train.train.loop import run
from deal_train.model.losses import answer_forward, token_cross_entropy_sum
from deal_train.methods import get_method
from deal_train.model.loading import load_model
from deal_train.model.precision import build_optimizer, load_base_model, low_precision_trainables

from conftest import TINY_METHOD, TINY_RUN


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_base_trains_lora(bits, tokenizer, tiny_method):
    cfg = TrainConfig(method="seq_lora", load_in_8bit=bits == 8, load_in_4bit=bits == 4, **TINY_METHOD)
    base = load_base_model(cfg, tokenizer, torch.device("cpu"))
    q_proj = base.model.layers[0].self_attn.q_proj
    if bits == 8:
        assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8
    else:
        assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
        assert q_proj.weight.quant_state.nested  # double quantisation
    _cfg, datas, _m, _plain = tiny_method("seq_lora")
    batch = collate_train([datas[0].train_features[i] for i in range(4)], tokenizer.pad_token_id)
    # the quantised base computes nearly what the float32 one does (the same weights, rounded); this inference
    # pass in eval mode also comes before training, as the loop's evaluation of task 1 comes before task 2
    with torch.no_grad():
        ref = answer_forward(load_model(cfg.model, tokenizer), batch).logits
        got = answer_forward(base.eval(), batch).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < (0.02 if bits == 8 else 0.2), rel
    method = get_method(cfg)
    model = method.wrap(base)
    method.before_task(model, 0)
    assert not low_precision_trainables(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = build_optimizer(cfg, method.param_groups(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    losses = []
    for _ in range(2):  # B starts at 0, so A gets a gradient from the second step on
        ce, n = token_cross_entropy_sum(answer_forward(model, batch).logits, batch["labels"])
        (ce / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(ce.detach() / n))
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before), "some LoRA matrices did not move"


def test_adamw_8bit_keeps_8bit_moments():
    cfg = TrainConfig(optim="adamw_8bit", learning_rate=1e-2)
    big = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: bitsandbytes' threshold for 8-bit state
    small = torch.nn.Parameter(torch.randn(8, 8))
    opt = build_optimizer(cfg, [{"params": [big, small], "lr": cfg.learning_rate}])
    assert isinstance(opt, bnb.optim.AdamW8bit)
    ref = torch.optim.AdamW([torch.nn.Parameter(big.detach().clone())], lr=cfg.learning_rate, weight_decay=0.0)
    grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for p in (big, ref.param_groups[0]["params"][0]):
        p.grad = grad.clone()
    small.grad = torch.randn(8, 8)
    start = big.detach().clone()
    opt.step()
    ref.step()
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[small]["state1"].dtype == torch.float32
    # first Adam step moves every entry by about lr * sign(grad); 8-bit moments keep that within 10 %
    moved = big.detach() - start
    torch.testing.assert_close(moved, ref.param_groups[0]["params"][0].detach() - start, atol=1e-3, rtol=0.1)


def test_both_quantisations_refused():
    from deal_train.config import validate

    with pytest.raises(ConfigError, match="load_in_8bit and load_in_4bit"):
        validate(TrainConfig(load_in_8bit=True, load_in_4bit=True))


def test_deal_run_on_8bit_base(tmp_path, tokenizer):
    """The whole loop: DEAL on an LLM.int8 base with the 8-bit AdamW and gradient checkpointing; the saved adapters
    are plain PEFT LoRA adapters that stock PEFT loads onto the float32 base."""
    small = {**TINY_RUN, "max_test_samples": 2, "max_new_tokens": 2}
    cfg = TrainConfig(method="deal", load_in_8bit=True, optim="adamw_8bit", gradient_checkpointing=True,
                      output_dir=str(tmp_path / "int8"), **small)
    metrics = run(cfg)
    assert metrics["finished"] and all(p["final_loss"] is not None for p in metrics["per_task"])
    first = load_file(tmp_path / "int8" / "adapters" / "1-dbpedia" / "adapter_model.safetensors")
    second = load_file(tmp_path / "int8" / "adapters" / "2-amazon" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(v.dtype == torch.float32 for v in second.values())
    assert any(not torch.equal(first[k], second[k]) for k in first), "DEAL's task 2 left the adapter unchanged"
    loaded = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), str(tmp_path / "int8" / "adapters" / "2-amazon"))
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(second)
