"""OSF: PEFT's Orthogonal Subspace Fine-tuning (Nayak et al. 2025, arXiv:2504.07097; ``peft.OSFConfig``).

Each target weight W (out x in, m = min(out, in)) is split by its SVD into a frozen "high" part, the top
``r_t`` singular directions, and a trainable "low" part ``U_low (out x k), S_low (k), V_low (k x in)``, k = m - r_t;
PEFT projects the gradients of ``U_low`` and ``V_low`` orthogonal to the frozen directions. So OSF trains a
full-rank residual subspace, not a rank-8 factor pair (README "Baselines" gives the counts).

Continual recipe (PEFT's ``examples/orthogonal_subspace_learning/osf_continual_learning.py``): task t of T
preserves a growing fraction ``osf_preserved_first + (osf_preserved_last - osf_preserved_first) * t / (T - 1)`` of
m (0.3, 0.5, 0.7 for three tasks), taken from the SVD of the weight *after* the earlier tasks: before task t > 0,
``before_task`` merges the adapter into the base weights (PEFT's ``merge``) and re-decomposes them at the new rank.

Saved adapters: ``adapters/<t+1>-<task>/`` is PEFT's own OSF format (``save_pretrained``), relative to the base
with the adapters of tasks 1..t merged in order. Stock PEFT rebuilds the model after task t as::

    for path in adapters[:-1]:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    model = PeftModel.from_pretrained(model, adapters[-1])

Profiles it refuses (``ConfigError``): a bitsandbytes 8-bit/4-bit base (no SVD or merge of packed weights) and
DeepSpeed ZeRO-3 (the SVD and the merge need whole weights; ZeRO-3 shards them).
"""

from __future__ import annotations

import os

import torch
from peft import OSFConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.osf.layer import OSFLayer
from safetensors.torch import load_file

from ..config import ConfigError, TrainConfig
from ..data.tasks import task_sequence
from ..model.loading import default_target_modules, peft_task_type
from ..model.sharding import is_zero3
from .base import ContinualMethod


def preserved_fraction(cfg: TrainConfig, task_index: int, num_tasks: int) -> float:
    """Fraction of each target matrix's smaller dimension preserved (frozen) on task ``task_index`` of
    ``num_tasks``: linear from ``osf_preserved_first`` (task 0) to ``osf_preserved_last`` (task T-1)."""
    if num_tasks <= 1:
        return cfg.osf_preserved_first
    step = (cfg.osf_preserved_last - cfg.osf_preserved_first) / (num_tasks - 1)
    return cfg.osf_preserved_first + step * min(task_index, num_tasks - 1)


def preserved_rank(fraction: float, min_dim: int) -> int:
    """PEFT's rank for a fractional ``effective_rank``: ``int(min_dim * fraction)`` clamped to [0, min_dim]
    (``OSFModel._create_and_replace``)."""
    return max(min(min_dim, int(min_dim * fraction)), 0)


def osf_layers(model: torch.nn.Module) -> list[tuple[str, OSFLayer]]:
    """(name, layer) of every OSF-wrapped linear layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OSFLayer)]


def _to_float32(model: torch.nn.Module) -> None:
    """Cast OSF's trainable factors and frozen SVD buffers to float32 in place (PEFT keeps the base weight's dtype;
    the loop requires float32 adapters, ``precision.check_trainable_float32``). Parameter objects are kept, so
    PEFT's projection hooks stay attached."""
    for _n, layer in osf_layers(model):
        for part in (layer.osf_svd_params, layer._osf_U_low_init, layer._osf_S_low_init, layer._osf_V_low_init,
                     layer._osf_U_high, layer._osf_V_high):
            part.float()


