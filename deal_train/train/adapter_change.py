"""How far a task moves the LoRA adapter: relative Frobenius change of A, B and ΔW = BA since the task began.

Measured for every method on the adapter it trains (``ContinualMethod.trained_adapter``), logged to TensorBoard
as ``deal/relative_change/{A,B,delta_w}`` during training and stored per task in ``metrics.json``
(``per_task[t]["relative_change"]``), so the movement of the adapter can be set against the forgetting of
earlier tasks (docs/design.md section 7). For DEAL the factors read are the parametrized ones, i.e. the
current O of Eq. 11 (what the fold will write).

Definitions, summed over all LoRA layers ℓ of the adapter (A_ℓ: r × d_in, B_ℓ: d_out × r, "0" = start of task)::

    A:       sqrt(Σ ||A_ℓ − A_ℓ0||²_F) / sqrt(Σ ||A_ℓ0||²_F)
    B:       sqrt(Σ ||B_ℓ − B_ℓ0||²_F) / sqrt(Σ ||B_ℓ0||²_F)
    delta_w: sqrt(Σ ||B_ℓA_ℓ − B_ℓ0A_ℓ0||²_F) / sqrt(Σ ||B_ℓ0A_ℓ0||²_F)   (the alpha/r scale cancels)

A ratio whose denominator is zero (B and ΔW on the first task, where B starts at zero) is None.

Subspace overlap (issue 22: which part of a task's update lies in the directions the earlier tasks use),
logged as ``subspace/overlap/{output,input,both,A,B}`` at the same steps and stored per task in ``metrics.json``
(``per_task[t]["subspace_overlap"]``). Per LoRA layer ℓ, with s_j = lora_alpha / r the scale of adapter j::

    history  H_ℓ = Σ_{adapters j active at the start of task t, before the method's before_task} s_j B_j A_j
                   (d_out × d_in; seq_lora/deal: the one adapter; o_lora: the sum of the earlier adapters)
    H_ℓ = U S Vᵀ,  k_ℓ = the smallest k with Σ_{i≤k} s_i² ≥ subspace_energy · Σ_i s_i²  (config key, in (0, 1])
    U_k: d_out × k_ℓ, V_k: d_in × k_ℓ (the top-k left / right singular vectors)
    update   D_ℓ = (Σ_{adapters j active now} s_j B_j A_j) − H_ℓ      (now: the logged step, or the task's end,
                   after the method's after_task, e.g. DEAL's fold)

    output: Σ_ℓ ||U_k U_kᵀ D_ℓ||²_F / Σ_ℓ ||D_ℓ||²_F
    input:  Σ_ℓ ||D_ℓ V_k V_kᵀ||²_F / Σ_ℓ ||D_ℓ||²_F
    both:   Σ_ℓ ||U_k U_kᵀ D_ℓ V_k V_kᵀ||²_F / Σ_ℓ ||D_ℓ||²_F

and per factor of the trained adapter when it was already one of the history's adapters (seq_lora and the
other one-adapter methods, deal: the factors continue across tasks; o_lora and per_task train a new adapter, so
None), with A_ℓ0 (r × d_in) and B_ℓ0 (d_out × r) its factors at the start of the task (for DEAL the folded
history, not the parametrized factor) and k chosen on each factor's own spectrum with the same threshold::

    A: Σ_ℓ ||(A_ℓ − A_ℓ0) V_k V_kᵀ||² / Σ_ℓ ||A_ℓ − A_ℓ0||²    (V_k: top-k right singular vectors of A_ℓ0)
    B: Σ_ℓ ||U_k U_kᵀ (B_ℓ − B_ℓ0)||² / Σ_ℓ ||B_ℓ − B_ℓ0||²    (U_k: top-k left singular vectors of B_ℓ0)

Every value is a fraction in [0, 1]; all are None where the history is zero in every layer (task 0, where B
starts at zero), a value is None where its update is zero. Nothing of size d_out × d_in is formed: H and D are
kept as factor pairs (``low_rank_svd``) and the norms are traces of r-sized products. Under ZeRO-3 the adapter
tensors are persistent (whole on every rank, ``train.distributed.check_persistent``) and gathered at the task's
start and end, as for ``relative_change``; a factor that is not whole when read (an empty tensor) makes every
overlap of that call None rather than wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deal import low_rank_svd
from ..methods.adapters import lora_layers


@dataclass
class AdapterSnapshot:
    """The adapter's factors at the start of a task, float64 copies: ``A[ℓ]`` (r × d_in), ``B[ℓ]`` (d_out × r)."""

    adapter: str
    A: list[torch.Tensor]
    B: list[torch.Tensor]


