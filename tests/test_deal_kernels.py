"""DEAL retention kernels and stacked layers (docs/design.md section 3, paper App. F): the invariants for every
kernel × update mode on the tiny model (identity at start, fold equality, finite gradients on degenerate
histories), the kernels' own formulas, the Haar transform, and the a >= b norm check."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from deal_train.cli import build_parser, config_from_args, run_cli
from deal_train.config import ConfigError, TrainConfig, config_fields, validate
from deal_train.deal import KERNELS, DEALFactor, HaarFilter, SpectralFilter, regulariser
from deal_train.deal.kernels import HeatProfile, SplineProfile, XExpProfile, kernel_widths
from deal_train.methods.deal import lora_layers
from test_deal_maths import _cfg, _history_model, _logits

ALL_KERNELS = ["heat", "xexp", "spline", "haar"]


def test_registry_matches_the_config_choices():
    choices = {name: meta.get("choices") for name, _t, _d, meta in config_fields()}
    assert tuple(KERNELS) == tuple(ALL_KERNELS) == choices["deal_kernel"]
    assert choices["deal_activation_retention"] == ("identity", "gelu", "tanh")
    cfg = TrainConfig()
    assert (cfg.deal_kernel, cfg.deal_layers, cfg.deal_activation_retention, cfg.deal_sigma_base) == \
        ("heat", 1, "identity", 0.5)


def _perturb(method, scale=0.3, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in [*method.deal_parameters(), *method.residual_parameters()]:
            p.add_(torch.randn_like(p) * scale)


K2_GELU = dict(deal_layers=2, deal_activation_retention="gelu")
CASES = ([pytest.param(k, u, {}, id=f"{k}-{u}-K1") for k in ALL_KERNELS for u in ("both", "A", "B")]
         + [pytest.param(k, "both", K2_GELU, id=f"{k}-both-K2gelu") for k in ALL_KERNELS]
         + [pytest.param(k, u, {"deal_residual_update": True}, id=f"{k}-{u}-residual")
            for k in ALL_KERNELS for u in ("both", "A")])


@pytest.mark.parametrize("kernel,update,stack", CASES)
def test_identity_at_start_and_fold_equality(tiny_model, kernel, update, stack):
    cfg = _cfg(deal_kernel=kernel, deal_update=update, **stack)
    method, model = _history_model(tiny_model, cfg)
    ids = torch.randint(0, 1000, (2, 12))
    before = _logits(model, ids)
    method.before_task(model, 1)
    factors = method.factors
    assert factors and all(len(f.retention.layers) == cfg.deal_layers for f in factors)
    want = HaarFilter if kernel == "haar" else SpectralFilter
    assert all(isinstance(layer, want) for f in factors for layer in f.retention.layers)
    # identity at the start of the task: logits and every parametrised weight bit for bit
    assert torch.equal(_logits(model, ids), before)
    for f in factors:
        assert torch.equal(f.factor(), f.history)
    # trained (perturbed) DEAL parameters change the model; folding keeps its logits
    _perturb(method)
    wrapped = _logits(model, ids)
    assert (wrapped - before).abs().max().item() > 1e-4
    method.after_task(model, 1)
    folded = _logits(model, ids)
    assert (wrapped - folded).abs().max().item() <= 1e-5
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("history", ["zeros", "repeated"])
@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_finite_gradients_on_degenerate_history(kernel, history, layers):
    torch.manual_seed(0)
    if history == "zeros":
        weight = torch.zeros(4, 15)
    else:
        q, _ = torch.linalg.qr(torch.randn(15, 4))
        weight = (2.0 * q).t().contiguous()  # A = (2Q)ᵀ: all singular values equal
    factor = DEALFactor(weight, transpose=True, num_scales=3, hidden=8, activation="gelu", kernel=kernel,
                        layers=layers, retention_activation="gelu" if layers > 1 else "identity")
    assert torch.equal(factor(weight), weight)
    with torch.no_grad():
        for p in factor.retention.parameters():
            p.add_(torch.randn_like(p))
        factor.update.fc2.weight.normal_()
    out = factor(weight)
    loss = out.pow(2).sum() + factor.drift() + regulariser(list(factor.parameters()), None, 10.0, "norm")
    loss.backward()
    assert torch.isfinite(out).all()
    for n, p in factor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if history == "repeated":  # the retention parameters do receive gradient (not silently cut off)
        assert any(p.grad.abs().sum() > 0 for p in factor.retention.parameters())


def test_decompose_gives_exact_singular_values_and_their_gradient():
    torch.manual_seed(0)
    h = torch.randn(9, 4, requires_grad=True)
    _u, s, _vh, s_hat = SpectralFilter.decompose(h)
    ref = torch.linalg.svdvals(h)
    assert torch.allclose(s, ref, atol=1e-5) and torch.allclose(s_hat, ref / ref.max(), atol=1e-6)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (g_ours,) = torch.autograd.grad((s * weights).sum(), h)
    h2 = h.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((torch.linalg.svdvals(h2) * weights).sum(), h2)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_profiles_hand_computed():
    s_hat = torch.tensor([0.0, 0.25, 0.5, 1.0])
    sigma = torch.tensor([0.5])
    c = torch.tensor([0.5])
    heat = HeatProfile()(s_hat, c, sigma)[0]
    assert torch.allclose(heat, torch.exp(-(s_hat - 0.5) ** 2 / 0.5))
    assert heat[2].item() == 1.0
    # spline: (4/3) B2(x), x = (ŝ - c) / sigma = -1, -0.5, 0, 1
    spline = SplineProfile()(s_hat, c, sigma)[0]
    expected = torch.tensor([0.5 * 0.5 ** 2, 0.75 - 0.25, 0.75, 0.5 * 0.5 ** 2]) * 4 / 3
    assert torch.allclose(spline, expected)
    assert SplineProfile()(torch.tensor([0.0, 1.0]), torch.tensor([0.5]), torch.tensor([0.1]))[0].abs().sum() == 0
    # xexp: t e^(1 - t), t = ŝ / (|c| + 1e-3); 0 at ŝ = 0, peak 1 at ŝ = c̃, finite for c -> 0
    xexp = XExpProfile()(s_hat, torch.tensor([0.499]), sigma)[0]
    assert xexp[0].item() == 0.0 and xexp[2].item() == pytest.approx(1.0)
    t = 0.25 / 0.5
    assert xexp[1].item() == pytest.approx(t * torch.exp(torch.tensor(1 - t)).item(), rel=1e-6)
    c0 = torch.zeros(1, requires_grad=True)
    v = XExpProfile()(s_hat, c0, sigma)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(c0.grad).all()
    assert torch.allclose(kernel_widths(3, 0.25), torch.tensor([0.25, 0.125, 0.0625]))


@pytest.mark.parametrize("kernel", ["heat", "xexp", "spline"])
def test_spectral_filter_matches_its_formula(kernel):
    torch.manual_seed(0)
    y = torch.randn(7, 3)
    layer = KERNELS[kernel](y, 2, 0.3, False)
    with torch.no_grad():
        layer.gains.normal_()
    u, s, vh = torch.linalg.svd(y, full_matrices=False)
    s_hat = s / s.max()
    phi = layer.profile(s_hat, layer.centres, torch.tensor([0.3, 0.15]))
    rho = 1 + (layer.gains * phi).sum(0)
    assert torch.allclose(layer(y), u @ torch.diag(s * rho) @ vh, atol=1e-5)
    assert torch.equal(layer.sigma, torch.tensor([0.3, 0.15]))


@pytest.mark.parametrize("shape", [(8, 4), (7, 4), (8, 3), (7, 3), (1, 1)])
def test_haar_round_trip_and_band_scaling(shape):
    torch.manual_seed(0)
    y = torch.randn(*shape)
    layer = HaarFilter(y)
    assert layer.scale.shape == ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    assert (layer.idwt(layer.dwt(y)) - y).abs().max().item() <= 1e-6  # exact reconstruction, odd sizes too
    assert torch.equal(layer(y), y)  # scale = 1: bit-exact identity
    # a matrix constant on 2 × 2 blocks (zero-padded at odd edges) lives in the approximation band only:
    # scaling the band by a scales the matrix
    n2, r2 = layer.scale.shape
    blocks = torch.randn(n2, r2)
    yb = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1)[: shape[0], : shape[1]]
    with torch.no_grad():
        layer.scale.fill_(0.0)
    out0 = layer(yb)
    with torch.no_grad():
        layer.scale.fill_(3.0)
    out3 = layer(yb)
    if shape[0] % 2 == 0 and shape[1] % 2 == 0:
        assert out0.abs().max().item() <= 1e-6 and torch.allclose(out3, 3 * yb, atol=1e-5)
    # one-level Haar approximation coefficient of the top-left block: (a + b + c + d) / 2
    approx, _ = layer.dwt(y)
    assert approx[0, 0, 0].item() == pytest.approx(y[:2, :2].sum().item() / 2, abs=1e-5)


def test_method_builds_factors_from_the_config(tiny_model):
    cfg = _cfg(deal_kernel="spline", deal_layers=3, deal_activation_retention="tanh", deal_sigma_base=0.2)
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    f = method.factors[0]
    assert len(f.retention.layers) == 3 and isinstance(f.retention.act, torch.nn.Tanh)
    assert isinstance(f.retention.layers[0].profile, SplineProfile)
    assert torch.allclose(f.retention.layers[0].sigma, torch.tensor([0.2, 0.1, 0.05]))
    assert not f.retention.layers[0].decompose_input and f.retention.layers[1].decompose_input
    assert all(parametrize.is_parametrized(layer.lora_A["default"], "weight") for _n, layer in lora_layers(model))


def test_bad_retention_settings_are_refused():
    with pytest.raises(ValueError, match="retention layer"):
        DEALFactor(torch.randn(4, 8), True, 2, 4, "gelu", layers=0)
    with pytest.raises(ValueError, match="Retention activation"):
        DEALFactor(torch.randn(4, 8), True, 2, 4, "gelu", retention_activation="relu")
    with pytest.raises(ValueError, match="Unknown DEAL kernel"):
        DEALFactor(torch.randn(4, 8), True, 2, 4, "gelu", kernel="mexican_hat")
    for bad in (dict(deal_layers=0), dict(deal_sigma_base=0.0), dict(deal_kernel="mexican_hat"),
                dict(deal_activation_retention="relu")):
        with pytest.raises(ConfigError):
            validate(TrainConfig(**bad))


def test_norm_order_a_below_b_is_refused_unless_allowed(capsys):
    with pytest.raises(ConfigError, match=r"a >= b.*allow_unordered_norms"):
        validate(TrainConfig(deal_norm_retention=2.0, deal_norm_update=10.0))
    validate(TrainConfig(deal_norm_retention=2.0, deal_norm_update=10.0, allow_unordered_norms=True))
    validate(TrainConfig(deal_norm_retention=2.0, deal_norm_update=2.0))  # a = b is fine
    parser = build_parser()
    base = ["--deal_norm_retention", "2", "--deal_norm_update", "10"]
    assert run_cli(lambda cfg: None, base, parser=parser) == 2
    assert "allow_unordered_norms" in capsys.readouterr().err
    for extra in (["--allow_unordered_norms", "true"], ["--allow-unordered-norms"]):
        cfg = config_from_args(parser.parse_args(base + extra))
        assert cfg.allow_unordered_norms is True and cfg.deal_norm_retention == 2.0
    assert config_from_args(parser.parse_args([])).allow_unordered_norms is False