class OSF(ContinualMethod):
    """One OSF adapter ``default``; before each later task its update is merged and the preserved rank grows."""

    name = "osf"
    label = "OSF"
    config_prefix = "osf_"

    @classmethod
    def num_tasks(cls, cfg: TrainConfig) -> int:
        """T, the length of the run's task sequence (``task_sequence``)."""
        return len(task_sequence(cfg.benchmark, cfg.order, list(cfg.tasks) or None))

    @classmethod
    def plan_trainable(cls, lora_parameters: int, factor_shapes: list[tuple[tuple, tuple]],
                       cfg: TrainConfig) -> tuple[int, int]:
        """(trainable parameters on task 1, on task 2) for the dry run: per target matrix (out x in, m = min),
        ``k * (out + in + 1)`` with ``k = m - int(m * fraction_t)`` (U_low, S_low, V_low). Later tasks train fewer
        (the preserved rank grows); task 2's count is the largest of them."""
        t = cls.num_tasks(cfg)

        def count(task_index: int) -> int:
            fraction = preserved_fraction(cfg, task_index, t)
            total = 0
            for (_r, d_in), (d_out, _r2) in factor_shapes:
                m = min(d_in, d_out)
                k = m - preserved_rank(fraction, m)
                total += k * (d_out + d_in + 1)
            return total

        return count(0), count(1 if t > 1 else 0)

    def __init__(self, cfg: TrainConfig):
        """Raises:
            ConfigError: preserved fractions outside 0 < first <= last < 1, or a quantised base
                (``load_in_8bit`` / ``load_in_4bit``).
        """
        super().__init__(cfg)
        if not 0 < cfg.osf_preserved_first <= cfg.osf_preserved_last < 1:
            raise ConfigError(f"osf_preserved_first ({cfg.osf_preserved_first}) and osf_preserved_last "
                              f"({cfg.osf_preserved_last}) must satisfy 0 < first <= last < 1 (fractions of each "
                              f"matrix's smaller dimension kept frozen), e.g. 0.3 and 0.7.")
        for key in ("load_in_8bit", "load_in_4bit"):
            if getattr(cfg, key):
                raise ConfigError(f"method osf cannot run with {key} true: OSF takes the SVD of each target weight "
                                  f"and merges every task's update into it, which bitsandbytes' packed 8-bit/4-bit "
                                  f"weights do not allow. Set {key} false (model_dtype bfloat16 halves the base "
                                  f"weights' memory) or use a LoRA method such as seq_lora.")
        self.preserved_task = -1  # the task whose preserved rank the OSF layers hold

    def fraction(self, task_index: int) -> float:
        """The preserved fraction of task ``task_index`` in this run's sequence (``preserved_fraction``)."""
        return preserved_fraction(self.cfg, task_index, self.num_tasks(self.cfg))

    def osf_config(self, fraction: float, target_modules: list[str]) -> OSFConfig:
        """PEFT's OSF config preserving ``fraction`` of each target matrix's smaller dimension."""
        return OSFConfig(effective_rank=float(fraction), target_modules=list(target_modules), task_type=self.task_type)

    @staticmethod
    def _refuse_zero3(weights) -> None:
        """Raises ConfigError under DeepSpeed ZeRO-3 (detected from transformers' flag or a sharded weight)."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled() or any(is_zero3(w) for w in weights):
            raise ConfigError("method osf cannot run under DeepSpeed ZeRO-3: OSF takes the SVD of each whole target "
                              "weight and merges each task's update into it, but ZeRO-3 shards the weights. Use "
                              "accelerate_configs/deepspeed_zero2.yaml, DDP (multi_gpu_bf16.yaml, multi_cpu.yaml) or one "
                              "GPU.")

    def wrap(self, base_model: torch.nn.Module) -> PeftModel:
        """Wrap the frozen base with OSF on ``target_modules`` (empty: PEFT's LoRA defaults for the model type, so
        the budget compares with LoRA on the same layers), preserving task 0's fraction.

        Raises:
            ConfigError: DeepSpeed ZeRO-3; a model type without default target modules and none given.
        """
        self._refuse_zero3([p for p in base_model.parameters()])
        self.task_type = peft_task_type(base_model)
        targets = list(self.cfg.target_modules) or default_target_modules(base_model.config)
        model = get_peft_model(base_model, self.osf_config(self.fraction(0), targets))
        _to_float32(model)
        self.preserved_task = 0
        return model

    def grow(self, model: PeftModel, task_index: int) -> None:
        """Merge the current OSF update into every target's base weight (``W <- W + U_low S_low V_low -
        U_init S_init V_init``, PEFT's ``merge``) and re-decompose it preserving task ``task_index``'s fraction; the
        new factors are float32 and trainable.

        Raises:
            ConfigError: a base weight is sharded by ZeRO-3.
        """
        layers = osf_layers(model)
        self._refuse_zero3([layer.get_base_layer().weight for _n, layer in layers])
        fraction = self.fraction(task_index)
        config = model.peft_config["default"]
        config.effective_rank = float(fraction)
        for _n, layer in layers:
            layer.merge(adapter_names=["default"])
            layer.merged_adapters = []  # the base weight now holds the update; the layer is not "merged"
            layer._detach_hooks()
            m = min(layer.get_base_layer().weight.shape)
            layer.update_layer("default", preserved_rank(fraction, m), config=config)
        _to_float32(model)
        self.preserved_task = task_index

    def preserved_ranks(self, model: PeftModel) -> dict[str, int]:
        """Layer name -> preserved (frozen) rank r_t of the ``default`` adapter."""
        return {n: layer.effective_rank["default"] for n, layer in osf_layers(model)}

    def before_task(self, model: PeftModel, task_index: int, train_rows=None) -> None:
        """Grow the preserved rank to task ``task_index``'s (merging the earlier tasks' update) unless the layers
        already hold it (task 0, or a resumed task's re-entry)."""
        super().before_task(model, task_index, train_rows)
        if task_index != self.preserved_task:
            self.grow(model, task_index)

    def load_adapter_weights(self, model: PeftModel, paths: list[str]) -> None:
        """Rebuild the model after task k from the adapters of tasks 1..k: load adapter i into ``default``, and
        before each later one merge and grow (as training did).

        Raises:
            RuntimeError: an adapter has keys the model lacks.
        """
        for i, path in enumerate(paths):
            if i > 0:
                self.grow(model, i)
            state = load_file(os.path.join(path, "adapter_model.safetensors"))
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"Adapter {path} has keys the model lacks: {result.unexpected_keys[:5]}")
        _to_float32(model)
