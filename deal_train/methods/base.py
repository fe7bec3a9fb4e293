"""The interface every continual-learning method implements; the loop knows only this.

Lifecycle for a sequence of T tasks (task_index t = 0 .. T-1)::

    model = method.wrap(base_model)                 # once: add the PEFT adapter(s)
    for t, task in enumerate(tasks):
        extra = method.replay_rows(t, earlier)      # (task, rows) of earlier tasks to mix into task t's data
        method.before_task(model, t, train_rows)    # freeze / add modules / snapshot state
        groups = method.param_groups(model)         # what the optimizer trains, with learning rates
        ... loss = CE(answer tokens) + method.extra_loss(model, batch, outputs) ...
        method.after_task(model, t, train_batches)  # fold, estimate statistics, ...
        method.save_adapter(model, dir)             # a plain PEFT adapter after task t
        method.state_dict()                         # tensors a resumed run needs (saved next to the adapter)
        # step checkpoints inside a task also save the adapter modules and method.task_state_dict()
        for i in range(t + 1):
            with method.eval_adapter(model, i): evaluate task i

Resuming after task k: ``wrap`` -> ``load_adapter_weights(model, [dirs of tasks 1..k])`` -> ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ..config import TrainConfig
from ..data import Task
from ..model.loading import peft_task_type


PAPER_COLUMNS = ("T5 TC", "T5 standard", "T5 long", "LLaMA TC", "LLaMA standard", "LLaMA long")
"""The columns of the paper's Table 1 (backbone and benchmark; docs/design.md section 5)."""


def paper_row(*aa: float) -> dict[str, float]:
    """One method's row of the paper's Table 1, AA in % in ``PAPER_COLUMNS`` order."""
    return dict(zip(PAPER_COLUMNS, aa, strict=True))


