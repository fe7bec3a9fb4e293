"""PEFT adapter helpers shared by the methods: naming, finding LoRA layers, switching active adapters without
leaving gradients on, and saving one named adapter as a plain PEFT adapter."""

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
