"""``method.forward_context``: DEAL builds each factor (a ``DEALFactor`` parametrization) once per micro batch
inside it, also when the model is called twice in it (the shared-prefix path), and the gradients equal those of
uncached weight accesses; with gradient checkpointing it caches nothing (and the gradients are still equal).
Tiny random LLaMA, fp32, real rows."""

from __future__ import annotations

import pytest
import torch

from deal_train.data import collate_train
from deal_train.deal import DEALFactor
from deal_train.model.losses import answer_forward, token_cross_entropy_sum

from test_gradient_checkpointing import _build


def _step(method, model, batch, cached: bool, calls: int = 1) -> dict[str, torch.Tensor]:
    """Gradients of (CE / answer tokens) × ``calls`` + extra loss, the forward passes and the extra loss inside
    ``method.forward_context`` when ``cached``, the backward pass outside it."""
    model.zero_grad(set_to_none=True)
    ctx = method.forward_context(model) if cached else torch.enable_grad()
    with ctx:
        loss = 0.0
        for _ in range(calls):
            outputs = answer_forward(model, batch)
            ce, n = token_cross_entropy_sum(outputs.logits, batch["labels"])
            loss = loss + ce / n
        extra, _ = method.extra_loss(model, batch, outputs)
        loss = loss + extra
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_deal_factors_built_once_per_micro_batch_same_gradients(checkpointing, tokenizer):
    method, model, datas = _build("deal", checkpointing, tokenizer, {})
    batch = collate_train([datas[0].train_features[i] for i in range(4)], tokenizer.pad_token_id)
    factors = [m for m in model.modules() if isinstance(m, DEALFactor)]
    assert factors
    builds = []
    hooks = [f.register_forward_hook(lambda *_: builds.append(1)) for f in factors]

    g_plain = _step(method, model, batch, cached=False, calls=2)
    plain_builds = len(builds)
    builds.clear()
    g_cached = _step(method, model, batch, cached=True, calls=2)
    for h in hooks:
        h.remove()

    # uncached: one build per weight access (2 model calls, + the recomputation when checkpointing); cached: the
    # forward passes build each factor once
    assert plain_builds >= 2 * len(factors)
    # with checkpointing the context caches nothing (a cached factor breaks the recomputation's tensor count)
    assert len(builds) == (plain_builds if checkpointing else len(factors)), (len(builds), len(factors))
    assert g_plain.keys() == g_cached.keys() and g_plain
    assert sum(int(g.abs().max() > 0) for g in g_plain.values()) >= len(g_plain) // 2
    for n in g_plain:
        torch.testing.assert_close(g_cached[n], g_plain[n], atol=1e-6, rtol=1e-6, msg=n)


def test_base_forward_context_is_a_no_op(tokenizer):
    method, model, datas = _build("seq_lora", False, tokenizer, {})
    batch = collate_train([datas[0].train_features[i] for i in range(2)], tokenizer.pad_token_id)
    with method.forward_context(model):
        cached = answer_forward(model, batch).logits
    assert torch.equal(cached, answer_forward(model, batch).logits)
