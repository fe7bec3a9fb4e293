"""DEAL's rank-growing orthogonal update (``deal_grow_adapter``, docs/design.md section 3.4; issue 22 item 1,
"one idea of yours"): a new rank-r adapter per task whose lora_A lies off the earlier adapters' input directions,
next to the DEAL-filtered earlier adapters. Identity at task start, shapes, exact fold, orthogonality after real
steps, save as one concatenated PEFT adapter and rebuild from it, the paper profile untouched."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from deal_train.cli import build_parser, config_from_args
from deal_train.config import PAPER_PROFILE, TrainConfig
from deal_train.deal import OrthogonalGrowth, history_input_basis
from deal_train.methods import DEAL
from deal_train.methods.adapters import lora_layers, task_adapter
from test_deal_maths import _cfg, _logits
from test_deal_round2 import _train


def _grow_cfg(**kw):
    return _cfg(deal_grow_adapter=True, deal_residual_update=True, deal_lambda_drift=0.5, **kw)


def _trained_task0(tiny_model, cfg):
    """A grow-DEAL model after task 1: adapter ``task_0`` with random non-zero factors."""
    method = DEAL(cfg)
    model = method.wrap(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for _n, layer in lora_layers(model, task_adapter(0)):
            layer.lora_B[task_adapter(0)].weight.normal_(0, 0.2)
            layer.lora_A[task_adapter(0)].weight.normal_(0, 0.2)
    method.before_task(model, 0)
    method.after_task(model, 0)
    return method, model


def _history_v(model, names, energy):
    """V_k per layer, from PEFT's weights by a dense SVD of Σ s_i B_i A_i (independent of ``history_input_basis``)."""
    out = []
    for _n, layer in lora_layers(model, names[0]):
        dw = sum(layer.scaling[n] * layer.lora_B[n].weight.double() @ layer.lora_A[n].weight.double() for n in names)
        _u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        e = s.pow(2)
        k = int((torch.cumsum(e, 0) < energy * e.sum()).sum()) + 1 if energy < 1 else int((s > 1e-12 * s[0]).sum())
        out.append(vh[:k].t())
    return out


def test_off_by_default_and_in_the_paper_profile():
    assert TrainConfig().deal_grow_adapter is False and PAPER_PROFILE["deal_grow_adapter"] is False
    cfg = config_from_args(build_parser().parse_args(["--deal_profile", "paper"]))
    assert cfg.deal_grow_adapter is False
    cfg = config_from_args(build_parser().parse_args(["--deal_grow_adapter", "true"]))
    assert cfg.deal_grow_adapter is True


def test_history_input_basis_matches_a_dense_svd():
    torch.manual_seed(0)
    pairs = [(torch.randn(10, 3), torch.randn(3, 16), 2.0), (torch.randn(10, 3), torch.randn(3, 16), 2.0)]
    for energy in (0.6, 0.95, 1.0):
        v = history_input_basis(pairs, energy)
        dw = sum(s * b.double() @ a.double() for b, a, s in pairs)
        _u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        e = s.pow(2)
        k = int((torch.cumsum(e, 0) < energy * e.sum()).sum()) + 1 if energy < 1 else 6
        assert v.shape == (16, k)
        # the same subspace: the projectors agree
        torch.testing.assert_close((v @ v.t()).double(), vh[:k].t() @ vh[:k], atol=1e-5, rtol=0)
    assert history_input_basis([(torch.zeros(4, 2), torch.zeros(2, 5), 1.0)], 0.9).shape == (5, 0)


def test_orthogonal_growth_identity_and_projection():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 3))
    weight = torch.randn(4, 12)
    g = OrthogonalGrowth(weight, q)
    assert torch.equal(g(weight), weight)  # R = 0: exactly the weight
    with torch.no_grad():
        g.residual.normal_()
    added = g(weight) - weight
    assert added.norm() > 0.1 and (added @ q).norm() < 1e-5 * added.norm()
    with pytest.raises(ValueError, match="basis must be d_in × k"):
        OrthogonalGrowth(weight, torch.zeros(5, 2))


