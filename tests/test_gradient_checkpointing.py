"""gradient_checkpointing: true gives the same gradients as false for LoRA (task 1) and DEAL (task 2, through its
parametrization of lora_A / lora_B), really recomputes the decoder layers in the backward pass, and an optimizer
step still changes the adapter. Tiny random LLaMA, fp32, real rows."""

from __future__ import annotations

import pytest
import torch

from deal_train.config import TrainConfig
from deal_train.data import collate_train
from deal_train.model.losses import answer_forward, token_cross_entropy_sum
from deal_train.methods import get_method
from deal_train.model.precision import load_base_model

from conftest import TINY_METHOD


def _build(name: str, checkpointing: bool, tokenizer, datas_cache: dict):
    cfg = TrainConfig(method=name, gradient_checkpointing=checkpointing, **TINY_METHOD)
    if "datas" not in datas_cache:
        from deal_train.data import Encoder
        from deal_train.train.loop import prepare_data, tokenise

        datas = prepare_data(cfg)
        tokenise(datas, Encoder(tokenizer, cfg.max_source_length, cfg.max_target_length, True), get_method(cfg))
        datas_cache["datas"] = datas
    method = get_method(cfg)
    torch.manual_seed(0)  # the same LoRA initialisation with and without checkpointing
    model = method.wrap(load_base_model(cfg, tokenizer, torch.device("cpu")))
    method.before_task(model, 0)
    if name == "deal":
        with torch.no_grad():  # a trained-looking history (PEFT starts B at 0), then DEAL's task 2
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        torch.manual_seed(1)
        method.before_task(model, 1)
    model.train()
    return method, model, datas_cache["datas"]


def _gradients(method, model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    outputs = answer_forward(model, batch)
    ce, n = token_cross_entropy_sum(outputs.logits, batch["labels"])
    loss = ce / n
    extra, _ = method.extra_loss(model, batch, outputs)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    return {n: p.grad.detach().clone() for g in method.param_groups(model) for n, p in
            ((n, p) for n, p in model.named_parameters() if any(p is q for q in g["params"]))}


@pytest.mark.parametrize("name", ["seq_lora", "deal"])
def test_checkpointed_gradients_equal_plain_ones(name, tokenizer):
    cache: dict = {}
    plain_method, plain, datas = _build(name, False, tokenizer, cache)
    ckpt_method, ckpt, _ = _build(name, True, tokenizer, cache)
    batch = collate_train([datas[0].train_features[i] for i in range(4)], tokenizer.pad_token_id)

    mlp = ckpt.base_model.model.model.layers[0].mlp  # a module inside the checkpointed decoder layer
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    g_ckpt = _gradients(ckpt_method, ckpt, batch)
    handle.remove()
    assert len(calls) == 2, "layer 0 ran once: checkpointing did not recompute it in the backward pass"
    g_plain = _gradients(plain_method, plain, batch)

    assert g_plain.keys() == g_ckpt.keys() and g_plain
    if name == "deal":
        assert all(".parametrizations.weight.0." in n for n in g_plain)  # only DEAL's parameters train on task 2
    nonzero = [n for n, g in g_plain.items() if g.abs().max() > 0]
    assert len(nonzero) >= len(g_plain) // 2, "too few parameters got a gradient for the comparison to mean much"
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-5, rtol=1e-5, msg=n)

    # one AdamW step with checkpointing on changes the adapter (for DEAL: the parametrized LoRA weights)
    adapter = {n: p.detach().clone() for n, p in ckpt.named_parameters() if "lora_" in n and n.endswith("weight")}
    weights = {n: m.weight.detach().clone() for n, m in ckpt.named_modules() if n.endswith(("lora_A.default",
                                                                                             "lora_B.default"))}
    opt = torch.optim.AdamW([p for g in ckpt_method.param_groups(ckpt) for p in g["params"]], lr=1e-2)
    _gradients(ckpt_method, ckpt, batch)
    opt.step()
    if name == "seq_lora":
        assert any(not torch.equal(p.detach(), adapter[n]) for n, p in ckpt.named_parameters() if n in adapter)
    else:
        assert any(not torch.equal(m.weight.detach(), weights[n]) for n, m in ckpt.named_modules() if n in weights)
