"""``--dry_run``: the plan of a run without training or downloading weights.

The model's architecture is built on PyTorch's ``meta`` device (shapes only, no memory, no weights). Hub ids of
the paper's backbones (``architectures.HUB_IDS``, e.g. ``google-t5/t5-large``) map to the architecture configs
written in ``deal_train/architectures.py``, so the paper profiles (``configs/paper/``) dry-run with no Hub access;
any other model's config is read as usual (``models.model_config``).

Printed and returned: the tasks with their training / test rows and optimizer steps, the trainable parameters of
every method on the first and on later tasks, and a memory estimate (``memory.lower_bound``: weights,
gradients and Adam states only).
"""

from __future__ import annotations

import dataclasses
import math

from transformers import PretrainedConfig

from ..model.architectures import ARCHITECTURES, HUB_IDS, architecture_config
from ..config import ConfigError, TrainConfig
from .memory import lower_bound
from ..model.loading import check_target_modules, default_target_modules, is_encoder_decoder, meta_model, model_config

_ADAPTER_CACHE: dict = {}


def plan_model_config(name: str) -> tuple[str, PretrainedConfig]:
    """(architecture label, config) of ``name`` for a dry run: a Hub id of ``HUB_IDS`` or an architecture name
    gives the written-in-code architecture; anything else is read with ``models.model_config``.

    Raises:
        ConfigError: the config cannot be read (offline, unknown id); the message lists the offline ids.
    """
    by_hub_id = {hub: arch for arch, hub in HUB_IDS.items()}
    arch = by_hub_id.get(name) or (name if name in ARCHITECTURES else None)
    if arch is not None:
        return arch, architecture_config(arch)
    try:
        return name, model_config(name)
    except ConfigError as err:
        raise ConfigError(f"{err} A dry run without Hub access knows these models: "
                          f"{', '.join(sorted({*HUB_IDS, *HUB_IDS.values()}))}.") from None


def adapter_shapes(label: str, config: PretrainedConfig, cfg: TrainConfig) -> dict:
    """Base parameter count and the LoRA layers of one rank-r adapter, from a meta-device model wrapped by PEFT.

    Returns:
        ``base_parameters`` (int), ``lora_parameters`` (int, one adapter), ``factors`` (list of
        ``(shape of lora_A.weight, shape of lora_B.weight)``, one per LoRA layer). Cached per (model, rank,
        target modules) within the process.
    Raises:
        ConfigError: a target module matches no linear layer.
    """
    from ..methods.base import ContinualMethod

    key = (label, cfg.lora_rank, tuple(cfg.target_modules))
    if key not in _ADAPTER_CACHE:
        model = meta_model(config)
        check_target_modules(model, cfg.target_modules)
        base = sum(p.numel() for p in model.parameters())
        peft_model = ContinualMethod(cfg).wrap(model)  # one rank-r adapter
        lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        factors = [(tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape))
                   for _n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        _ADAPTER_CACHE[key] = {"base_parameters": base, "lora_parameters": lora, "factors": factors}
    return _ADAPTER_CACHE[key]


