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
  parametrization runs, including the kernels' gains and centres and the residual that it reads without calling a
  submodule), whose input is made to require grad so that ZeRO-3 reduces its gradients only once they are complete
  (``mark_leaf_modules``). DEAL's history factors and their SVD are buffers, which ZeRO never partitions.
* ``keeps_engine``: under ZeRO-3 the engine's hooks gather the sharded base weights for every forward pass, so the
  engine of a task lives on through evaluation and is destroyed when the next task prepares its own.

DeepSpeed on a machine without GPUs (tests, laptops): set ``DS_ACCELERATOR=cpu`` (DeepSpeed falls back to it with
a warning otherwise). Several CPU processes run over gloo: Accelerate (1.16) finds no distributed backend for a CPU
device by itself and would report one process on every rank (each training alone), so ``accelerator_kwargs``
names gloo, and ``check_profile`` refuses a run where the two still disagree. DeepSpeed would compile its
shared-memory communication op on the first CPU run in every virtual environment (1-2 minutes), which ZeRO
training never calls; ``skip_cpu_shared_memory_op`` marks that op unusable before Accelerate starts DeepSpeed, so
nothing is compiled.
"""

from __future__ import annotations

import os

import torch
from accelerate.utils import DistributedType

from ..config import ConfigError, TrainConfig
from ..model.sharding import is_zero3, gather_adapters


def _deepspeed_on_cpu() -> bool:
    """True when this process runs under a DeepSpeed profile (``ACCELERATE_USE_DEEPSPEED``) and DeepSpeed's
    accelerator is the CPU (``DS_ACCELERATOR=cpu``, or no GPU)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name() == "cpu"
    except ImportError:
        return False


def skip_cpu_shared_memory_op() -> bool:
    """Keep DeepSpeed from compiling its CPU shared-memory communication op in a CPU run.

    Call before ``Accelerator()``: under ``accelerate launch`` with a DeepSpeed profile, Accelerate starts DeepSpeed's
    communication backend, whose ``TorchBackend`` builds ``deepspeed_shm_comm`` with the C++ compiler whenever
    DeepSpeed's accelerator is the CPU (1-2 minutes on 2 cores; the build is cached per virtual environment). The op
    serves only DeepSpeed's ``inference_all_reduce`` (tensor-parallel inference); the collectives of ZeRO training
    go through ``torch.distributed`` (gloo on CPUs, see ``accelerator_kwargs``) with or without it, and with one
    process there are none at all. DeepSpeed skips the build when the op is marked incompatible in
    ``deepspeed.ops.__compatible_ops__`` (a dict that DeepSpeed caches so that edits to it persist), which is what
    this does.

    Does nothing (returns False) without DeepSpeed (``ACCELERATE_USE_DEEPSPEED`` unset), when DeepSpeed's
    accelerator is not the CPU (GPUs), or when the DeepSpeed version has no such table. Returns True when it marked
    the op.
    """
    if not _deepspeed_on_cpu():
        return False
    try:
        import deepspeed.ops

        compatible = deepspeed.ops.__compatible_ops__
    except (ImportError, AttributeError):
        return False
    if not isinstance(compatible, dict):
        return False
    compatible["deepspeed_shm_comm"] = False
    return True


def accelerator_kwargs() -> dict:
    """Extra ``Accelerator(...)`` arguments for the launch profile: with DeepSpeed on CPUs and several processes,
    the process group's backend ``gloo`` (``InitProcessGroupKwargs``).

    Without it Accelerate (1.16) finds no distributed backend for a CPU device, lets DeepSpeed start its own process
    group, but then reports one process on every rank, so each rank would train alone on all the data (a silent
    wrong result that ``check_profile`` refuses). Named explicitly, ``gloo`` is the backend that both Accelerate's
    bookkeeping (``num_processes``, ``process_index``) and DeepSpeed's collectives use. Empty on GPUs and for one
    process."""
    if not _deepspeed_on_cpu() or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


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
        ConfigError: FSDP (not supported: ZeRO-3 is the sharding profile); fp16 mixed precision on a CPU (a silent
            no-op there); DeepSpeed with several processes but
            no GPUs; a DeepSpeed config with its own optimizer or scheduler; under ZeRO-3 a bitsandbytes-quantised
            base or ``eval_zero_shot``. Each message says why and what to use instead.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("FSDP is not supported: its flat parameters hide the LoRA factors that DEAL re-parametrizes "
                          "and the methods read. Shard a large base model with accelerate_configs/deepspeed_zero3.yaml.")
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise ConfigError("mixed_precision fp16 does nothing on a CPU (Accelerate's CPU autocast runs bf16 only, so "
                          "the run would silently train in fp32). Use --mixed_precision bf16 or no on a CPU, or "
                          "run fp16 on a GPU.")
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if _world_size() != accelerator.num_processes:
        raise ConfigError(f"DeepSpeed runs {_world_size()} processes, but Accelerate sees {accelerator.num_processes} "
                          f"(it found no distributed backend for this device, so every process would train alone). "
                          f"Create the Accelerator with distributed.accelerator_kwargs() (gloo on CPUs), as the "
                          f"trainer does, or use accelerate_configs/multi_cpu.yaml (DDP) or --num_processes 1.")
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
    from ..model.precision import adapter_parameters

    return max((getattr(p, "ds_numel", p.numel()) for _n, p in adapter_parameters(model)), default=0)


