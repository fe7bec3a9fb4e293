"""Memory savings for the frozen base model and the optimizer, and the rule that trainable tensors stay float32.

* ``model_dtype``: the base model's weight dtype (float32, bfloat16, float16).
* ``load_in_8bit`` / ``load_in_4bit``: the base model's linear layers as bitsandbytes LLM.int8 (Dettmers et al.
  2022) or NF4 with double quantisation (QLoRA, Dettmers et al. 2023) weights, loaded by transformers'
  ``BitsAndBytesConfig`` and prepared with PEFT's ``prepare_model_for_kbit_training`` (the base frozen, its
  remaining fp16/bf16 tensors upcast to float32).
* ``gradient_checkpointing``: transformers' activation checkpointing of every decoder layer with torch's
  non-reentrant ``torch.utils.checkpoint``. Non-reentrant because (1) it records the recomputed graph itself, so
  gradients reach the LoRA and DEAL parameters inside a layer even when nothing entering the layer requires a
  gradient (the frozen embeddings' output does not); (2) it works with DDP's gradient hooks and with parameters
  computed inside the layer, as DEAL's ``torch.nn.utils.parametrize`` weights are (the parametrization is simply
  run again in the recomputation); (3) PyTorch recommends it and plans to make it the default. The input-grad
  hook that PEFT needs with reentrant checkpointing (``enable_input_require_grads``: the embedding output
  requires a gradient) is registered as well, so a model whose own code checkpoints reentrantly still trains.
  Under DeepSpeed ZeRO-3 the reentrant variant is used instead (see ``enable_gradient_checkpointing``).
* ``optim: adamw_8bit``: bitsandbytes' ``AdamW8bit`` (block-wise 8-bit moments for tensors of at least 4096
  elements, 32-bit below that).
* Trainable tensors (LoRA, DEAL, any adapter) are float32 whatever the base is: PEFT upcasts fp16/bf16 adapters
  when it creates or loads them (``autocast_adapter_dtype``) and DEAL builds its modules in float32;
  ``check_trainable_float32`` checks it before every task.

bitsandbytes is an optional extra (``pip install -e .[bnb]``). On a machine without CUDA it logs warnings about
missing GPU kernels when imported (PEFT imports it whenever it is installed); ``quiet_bitsandbytes`` keeps those
off the console.
"""

from __future__ import annotations

import logging
import os

import torch

from ..config import ConfigError, TrainConfig
from ..outputs import atomic_write_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``model_dtype`` config values -> torch dtypes."""

BNB_EXTRA = "pip install -e '.[bnb]' (bitsandbytes>=0.45)"


def quiet_bitsandbytes() -> None:
    """Raise the ``bitsandbytes`` and ``kernels`` loggers (``deal_train.QUIET_LOGGERS``) to ERROR, before anything
    imports bitsandbytes: its CPU-only warnings (missing CUDA library, missing ``kernels`` package, the Hub trust
    check of its kernels in offline mode) are not the user's problem. Errors still show."""
    from .. import QUIET_LOGGERS

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    """The torch dtype named by ``cfg.model_dtype``."""
    return DTYPES[cfg.model_dtype]


def require_bitsandbytes(option: str):
    """Import bitsandbytes for ``option`` (a config key, for the message).

    Raises:
        ConfigError: bitsandbytes is not installed; says how to install it.
    """
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"{option} needs bitsandbytes: {BNB_EXTRA}.") from None
    return bitsandbytes


def quantization_config(cfg: TrainConfig):
    """transformers' ``BitsAndBytesConfig`` for ``load_in_8bit`` / ``load_in_4bit`` (NF4, double quantisation,
    compute dtype = ``model_dtype``), or None for an unquantised base.

    Raises:
        ConfigError: bitsandbytes is not installed.
    """
    if not (cfg.load_in_8bit or cfg.load_in_4bit):
        return None
    require_bitsandbytes("load_in_8bit" if cfg.load_in_8bit else "load_in_4bit")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=model_dtype(cfg))


def _pretrained_dir(name: str, tokenizer) -> str:
    """A directory ``from_pretrained`` can read for ``name``; the tiny random models are written once to the cache
    (``$DEAL_TRAIN_CACHE/<alias>``) since quantisation happens while transformers loads weights."""
    from . import loading

    if name not in (loading.TINY_LLAMA_ALIAS, loading.TINY_T5_ALIAS):
        return loading.resolve_model_path(name)
    target = os.path.join(loading.cache_dir(), name)
    if not os.path.isfile(os.path.join(target, "config.json")):
        model = loading.load_model(name, tokenizer)

        def save(tmp: str) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_write_dir(target, save, keep_existing=True)
    return target