def test_identity_at_start_orthogonal_training_and_exact_fold(tiny_model):
    cfg = _grow_cfg(deal_project_energy=0.9)
    method, model = _trained_task0(tiny_model, cfg)
    ids = torch.randint(0, 1000, (2, 12))
    before = _logits(model, ids)
    method.before_task(model, 1)
    assert method.adapter_names(model) == ["task_0", "task_1"] and method.trained_adapter() == "task_1"
    assert sorted(model.active_adapters) == ["task_0", "task_1"]
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-6, rtol=0)  # new B = 0, DEAL factors identity
    layers = lora_layers(model, "task_0")
    assert len(method.factors) == 2 * len(layers) and len(method.growth) == len(layers)
    v_dense = _history_v(model, ["task_0"], 0.9)
    assert any(0 < v.shape[1] < cfg.lora_rank for v in v_dense)  # a proper subspace is protected somewhere
    for g, v in zip(method.growth, v_dense):
        assert g.basis.shape == v.shape
    # the history is frozen; what trains: DEAL's θ1, θ2, R of the factors, and the new adapter's R and B
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [p for group in method.param_groups(model) for p in group["params"]]
    assert {id(p) for p in grouped} == trainable
    assert [g["name"] for g in method.param_groups(model)] == ["deal", "residual", "lora"]
    assert all(not layer.lora_A["task_1"].parametrizations.weight.original.requires_grad for _n, layer in layers)
    assert all(layer.lora_B["task_1"].weight.requires_grad for _n, layer in layers)

    _train(method, model, steps=5)
    for (_n, layer), v in zip(layers, v_dense):
        a_new = layer.lora_A["task_1"].weight.detach().double()  # A0 + R P⊥ (r × d_in)
        if v.shape[1]:
            assert (a_new @ v).norm() < 1e-5 * a_new.norm()  # reads nothing of the history's input directions
    assert max(layer.lora_B["task_1"].weight.abs().max().item() for _n, layer in layers) > 0  # B learned
    live = _logits(model, ids)
    assert (live - before).abs().max().item() > 1e-4
    method.after_task(model, 1)
    torch.testing.assert_close(_logits(model, ids), live, atol=1e-5, rtol=0)
    assert not any("parametrizations" in n for n, _p in model.named_parameters())
    shapes = {tuple(layer.lora_A[a].weight.shape) for _n, layer in layers for a in ("task_0", "task_1")}
    assert shapes == {(cfg.lora_rank, layers[0][1].in_features)}  # two plain rank-r adapters


def test_saved_adapter_is_one_concatenated_peft_adapter_and_rebuilds(tokenizer, tmp_path):
    """After task 2 the saved adapter is a plain PEFT adapter of rank 2r whose stock ``from_pretrained`` load gives the
    live two-adapter model's logits; ``load_adapter_weights`` rebuilds ``task_0``, ``task_1`` from it, and the next
    task starts from the same model."""
    from deal_train.model.loading import load_model

    cfg = _grow_cfg()
    method, model = _trained_task0(load_model("tiny-random-llama", tokenizer), cfg)
    method.before_task(model, 1)
    _train(method, model, steps=3)
    method.after_task(model, 1)
    ids = torch.randint(0, 1000, (2, 12))
    live = _logits(model, ids)
    path = tmp_path / "adapter"
    method.save_adapter(model, str(path))
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["r"] == 2 * cfg.lora_rank
    stock = PeftModel.from_pretrained(load_model("tiny-random-llama", tokenizer), str(path))
    torch.testing.assert_close(_logits(stock, ids), live, atol=1e-5, rtol=0)

    again = DEAL(cfg)
    rebuilt = again.wrap(load_model("tiny-random-llama", tokenizer))
    again.load_adapter_weights(rebuilt, [str(tmp_path / "unused"), str(path)])
    assert again.adapter_names(rebuilt) == ["task_0", "task_1"]
    assert not any(p.requires_grad for p in rebuilt.parameters())
    torch.testing.assert_close(_logits(rebuilt, ids), live, atol=1e-5, rtol=0)
    torch.manual_seed(5)
    again.before_task(rebuilt, 2)
    assert again.adapter_names(rebuilt) == ["task_0", "task_1", "task_2"]
    assert len(again.factors) == 2 * 2 * len(lora_layers(rebuilt, "task_0"))  # both earlier adapters filtered
    torch.testing.assert_close(_logits(rebuilt, ids), live, atol=1e-5, rtol=0)


def test_plan_counts_the_new_adapter(tiny_model):
    from deal_train.train.plan import adapter_shapes

    off, on = _cfg(deal_residual_update=True), _cfg(deal_residual_update=True, deal_grow_adapter=True)
    shapes = adapter_shapes("tiny-random-llama", tiny_model.config, off)
    lora, later_off = DEAL.plan_trainable(shapes["lora_parameters"], shapes["factors"], off)
    _lora, later_on = DEAL.plan_trainable(shapes["lora_parameters"], shapes["factors"], on)
    assert later_on == later_off + lora
    method, model = _trained_task0(tiny_model, on)
    method.before_task(model, 1)
    assert sum(p.numel() for g in method.param_groups(model) for p in g["params"]) == later_on


def test_memory_estimate_counts_the_new_adapter(tiny_model):
    """The estimate with the switch on holds the real new adapter: R at 4 bytes besides the trainable tensors (the
    same R and B a real ``before_task`` builds), and the adapter weights twice (history and new adapter)."""
    from deal_train.tools.estimate_memory import PROFILES, estimate, model_shapes

    cfg_off = TrainConfig(model="tiny-random-llama", lora_rank=4, deal_mlp_hidden=8)
    cfg_on = TrainConfig(model="tiny-random-llama", lora_rank=4, deal_mlp_hidden=8, deal_grow_adapter=True)
    shapes = model_shapes(cfg_on.model, cfg_on.target_modules)
    off, on = (estimate(c.model, "deal", c, PROFILES["cpu"], shapes=shapes) for c in (cfg_off, cfg_on))
    method, model = _trained_task0(tiny_model, cfg_on)
    method.before_task(model, 1)
    new = method.growth_parameters(model)
    r_values = sum(g.residual.numel() for g in method.growth)
    assert on.components["deal_parameters"] - off.components["deal_parameters"] == 4 * r_values
    assert on.components["lora_adapter"] == 2 * off.components["lora_adapter"]
    assert on.trainable_parameters - off.trainable_parameters == sum(p.numel() for p in new)
