"""Subspace overlap of a task's LoRA update with the earlier tasks' top-k subspace (train/adapter_change.py):
the maths on hand-built matrices, against a dense computation on the tiny model, in real two-task runs (metrics,
TensorBoard), and the table tool."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

from deal_train.config import ConfigError, TrainConfig, validate
from deal_train.methods.adapters import activate, lora_layers
from deal_train.train import adapter_change as ac
from deal_train.tools import overlap_table


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- hand-built matrices ----------------------------------------------------------------------------------------

def test_energy_rank_follows_the_threshold():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [ac.energy_rank(s, e) for e in (0.1, 9 / 14, 0.65, 0.9, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 2, 3, 3]
    assert ac.energy_rank(torch.tensor([1.0, 0.0, 0.0]), 1.0) == 1  # zero singular values never count
    assert ac.energy_rank(torch.zeros(3), 0.9) == 0


@pytest.mark.parametrize("d_out,d_in,rank", [(40, 30, 6), (12, 50, 9), (20, 20, 20)])
def test_factor_svd_equals_the_dense_svd(d_out, d_in, rank):
    b, a = _rand(d_out, rank, seed=1), _rand(rank, d_in, seed=2)
    u, s, v = ac.low_rank_svd(b, a)
    dense = b @ a
    s_dense = torch.linalg.svdvals(dense)
    assert s.shape[0] == min(rank, d_out, d_in)
    assert torch.allclose(s, s_dense[:s.shape[0]], atol=1e-10, rtol=0)
    assert torch.allclose(u @ torch.diag(s) @ v.T, dense, atol=1e-10, rtol=0)
    assert torch.allclose(u.T @ u, torch.eye(len(s), dtype=torch.float64), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(len(s), dtype=torch.float64), atol=1e-10)
    # the projector onto the top-k singular directions equals the dense SVD's (singular vectors up to sign)
    u_d, _s, vh_d = torch.linalg.svd(dense, full_matrices=False)
    k = 3
    assert torch.allclose(u[:, :k] @ u[:, :k].T, u_d[:, :k] @ u_d[:, :k].T, atol=1e-10, rtol=0)
    assert torch.allclose(v[:, :k] @ v[:, :k].T, vh_d[:k].T @ vh_d[:k], atol=1e-10, rtol=0)


def test_subspace_energy_is_validated():
    validate(TrainConfig(subspace_energy=1.0))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="subspace_energy"):
            validate(TrainConfig(subspace_energy=bad))


def _peft(tiny_model, r=4):
    model = get_peft_model(tiny_model, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model, lora_layers(model, "default")


def _set(layer, name, a, b):
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a)
        layer.lora_B[name].weight.copy_(b)


def _history_factors(model, layers, seed=10):
    """Random float32-exact history factors with B of full column rank; returns them per layer."""
    out = []
    for i, (_n, layer) in enumerate(layers):
        a0 = _rand(*layer.lora_A["default"].weight.shape, seed=seed + 2 * i).float()
        b0 = _rand(*layer.lora_B["default"].weight.shape, seed=seed + 2 * i + 1).float()
        _set(layer, "default", a0, b0)
        out.append((a0.double(), b0.double()))
    return out


def test_update_inside_the_history_has_output_overlap_one_and_orthogonal_zero(tiny_model):
    model, layers = _peft(tiny_model)
    hist = _history_factors(model, layers)
    start = ac.history(model, 1.0).bind("default")
    assert not start.empty and start.factor_subspaces is not None
    assert ac.subspace_overlap(model, start) == dict.fromkeys(ac.OVERLAP_KEYS)  # no update yet: all None

    # B moves inside the column space of B0 (= that of H): D = B0 M sA0 lies in col(H) and row(H)
    for (_n, layer), (a0, b0) in zip(layers, hist):
        m = _rand(b0.shape[1], b0.shape[1], seed=3)
        _set(layer, "default", a0, b0 + b0 @ m)
    got = ac.subspace_overlap(model, start)
    assert got["output"] == pytest.approx(1, abs=1e-6) and got["input"] == pytest.approx(1, abs=1e-6)
    assert got["both"] == pytest.approx(1, abs=1e-6) and got["B"] == pytest.approx(1, abs=1e-6)
    assert got["A"] is None  # A did not move

    # B moves orthogonally to col(B0): D = N sA0 is orthogonal on the output side, inside on the input side
    for (_n, layer), (a0, b0) in zip(layers, hist):
        q, _ = torch.linalg.qr(b0)
        n = _rand(*b0.shape, seed=4)
        n = n - q @ (q.T @ n)
        _set(layer, "default", a0, b0 + n)
    got = ac.subspace_overlap(model, start)
    assert got["output"] == pytest.approx(0, abs=1e-6) and got["both"] == pytest.approx(0, abs=1e-6)
    assert got["input"] == pytest.approx(1, abs=1e-6) and got["B"] == pytest.approx(0, abs=1e-6)

    # A moves inside the row space of A0, B back at B0: input side and factor A overlap 1
    for (_n, layer), (a0, b0) in zip(layers, hist):
        _set(layer, "default", a0 + _rand(a0.shape[0], a0.shape[0], seed=5) @ a0, b0)
    got = ac.subspace_overlap(model, start)
    assert got["input"] == pytest.approx(1, abs=1e-6) and got["A"] == pytest.approx(1, abs=1e-6)
    assert got["B"] is None
    assert set(ac.overlap_logs(got)) == {f"subspace/overlap/{k}" for k in ("output", "input", "both", "A")}


def test_k_follows_the_energy_threshold_in_the_overlap(tiny_model):
    """H = s1 u1 v1ᵀ + s2 u2 v2ᵀ with s1 ≫ s2, D along u2: outside the 0.5-energy subspace, inside the full one."""
    model, layers = _peft(tiny_model, r=2)
    directions = []
    for i, (_n, layer) in enumerate(layers):
        d_out, d_in = layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1]
        u, _ = torch.linalg.qr(_rand(d_out, 2, seed=20 + i))
        v, _ = torch.linalg.qr(_rand(d_in, 2, seed=40 + i))
        b0, a0 = u @ torch.diag(torch.tensor([10.0, 1.0], dtype=torch.float64)), v.T
        _set(layer, "default", a0.float(), b0.float())
        directions.append((a0, b0, u))
    for energy, expected in ((0.5, 0.0), (0.99, 0.0), (1.0, 1.0)):
        start = ac.history(model, energy).bind("default")
        assert all(layer.U.shape[1] == (1 if energy < 1 else 2) for layer in start.layers.values())
        for (_n, layer), (a0, b0, u) in zip(layers, directions):
            _set(layer, "default", a0.float(), (b0 + 0.5 * u[:, 1:] @ torch.ones(1, 2, dtype=torch.float64)).float())
        assert ac.subspace_overlap(model, start)["output"] == pytest.approx(expected, abs=1e-6)
        for (_n, layer), (a0, b0, _u) in zip(layers, directions):
            _set(layer, "default", a0.float(), b0.float())


def _dense(model, layers, names):
    out = {}
    for n, layer in layers:
        out[n] = sum(layer.scaling[a] * layer.lora_B[a].weight.detach().double() @
                     layer.lora_A[a].weight.detach().double() for a in names)
    return out


def test_two_active_adapters_match_a_dense_computation(tiny_model):
    """O-LoRA's case: history = the earlier adapters' sum, the update = a new adapter, checked against dense
    d_out × d_in matrices and their full SVD."""
    model, layers = _peft(tiny_model)
    model.add_adapter("task_1", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("task_2", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for i, (_n, layer) in enumerate(layers):
        for j, name in enumerate(("default", "task_1", "task_2")):
            _set(layer, name, _rand(*layer.lora_A[name].weight.shape, seed=100 + 6 * i + 2 * j).float(),
                 _rand(*layer.lora_B[name].weight.shape, seed=101 + 6 * i + 2 * j).float())
    activate(model, ["default", "task_1"])
    energy = 0.8
    start = ac.history(model, energy).bind("task_2")
    assert start.factor_subspaces is None  # a new adapter: no factor continues
    h = _dense(model, layers, ["default", "task_1"])
    activate(model, ["default", "task_1", "task_2"])
    d = {n: t - h[n] for n, t in _dense(model, layers, ["default", "task_1", "task_2"]).items()}
    num = {"output": 0.0, "input": 0.0, "both": 0.0}
    den = 0.0
    for n in h:
        u, s, vh = torch.linalg.svd(h[n], full_matrices=False)
        k = ac.energy_rank(s, energy)
        assert 0 < k < 8
        pu, pv = u[:, :k] @ u[:, :k].T, vh[:k].T @ vh[:k]
        num["output"] += float((pu @ d[n]).pow(2).sum())
        num["input"] += float((d[n] @ pv).pow(2).sum())
        num["both"] += float((pu @ d[n] @ pv).pow(2).sum())
        den += float(d[n].pow(2).sum())
    got = ac.subspace_overlap(model, start)
    for key in num:
        assert got[key] == pytest.approx(num[key] / den, abs=1e-9)
    assert 0 < got["both"] < got["output"] < 1 and got["A"] is None and got["B"] is None


def test_factor_overlap_matches_a_dense_computation(tiny_model):
    """One adapter whose A and B both move (SeqLoRA's case): factor and ΔW overlaps against dense matrices."""
    model, layers = _peft(tiny_model)
    hist = _history_factors(model, layers)
    energy = 0.7
    start = ac.history(model, energy).bind("default")
    num_a = num_b = den_a = den_b = den_d = 0.0
    num_d = {"output": 0.0, "input": 0.0, "both": 0.0}
    for i, ((_n, layer), (a0, b0)) in enumerate(zip(layers, hist)):
        a, b = a0 + 0.3 * _rand(*a0.shape, seed=60 + i), b0 + 0.3 * _rand(*b0.shape, seed=80 + i)
        _set(layer, "default", a.float(), b.float())
        a, b = a.float().double(), b.float().double()
        scale = layer.scaling["default"]
        h, d = scale * b0 @ a0, scale * (b @ a - b0 @ a0)
        u_h, s_h, vh_h = torch.linalg.svd(h, full_matrices=False)
        k = ac.energy_rank(s_h, energy)
        pu, pv = u_h[:, :k] @ u_h[:, :k].T, vh_h[:k].T @ vh_h[:k]
        num_d["output"] += float((pu @ d).pow(2).sum())
        num_d["input"] += float((d @ pv).pow(2).sum())
        num_d["both"] += float((pu @ d @ pv).pow(2).sum())
        den_d += float(d.pow(2).sum())
        _u, s_a, vh_a = torch.linalg.svd(a0, full_matrices=False)
        u_b, s_b, _vh = torch.linalg.svd(b0, full_matrices=False)
        v = vh_a[:ac.energy_rank(s_a, energy)].T
        u = u_b[:, :ac.energy_rank(s_b, energy)]
        num_a += float(((a - a0) @ v).pow(2).sum())
        den_a += float((a - a0).pow(2).sum())
        num_b += float((u.T @ (b - b0)).pow(2).sum())
        den_b += float((b - b0).pow(2).sum())
    got = ac.subspace_overlap(model, start)
    assert got["A"] == pytest.approx(num_a / den_a, abs=1e-9) and got["B"] == pytest.approx(num_b / den_b, abs=1e-9)
    for key in num_d:
        assert got[key] == pytest.approx(num_d[key] / den_d, abs=1e-9)
    assert 0 < got["A"] < 1 and 0 < got["B"] < 1


def test_no_history_gives_none(tiny_model):
    model, _layers = _peft(tiny_model)  # PEFT starts B at zero: H = 0
    start = ac.history(model, 0.9).bind("default")
    assert start.empty and start.factor_subspaces is None
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert ac.subspace_overlap(model, start) == dict.fromkeys(ac.OVERLAP_KEYS)


# --- real two-task runs -----------------------------------------------------------------------------------------

def _scalars(logdir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.out") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


@pytest.mark.parametrize("method", ["seq_lora", "deal", "o_lora"])
def test_two_task_run_records_the_overlap(finished_run, method):
    cfg, metrics, _trained = finished_run(method)
    out = pathlib.Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    first, second = (p["subspace_overlap"] for p in saved["per_task"])
    assert first == dict.fromkeys(ac.OVERLAP_KEYS)
    sides = ["output", "input", "both"]
    factors = ["A", "B"] if method != "o_lora" else []  # o_lora trains a new adapter: no factor continues
    for key in sides + factors:
        assert isinstance(second[key], float) and 0 <= second[key] <= 1, (key, second)
    assert second["both"] <= min(second["output"], second["input"]) + 1e-12
    if method == "o_lora":
        assert second["A"] is None and second["B"] is None
    assert metrics["per_task"][1]["subspace_overlap"] == second
    tags = _scalars(str(out / "tensorboard"))
    for key in sides + factors:
        values = tags[f"subspace/overlap/{key}"]
        assert values and all(0 <= v <= 1 for v in values)
    assert "subspace/overlap/A" not in tags if method == "o_lora" else True


def test_overlap_table_prints_a_row_per_task_with_the_drops(finished_run, capsys):
    dirs = [finished_run(m)[0].output_dir for m in ("seq_lora", "o_lora")]
    assert overlap_table.main(dirs) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert lines[0].startswith("| run | method | task | output |") and len(lines) == 2 + 2 * 2
    for d, method in zip(dirs, ("seq_lora", "o_lora")):
        m = json.loads((pathlib.Path(d) / "metrics.json").read_text())
        acc, ov = m["accuracy_matrix"], m["per_task"][1]["subspace_overlap"]
        row1, row2 = [line for line in lines if line.startswith(f"| {method} |")]
        assert "| 1 dbpedia |" in row1 and row1.endswith("| – |")
        assert f"| 2 amazon | {ov['output']:.3f} | {ov['input']:.3f} | {ov['both']:.3f} |" in row2
        assert row2.endswith(f"| dbpedia {acc[0][0] - acc[0][1]:+.1f} |")
    assert overlap_table.main([str(pathlib.Path(dirs[0]).parent / "missing")]) == 2
