"""PerTaskFT, the oracle baseline (docs/design.md section 4): a fresh LoRA adapter per task, and task i is
evaluated with adapter i. It is told the task identity at test time, so it cannot forget; it bounds what a
continual method can reach with the same adapter size.

Adapter ``task_<t>`` is added before task t (t > 0) and is the only active and trainable one while t trains;
the earlier adapters stay in the model, inactive and frozen. After task t, adapter t is saved as a plain PEFT
adapter (``adapters/<t+1>-<task>/``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft import PeftModel

from .adapters import activate, kept_adapter_state, load_named_adapter, save_named_adapter, task_adapter
from .base import ContinualMethod, paper_row


class PerTaskFT(ContinualMethod):
    """One adapter per task; ``eval_adapter(model, i)`` switches to adapter i."""

    name = "per_task"
    label = "PerTaskFT"
    oracle = True
    paper_aa = paper_row(90.3, 70.0, 76.5, 88.2, 77.5, 77.1)

    def wrap(self, base_model: torch.nn.Module) -> PeftModel:
        return self.new_peft_model(base_model, adapter_name=task_adapter(0))

    def trained_adapter(self) -> str:
        return task_adapter(self.task_index)

    def before_task(self, model: PeftModel, task_index: int, train_rows=None) -> None:
        """Add adapter ``task_<t>`` (t > 0) and make it the only active, trainable one."""
        super().before_task(model, task_index, train_rows)
        name = task_adapter(task_index)
        if name not in model.peft_config:
            model.add_adapter(name, self.lora_config())
        activate(model, [name])  # PEFT's set_adapter: requires_grad on for it, off for every other adapter

    def save_adapter(self, model: PeftModel, path: str) -> None:
        """Write adapter ``task_<t>`` of the task just trained as a plain PEFT adapter."""
        save_named_adapter(model, task_adapter(self.task_index), path)

    def load_adapter_weights(self, model: PeftModel, paths: list[str]) -> None:
        """Load the adapter saved after task i into ``task_<i>`` for i = 0..k-1 (PEFT ``load_adapter``; new
        adapters come in frozen) and leave ``task_<k-1>`` active, every adapter frozen."""
        for i, path in enumerate(paths):
            load_named_adapter(model, path, task_adapter(i))
        activate(model, [task_adapter(len(paths) - 1)])
        model.set_requires_grad([task_adapter(i) for i in range(len(paths))], requires_grad=False)

    @contextlib.contextmanager
    def eval_adapter(self, model: PeftModel, task_index: int) -> Iterator[None]:
        """Adapter ``task_<i>`` alone is active inside, with no adapter requiring gradients; the active adapter
        and ``requires_grad`` flags are restored on exit.

        Raises:
            KeyError: task ``task_index`` has no adapter (it has not been trained yet).
        """
        name = task_adapter(task_index)
        if name not in model.peft_config:
            raise KeyError(f"per_task: no adapter for task {task_index} yet.")
        with kept_adapter_state(model):
            activate(model, [name], inference_mode=True)
            yield
