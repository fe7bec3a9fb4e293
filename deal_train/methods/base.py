"""The interface every continual-learning method implements; the loop knows only this.

Lifecycle for a sequence of T tasks (task_index t = 0 .. T-1)::

    model = method.wrap(base_model)                 # once: add the PEFT adapter(s)
    for t, task in enumerate(tasks):
        method.before_task(model, t, train_rows)    # freeze / add modules / snapshot state
        groups = method.param_groups(model)         # what the optimizer trains, with learning rates
        ... loss = CE(answer tokens) + method.extra_loss(model, batch, outputs) ...
        method.after_task(model, t)                 # fold, estimate statistics, ...
        method.save_adapter(model, dir)             # a plain PEFT adapter after task t
        for i in range(t + 1):
            with method.eval_adapter(model, i): evaluate task i
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ..config import TrainConfig


class ContinualMethod:
    """Base class: one LoRA adapter named ``default`` trained on every task (that is SeqLoRA).

    Subclasses override the hooks they need. ``self.task_index`` is the index of the task being trained.
    """

    name = "base"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.task_index = -1

    # --- model ---------------------------------------------------------------------------------
    def lora_config(self) -> LoraConfig:
        """The PEFT LoRA config built from ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules``."""
        return LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=list(self.cfg.target_modules), task_type="CAUSAL_LM", bias="none")

    def wrap(self, base_model: torch.nn.Module) -> PeftModel:
        """Add the adapter to the frozen base model (called once, before task 0)."""
        return get_peft_model(base_model, self.lora_config())

    # --- per task ------------------------------------------------------------------------------
    def before_task(self, model: PeftModel, task_index: int, train_rows: list[dict] | None = None) -> None:
        """Prepare the model for training task ``task_index`` (0-based)."""
        self.task_index = task_index

    def param_groups(self, model: PeftModel) -> list[dict]:
        """Optimizer parameter groups: every parameter with ``requires_grad``, at ``learning_rate``."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.cfg.learning_rate}]

    def extra_loss(self, model: PeftModel, batch: dict, outputs) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A term added to the cross-entropy of each micro batch, and scalars to log. Default: none."""
        return None, {}

    def after_task(self, model: PeftModel, task_index: int) -> None:
        """Called after the last optimizer step of task ``task_index``."""

    # --- outputs -------------------------------------------------------------------------------
    def save_adapter(self, model: PeftModel, path: str) -> None:
        """Write a plain PEFT LoRA adapter (safetensors) that stock ``PeftModel.from_pretrained`` loads."""
        model.save_pretrained(path, safe_serialization=True)

    def load_adapter_weights(self, model: PeftModel, path: str) -> None:
        """Load the weights saved by ``save_adapter`` into the ``default`` adapter (used to resume a run).

        ``requires_grad`` flags are left as they are.
        """
        state = load_file(os.path.join(path, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"Adapter {path} has keys the model lacks: {result.unexpected_keys[:5]}")

    @contextlib.contextmanager
    def eval_adapter(self, model: PeftModel, task_index: int) -> Iterator[None]:
        """Context in which ``model`` evaluates task ``task_index``. Default: the current adapter."""
        yield