def load_base_model(cfg: TrainConfig, tokenizer, device: torch.device, reentrant_checkpointing: bool = False):
    """The frozen base model as configured: ``model_dtype`` weights, optionally bitsandbytes-quantised, with
    gradient checkpointing when ``cfg.gradient_checkpointing``; in eval mode.

    Args:
        device: where a quantised model is loaded (bitsandbytes quantises while loading onto it); an unquantised
            model is returned on the CPU and moved by the caller.
        reentrant_checkpointing: use reentrant checkpointing (needed under DeepSpeed ZeRO-3, see
            ``enable_gradient_checkpointing``).
    Raises:
        ConfigError: the model cannot be loaded, or quantisation is asked for without bitsandbytes.
    """
    from . import loading

    dtype = model_dtype(cfg)
    quant = quantization_config(cfg)
    if quant is None:
        model = loading.load_model(cfg.model, tokenizer, dtype, trust_remote_code=cfg.trust_remote_code,
                                  allow_pickle=cfg.allow_pickle_weights)
    else:
        from peft import prepare_model_for_kbit_training

        model = loading.load_pretrained(cfg.model, _pretrained_dir(cfg.model, tokenizer), tokenizer, dtype,
                                       cfg.trust_remote_code, cfg.allow_pickle_weights, quantization_config=quant,
                                       device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if cfg.load_in_4bit and torch.device(device).type == "cpu":
            keep_4bit_trainable_on_cpu(model)
        model.eval()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, reentrant=reentrant_checkpointing)
    return model


def keep_4bit_trainable_on_cpu(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, ``bnb.nn.Linear4bit`` (bitsandbytes 0.50) repacks its weight for a faster inference
    kernel on the first forward pass in eval mode without gradients, and keeps it repacked; later training forward
    passes then return outputs without a gradient path, so every LoRA gradient is None (measured on the tiny model:
    an evaluation after task 1 left task 2 untrainable). The instance flag ``support_avx512bf16_for_cpu`` gates the
    repacking; with it off, CPU inference uses the same (slower) kernel as training.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model, reentrant: bool = False) -> None:
    """Turn on activation checkpointing for every decoder layer of a transformers model (active in train mode
    only), non-reentrant unless ``reentrant``, and register the input-grad hook (see the module docstring).

    ``reentrant`` is for DeepSpeed ZeRO-3: transformers checkpoints a layer's ``forward`` (not its ``__call__``),
    and in torch's non-reentrant recomputation ZeRO-3 has released the layer's parameters (torch then stops with
    "Recomputed values ... have different metadata"; measured with DeepSpeed 0.19.8). The reentrant variant runs
    the recomputation as a forward pass in which ZeRO-3's hooks gather them again; with the input-grad hook its
    gradients reach the LoRA and DEAL parameters (equal within 1e-5 to no checkpointing, measured on the tiny model).

    Raises:
        ConfigError: the architecture does not support gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; set it to false.")
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()
    model.config.use_cache = False


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer of one task over ``groups`` (each with its own ``lr``): ``torch.optim.AdamW`` or
    bitsandbytes' ``AdamW8bit`` (``optim``), both with ``weight_decay``, betas (0.9, 0.999), eps 1e-8.

    Raises:
        ConfigError: ``optim: adamw_8bit`` without bitsandbytes.
    """
    if cfg.optim == "adamw_8bit":
        bnb = require_bitsandbytes("optim: adamw_8bit")
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def nonfinite_adapter_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the adapter tensors (``adapter_parameters``) holding a NaN or inf; [] when all are finite.
    One host synchronisation per call (meant for the end of a task, not every step)."""
    named = adapter_parameters(model)
    if not named:
        return []
    flags = torch.stack([torch.isfinite(p.detach()).all() for _n, p in named]).cpu().tolist()
    return [n for (n, _p), ok in zip(named, flags) if not ok]


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every adapter tensor: each parameter of a PEFT tuner layer outside its
    ``base_layer`` (LoRA matrices of every adapter, DEAL's parametrization modules under them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, seen = [], set()
    for mname, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer.") and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{mname}.{pname}", p))
    return out


def low_precision_trainables(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters and adapter tensors (parameters and DEAL buffers) that are not float32."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    names += [n for n, p in adapter_parameters(model) if not p.requires_grad and p.dtype != torch.float32]
    from peft.tuners.tuners_utils import BaseTunerLayer

    for mname, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names += [f"{mname}.{b}" for b, t in module.named_buffers()
                      if not b.startswith("base_layer.") and t.is_floating_point() and t.dtype != torch.float32]
    return sorted(set(names))


def check_trainable_float32(model: torch.nn.Module) -> None:
    """Every trainable parameter and adapter tensor must be float32 (mixed precision computes in fp16/bf16 under
    autocast but keeps these in float32; an fp16 adapter would also break fp16 loss scaling).

    Raises:
        RuntimeError: naming up to five offending tensors.
    """
    bad = low_precision_trainables(model)
    if bad:
        raise RuntimeError(f"{len(bad)} trainable/adapter tensors are not float32, e.g. {bad[:5]}.")
