"""PEFT adapter helpers shared by the methods: naming, finding LoRA layers, switching active adapters without
leaving gradients on, saving one named adapter as a plain PEFT adapter, and saving several task adapters as one
concatenated adapter (O-LoRA, DEAL with ``deal_grow_adapter``) and rebuilding them from it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


def task_adapter(task_index: int) -> str:
    """The PEFT adapter name of task ``task_index`` (0-based) for methods with one adapter per task: ``task_<t>``."""
    return f"task_{task_index}"


def task_adapter_names(model: PeftModel) -> list[str]:
    """``task_0 .. task_{k-1}``: the per-task adapters the model holds, in task order (up to the first gap)."""
    names = []
    while task_adapter(len(names)) in model.peft_config:
        names.append(task_adapter(len(names)))
    return names


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> list[tuple[str, LoraLayer]]:
    """(name, layer) for every PEFT LoRA layer that holds ``adapter``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every LoRA matrix (``lora_A`` / ``lora_B``) of ``adapter``."""
    return [(n, p) for n, p in model.named_parameters()
            if (f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n)]


def activate(model: PeftModel, adapters: list[str], inference_mode: bool = False) -> None:
    """Make exactly ``adapters`` the active adapter(s) with PEFT's ``set_adapter``, which also turns their
    ``requires_grad`` on (off with ``inference_mode``) and every other adapter's off. One name goes through
    ``PeftModel.set_adapter`` so that ``model.active_adapter`` follows; several through
    ``model.base_model.set_adapter``, which takes a list."""
    if len(adapters) == 1:
        model.set_adapter(adapters[0], inference_mode=inference_mode)
    else:
        model.base_model.set_adapter(list(adapters), inference_mode=inference_mode)


@contextlib.contextmanager
def kept_adapter_state(model: PeftModel) -> Iterator[None]:
    """Restore the active adapter(s) and every parameter's ``requires_grad`` on exit.

    PEFT's ``set_adapter`` turns ``requires_grad`` on for the adapters it activates; code that switches adapters
    temporarily (evaluation, a teacher forward, merging for a save) runs inside this context.
    """
    active = list(model.active_adapters)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        activate(model, active)
        for p, flag in flags:
            p.requires_grad_(flag)


def save_named_adapter(model: PeftModel, adapter: str, path: str) -> None:
    """Write adapter ``adapter`` as a plain PEFT LoRA adapter directly under ``path``.

    ``save_pretrained`` puts an adapter not named ``default`` in ``path/<adapter>/``; its files are moved up so
    that stock ``PeftModel.from_pretrained(base, path)`` loads it. ``path`` is created if missing.
    """
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=path)
    try:
        model.save_pretrained(tmp, selected_adapters=[adapter], safe_serialization=True)
        src = tmp if adapter == "default" else os.path.join(tmp, adapter)
        for name in os.listdir(src):
            if os.path.isfile(os.path.join(src, name)):
                os.replace(os.path.join(src, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_named_adapter(model: PeftModel, path: str, adapter: str) -> None:
    """Load the plain PEFT adapter saved in ``path`` into ``adapter`` with ``PeftModel.load_adapter`` (a new
    adapter comes in inactive and frozen; an existing one keeps its flags). Leaves the model in eval mode.

    Raises:
        RuntimeError: the saved adapter lacks weights of ``adapter`` or has weights the model lacks.
    """
    result = model.load_adapter(path, adapter_name=adapter)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"Adapter {path} does not fit adapter '{adapter}': missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}.")


CAT_ADAPTER = "cat_adapters"
"""Name of the temporary concatenated adapter built by ``save_concatenated`` (and while ``load_concatenated`` runs)."""


def save_concatenated(model: PeftModel, names: list[str], path: str) -> None:
    """Save adapters ``names`` (each of rank r) as ONE plain PEFT adapter of rank len(names)·r under ``path``.

    PEFT's ``add_weighted_adapter(names, [1]*k, combination_type="cat")`` stacks the rows ``A_i · scaling_i`` and the
    columns ``B_i`` and gives the result ``lora_alpha = r_cat`` (scaling 1), so ``B_cat A_cat x = Σ_i scaling_i B_i
    A_i x``: exactly the live model's LoRA output with all of them active. One adapter is saved as it is (``cat`` of
    one adapter falls back to PEFT's ``linear`` combination). The temporary adapter is deleted again; active
    adapters and ``requires_grad`` are unchanged. PEFT creates the ``cat`` adapter in the base layers' dtype, which
    on a bfloat16/float16 base would round ``A_i · scaling_i`` to 16 bits, so such a ``cat`` is recomputed in float32
    from the float32 task adapters with the same formula.
    """
    if len(names) == 1:
        save_named_adapter(model, names[0], path)
        return
    with kept_adapter_state(model):
        model.base_model.add_weighted_adapter(names, [1.0] * len(names), CAT_ADAPTER, combination_type="cat")
        try:
            with torch.no_grad():
                for _n, layer in lora_layers(model, CAT_ADAPTER):
                    a_cat, b_cat = layer.lora_A[CAT_ADAPTER].weight, layer.lora_B[CAT_ADAPTER].weight
                    if a_cat.dtype == torch.float32 and b_cat.dtype == torch.float32:
                        continue
                    a_cat.data = torch.cat([layer.lora_A[n].weight * layer.scaling[n] for n in names], dim=0).float()
                    b_cat.data = torch.cat([layer.lora_B[n].weight for n in names], dim=1).float()
            save_named_adapter(model, CAT_ADAPTER, path)
        finally:
            model.delete_adapter(CAT_ADAPTER)


def load_concatenated(model: PeftModel, path: str, names: list[str], rank: int, lora_config) -> None:
    """Rebuild adapters ``names`` (the first may exist already, as the one the model was wrapped with; the others are
    added with ``lora_config``) from the concatenated adapter ``save_concatenated`` wrote to ``path``.

    Block i of the saved adapter holds ``A_i · scaling_i / scaling_cat`` and ``B_i``; dividing the scale back out is
    exact when ``lora_alpha / r`` is a power of two (the default 32 / 8 = 4) and otherwise within one float rounding.
    All adapters end active and frozen.

    Raises:
        ValueError: the saved adapter's rank is not len(names) · ``rank``.
    """
    k = len(names)
    load_named_adapter(model, path, CAT_ADAPTER)  # inactive and frozen
    try:
        if model.peft_config[CAT_ADAPTER].r != k * rank:
            raise ValueError(f"{path} has rank {model.peft_config[CAT_ADAPTER].r}, expected {k} tasks × rank {rank}.")
        for name in names:
            if name not in model.peft_config:
                model.add_adapter(name, lora_config)
        with torch.no_grad():
            for _n, layer in lora_layers(model, CAT_ADAPTER):
                a_cat, b_cat = layer.lora_A[CAT_ADAPTER].weight, layer.lora_B[CAT_ADAPTER].weight
                for i, name in enumerate(names):
                    ratio = layer.scaling[CAT_ADAPTER] / layer.scaling[name]
                    layer.lora_A[name].weight.copy_(a_cat[i * rank:(i + 1) * rank] * ratio)
                    layer.lora_B[name].weight.copy_(b_cat[:, i * rank:(i + 1) * rank])
    finally:
        model.delete_adapter(CAT_ADAPTER)
    activate(model, names)
    model.set_requires_grad(names, requires_grad=False)