def _factors(model: torch.nn.Module, adapter: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with torch.no_grad():
        layers = lora_layers(model, adapter)
        return ([layer.lora_A[adapter].weight.detach().double() for _, layer in layers],
                [layer.lora_B[adapter].weight.detach().double() for _, layer in layers])


def snapshot(model: torch.nn.Module, adapter: str) -> AdapterSnapshot:
    """Copy the current factors of ``adapter`` (float64, detached)."""
    a, b = _factors(model, adapter)
    return AdapterSnapshot(adapter, [x.clone() for x in a], [x.clone() for x in b])


def _gram_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ)) from r × r products, never forming d_out × d_in matrices."""
    return torch.trace((b1.T @ b2) @ (a2 @ a1.T))


def relative_change(model: torch.nn.Module, start: AdapterSnapshot) -> dict[str, float | None]:
    """``{"A": ..., "B": ..., "delta_w": ...}``: relative Frobenius changes since ``start`` (module docstring).

    Raises:
        ValueError: the model's adapter has a different number of LoRA layers than the snapshot.
    """
    a_now, b_now = _factors(model, start.adapter)
    if len(a_now) != len(start.A):
        raise ValueError(f"Adapter {start.adapter!r} has {len(a_now)} LoRA layers, the snapshot {len(start.A)}.")

    def ratio(num: float, den: float) -> float | None:
        return None if den <= 0 else float(num ** 0.5 / den ** 0.5)

    if not a_now:
        return {"A": None, "B": None, "delta_w": None}

    # every sum stays on the device and is read back once (one synchronisation per call, not five per layer)
    da = torch.stack([(a - a0).pow(2).sum() for a, a0 in zip(a_now, start.A)]).sum()
    na = torch.stack([a0.pow(2).sum() for a0 in start.A]).sum()
    db = torch.stack([(b - b0).pow(2).sum() for b, b0 in zip(b_now, start.B)]).sum()
    nb = torch.stack([b0.pow(2).sum() for b0 in start.B]).sum()
    old = [_gram_inner(b0, a0, b0, a0) for a0, b0 in zip(start.A, start.B)]  # ||B0 A0||², one per layer
    dw = torch.stack([(_gram_inner(b, a, b, a) + o - 2 * _gram_inner(b, a, b0, a0)).clamp_min(0.0)
                      for a, b, a0, b0, o in zip(a_now, b_now, start.A, start.B, old)]).sum()
    nw = torch.stack(old).sum()
    da, na, db, nb, dw, nw = torch.stack([da, na, db, nb, dw, nw]).tolist()
    return {"A": ratio(da, na), "B": ratio(db, nb), "delta_w": ratio(dw, nw)}


def change_logs(change: dict[str, float | None]) -> dict[str, float]:
    """TensorBoard scalars ``deal/relative_change/<name>`` for the ratios that are defined."""
    return {f"deal/relative_change/{k}": v for k, v in change.items() if v is not None}


# --- subspace overlap (module docstring) -------------------------------------------------------------------------

OVERLAP_KEYS = ("output", "input", "both", "A", "B")


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of Σ s² (``s`` descending); 0 when s is zero.

    A relative tolerance of 1e-12 keeps ``energy`` = 1 from counting singular values that are zero up to rounding.
    """
    e = s.detach().double().pow(2)
    total = float(e.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0)
    return min(int((cum < energy * total * (1 - 1e-12)).sum()) + 1, len(s))


