"""DEAL: continual LoRA where a spectral filter keeps the old adapter and a small MLP adds the new
(NeurIPS 2025; docs/design.md section 3). The maths lives in ``deal_train.deal``; this module applies it to
every LoRA layer of a PEFT model at the right points of the continual loop.

Task 0 trains a plain LoRA adapter. Before every later task the adapter is frozen as the history, a
``DEALFactor`` parametrization is installed on ``lora_A.weight`` and/or ``lora_B.weight`` of each LoRA
layer (``deal_update``), and only the retention and update parameters train. After the task the
parametrizations are folded into the weights, leaving a plain PEFT LoRA adapter of the same rank.

With ``deal_grow_adapter`` (docs/design.md section 3.4) the adapters are ``task_0 .. task_t`` as O-LoRA's: every
task after the first adds a new rank-r adapter whose ``lora_A`` is kept off the earlier adapters' input directions
(``OrthogonalGrowth``), while the earlier adapters are DEAL-filtered as above; the adapter saved after task t is
their concatenation, a plain PEFT adapter of rank (t+1)·r.
"""

from __future__ import annotations

import contextlib

import torch
from peft import PeftModel
from torch.nn.utils import parametrize

from ..config import PROFILES
from ..deal import DEALFactor, OrthogonalGrowth, attach, history_input_basis, regulariser, set_drift_floors
from ..model.sharding import is_zero3, live, live_named, writing
from .adapters import (activate, load_concatenated, lora_layers, save_concatenated, task_adapter,
                       task_adapter_names)
from .base import ContinualMethod, paper_row


def split_drift_weights(cfg) -> tuple[float, float] | None:
    """(λ_h, λ_r) of the split drift penalty, a null key taking ``deal_lambda_drift``; None when both
    ``deal_lambda_drift_history`` and ``deal_lambda_drift_residual`` are null (the unsplit penalty)."""
    h, r = cfg.deal_lambda_drift_history, cfg.deal_lambda_drift_residual
    if h is None and r is None:
        return None
    return (cfg.deal_lambda_drift if h is None else h), (cfg.deal_lambda_drift if r is None else r)