def configure_deepspeed(accelerator, cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Fill the run-dependent DeepSpeed config values before ``accelerator.prepare`` (a no-op without DeepSpeed).

    * ``gradient_clipping``: ``"auto"`` -> ``max_grad_norm`` (0 = none).
    * mixed precision (the Accelerate config's ``mixed_precision`` or ``fp16``/``bf16`` enabled in the JSON):
      ``torch_autocast`` with that dtype; ``fp16`` and ``bf16`` disabled (see the module docstring).
    * ZeRO-3: ``stage3_param_persistence_threshold`` ``"auto"`` -> max(10 x hidden size (Accelerate's rule), the
      largest adapter tensor); DEAL's ``DEALFactor`` modules become leaf modules (``mark_leaf_modules``).

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
        mark_leaf_modules(model)
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


def _input_requires_grad(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a ZeRO-3 leaf module: while gradients are recorded, its tensor inputs are replaced by
    copies that require grad (same values; the copies' gradients are dropped with them)."""
    if not torch.is_grad_enabled():
        return None
    return tuple(a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in args)


def mark_leaf_modules(model: torch.nn.Module) -> None:
    """Make DEAL's ``DEALFactor`` (and ``OrthogonalGrowth``) modules of ``model`` ZeRO-3 leaf modules, whose gradients ZeRO-3 reduces only once
    they are complete. Call before ``accelerator.prepare`` (our hook must run before ZeRO-3's own); idempotent; a
    no-op without ``DEALFactor`` modules.

    ZeRO-3 gathers all parameters of a leaf module for its forward and backward passes, and reduces their gradients
    in the module's full backward hook (``register_full_backward_hook``; the per-parameter gradient hooks are not
    installed for them). That hook fires once the gradients w.r.t. the module's inputs are computed, but when no
    input requires grad, as soon as the gradient w.r.t. its output arrives, i.e. before any of its parameters has
    a gradient (PyTorch's documented behaviour; DeepSpeed requires a leaf module input that requires grad). A
    ``DEALFactor``'s only input is the frozen LoRA weight, so ZeRO-3 would reduce what ``.grad`` holds at that
    moment (zeros where there is none yet; for a parameter that ZeRO-3 has released, an empty tensor, to which the
    real gradient then cannot be added: "The size of tensor a (0) must match ..."), and the real gradients would
    land in the not yet reduced bucket only by chance, or stay in ``.grad``, never reduced (DeepSpeed's
    ``zero_grad`` then fails on CPU with "unknown parameter type"; on a GPU it would drop them without a word).
    Here each ``DEALFactor`` gets a forward pre-hook that passes a copy of its input that requires grad;
    ``DEALFactor`` computes O from its input, so the input is at the root of the module's graph and the hook fires
    after the gradients of all its parameters (the autograd engine runs a node's gradient accumulation as soon as
    it is ready and, among ready nodes, those created later in the forward pass first). Gradients that reach the
    parameters through other paths in the same backward pass (the regularisers' and the drift's gathered copies,
    ``live``) are accumulated before as well: their nodes are created after the model's forward pass (or, under
    reentrant gradient checkpointing, lie in the outer backward pass, which finishes them before it recomputes the
    checkpointed layers). ``tests/test_distributed.py`` checks this order.
    """
    from ..deal import DEALFactor, OrthogonalGrowth

    factors = [m for m in model.modules() if isinstance(m, (DEALFactor, OrthogonalGrowth))]
    if not factors:
        return
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [DEALFactor, OrthogonalGrowth])
    for factor in factors:
        if not getattr(factor, "_zero3_input_hook", None):
            factor._zero3_input_hook = factor.register_forward_pre_hook(_input_requires_grad)


def check_persistent(model: torch.nn.Module) -> None:
    """Under ZeRO-3 (after ``prepare``): every adapter tensor must be a persistent ZeRO parameter.

    Raises:
        RuntimeError: naming up to three adapter tensors that ZeRO-3 would shard.
    """
    from ..model.precision import adapter_parameters

    sharded = [n for n, p in adapter_parameters(model) if is_zero3(p) and not getattr(p, "ds_persist", False)]
    if sharded:
        raise RuntimeError(f"ZeRO-3 shards {len(sharded)} adapter tensors, e.g. {sharded[:3]}; raise "
                           f"stage3_param_persistence_threshold.")


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


class Zero3:
    """What the loop does differently under DeepSpeed ZeRO-3, in one place; every method is correct (and mostly a
    no-op) without ZeRO-3, so the loop calls them unconditionally.

    Args:
        accelerator: the run's ``Accelerator``; ``active`` is True under ZeRO-3 (``keeps_engine``).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.active = keeps_engine(accelerator)

    def place(self, model: torch.nn.Module) -> None:
        """Move the wrapped model to the device, except under ZeRO-3, which moves only each rank's shard itself."""
        if not self.active:
            model.to(self.accelerator.device)

    @staticmethod
    def gather(model: torch.nn.Module) -> None:
        """Make every adapter tensor whole on this rank (collective under ZeRO-3): before the methods read adapter
        tensors between forward passes, and before a save."""
        gather_adapters(model)

    def prepare(self, cfg: TrainConfig, model, optimizer, loader) -> tuple:
        """``accelerator.prepare`` of one task's model, optimizer and loader: frees the previous task's engine,
        fills the run-dependent DeepSpeed values first (``configure_deepspeed``) and, under ZeRO-3, checks that
        every adapter tensor stayed persistent (``check_persistent``, RuntimeError otherwise)."""
        self.accelerator.free_memory()  # also destroys the previous task's DeepSpeed engine
        configure_deepspeed(self.accelerator, cfg, model)
        model, optimizer, loader = self.accelerator.prepare(model, optimizer, loader)
        if self.active:
            check_persistent(self.accelerator.unwrap_model(model))
        return model, optimizer, loader

    def release(self) -> None:
        """Free the task's engine after training, except under ZeRO-3, whose hooks run the evaluation's forward
        passes (the engine is destroyed when the next task prepares its own)."""
        if not self.active:
            self.accelerator.free_memory()
