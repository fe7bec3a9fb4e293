"""DEAL round 2 (issue 22, item 1): the projection of the update off the history's top-k singular directions, the
spectral drift weighting and the split drift weights (docs/design.md sections 3.1-3.3), each a switch of method
``deal`` that is off by default and in ``deal_profile: paper``."""

from __future__ import annotations

import pytest
import torch

from deal_train.cli import build_parser, config_from_args
from deal_train.config import PAPER_PROFILE, ConfigError, TrainConfig, validate
from deal_train.deal import DEALFactor, energy_rank, regulariser
from deal_train.methods import DEAL
from deal_train.methods.deal import lora_layers
from deal_train.train.loop import RESUME_IGNORED_KEYS, comparable_config
from test_deal_maths import _cfg, _history_model, _logits

SWITCHES = {
    "project-both": dict(deal_project_residual="both"),
    "project-A": dict(deal_project_residual="A"),
    "project-B": dict(deal_project_residual="B", deal_project_energy=0.5),
    "spectral": dict(deal_drift_weighting="spectral"),
    "split": dict(deal_lambda_drift_history=0.0, deal_lambda_drift_residual=2.0),
    "all": dict(deal_project_residual="both", deal_drift_weighting="spectral", deal_lambda_drift_history=0.5,
                deal_lambda_drift_residual=None),
}
NEW_KEYS = ("deal_grow_adapter", "deal_project_residual", "deal_project_energy", "deal_drift_weighting",
            "deal_lambda_drift_history", "deal_lambda_drift_residual")
OFF = {"deal_grow_adapter": False, "deal_project_residual": "none", "deal_drift_weighting": "flat",
       "deal_lambda_drift_history": None, "deal_lambda_drift_residual": None}


def _switch_cfg(name, **kw):
    return _cfg(deal_residual_update=True, deal_lambda_drift=0.5, **{**SWITCHES[name], **kw})


def _lora_pairs(model):
    """(lora_A linear, lora_B linear) per LoRA layer."""
    return [(layer.lora_A["default"], layer.lora_B["default"]) for _n, layer in lora_layers(model)]


