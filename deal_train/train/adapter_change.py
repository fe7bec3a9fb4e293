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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