class ContinualMethod:
    """Base class: one LoRA adapter named ``default`` trained on every task (that is SeqLoRA).

    Subclasses override the hooks they need. ``self.task_index`` is the index of the task being trained.
    """

    name = "base"
    """The ``method`` config value (the key of this class in ``methods.REGISTRY``)."""
    label = "base"
    """The name tables print (the paper's spelling, e.g. ``O-LoRA``)."""
    config_prefix = ""
    """Prefix of the config keys only this method reads (``deal_``); empty: none."""
    config_keys: tuple[str, ...] = ()
    """Further config keys only this method reads."""
    profiles: tuple[str, ...] = ()
    """Presets of this method's keys that ``compare`` accepts as ``<name>:<profile>``."""
    oracle = False
    """Not a continual learner (each task evaluated with its own adapter): shown as an upper reference, not ranked."""
    results_role = ""
    """``"proposed"``: the method the results page judges; ``"plain"``: the plain LoRA baseline set against it."""
    paper_aa: dict[str, float] | None = None
    """The paper's Table 1 AA (%) of this method per backbone and benchmark (docs/design.md section 5), if any."""
    shared_prefix_zero3 = True
    """Whether training may take the shared-prefix path (``model/prefix.py``) under ZeRO-3. False for a method whose
    trainable modules are ZeRO-3 leaf modules (their gradients are reduced in the module's backward hook, which the
    prefix and the suffix pass would each fire: DeepSpeed then reduces a parameter twice and asserts)."""
    memory_kind = "lora"
    """What ``estimate_memory`` counts for its later tasks: ``lora`` (one rank-r adapter) or ``deal``."""

    @classmethod
    def profile_config(cls, profile: str) -> dict:
        """The config values of preset ``profile`` (one of ``profiles``) for ``compare``'s ``<name>:<profile>``."""
        return {}

    @classmethod
    def plan_trainable(cls, lora_parameters: int, factor_shapes: list[tuple[tuple, tuple]],
                       cfg: TrainConfig) -> tuple[int, int]:
        """(trainable parameters on task 1, on each later task) for the dry run: one rank-r adapter's worth on
        every task by default (O-LoRA and PerTaskFT train a new adapter per task).

        Args:
            lora_parameters: parameters of one rank-r LoRA adapter.
            factor_shapes: ``(shape of lora_A.weight, shape of lora_B.weight)`` per LoRA layer.
        """
        return lora_parameters, lora_parameters

    @classmethod
    def plan_train_rows(cls, train_rows: list[int], task_index: int, cfg: TrainConfig) -> int:
        """Rows trained on in task ``task_index`` for the dry run, given every task's own training rows
        (default: the task's own)."""
        return train_rows[task_index]

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.task_index = -1
        self.task_type = "CAUSAL_LM"  # PEFT task type; set from the base model by ``new_peft_model``

    # --- model ---------------------------------------------------------------------------------
    def lora_config(self) -> LoraConfig:
        """The PEFT LoRA config built from ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules``
        (empty: PEFT's default modules for the model type) and the base model's task type."""
        return LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=list(self.cfg.target_modules) or None, task_type=self.task_type,
                          bias="none")

    def new_peft_model(self, base_model: torch.nn.Module, adapter_name: str = "default") -> PeftModel:
        """``get_peft_model`` with this method's LoRA config, after taking the PEFT task type from the base model
        (``SEQ_2_SEQ_LM`` for encoder-decoder models, ``CAUSAL_LM`` otherwise)."""
        self.task_type = peft_task_type(base_model)
        return get_peft_model(base_model, self.lora_config(), adapter_name=adapter_name)

    def wrap(self, base_model: torch.nn.Module) -> PeftModel:
        """Add the adapter to the frozen base model (called once, before task 0)."""
        return self.new_peft_model(base_model)

    # --- per task ------------------------------------------------------------------------------
    def replay_rows(self, task_index: int, earlier: list[tuple[Task, list[dict]]]) -> list[tuple[Task, list[dict]]]:
        """Rows of earlier tasks to train on together with task ``task_index``'s own rows. Default: none.

        Args:
            earlier: (task, training rows) of tasks 0 .. task_index-1, in order.
        Returns:
            (task, rows) pairs; the loop tokenises each with its own task's prompt.
        """
        return []

    def before_task(self, model: PeftModel, task_index: int, train_rows: list[dict] | None = None) -> None:
        """Prepare the model for training task ``task_index`` (0-based)."""
        self.task_index = task_index

    def trained_adapter(self) -> str:
        """The PEFT adapter whose LoRA factors the current task trains (its movement is logged). Default: ``default``."""
        return "default"

    def param_groups(self, model: PeftModel) -> list[dict]:
        """Optimizer parameter groups (``params``, ``lr``, and a ``name`` for the logged learning rate): every
        parameter with ``requires_grad``, at ``learning_rate``, named ``lora``."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.cfg.learning_rate, "name": "lora"}]

    def extra_loss(self, model: PeftModel, batch: dict, outputs) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A term added to the cross-entropy of each micro batch, and scalars to log. Default: none."""
        return None, {}

    @contextlib.contextmanager
    def forward_context(self, model: PeftModel) -> Iterator[None]:
        """Context the loop holds around one micro batch's forward pass(es) and ``extra_loss``, never around its
        backward pass (a gradient-checkpointing recomputation runs outside it and rebuilds what it needs). A method
        whose weights are computed (parametrizations) caches them here so that every access within one micro
        batch, including a second model call of the same batch, builds them once. Default: nothing."""
        yield

    def after_task(self, model: PeftModel, task_index: int, train_batches: Iterable[dict] | None = None) -> None:
        """Called after the last optimizer step of task ``task_index``.

        Args:
            train_batches: the finished task's own training rows (no replay rows) as collated micro batches
                (``collate_train``; CPU tensors, a fixed order), for methods that estimate statistics on them.
        """

    # --- outputs -------------------------------------------------------------------------------
    def save_adapter(self, model: PeftModel, path: str) -> None:
        """Write a plain PEFT LoRA adapter (safetensors) that stock ``PeftModel.from_pretrained`` loads."""
        model.save_pretrained(path, safe_serialization=True)

    def load_adapter_weights(self, model: PeftModel, paths: list[str]) -> None:
        """Restore the model as it was after task k from the adapters saved after tasks 1..k (used to resume).

        The base class loads the last one into the ``default`` adapter; ``requires_grad`` flags are left as
        they are.

        Raises:
            RuntimeError: the adapter has keys the model lacks.
        """
        state = load_file(os.path.join(paths[-1], "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"Adapter {paths[-1]} has keys the model lacks: {result.unexpected_keys[:5]}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors besides the adapter that a run resumed after the current task needs. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (after ``load_adapter_weights``).

        Raises:
            ValueError: ``state`` is not empty (this method keeps no state).
        """
        if state:
            raise ValueError(f"Method {self.name} keeps no state but got keys {sorted(state)[:5]}.")

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors besides the model's adapter modules that a run resumed in the middle of the current task needs
        (saved in step checkpoints, restored with ``load_task_state_dict`` after ``before_task``). Default: none."""
        return {}

    def load_task_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``task_state_dict`` returned.

        Raises:
            ValueError: ``state`` is not empty (this method keeps no mid-task state).
        """
        if state:
            raise ValueError(f"Method {self.name} keeps no mid-task state but got keys {sorted(state)[:5]}.")

    @contextlib.contextmanager
    def eval_adapter(self, model: PeftModel, task_index: int) -> Iterator[None]:
        """Context in which ``model`` evaluates task ``task_index``. Default: the current adapter."""
        yield