class DEAL(ContinualMethod):
    """DEAL with a spectral (or Haar) retention filter and residual update MLP.

    Config keys: ``deal_learning_rate``, ``deal_kernel`` (heat/xexp/spline/haar), ``deal_scales`` (J),
    ``deal_sigma_base``, ``deal_layers`` (K), ``deal_activation_retention``, ``deal_mlp_hidden`` (h),
    ``deal_activation`` (of the update MLP),
    ``deal_update`` (both/A/B), ``deal_lambda_retention`` / ``deal_norm_retention`` (λ1, a),
    ``deal_lambda_update`` / ``deal_norm_update`` (λ2, b), ``deal_reg_target`` (delta/raw),
    ``deal_reg_form`` (norm/power), ``deal_lambda_drift``, ``deal_residual_update`` (our residual R; its
    parameters train at ``learning_rate``); the round-2 switches (docs/design.md sections 3.1-3.3, all off by
    default): ``deal_project_residual`` / ``deal_project_energy``, ``deal_drift_weighting``,
    ``deal_lambda_drift_history`` / ``deal_lambda_drift_residual``, ``deal_grow_adapter`` (section 3.4).
    """

    name = "deal"
    label = "DEAL"
    config_prefix = "deal_"
    config_keys = ("allow_unordered_norms",)
    profiles = tuple(PROFILES)
    results_role = "proposed"
    paper_aa = paper_row(87.7, 78.5, 73.9, 88.9, 78.9, 74.6)
    memory_kind = "deal"
    shared_prefix_zero3 = False  # DEALFactor is a ZeRO-3 leaf module: two passes would reduce its gradients twice

    @classmethod
    def profile_config(cls, profile: str) -> dict:
        """``deal_profile`` = ``profile`` and that preset's DEAL values (``config.PROFILES``)."""
        return {**PROFILES[profile], "deal_profile": profile}

    @classmethod
    def plan_trainable(cls, lora_parameters: int, factor_shapes: list[tuple[tuple, tuple]],
                       cfg) -> tuple[int, int]:
        """LoRA on task 1; on later tasks the parameters of the factor map DEAL builds (``new_factor``) for every
        LoRA factor ``deal_update`` maps, each built once per shape on a small random CPU matrix. With
        ``deal_grow_adapter`` the later count is task 2's (the maps of one earlier adapter plus the new adapter's
        R and B, as many as a LoRA adapter's); each further task adds the maps of one more earlier adapter."""
        deal = cls(cfg)
        counts: dict = {}
        total = 0
        for a_shape, b_shape in factor_shapes:
            for which, shape in (("A", a_shape), ("B", b_shape)):
                if cfg.deal_update not in ("both", which):
                    continue
                if (which, shape) not in counts:
                    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
                    counts[(which, shape)] = sum(p.numel() for p in deal.new_factor(weight, which).parameters())
                total += counts[(which, shape)]
        if cfg.deal_grow_adapter:
            total += lora_parameters
        return lora_parameters, total

    def __init__(self, cfg):
        super().__init__(cfg)
        self.factors: list[DEALFactor] = []
        self.growth: list[OrthogonalGrowth] = []  # the new adapter's lora_A maps (deal_grow_adapter)
        self._retention_start: list[torch.Tensor] = []
        self._update_start: list[torch.Tensor] = []

    @property
    def grow(self) -> bool:
        """``deal_grow_adapter``: one new adapter per task (``task_<t>``) instead of the one ``default`` adapter."""
        return bool(self.cfg.deal_grow_adapter)

    def wrap(self, base_model: torch.nn.Module) -> PeftModel:
        """The LoRA adapter of task 1: ``default``, or ``task_0`` with ``deal_grow_adapter``."""
        return self.new_peft_model(base_model, adapter_name=task_adapter(0) if self.grow else "default")

    def adapter_names(self, model: PeftModel) -> list[str]:
        """The adapters the model holds, in task order: ``default``, or ``task_0 .. task_{k-1}`` with grow."""
        return task_adapter_names(model) if self.grow else ["default"]

    def trained_adapter(self) -> str:
        return task_adapter(self.task_index) if self.grow else "default"

    def before_task(self, model: PeftModel, task_index: int, train_rows=None) -> None:
        """Task 0: nothing (plain LoRA). Later tasks: freeze the history adapter(s) and install a ``DEALFactor``
        on each of their factors that ``deal_update`` maps; with ``deal_grow_adapter`` first add adapter
        ``task_<t>`` and install ``OrthogonalGrowth`` on its ``lora_A`` (its basis from the history before DEAL
        touches it), with its initial A written already projected.

        Raises:
            RuntimeError: with grow, the model does not hold exactly ``task_0 .. task_<t-1>``.
        """
        super().before_task(model, task_index, train_rows)
        self.factors, self.growth = [], []
        if task_index == 0:
            return  # task 1 has no history: plain LoRA
        cfg = self.cfg
        history = self.adapter_names(model)
        if self.grow:
            if history != [task_adapter(i) for i in range(task_index)]:
                raise RuntimeError(f"DEAL (deal_grow_adapter) before task {task_index}: the model holds adapters "
                                   f"{history}.")
            bases = [history_input_basis([(layer.lora_B[n].weight, layer.lora_A[n].weight, layer.scaling[n])
                                          for n in history], cfg.deal_project_energy)
                     for _name, layer in lora_layers(model, history[0])]
            new = task_adapter(task_index)
            model.add_adapter(new, self.lora_config())
            activate(model, [*history, new])  # PEFT turns requires_grad on for every active adapter
        for _name, layer in lora_layers(model, history[0]):
            for adapter in history:
                for which, linear in (("A", layer.lora_A[adapter]), ("B", layer.lora_B[adapter])):
                    linear.weight.requires_grad_(False)  # the history is frozen
                    if cfg.deal_update not in ("both", which):
                        continue
                    factor = self.new_factor(linear.weight, which)
                    factor.to(linear.weight.device)
                    attach(linear, "weight", factor)
                    self.factors.append(factor)
        if self.grow:
            for (_name, layer), basis in zip(lora_layers(model, history[0]), bases):
                linear = layer.lora_A[new]
                growth = OrthogonalGrowth(linear.weight, basis.to(linear.weight.device))
                with torch.no_grad():
                    linear.weight.copy_(growth.project_out(linear.weight.float()).to(linear.weight.dtype))
                growth.to(linear.weight.device)
                attach(linear, "weight", growth)
                self.growth.append(growth)
        set_drift_floors(self.factors)
        self._retention_start = [p.detach().clone().float() for f in self.factors for p in f.retention_parameters()]
        self._update_start = [p.detach().clone().float() for f in self.factors for p in f.update_parameters()]

    def new_factor(self, weight: torch.Tensor, which: str) -> DEALFactor:
        """The ``DEALFactor`` for one frozen LoRA weight (``which``: ``A`` for lora_A, ``B`` for lora_B) with this
        config's settings; also used by ``plan_trainable`` to count DEAL's parameters for a dry run."""
        cfg = self.cfg
        return DEALFactor(weight, transpose=(which == "A"), num_scales=cfg.deal_scales, hidden=cfg.deal_mlp_hidden,
                          activation=cfg.deal_activation, kernel=cfg.deal_kernel, layers=cfg.deal_layers,
                          retention_activation=cfg.deal_activation_retention, sigma_base=cfg.deal_sigma_base,
                          residual=cfg.deal_residual_update, project=cfg.deal_project_residual in ("both", which),
                          project_energy=cfg.deal_project_energy, drift_weighting=cfg.deal_drift_weighting)

    def deal_parameters(self) -> list[torch.nn.Parameter]:
        """All retention and update parameters of the current task (empty on task 0)."""
        return [p for f in self.factors for p in (*f.retention_parameters(), *f.update_parameters())]

    def residual_parameters(self) -> list[torch.nn.Parameter]:
        """The residuals R of ``deal_residual_update`` (empty when it is off or on task 0)."""
        return [p for f in self.factors for p in f.residual_parameters()]

    def growth_parameters(self, model: PeftModel) -> list[torch.nn.Parameter]:
        """The new adapter's trainable tensors with ``deal_grow_adapter``: the R of each ``OrthogonalGrowth``
        (r × d_in) and each ``lora_B`` (d_out × r); empty otherwise and on task 0."""
        if not self.growth:
            return []
        new = self.trained_adapter()
        return [*(g.residual for g in self.growth),
                *(layer.lora_B[new].weight for _n, layer in lora_layers(model, new))]

    def param_groups(self, model: PeftModel) -> list[dict]:
        """Task 0: LoRA at ``learning_rate`` (``lora``). Later tasks: θ1, θ2 at ``deal_learning_rate`` (``deal``),
        residuals at ``learning_rate`` (``residual``: they move factor entries directly, as LoRA's own parameters
        do), and with ``deal_grow_adapter`` the new adapter at ``learning_rate`` (``lora``)."""
        if self.task_index == 0:
            return super().param_groups(model)
        groups = [{"params": self.deal_parameters(), "lr": self.cfg.deal_learning_rate, "name": "deal"}]
        if self.residual_parameters():
            groups.append({"params": self.residual_parameters(), "lr": self.cfg.learning_rate, "name": "residual"})
        if self.growth:
            groups.append({"params": self.growth_parameters(model), "lr": self.cfg.learning_rate, "name": "lora"})
        return groups

    def regularisation(self) -> tuple[torch.Tensor, dict[str, float]]:
        """λ1 Σ||θ1 − θ1₀||_a + λ2 Σ||θ2 − θ2₀||_b (Eq. 12, or the raw ||θ|| form) + λ_drift Σ drift, or with split
        drift weights (``split_drift_weights``) λ_h Σ drift(X̂ − Y) + λ_r Σ drift(O − X̂) (docs/design.md 3.3)."""
        cfg = self.cfg
        theta1 = live([p for f in self.factors for p in f.retention_parameters()])  # gathered copies under ZeRO-3
        theta2 = live([p for f in self.factors for p in f.update_parameters()])
        raw = cfg.deal_reg_target == "raw"
        r1 = regulariser(theta1, None if raw else self._retention_start, cfg.deal_norm_retention, cfg.deal_reg_form)
        r2 = regulariser(theta2, None if raw else self._update_start, cfg.deal_norm_update, cfg.deal_reg_form)
        total = cfg.deal_lambda_retention * r1 + cfg.deal_lambda_update * r2
        logs = {"deal/reg_retention": float(r1.detach()), "deal/reg_update": float(r2.detach())}
        split = split_drift_weights(cfg)
        if split is None:
            if cfg.deal_lambda_drift > 0:
                drift = torch.stack([f.drift(live_named(f)) for f in self.factors]).sum()
                total = total + cfg.deal_lambda_drift * drift
                logs["deal/drift"] = float(drift.detach())
        elif split[0] > 0 or split[1] > 0:
            parts = [f.drift_parts(live_named(f)) for f in self.factors]
            history = torch.stack([h for h, _r in parts]).sum()
            residual = torch.stack([r for _h, r in parts]).sum()
            total = total + split[0] * history + split[1] * residual
            logs["deal/drift_history"] = float(history.detach())
            logs["deal/drift_residual"] = float(residual.detach())
        return total, logs

    @contextlib.contextmanager
    def forward_context(self, model):
        """``parametrize.cached()``: each DEAL factor (Oᵀ A or B O) is built once per micro batch instead of once per
        weight access. Not under ZeRO-3, where a factor's parameters are gathered only inside its module's forward
        and released after it, so a factor cached from one call must not outlive that call. Nor with gradient
        checkpointing: a checkpointed layer whose forward reused a cached factor saves fewer tensors than its
        recomputation (outside the context) that rebuilds it, and torch stops with "Recomputed values ... have
        different metadata" (CheckpointError, torch 2.x non-reentrant; tests/test_forward_context.py)."""
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if (not self.factors or checkpointing
                or any(is_zero3(p) for f in (*self.factors, *self.growth) for p in f.parameters())):
            yield
            return
        with parametrize.cached():
            yield

    def extra_loss(self, model, batch, outputs):
        if self.task_index == 0 or not self.factors:
            return None, {}
        return self.regularisation()

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """The start-of-task values of θ1 and θ2 (``retention_start/<i>``, ``update_start/<i>``) that the delta
        regulariser measures from; the parametrizations themselves (history buffers, θ1, θ2) are adapter-module
        entries of the model's state and are checkpointed with it."""
        state = {f"retention_start/{i}": t for i, t in enumerate(self._retention_start)}
        state.update({f"update_start/{i}": t for i, t in enumerate(self._update_start)})
        return state if self.factors else {}

    def load_task_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the start-of-task values (after ``before_task`` built the parametrizations).

        Raises:
            ValueError: the number or shapes of the saved tensors do not match this task's parameters.
        """
        ret = [state[f"retention_start/{i}"] for i in range(len(state)) if f"retention_start/{i}" in state]
        upd = [state[f"update_start/{i}"] for i in range(len(state)) if f"update_start/{i}" in state]
        if len(ret) + len(upd) != len(state) or [t.shape for t in ret] != [t.shape for t in self._retention_start] \
                or [t.shape for t in upd] != [t.shape for t in self._update_start]:
            raise ValueError("DEAL mid-task state does not match this task's retention/update parameters.")
        device = self.factors[0].history.device if self.factors else None
        self._retention_start = [t.float().to(device) for t in ret]
        self._update_start = [t.float().to(device) for t in upd]

    def save_adapter(self, model: PeftModel, path: str) -> None:
        """The ``default`` adapter as PEFT saves it; with ``deal_grow_adapter`` the concatenation of ``task_0 ..
        task_t``, one plain PEFT adapter of rank (t+1)·r (``adapters.save_concatenated``)."""
        if not self.grow:
            super().save_adapter(model, path)
            return
        save_concatenated(model, self.adapter_names(model), path)

    def load_adapter_weights(self, model: PeftModel, paths: list[str]) -> None:
        """As the base class; with ``deal_grow_adapter`` rebuild ``task_0 .. task_{k-1}`` from the concatenated
        adapter saved after task k (``adapters.load_concatenated``), all active and frozen.

        Raises:
            ValueError: with grow, the saved adapter's rank is not k · ``lora_rank``.
        """
        if not self.grow:
            super().load_adapter_weights(model, paths)
            return
        names = [task_adapter(i) for i in range(len(paths))]
        load_concatenated(model, paths[-1], names, self.cfg.lora_rank, self.lora_config())

    def after_task(self, model: PeftModel, task_index: int, train_batches=None) -> None:
        """Fold: A <- O_Aᵀ, B <- O_B in place (with grow also the new adapter's A <- A0 + R P⊥); the adapters are
        plain LoRA again (the history's stay frozen).

        The same as ``deal.fold`` on each weight, in two phases so that it also holds under ZeRO-3: every O is
        computed first (running a parametrization is a forward pass, after which ZeRO-3 may release the weight),
        then the parametrizations are removed and the values written (``model.sharding.writing``)."""
        if task_index == 0:
            return
        linears = [linear for _name, layer in lora_layers(model, self.trained_adapter())
                   for adapter in self.adapter_names(model)
                   for linear in (layer.lora_A[adapter], layer.lora_B[adapter])
                   if parametrize.is_parametrized(linear, "weight")]
        with torch.no_grad():
            folded = [linear.weight.detach().clone() for linear in linears]
            for linear in linears:
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            with writing([linear.weight for linear in linears]):
                for linear, value in zip(linears, folded):
                    linear.weight.copy_(value)
        self.factors, self.growth = [], []
