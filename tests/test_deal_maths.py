"""DEAL maths (docs/design.md section 3): identity at start, fold equality, gradient routing, degenerate
factors, regulariser values."""

from __future__ import annotations

import math

import pytest
import torch

from deal_train.config import TrainConfig
from deal_train.deal import DEALFactor, p_norm, regulariser
from deal_train.methods import DEAL
from deal_train.methods.deal import lora_layers


def _cfg(**kw) -> TrainConfig:
    # the paper's parts alone (our residual update has its own tests in test_deal_defaults.py)
    base = dict(method="deal", model="tiny-random-llama", lora_rank=4, lora_alpha=8.0, deal_scales=3,
                deal_mlp_hidden=8, deal_residual_update=False)
    base.update(kw)
    return TrainConfig(**base)


def _history_model(tiny_model, cfg):
    """A PEFT model whose LoRA factors are random and non-zero, as after training task 1."""
    method = DEAL(cfg)
    model = method.wrap(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for _n, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.2)
            layer.lora_A["default"].weight.normal_(0, 0.2)
    method.before_task(model, 0)
    method.after_task(model, 0)
    return method, model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("update", ["both", "A", "B"])
def test_identity_at_task_start(tiny_model, update):
    cfg = _cfg(deal_update=update)
    method, model = _history_model(tiny_model, cfg)
    ids = torch.randint(0, 1000, (2, 12))
    before = _logits(model, ids)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    method.before_task(model, 1)
    after = _logits(model, ids)
    assert torch.equal(before, after), (before - after).abs().max()
    # the parametrised weights are the history bit for bit
    n_param = 0
    for _n, layer in lora_layers(model):
        for lin in (layer.lora_A["default"], layer.lora_B["default"]):
            if torch.nn.utils.parametrize.is_parametrized(lin, "weight"):
                n_param += 1
                assert torch.equal(lin.weight, lin.parametrizations.weight.original)
                # the same layout as plain LoRA's weight, so F.linear takes the same BLAS kernel on any CPU
                original = lin.parametrizations.weight.original
                assert (lin.weight.dtype, lin.weight.shape, lin.weight.stride()) == \
                    (original.dtype, original.shape, original.stride())
                assert lin.weight.is_contiguous()
    assert n_param == len(method.factors)
    assert len(method.factors) == {"both": 2, "A": 1, "B": 1}[update] * len(lora_layers(model))
    assert weights_before  # the model has LoRA weights at all


def test_fold_equals_wrapped_and_is_plain_lora(tiny_model):
    cfg = _cfg()
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in method.deal_parameters():
            p.add_(torch.randn_like(p) * 0.3)  # as if trained
    ids = torch.randint(0, 1000, (2, 12))
    wrapped = _logits(model, ids)
    history = {n.replace(".parametrizations.weight.original", ".weight"): p.detach().clone()
               for n, p in model.named_parameters() if "original" in n}
    method.after_task(model, 1)
    folded = _logits(model, ids)
    assert (wrapped - folded).abs().max().item() <= 1e-5
    params = dict(model.named_parameters())
    assert not any("parametrizations" in n for n in params)
    # the fold changed every adapter weight (the DEAL map was not the identity any more), same shapes
    assert history and set(history) <= set(params)
    for n, old in history.items():
        assert params[n].shape == old.shape
        assert not torch.equal(params[n], old), n
    # the folded LoRA weights stay frozen (the next task freezes them anyway; nothing flips back on)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_gradients_reach_only_deal_parameters(tiny_model):
    cfg = _cfg()
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    trainable = {id(p) for g in method.param_groups(model) for p in g["params"]}
    deal_ids = {id(p) for p in method.deal_parameters()}
    assert trainable == deal_ids and deal_ids
    ids = torch.randint(0, 1000, (2, 10))
    out = model(input_ids=ids)
    loss = out.logits.float().pow(2).mean()
    extra, _ = method.extra_loss(model, None, out)
    (loss + extra).backward()
    for n, p in model.named_parameters():
        if id(p) in deal_ids:
            continue
        assert p.grad is None, n
    # gradient reaches the update MLP's output layer (W2 starts at zero but its gradient is non-zero)
    got = [p.grad for f in method.factors for p in f.update.fc2.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in got)
    # and the retention gains
    gains = [f.retention.layers[0].gains.grad for f in method.factors]
    assert any(g is not None and g.abs().sum() > 0 for g in gains)


@pytest.mark.parametrize("history", ["zeros", "repeated"])
def test_finite_gradients_on_degenerate_history(history):
    torch.manual_seed(0)
    if history == "zeros":
        weight = torch.zeros(4, 16)
    else:
        q, _ = torch.linalg.qr(torch.randn(16, 4))
        weight = (2.0 * q).t().contiguous()  # A = (2Q)ᵀ: all singular values equal
    factor = DEALFactor(weight, transpose=True, num_scales=4, hidden=8, activation="gelu")
    with torch.no_grad():
        factor.retention.layers[0].gains.normal_()
        factor.update.fc2.weight.normal_()
    out = factor(weight)
    loss = out.pow(2).sum() + factor.drift() + regulariser(list(factor.parameters()), None, 10.0, "norm")
    loss.backward()
    for n, p in factor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert torch.isfinite(out).all()


def test_regulariser_hand_computed():
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    zero = [torch.zeros(2)]
    assert regulariser([x], zero, 2.0, "norm").item() == pytest.approx(5.0)
    assert regulariser([x], zero, 2.0, "power").item() == pytest.approx(25.0)
    assert regulariser([x], None, 1.0, "norm").item() == pytest.approx(7.0)
    # distance from the start value
    assert regulariser([x], [torch.tensor([3.0, 0.0])], 2.0, "norm").item() == pytest.approx(4.0)
    # two tensors: the norms add
    y = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    assert regulariser([x, y], [torch.zeros(2), torch.zeros(2, 2)], 2.0, "norm").item() == pytest.approx(7.0)
    # a = 10 on tiny values: no underflow (naive (sum |x|^10)^(1/10) is 0 in float32 here)
    small = torch.tensor([1e-6, 2e-6])
    expected = (1.0 + 2.0 ** 10) ** 0.1 * 1e-6
    assert p_norm(small, 10.0).item() == pytest.approx(expected, rel=1e-5)
    # gradient at the start (distance 0) is zero, not NaN
    z = torch.zeros(3, requires_grad=True)
    p_norm(z, 10.0).backward()
    assert torch.equal(z.grad, torch.zeros(3))
    # gradient of ||x||_2 is x / ||x||
    x.grad = None
    regulariser([x], zero, 2.0, "norm").backward()
    assert torch.allclose(x.grad, torch.tensor([0.6, 0.8]))


def test_drift_penalty_value():
    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    factor = DEALFactor(weight, transpose=False, num_scales=2, hidden=4, activation="identity")
    assert factor.drift().item() == 0.0
    with torch.no_grad():
        factor.update.fc2.bias.fill_(0.5)  # O = Y + 0.5 everywhere
    expected = (0.25 * weight.numel()) / weight.pow(2).sum().item()
    assert factor.drift().item() == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(expected)


def test_regularisation_starts_at_zero_and_grows(tiny_model):
    cfg = _cfg(deal_lambda_drift=1.0)
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    total, logs = method.regularisation()
    assert total.item() == 0.0 and logs["deal/drift"] == 0.0
    with torch.no_grad():
        method.factors[0].update.fc2.bias.fill_(0.1)
    total2, logs2 = method.regularisation()
    assert total2.item() > 0 and logs2["deal/drift"] > 0 and logs2["deal/reg_update"] > 0
