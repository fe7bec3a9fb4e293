"""O-LoRA: orthogonal subspace learning for continual learning (Wang et al., EMNLP Findings 2023;
docs/design.md section 4; reference code github.com/cmnfriend/O-LoRA, ``uie_trainer_lora.py``).

Task t (0-based) trains a new rank-r PEFT LoRA adapter ``task_<t>`` while the adapters of tasks 0..t-1 stay
active in the forward pass and frozen. The loss adds

    lambda_orth * sum_{i<t} sum_layers sum_{j,k} |(A_i A_t^T)[j, k]|        (A: lora_A.weight, r × d_in)

so the new adapter's input subspace (the rows of A_t) is pushed orthogonal to the earlier ones, and optionally
``lambda_l2 * sum_{M in new adapter's LoRA matrices} ||M||_F`` (the reference code's L2 term: norms, not
squared). Evaluation uses all adapters together.

Output after task t: ONE plain PEFT adapter of rank (t+1)·r, PEFT's ``add_weighted_adapter(...,
combination_type="cat")`` of all adapters with weights 1. It is exact: ``cat`` stacks ``A_i · scaling_i``
(rows) and ``B_i`` (columns) and gives the result ``lora_alpha = r_cat`` (scaling 1), so
``B_cat A_cat x = sum_i scaling_i B_i A_i x``, the live model's LoRA output. After task 0 the single adapter
``task_0`` is saved as it is (``cat`` of one adapter falls back to PEFT's ``linear`` combination).
"""

from __future__ import annotations

import torch
from peft import PeftModel

from ..model.sharding import live
from .adapters import (activate, adapter_parameters, load_concatenated, lora_layers, save_concatenated,
                       task_adapter, task_adapter_names)
from .base import ContinualMethod, paper_row

class OLoRA(ContinualMethod):
    """O-LoRA with one new rank-r adapter per task. Config keys: ``o_lora_lambda_orth``, ``o_lora_lambda_l2``."""

    name = "o_lora"
    label = "O-LoRA"
    config_prefix = "o_lora_"
    paper_aa = paper_row(85.2, 71.2, 70.8, 86.4, 75.3, 73.2)

    def __init__(self, cfg):
        super().__init__(cfg)
        self._pairs: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (A_t, [A_i, i < t]) per LoRA layer

    def wrap(self, base_model: torch.nn.Module) -> PeftModel:
        return self.new_peft_model(base_model, adapter_name=task_adapter(0))

    @staticmethod
    def adapter_names(model: PeftModel) -> list[str]:
        """``task_0 .. task_{k-1}``: the task adapters the model holds, in task order."""
        return task_adapter_names(model)

    def trained_adapter(self) -> str:
        return task_adapter(self.task_index)

    def before_task(self, model: PeftModel, task_index: int, train_rows=None) -> None:
        """Add adapter ``task_<t>`` (t > 0), activate all adapters, and leave only the new one trainable.

        Raises:
            RuntimeError: after adding ``task_<t>`` the model does not hold exactly ``task_0 .. task_<t>``.
        """
        super().before_task(model, task_index, train_rows)
        new = task_adapter(task_index)
        if task_index > 0:
            model.add_adapter(new, self.lora_config())
        names = self.adapter_names(model)
        if names != [task_adapter(i) for i in range(task_index + 1)]:
            raise RuntimeError(f"O-LoRA before task {task_index}: the model holds adapters {names}.")
        activate(model, names)  # PEFT turns requires_grad on for every active adapter ...
        if len(names) > 1:
            model.set_requires_grad(names[:-1], requires_grad=False)  # ... so the earlier ones are frozen again
        self._pairs = [(layer.lora_A[new].weight, [layer.lora_A[old].weight for old in names[:-1]])
                       for _n, layer in lora_layers(model, new)]

    def orthogonality(self) -> torch.Tensor:
        """sum_{i<t} sum_layers sum |A_i A_t^T| (a float32 scalar; 0-dim, zero on task 0)."""
        flat = iter(live([t for a_new, olds in self._pairs for t in (a_new, *olds)]))  # gathered copies under ZeRO-3
        pairs = [(next(flat), [next(flat) for _ in olds]) for _a_new, olds in self._pairs]
        terms = [torch.mm(a_old, a_new.T).abs().sum() for a_new, olds in pairs for a_old in olds]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def extra_loss(self, model, batch, outputs):
        if self.task_index == 0:
            return None, {}
        cfg = self.cfg
        orth = self.orthogonality()
        total = cfg.o_lora_lambda_orth * orth
        logs = {"o_lora/orth_loss": float(orth.detach())}
        if cfg.o_lora_lambda_l2 > 0:
            new = live(p for _n, p in adapter_parameters(model, task_adapter(self.task_index)))
            l2 = torch.stack([p.norm() for p in new]).sum()
            total = total + cfg.o_lora_lambda_l2 * l2
            logs["o_lora/l2_loss"] = float(l2.detach())
        return total, logs

    def save_adapter(self, model: PeftModel, path: str) -> None:
        """Save the concatenation of all task adapters as one plain PEFT adapter of rank k·r
        (``adapters.save_concatenated``)."""
        save_concatenated(model, self.adapter_names(model), path)

    def load_adapter_weights(self, model: PeftModel, paths: list[str]) -> None:
        """Rebuild adapters ``task_0 .. task_{k-1}`` from the concatenated adapter saved after task k
        (``adapters.load_concatenated``); all end active and frozen.

        Raises:
            ValueError: the saved adapter's rank is not k · ``lora_rank``.
        """
        names = [task_adapter(i) for i in range(len(paths))]
        load_concatenated(model, paths[-1], names, self.cfg.lora_rank, self.lora_config())
