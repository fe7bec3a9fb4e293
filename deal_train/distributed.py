"""The continual loop under Accelerate's launch profiles (``accelerate_configs/``): one process, DDP, and DeepSpeed
ZeRO-2 / ZeRO-2 with optimizer offload / ZeRO-3.

What lives here, and why:

* ``check_profile``: the option combinations a profile cannot run, refused before anything loads
  (``ConfigError``), each with the reason.
* ``configure_deepspeed``: DeepSpeed config values that depend on the run, filled before each ``prepare``:
  ``gradient_clipping`` from ``max_grad_norm`` (Accelerate would fill "auto" with 1.0); mixed precision through
  DeepSpeed's ``torch_autocast`` mode instead of its ``fp16``/``bf16`` modes, because those cast every parameter
  and buffer of the model to 16 bits, DEAL's history factor and its SVD included, and deal_train keeps every
  trainable and adapter tensor in float32 (as Accelerate's autocast does without DeepSpeed); and, under ZeRO-3,
  ``stage3_param_persistence_threshold`` at least the size of the largest adapter tensor.
* ZeRO-3 shards parameters and gathers a module's parameters only for the module's own forward and backward
  passes. The methods also use adapter tensors outside those passes (DEAL's history, regularisers and fold,
  O-LoRA's orthogonality term, EWC's penalty and anchor, LwF's teacher copy, the adapter saves), so:
  every adapter tensor is *persistent* (``stage3_param_persistence_threshold``: whole on every rank; with
  ``"auto"`` the threshold is raised to cover them, a fixed value that is too small is refused), which costs each
  rank only the adapters' size while the frozen base model, where the memory is, stays sharded;
  ``gather`` makes them whole again where ZeRO-3 has released them (it releases even persistent parameters
  while it records the module order of a new kind of forward pass, e.g. the first step or a generation);
  ``live`` hands loss terms gathered copies whose gradients flow to the parameters (a copy, because ZeRO-3 may
  release the parameter itself before the backward pass); ``writing`` writes a change made outside the optimizer
  (DEAL's fold, LwF's teacher copy) into the partitions, which the next engine would otherwise re-gather with
  the old values; and DEAL's ``DEALFactor`` is a ZeRO-3 leaf module (all its parameters are gathered when the
  parametrization runs, including the kernels' gains and centres that it reads without calling a submodule).
  DEAL's history factors and their SVD are buffers, which ZeRO never partitions.
* ``keeps_engine``: under ZeRO-3 the engine's hooks gather the sharded base weights for every forward pass, so the
  engine of a task lives on through evaluation and is destroyed when the next task prepares its own.

DeepSpeed on a machine without GPUs (tests, laptops): set ``DS_ACCELERATOR=cpu`` (DeepSpeed falls back to it with
a warning otherwise). It runs at world size 1 only: Accelerate (1.15) gives a DeepSpeed run without CUDA no
distributed backend and reports one process on every rank, so several CPU processes would each train alone;
``check_profile`` refuses that. The first DeepSpeed run on CPU compiles DeepSpeed's shared-memory
communication op (about 1-2 minutes, cached under ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from accelerate.utils import DistributedType

from .config import ConfigError, TrainConfig


def deepspeed_plugin(accelerator):
    """The active ``DeepSpeedPlugin``, or None when the run does not use DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage (0-3), or -1 when the run does not use DeepSpeed."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return -1
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def keeps_engine(accelerator) -> bool:
    """True under ZeRO-3: the model can only run forward passes while its engine's hooks gather the shards."""
    return zero_stage(accelerator) == 3


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def check_profile(cfg: TrainConfig, accelerator) -> None:
    """Refuse the option combinations the launch profile cannot run.

    Raises:
        ConfigError: FSDP (not supported: ZeRO-3 is the sharding profile); DeepSpeed with several processes but
            no GPUs; a DeepSpeed config with its own optimizer or scheduler; under ZeRO-3 a bitsandbytes-quantised
            base or ``eval_zero_shot``. Each message says why and what to use instead.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("FSDP is not supported: its flat parameters hide the LoRA factors that DEAL re-parametrizes "
                          "and the methods read. Shard a large base model with accelerate_configs/deepspeed_zero3.yaml.")
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if _world_size() != accelerator.num_processes:
        raise ConfigError(f"DeepSpeed runs {_world_size()} processes, but Accelerate sees {accelerator.num_processes} "
                          f"(it gives DeepSpeed without GPUs no distributed backend, so every process would train "
                          f"alone). On CPUs use accelerate_configs/multi_cpu.yaml (DDP) or --num_processes 1.")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"The DeepSpeed config has a '{key}' section; deal_train builds its own optimizer "
                              f"(optim, per-group learning rates, constant schedule). Remove the section.")
    stage = zero_stage(accelerator)
    if stage == 3 and (cfg.load_in_8bit or cfg.load_in_4bit):
        raise ConfigError("load_in_8bit/load_in_4bit cannot run under ZeRO-3: ZeRO-3 shards parameters by flattening "
                          "them, which bitsandbytes' packed 8-bit/4-bit weights do not survive. Use a quantised base "
                          "on one GPU (a100_fp16.yaml) or DDP, or ZeRO-3 with model_dtype bfloat16.")
    if stage == 3 and cfg.eval_zero_shot:
        raise ConfigError("eval_zero_shot needs the whole base model on one device before training, but under ZeRO-3 "
                          "it is sharded only when the first task starts. Set eval_zero_shot false, and evaluate the "
                          "base model with a one-GPU or DDP profile if you need the zero-shot row.")


def adapter_tensor_sizes(model: torch.nn.Module) -> int:
    """Elements of the largest adapter tensor (LoRA matrices of every adapter, DEAL's modules); 0 if none."""
    from .precision import adapter_parameters

    return max((getattr(p, "ds_numel", p.numel()) for _n, p in adapter_parameters(model)), default=0)


def configure_deepspeed(accelerator, cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Fill the run-dependent DeepSpeed config values before ``accelerator.prepare`` (a no-op without DeepSpeed).

    * ``gradient_clipping``: ``"auto"`` -> ``max_grad_norm`` (0 = none).
    * mixed precision (the Accelerate config's ``mixed_precision`` or ``fp16``/``bf16`` enabled in the JSON):
      ``torch_autocast`` with that dtype; ``fp16`` and ``bf16`` disabled (see the module docstring).
    * ZeRO-3: ``stage3_param_persistence_threshold`` ``"auto"`` -> max(10 x hidden size (Accelerate's rule), the
      largest adapter tensor).

    Raises:
        ConfigError: under ZeRO-3, a fixed persistence threshold below the largest adapter tensor.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(cfg.max_grad_norm)
    enabled = {key: str(ds.get(key, {}).get("enabled", False)).lower() == "true" for key in ("fp16", "bf16")}
    precision = accelerator.mixed_precision
    if precision not in ("fp16", "bf16"):
        precision = "fp16" if enabled["fp16"] else "bf16" if enabled["bf16"] else "no"
    if precision in ("fp16", "bf16"):
        ds["fp16"] = {"enabled": False}
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": precision}
    if zero_stage(accelerator) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from .deal import DEALFactor

        if any(isinstance(m, DEALFactor) for m in model.modules()):
            set_z3_leaf_modules(model, [DEALFactor])
        zero = ds.setdefault("zero_optimization", {})
        largest = adapter_tensor_sizes(model)
        value = zero.get("stage3_param_persistence_threshold", "auto")
        if value == "auto":
            hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
            zero["stage3_param_persistence_threshold"] = max(10 * int(hidden), largest)
        elif int(float(value)) < largest:
            raise ConfigError(f"ZeRO-3: stage3_param_persistence_threshold = {value} is below the largest adapter "
                              f"tensor ({largest} elements). deal_train's methods read adapter tensors outside the "
                              f"forward pass, so they must stay whole: set it to \"auto\" or at least {largest}.")


def check_persistent(model: torch.nn.Module) -> None:
    """Under ZeRO-3 (after ``prepare``): every adapter tensor must be a persistent ZeRO parameter.

    Raises:
        RuntimeError: naming up to three adapter tensors that ZeRO-3 would shard.
    """
    from .precision import adapter_parameters

    sharded = [n for n, p in adapter_parameters(model) if _is_zero(p) and not getattr(p, "ds_persist", False)]
    if sharded:
        raise RuntimeError(f"ZeRO-3 shards {len(sharded)} adapter tensors, e.g. {sharded[:3]}; raise "
                           f"stage3_param_persistence_threshold.")


def _is_zero(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gather(params: Iterable[torch.nn.Parameter]) -> None:
    """Make the ZeRO-3 parameters among ``params`` whole on this rank where ZeRO-3 has released them; they stay
    whole until ZeRO-3 releases them again. Ordinary tensors are left alone. Collective under ZeRO-3 (every process
    calls it with the same parameters)."""
    todo = [p for p in params if _is_zero(p) and p.ds_status.name == "NOT_AVAILABLE"]
    if todo:
        todo[0].all_gather(param_list=todo)


def gather_adapters(model: torch.nn.Module) -> None:
    """``gather`` for every adapter tensor of ``model`` (a no-op unless they are ZeRO-3 parameters)."""
    from .precision import adapter_parameters

    gather([p for _n, p in adapter_parameters(model)])


def live(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors to build a loss term from outside the forward pass: ``params`` themselves, except that ZeRO-3
    parameters are gathered and replaced by copies (``clone``: the gradient flows back to the parameter, while the
    data the backward pass needs no longer depends on ZeRO-3 keeping the parameter whole). Collective under
    ZeRO-3."""
    params = list(params)
    if not any(_is_zero(p) for p in params):
        return params
    gather(params)
    return [p.clone() if _is_zero(p) else p for p in params]


def live_named(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``live`` for the parameters of ``module`` by name, for ``torch.func.functional_call``; None when none is a
    ZeRO-3 parameter (then call the module as it is)."""
    named = dict(module.named_parameters())
    if not any(_is_zero(p) for p in named.values()):
        return None
    return dict(zip(named, live(named.values())))


@contextlib.contextmanager
def writing(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Context for changing parameters outside the optimizer. For ZeRO-3 parameters: gathered on entry, the new
    values (those of rank 0; every rank computes the same) written into their partitions on exit, and gathered
    whole again; for ordinary tensors it does nothing. Run no forward pass inside (ZeRO-3 may release the
    parameters after one, and a released parameter's new value would be lost). Collective under ZeRO-3."""
    zero = [p for p in params if _is_zero(p)]
    if not zero:
        yield
        return
    import deepspeed

    gather(zero)

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=0):
        yield
    zero[0].all_gather(param_list=zero)


def check_saved_adapter(path: str) -> None:
    """Every tensor of the adapter saved in directory ``path`` must hold data (ZeRO-3 leaves parameters that are
    not gathered as empty tensors, which ``save_pretrained`` would write as they are).

    Raises:
        RuntimeError: naming up to three empty tensors.
    """
    import os

    from safetensors import safe_open

    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as fh:
        empty = [k for k in fh.keys() if 0 in fh.get_slice(k).get_shape()]
    if empty:
        raise RuntimeError(f"Adapter saved in {path} has empty tensors (not gathered from ZeRO-3 shards): {empty[:3]}")