def _top(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = energy_rank(s, energy)
    return u[:, :k], v[:, :k]


@dataclass
class HistoryLayer:
    """One LoRA layer's history: per adapter its factors (float64 copies) and scale, and H's top-k subspace."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # adapter -> (A: r × d_in, B: d_out × r, scale)
    U: torch.Tensor  # d_out × k
    V: torch.Tensor  # d_in × k
    energy: float  # ||H||²_F


@dataclass
class SubspaceHistory:
    """The history of one task (module docstring), taken by ``history`` before the method's ``before_task``;
    ``bind`` names the adapter the task trains, for the per-factor overlaps."""

    energy: float
    layers: dict[str, HistoryLayer]
    adapter: str | None = None
    # per layer name: (V_k of A_0, U_k of B_0) of the trained adapter, when it was one of the history's adapters
    factor_subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def empty(self) -> bool:
        """No history (H = 0 in every layer: task 0, or an adapter whose B is still zero)."""
        return not any(layer.energy > 0 for layer in self.layers.values())

    def bind(self, adapter: str) -> "SubspaceHistory":
        """Record the trained adapter and, when the history holds it, the top-k subspaces of its factors."""
        self.adapter = adapter
        self.factor_subspaces = None
        if self.empty or not any(adapter in layer.factors for layer in self.layers.values()):
            return self
        self.factor_subspaces = {}
        for name, layer in self.layers.items():
            if adapter not in layer.factors:
                continue
            a0, b0, _scale = layer.factors[adapter]
            _u, s_a, vh_a = torch.linalg.svd(a0.cpu(), full_matrices=False)  # r × d_in: small
            u_b, s_b, _vh = torch.linalg.svd(b0.cpu(), full_matrices=False)  # d_out × r
            v_a = vh_a.T[:, :energy_rank(s_a, self.energy)].to(a0.device)
            u_b = u_b[:, :energy_rank(s_b, self.energy)].to(b0.device)
            self.factor_subspaces[name] = (v_a, u_b)
        return self


def _active_factors(model: torch.nn.Module) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per LoRA layer name: adapter -> (A, B, scale) of every active adapter (float64, detached, not copied)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            active = {a: (layer.lora_A[a].weight.detach().double(), layer.lora_B[a].weight.detach().double(),
                          float(layer.scaling[a])) for a in layer.active_adapters if a in layer.lora_A}
            if active:
                out[name] = active
    return out


def _whole(factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]) -> bool:
    """Every factor holds data (a ZeRO-3 parameter that is not gathered reads as an empty tensor)."""
    return all(a.dim() == 2 and b.dim() == 2 and a.numel() and b.numel()
               for layer in factors.values() for a, b, _s in layer.values())


def history(model: torch.nn.Module, energy: float) -> SubspaceHistory:
    """The history at the start of a task: call before the method's ``before_task`` (module docstring)."""
    layers = {}
    factors = _active_factors(model)
    if not _whole(factors):
        return SubspaceHistory(energy, {})
    for name, adapters in factors.items():
        kept = {a: (x.clone(), b.clone(), s) for a, (x, b, s) in adapters.items()}
        b_cat = torch.cat([b for _a, b, _s in kept.values()], dim=1)
        a_cat = torch.cat([s * a for a, _b, s in kept.values()], dim=0)
        u, sv, v = low_rank_svd(b_cat, a_cat)
        u_k, v_k = _top(u, sv, v, energy)
        layers[name] = HistoryLayer(kept, u_k, v_k, float(sv.pow(2).sum()))
    return SubspaceHistory(energy, layers)


def _update_factors(now: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                    old: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Db, Da) with D = Db @ Da = Σ_now s B A − Σ_old s B0 A0, written without cancellation: an adapter in both
    gives (B − B0) sA + B0 s(A − A0), a new one B sA, one no longer active −B0 sA0."""
    bs, as_ = [], []
    for name, (a, b, s) in now.items():
        if name in old:
            a0, b0, s0 = old[name]
            bs += [b - b0, b0]
            as_ += [s * a, s * a - s0 * a0]
        else:
            bs.append(b)
            as_.append(s * a)
    for name, (a0, b0, s0) in old.items():
        if name not in now:
            bs.append(-b0)
            as_.append(s0 * a0)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def subspace_overlap(model: torch.nn.Module, start: SubspaceHistory) -> dict[str, float | None]:
    """``{"output", "input", "both", "A", "B"}``: the overlaps of the update since ``start`` with the history's
    top-k subspaces (module docstring); None where undefined."""
    none = dict.fromkeys(OVERLAP_KEYS)
    if start.empty:
        return none
    factors = _active_factors(model)
    if not _whole(factors):
        return none
    sums = []  # per layer: ||D||², output, input, both, then per factor ||ΔA||², proj, ||ΔB||², proj
    zero = torch.zeros((), dtype=torch.float64)
    for name, now in factors.items():
        layer = start.layers.get(name)
        old = layer.factors if layer is not None else {}
        db, da = _update_factors(now, old)
        g_b, g_a = db.T @ db, da @ da.T  # R' × R'
        row = [(g_b * g_a).sum()]  # ||Db Da||² = tr(DbᵀDb DaDaᵀ)
        if layer is None:
            row += [zero.to(db.device)] * 3
        else:
            p, q = layer.U.T @ db, da @ layer.V  # k × R', R' × k
            row += [((p.T @ p) * g_a).sum(), (g_b * (q @ q.T)).sum(), (p @ q).pow(2).sum()]
        sub = (start.factor_subspaces or {}).get(name)
        if sub is not None and start.adapter in now:
            a, b, _s = now[start.adapter]
            a0, b0, _s0 = old[start.adapter]
            d_a, d_b = a - a0, b - b0
            row += [d_a.pow(2).sum(), (d_a @ sub[0]).pow(2).sum(), d_b.pow(2).sum(), (sub[1].T @ d_b).pow(2).sum()]
        else:
            row += [zero.to(db.device)] * 4
        sums.append(torch.stack([x.to(db.device) for x in row]))
    if not sums:
        return none
    total = torch.stack([x.to(sums[0].device) for x in sums]).sum(0).tolist()  # one read-back

    def frac(num: float, den: float) -> float | None:
        return None if den <= 0 else min(max(num / den, 0.0), 1.0)

    d2, out, inp, both, da2, pa, db2, pb = total
    return {"output": frac(out, d2), "input": frac(inp, d2), "both": frac(both, d2),
            "A": frac(pa, da2) if start.factor_subspaces else None,
            "B": frac(pb, db2) if start.factor_subspaces else None}


def overlap_logs(overlap: dict[str, float | None]) -> dict[str, float]:
    """TensorBoard scalars ``subspace/overlap/<name>`` for the overlaps that are defined."""
    return {f"subspace/overlap/{k}": v for k, v in overlap.items() if v is not None}