def _train(method, model, steps=4, seed=0):
    """A few real AdamW steps on next-token cross-entropy plus DEAL's regularisation."""
    torch.manual_seed(seed)
    groups = [{**g, "lr": 1e-2} for g in method.param_groups(model)]
    opt = torch.optim.AdamW(groups)
    ids = torch.randint(0, 1000, (2, 12))
    for _ in range(steps):
        opt.zero_grad()
        out = model(input_ids=ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        extra, _logs = method.extra_loss(model, None, out)
        (loss + extra).backward()
        opt.step()


def _perturb(method, scale=0.3, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in [*method.deal_parameters(), *method.residual_parameters()]:
            p.add_(torch.randn_like(p) * scale)


# --- defaults, profiles, config -------------------------------------------------------------------------------
def test_switches_are_off_by_default_and_in_the_paper_profile():
    for cfg in (TrainConfig(), config_from_args(build_parser().parse_args(["--deal_profile", "paper"]))):
        assert {k: getattr(cfg, k) for k in OFF} == OFF
        assert cfg.deal_project_energy == 0.95
    assert {k: PAPER_PROFILE[k] for k in OFF} == OFF  # the paper preset names them: a new default cannot leak in
    # a user's own switch wins over the preset, as for every DEAL key
    own = config_from_args(build_parser().parse_args(["--deal_profile", "paper", "--deal_project_residual", "B"]))
    assert own.deal_project_residual == "B" and own.deal_reg_target == "raw"


@pytest.mark.parametrize("profile", ["paper", "tuned"])
def test_off_switches_build_the_factor_of_before(tiny_model, profile):
    """Off, each factor holds only the buffers of before (history and the filter's SVD), no projection, and its
    drift is the flat ||O - Y||² / (||Y||² + ε), by hand; the regularisation logs only the unsplit drift."""
    cfg = TrainConfig(**{**_cfg().to_dict(), "deal_profile": profile,
                         **({**PAPER_PROFILE, "deal_lambda_drift": 0.3} if profile == "paper" else {})})
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    _perturb(method)
    for f in method.factors:
        assert not f.project and f.project_rank == 0 and f.drift_weighting == "flat"
        assert {n for n, _b in f.named_buffers()} == {"history", "retention.layers.0.sigma", "retention.layers.0.U",
                                                      "retention.layers.0.s", "retention.layers.0.Vh",
                                                      "retention.layers.0.s_norm"}
        want = (f.factor() - f.history).pow(2).sum() / (f.history.pow(2).sum() + f.drift_floor)
        assert torch.equal(f.drift(), want)
    _total, logs = method.regularisation()
    assert "deal/drift" in logs and "deal/drift_history" not in logs


def test_cli_flags_yaml_null_and_sweep_values(tmp_path):
    help_text = build_parser().format_help()
    for key in NEW_KEYS:
        assert f"--{key}" in help_text, key
    assert "FLOAT|null" in help_text
    args = ["--deal_lambda_drift_history", "0.25", "--deal_lambda_drift_residual", "null",
            "--deal_project_residual", "both", "--deal_project_energy", "0.8", "--deal_drift_weighting", "spectral"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert (cfg.deal_lambda_drift_history, cfg.deal_lambda_drift_residual, cfg.deal_project_residual,
            cfg.deal_project_energy, cfg.deal_drift_weighting) == (0.25, None, "both", 0.8, "spectral")
    path = tmp_path / "c.yaml"
    path.write_text("deal_lambda_drift_history: null\ndeal_lambda_drift_residual: 1\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(path)]))
    assert cfg.deal_lambda_drift_history is None and cfg.deal_lambda_drift_residual == 1.0
    from deal_train.tools.sweep import parse_grid, point_configs

    grid = parse_grid(["deal_lambda_drift_residual=null,0.1"])
    assert grid == [("deal_lambda_drift_residual", [None, 0.1])]
    points = point_configs(TrainConfig(output_dir=str(tmp_path)), grid)
    assert [(name, cfg.deal_lambda_drift_residual) for name, _s, cfg in points] == \
        [("deal_lambda_drift_residual=null", None), ("deal_lambda_drift_residual=0.1", 0.1)]


@pytest.mark.parametrize("argv,match", [
    (["--deal_project_residual", "left"], r"'deal_project_residual' = 'left' is not one of \['none', 'A', 'B', 'both'\]"),
    (["--deal_drift_weighting", "log"], r"'deal_drift_weighting' = 'log' is not one of \['flat', 'spectral'\]"),
    (["--deal_project_energy", "0"], r"'deal_project_energy' must be in \(0, 1\]"),
    (["--deal_project_energy", "1.5"], r"'deal_project_energy' must be in \(0, 1\]"),
    (["--deal_lambda_drift_history", "-1"], r"'deal_lambda_drift_history' must be >= 0 or null"),
    (["--deal_lambda_drift_residual", "nan"], r"'deal_lambda_drift_residual' must be a finite number"),
    (["--deal_lambda_drift_residual", "abc"], r"'deal_lambda_drift_residual' expects a float or null"),
    (["--deal_lambda_drift_history", "true"], r"'deal_lambda_drift_history' expects a float or null"),
    (["--deal_update", "A", "--deal_project_residual", "B"], r"deal_project_residual is 'B' but deal_update is 'A'.*"
                                                             r"Set deal_project_residual to 'A'"),
])
def test_bad_values_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        config_from_args(build_parser().parse_args(argv))


def test_valid_corners_pass_validation():
    validate(TrainConfig(deal_project_energy=1.0, deal_project_residual="A", deal_update="A"))
    validate(TrainConfig(deal_project_residual="both", deal_update="B"))  # both = every factor DEAL maps
    validate(TrainConfig(deal_lambda_drift_history=0.0, deal_lambda_drift_residual=None))


def test_switches_make_a_run_differ_on_resume():
    """Not resume-ignored: a partial run resumed with a switch flipped is refused (its config differs); a run saved
    before the keys existed compares equal to the defaults (off, how it ran)."""
    assert not set(NEW_KEYS) & RESUME_IGNORED_KEYS
    base = TrainConfig().to_dict()
    for key, value in [("deal_project_residual", "A"), ("deal_project_energy", 0.5),
                       ("deal_drift_weighting", "spectral"), ("deal_lambda_drift_history", 0.0),
                       ("deal_lambda_drift_residual", 1.0)]:
        assert comparable_config({**base, key: value}) != comparable_config(base), key
    old = {k: v for k, v in base.items() if k not in NEW_KEYS}
    assert comparable_config(old) == comparable_config(base)
    seq = TrainConfig(method="seq_lora").to_dict()  # another method's run is not made stale by them
    assert comparable_config({**seq, "deal_drift_weighting": "spectral"}) == comparable_config(seq)


# --- identity at start, shapes, fold -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SWITCHES))
def test_identity_at_start_shapes_and_exact_fold(tiny_model, name):
    cfg = _switch_cfg(name)
    method, model = _history_model(tiny_model, cfg)
    ids = torch.randint(0, 1000, (2, 12))
    before = _logits(model, ids)  # the plain task-1 adapter
    shapes = {n: p.shape for n, p in model.named_parameters() if "lora_" in n}
    method.before_task(model, 1)
    assert torch.equal(_logits(model, ids), before)  # exact, as tests/test_deal_maths.py's identity test
    assert len(method.factors) == 2 * len(lora_layers(model))
    project = cfg.deal_project_residual
    for f in method.factors:
        n, r = f.history.shape
        assert torch.equal(f.factor(), f.history)
        x_hat, out = f.parts()
        assert torch.equal(x_hat, f.history) and torch.equal(out, f.history)
        assert f.project is (project in ("both", "A" if f.transpose else "B"))
        if f.project or f.drift_weighting == "spectral":
            assert f.basis_u.shape == (n, r) and f.basis_s.shape == (r,)
        if f.project:
            assert 1 <= f.project_rank <= r
            assert f.project_rank == energy_rank(torch.linalg.svdvals(f.history), cfg.deal_project_energy)
        else:
            assert f.project_rank == 0
        if f.drift_weighting == "spectral":
            assert f.drift_weights.shape == (r,) and f.drift_weights.sum().item() == pytest.approx(r, rel=1e-6)
        h, res = f.drift_parts()
        assert f.drift().item() == h.item() == res.item() == 0.0
    total, _logs = method.regularisation()
    assert total.item() == 0.0
    _train(method, model)
    wrapped = _logits(model, ids)
    assert (wrapped - before).abs().max().item() > 1e-4  # the task changed the model
    method.after_task(model, 1)
    folded = _logits(model, ids)
    assert (wrapped - folded).abs().max().item() <= 1e-5  # the existing fold tolerance
    params = dict(model.named_parameters())
    assert not any("parametrizations" in n for n in params)
    assert {n: p.shape for n, p in params.items() if "lora_" in n} == shapes  # plain LoRA of the same shapes


def test_functional_path_equals_the_module_path():
    """``factor(params)`` / ``drift_parts(params)`` with gathered copies (how ZeRO-3 computes the drift) give the
    module path's values with every switch on."""
    torch.manual_seed(0)
    weight = torch.randn(4, 16)
    f = DEALFactor(weight, transpose=True, num_scales=3, hidden=8, activation="gelu", residual=True, project=True,
                   project_energy=0.7, drift_weighting="spectral")
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.2 * torch.randn_like(p))
    copies = {n: p.clone() for n, p in f.named_parameters()}
    assert torch.equal(f.factor(copies), f.factor())
    assert torch.equal(f.forward(weight).t(), f.factor())
    for a, b in zip(f.drift_parts(copies), f.drift_parts()):
        assert torch.equal(a, b)
    assert torch.equal(f.drift(copies), f.drift())
    # a factor rebuilt from the same history (a resumed task) loads the saved state and projects the same k
    g = DEALFactor(weight, transpose=True, num_scales=3, hidden=8, activation="gelu", residual=True, project=True,
                   project_energy=0.7, drift_weighting="spectral")
    g.load_state_dict(f.state_dict())
    assert g.project_rank == f.project_rank and torch.equal(g.factor(), f.factor())


# --- the projection ------------------------------------------------------------------------------------------
def test_energy_rank_hand_computed():
    s = torch.tensor([2.0, 1.0, 1.0, 0.0])  # s² = 4, 1, 1, 0 of 6
    assert [energy_rank(s, e) for e in (0.1, 0.6, 0.67, 0.8, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_rank(torch.zeros(3), 0.95) == 0


def _top_directions(weight: torch.Tensor, transpose: bool, energy: float) -> torch.Tensor:
    """The history's protected directions, computed from PEFT's own weight independently of ``DEALFactor``:
    lora_A (r × n): its top-k right singular vectors (n-dim input space); lora_B (m × r): its top-k left ones."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    e = s.pow(2)
    k = int(torch.searchsorted(torch.cumsum(e, 0) / e.sum(), torch.tensor(energy, dtype=e.dtype) - 1e-12)) + 1
    return (vh[:k].t() if transpose else u[:, :k]).float()


@pytest.mark.parametrize("project", ["both", "none"])
def test_projection_keeps_the_update_out_of_the_top_k_directions(tiny_model, project):
    """After real training steps, what the task added on top of the filtered history (O - X̂: the MLP's correction and
    R) has no component in the history's top-k directions (relative size < 1e-5) with the switch on, and a clear one
    (> 1e-2) with it off. The directions come from PEFT's weights: A's right singular vectors (input space),
    B's left singular vectors (output space)."""
    energy = 0.8
    cfg = _cfg(deal_residual_update=True, deal_project_residual=project, deal_project_energy=energy,
               deal_lambda_drift=0.0)
    method, model = _history_model(tiny_model, cfg)
    histories = [(a.weight.detach().clone(), b.weight.detach().clone()) for a, b in _lora_pairs(model)]
    method.before_task(model, 1)
    _train(method, model, steps=5)
    by_weight = {}
    for (a_lin, b_lin), (a_hist, b_hist) in zip(_lora_pairs(model), histories):
        by_weight[id(a_lin.parametrizations.weight[0])] = (a_hist, True)
        by_weight[id(b_lin.parametrizations.weight[0])] = (b_hist, False)
    ratios, ks = [], []
    for f in method.factors:
        hist, transpose = by_weight[id(f)]
        q = _top_directions(hist, transpose, energy)        # n × k
        ks.append(q.shape[1])
        with torch.no_grad():
            x_hat, out = f.parts()
            added = out - x_hat                               # n × r (Y layout)
            added_weight = added.t() if transpose else added  # in PEFT's layout: A (r × n) or B (m × r)
            inside = added_weight @ q if transpose else q.t() @ added_weight
        assert added.norm() > 1e-3  # the task did add something
        ratios.append((inside.norm() / added.norm()).item())
        if project == "both":
            assert f.project_rank == q.shape[1]
    assert min(ks) >= 1 and any(k < cfg.lora_rank for k in ks)  # some factors protect a proper subspace
    if project == "both":
        assert max(ratios) < 1e-5, ratios
    else:
        assert max(ratios) > 1e-2, ratios
    # the retention filter still moves inside the subspace: the filtered history is not projected
    if project == "both":
        f = method.factors[0]
        with torch.no_grad():
            x_hat, _ = f.parts()
        assert (x_hat - f.history).norm() > 0


def test_projection_of_one_side_only(tiny_model):
    cfg = _cfg(deal_residual_update=True, deal_project_residual="B")
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    assert [f.project for f in method.factors] == [not f.transpose for f in method.factors]
    assert any(f.project for f in method.factors) and not all(f.project for f in method.factors)


# --- the spectral drift weighting --------------------------------------------------------------------------------
def _factor_with_spectrum(s: list[float], n: int = 12, weighting: str = "spectral", seed: int = 0) -> DEALFactor:
    torch.manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(n, r))
    v, _ = torch.linalg.qr(torch.randn(r, r))
    y = u @ torch.diag(torch.tensor(s)) @ v.t()  # n × r, the lora_B layout
    return DEALFactor(y.contiguous(), transpose=False, num_scales=2, hidden=4, activation="gelu", residual=True,
                      drift_weighting=weighting)


def _move(factors, seed=1):
    torch.manual_seed(seed)
    moves = {n: 0.3 * torch.randn_like(p) for n, p in factors[0].named_parameters()}
    with torch.no_grad():
        for f in factors:
            for n, p in f.named_parameters():
                p.add_(moves[n])


def test_spectral_drift_equals_flat_for_a_uniform_spectrum_and_differs_otherwise():
    uniform = [_factor_with_spectrum([1.5] * 4, weighting=w) for w in ("flat", "spectral")]
    _move(uniform)
    flat, spectral = (f.drift() for f in uniform)
    assert flat.item() > 0 and spectral.item() == pytest.approx(flat.item(), rel=1e-5)
    skewed = [_factor_with_spectrum([4.0, 2.0, 1.0, 0.25], weighting=w) for w in ("flat", "spectral")]
    _move(skewed)
    flat, spectral = (f.drift() for f in skewed)
    assert abs(spectral.item() - flat.item()) > 1e-2 * flat.item()


def test_spectral_drift_prices_each_direction_by_its_singular_value():
    s = [4.0, 2.0, 1.0, 1.0]
    f = _factor_with_spectrum(s)
    u = f.basis_u
    mean = sum(s) / len(s)
    den = f.history.pow(2).sum() + f.drift_floor
    assert torch.allclose(f.drift_weights, torch.tensor(s) / mean)
    for i in range(4):  # O - Y = u_i e_0ᵀ: costs w_i = s_i / mean(s)
        with torch.no_grad():
            f.residual.zero_()
            f.residual[:, 0] = u[:, i]
        assert f.drift().item() == pytest.approx(s[i] / mean / den.item(), rel=1e-5)
    outside = torch.randn(u.shape[0])
    outside = outside - u @ (u.t() @ outside)
    with torch.no_grad():
        f.residual.zero_()
        f.residual[:, 1] = outside
    assert f.drift().item() == pytest.approx(outside.pow(2).sum().item() / den.item(), rel=1e-5)  # as flat
    # a zero history: weights 1 (the flat penalty)
    zero = DEALFactor(torch.zeros(6, 3), transpose=False, num_scales=2, hidden=4, activation="gelu",
                      drift_weighting="spectral")
    assert torch.equal(zero.drift_weights, torch.ones(3))


def test_spectral_drift_in_the_method_loss(tokenizer):
    from deal_train.model.loading import load_model

    logs = {}
    for weighting in ("flat", "spectral"):
        cfg = _cfg(deal_residual_update=True, deal_lambda_drift=1.0, deal_drift_weighting=weighting)
        method, model = _history_model(load_model("tiny-random-llama", tokenizer), cfg)
        method.before_task(model, 1)
        _perturb(method)
        _total, logs[weighting] = method.regularisation()
    assert logs["flat"]["deal/drift"] > 0 and logs["spectral"]["deal/drift"] > 0
    assert logs["flat"]["deal/drift"] != pytest.approx(logs["spectral"]["deal/drift"], rel=1e-3)


# --- split drift weights ----------------------------------------------------------------------------------------
def _reg_terms(method, cfg):
    theta1 = [p for f in method.factors for p in f.retention_parameters()]
    theta2 = [p for f in method.factors for p in f.update_parameters()]
    r1 = regulariser(theta1, method._retention_start, cfg.deal_norm_retention, cfg.deal_reg_form)
    r2 = regulariser(theta2, method._update_start, cfg.deal_norm_update, cfg.deal_reg_form)
    return cfg.deal_lambda_retention * r1 + cfg.deal_lambda_update * r2


def test_both_null_is_todays_loss_exactly(tiny_model):
    cfg = _cfg(deal_residual_update=True, deal_lambda_drift=0.7)
    assert cfg.deal_lambda_drift_history is None and cfg.deal_lambda_drift_residual is None
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    _perturb(method)
    total, logs = method.regularisation()
    drift = torch.stack([(f.factor() - f.history).pow(2).sum() / (f.history.pow(2).sum() + f.drift_floor)
                         for f in method.factors]).sum()
    torch.testing.assert_close(total, _reg_terms(method, cfg) + cfg.deal_lambda_drift * drift, rtol=1e-6, atol=0)
    assert set(logs) == {"deal/reg_retention", "deal/reg_update", "deal/drift"}


def test_split_weights_weigh_the_history_and_residual_parts(tiny_model):
    cfg = _cfg(deal_residual_update=True, deal_lambda_drift=0.7, deal_lambda_drift_history=0.2,
               deal_lambda_drift_residual=None)
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    _perturb(method)
    total, logs = method.regularisation()
    hist, res = [], []
    for f in method.factors:
        den = f.history.pow(2).sum() + f.drift_floor
        x_hat = f.retention(f.history)
        hist.append((x_hat - f.history).pow(2).sum() / den)
        res.append((f.factor() - x_hat).pow(2).sum() / den)
    h, r = torch.stack(hist).sum(), torch.stack(res).sum()
    assert h.item() > 0 and r.item() > 0
    # null residual weight: deal_lambda_drift
    torch.testing.assert_close(total, _reg_terms(method, cfg) + 0.2 * h + 0.7 * r, rtol=1e-6, atol=0)
    assert logs["deal/drift_history"] == pytest.approx(h.item(), rel=1e-6)
    assert logs["deal/drift_residual"] == pytest.approx(r.item(), rel=1e-6)
    assert "deal/drift" not in logs
    # the split form leaves out the cross term: its parts do not add up to the unsplit drift
    unsplit = torch.stack([f.drift() for f in method.factors]).sum()
    assert abs((h + r - unsplit).item()) > 1e-6 * unsplit.item()


def test_a_zero_weight_frees_its_part(tiny_model):
    """λ_h = 0, λ_r = 1: moving only the filter costs no drift, moving only R does; the gradient of the drift
    reaches R and not the retention gains."""
    cfg = _cfg(deal_residual_update=True, deal_lambda_drift=0.0, deal_lambda_drift_history=0.0,
               deal_lambda_drift_residual=1.0, deal_lambda_retention=0.0, deal_lambda_update=0.0)
    method, model = _history_model(tiny_model, cfg)
    method.before_task(model, 1)
    with torch.no_grad():
        for f in method.factors:
            f.retention.layers[0].gains.add_(0.5)
    total, logs = method.regularisation()
    assert total.item() == 0.0 and logs["deal/drift_history"] > 0 and logs["deal/drift_residual"] == 0.0
    with torch.no_grad():
        method.factors[0].residual.add_(0.1)
    total, logs = method.regularisation()
    assert total.item() > 0 and total.item() == pytest.approx(logs["deal/drift_residual"], rel=1e-6)
    total.backward()
    assert method.factors[0].residual.grad.abs().sum() > 0
    assert all(f.retention.layers[0].gains.grad is None or f.retention.layers[0].gains.grad.abs().sum() == 0
               for f in method.factors)


# --- the memory estimate counts the new buffers ----------------------------------------------------------------
def test_memory_estimate_counts_the_new_buffers(tokenizer):
    from deal_train.methods import SeqLoRA
    from deal_train.model.loading import load_model
    from deal_train.tools.estimate_memory import PROFILES, estimate, model_shapes

    for switches in (dict(deal_project_residual="B"), dict(deal_project_residual="both", deal_drift_weighting="spectral")):
        cfg = TrainConfig(model="tiny-random-llama", lora_rank=4, deal_mlp_hidden=8, **switches)
        model = SeqLoRA(cfg).wrap(load_model(cfg.model, tokenizer))
        deal = DEAL(cfg)
        deal.before_task(model, 1)
        theta = sum(p.numel() for p in deal.deal_parameters())
        count = theta + sum(p.numel() for p in deal.residual_parameters())
        buffers = sum(b.numel() for f in deal.factors for b in f.buffers())
        e = estimate(cfg.model, "deal", cfg, PROFILES["cpu"], shapes=model_shapes(cfg.model, cfg.target_modules))
        assert e.components["deal_parameters"] == 4 * (count + theta + buffers), switches


# --- a task resumed mid-way with the switches on ----------------------------------------------------------------
ROUND2_ARGS = ["--deal_project_residual", "both", "--deal_project_energy", "0.8", "--deal_drift_weighting",
               "spectral", "--deal_lambda_drift_history", "1.0", "--deal_residual_update", "true",
               "--deal_grow_adapter", "true"]


def test_sigint_in_task_2_then_resume_gives_the_same_run_with_the_switches_on(tmp_path, capsys):
    """The projection basis, the spectral weights, the split drift and the growing adapter (its new adapter, basis
    and R) survive a step checkpoint: a run stopped by
    SIGINT inside task 2 (DEAL) and rerun ends with the uninterrupted run's adapters, byte for byte; a rerun with a
    switch flipped is refused (the switches are not resume-ignored)."""
    import json
    import os
    import signal

    from deal_train.cli import run_cli
    from deal_train.train.checkpointing import StepCheckpointer
    from deal_train.train.loop import run
    from test_checkpointing import ADAPTERS, ARGS

    ref_out, out = tmp_path / "ref", tmp_path / "run"
    assert run_cli(run, [*ARGS, *ROUND2_ARGS, "--output_dir", str(ref_out)]) == 0
    after_step = StepCheckpointer.after_step

    def interrupt_at_step_6(self, progress, task_name):
        if progress.global_step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return after_step(self, progress, task_name)

    argv = [*ARGS, *ROUND2_ARGS, "--output_dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepCheckpointer, "after_step", interrupt_at_step_6)
        assert run_cli(run, argv) == 130
    assert json.loads((out / "metrics.json").read_text())["completed_tasks"] == 1
    capsys.readouterr()
    assert run_cli(run, [*argv, "--deal_drift_weighting", "flat"]) == 2
    assert "deal_drift_weighting" in capsys.readouterr().err
    assert run_cli(run, argv) == 0
    assert "resuming task 2 from" in capsys.readouterr().out
    for a in ADAPTERS:
        assert (out / "adapters" / a / "adapter_model.safetensors").read_bytes() == \
            (ref_out / "adapters" / a / "adapter_model.safetensors").read_bytes(), a
    saved = json.loads((out / "metrics.json").read_text())["config"]
    assert (saved["deal_project_residual"], saved["deal_drift_weighting"], saved["deal_lambda_drift_history"],
            saved["deal_grow_adapter"]) == ("both", "spectral", 1.0, True)