def trainable_per_method(lora: int, factors: list[tuple[tuple, tuple]], cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """(trainable parameters on task 1, on each later task) for every registered method (``plan_trainable``)."""
    from ..methods import METHOD_NAMES, method_class

    return {m: method_class(m).plan_trainable(lora, factors, cfg) for m in METHOD_NAMES}


def data_plan(cfg: TrainConfig) -> tuple[list[str], list[int], list[int], str]:
    """(task names, training rows, test rows, note) per task. The rows are counted by reading the data
    (CL_Benchmark folder or files) as a run would; a Hub source is not downloaded, and data that cannot be read
    falls back to ``max_train_samples`` / ``max_test_samples``, with the reason in the note."""
    from ..data.prepare import prepare_data
    from ..data.sources import task_source

    if cfg.data_source != "hub":
        try:
            datas = prepare_data(cfg)
            return ([d.task.name for d in datas], [len(d.train_rows) for d in datas],
                    [len(d.test_rows) for d in datas], "")
        except ConfigError as err:
            note = f"data not read ({err}); row counts are the configured maxima"
    else:
        note = "data_source hub is not downloaded in a dry run; row counts are the configured maxima"
    try:
        names = task_source(cfg).task_names()
    except ConfigError:
        names = list(cfg.tasks) or ["?"]
    return names, [cfg.max_train_samples] * len(names), [cfg.max_test_samples] * len(names), note


def optimizer_steps(train_rows: list[int], cfg: TrainConfig, method: str) -> list[int]:
    """Optimizer steps per task on one process, as ``train.loop.train_task`` counts them:
    ceil(ceil(rows / batch) / accumulation) × epochs, of the rows the method trains on (``plan_train_rows``:
    Replay adds its buffer of each earlier task)."""
    from ..methods import method_class

    steps = []
    for t in range(len(train_rows)):
        rows = method_class(method).plan_train_rows(train_rows, t, cfg)
        batches = math.ceil(rows / cfg.per_device_train_batch_size)
        steps.append(math.ceil(batches / cfg.gradient_accumulation_steps) * cfg.num_train_epochs)
    return steps


def dry_run(cfg: TrainConfig) -> dict:
    """Build the plan of ``cfg``, print it and return it; nothing is trained, downloaded or written.

    Returns:
        ``model``, ``architecture``, ``encoder_decoder``, ``target_modules``, ``tasks`` (list of dicts: ``task``,
        ``train_rows``, ``test_rows``, ``optimizer_steps``), ``data_note``, ``base_parameters``,
        ``lora_layers``, ``trainable_parameters`` (method -> [task 1, later tasks]) and ``memory_estimate``
        (method -> ``memory.lower_bound`` at its larger trainable count).
    Raises:
        ConfigError: the model's config cannot be built, or a target module matches nothing.
    """
    label, config = plan_model_config(cfg.model)
    if not cfg.target_modules:
        cfg = dataclasses.replace(cfg, target_modules=default_target_modules(config))
    shapes = adapter_shapes(label, config, cfg)
    per_method = trainable_per_method(shapes["lora_parameters"], shapes["factors"], cfg)
    memory = {m: lower_bound(shapes["base_parameters"], max(v)) for m, v in per_method.items()}
    names, train_rows, test_rows, note = data_plan(cfg)
    steps = optimizer_steps(train_rows, cfg, cfg.method)
    plan = {
        "model": cfg.model, "architecture": label, "encoder_decoder": is_encoder_decoder(config),
        "target_modules": list(cfg.target_modules), "method": cfg.method,
        "tasks": [{"task": n, "train_rows": a, "test_rows": b, "optimizer_steps": s}
                  for n, a, b, s in zip(names, train_rows, test_rows, steps)],
        "data_note": note, "base_parameters": shapes["base_parameters"], "lora_layers": len(shapes["factors"]),
        "trainable_parameters": {m: list(v) for m, v in per_method.items()}, "memory_estimate": memory,
    }
    print(format_plan(plan, cfg))
    return plan


def format_plan(plan: dict, cfg: TrainConfig) -> str:
    """The plan as the plain-text report ``dry_run`` prints."""
    kind = "encoder-decoder" if plan["encoder_decoder"] else "decoder-only"
    lines = [f"Dry run (nothing is trained or downloaded): method {plan['method']}, model {plan['model']}",
             f"  architecture {plan['architecture']} ({kind}, {plan['base_parameters']:,} parameters, built on the "
             f"meta device without weights)",
             f"  LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, target modules {','.join(plan['target_modules'])}"
             f" ({plan['lora_layers']} layers); lr {cfg.learning_rate:g}, batch {cfg.per_device_train_batch_size} x "
             f"accumulation {cfg.gradient_accumulation_steps} per process, {cfg.num_train_epochs} epoch(s), "
             f"mixed precision {cfg.mixed_precision or '(accelerate config)'}",
             f"  data: {cfg.data_source}" + (f" — {plan['data_note']}" if plan["data_note"] else ""),
             "", f"  {'task':<12}{'train rows':>12}{'test rows':>11}{'optimizer steps':>17}"]
    for i, t in enumerate(plan["tasks"]):
        lines.append(f"  {str(i + 1) + ' ' + t['task']:<12}{t['train_rows']:>12}{t['test_rows']:>11}"
                     f"{t['optimizer_steps']:>17}")
    total = sum(t["optimizer_steps"] for t in plan["tasks"])
    lines += [f"  {'total':<12}{'':>23}{total:>17}  (one process; divide by the number of processes)", "",
              f"  {'method':<10}{'trainable, task 1':>19}{'later tasks':>14}{'memory estimate':>18}"]
    for m, (first, later) in plan["trainable_parameters"].items():
        lines.append(f"  {m:<10}{first:>19,}{later:>14,}{plan['memory_estimate'][m]['total_gib']:>14.2f} GiB")
    lines.append("  memory estimate: fp32 base weights + 16 bytes per trainable parameter (weight, gradient, two "
                 "Adam moments); activations not included")
    return "\n".join(lines)
