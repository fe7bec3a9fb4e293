"""``python -m deal_train.estimate_memory``: the analytic peak-memory estimate of ``train.memory`` for one
configuration, whether it fits the profile's device, and with ``--measure_steps`` the profiler's measurement of
the same run beside it (see ``train.memory`` for how it counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from typing import Sequence

import torch

from ..cli import build_parser, quiet_libraries, run_cli
from ..config import ConfigError, TrainConfig, config_fields
from ..outputs import atomic_write_json
from ..train.memory import (ALLOCATOR_MARGIN, GIB, PROFILES, HardwareProfile, MemoryEstimate,  # noqa: F401
                            estimate, memory_kind, model_shapes)


# --- measuring the same configuration ------------------------------------------------------------------------------

_runtime_warm = False


def _warm_runtime() -> None:
    """One LoRA step and one DEAL setup of ``tiny-random-llama`` (seconds; once per process): the libraries'
    one-time allocations (autograd engine, oneDNN/MKL buffers, LAPACK for the SVD, ~20-40 MiB of RSS) happen here,
    before the baseline."""
    global _runtime_warm
    if _runtime_warm:
        return
    _runtime_warm = True
    from .bench import Bench, BenchOptions

    warm_cfg = TrainConfig(model="tiny-random-llama", per_device_train_batch_size=2, max_source_length=128,
                           lora_rank=4, output_dir="unused")
    bench = Bench(warm_cfg, BenchOptions(train_steps=1, inference_samples=1, device="cpu"))
    bench.train_once("deal", snapshot=False)
    bench.train_once("lora", snapshot=False)


def measure(cfg: TrainConfig, methods: Sequence[str], steps: int, task: str = "dbpedia") -> dict[str, dict]:
    """For each of ``methods``, train ``steps`` optimizer steps on real rows of ``task`` the way ``deal_train.bench``
    does (a task after the first, through the trainer's ``train_task``; one model for all methods), measure the
    peak with ``profiling.MemoryProfiler``, and estimate the same run (the batches' longest row and answer; the
    run's plain precision settings).

    On CUDA the measurement is ``max_memory_allocated``. On CPU it is the peak RSS during training minus the RSS
    before the model was built, with glibc's mmap threshold fixed (``profiling.fix_malloc_mmap_threshold``) and the
    libraries' one-time allocations made beforehand (``_warm_runtime``), so that it counts tensors.

    Returns:
        ``{method: {measured_bytes, source, estimate (MemoryEstimate.to_dict()), ratio (estimated peak /
        measured), seq_len, answer_window, batch_size, steps}}``.
    Raises:
        ConfigError: bad model, task or settings (as the bench).
    """
    from .bench import Bench, BenchOptions
    from ..train.profiling import current_rss_bytes, fix_malloc_mmap_threshold, release_freed_memory

    cuda = torch.cuda.is_available()
    if not cuda:
        fix_malloc_mmap_threshold()
        _warm_runtime()
        release_freed_memory()
    baseline = 0 if cuda else current_rss_bytes()
    bench = Bench(cfg, BenchOptions(train_steps=steps, inference_samples=1, task=task))
    rows = bench.data.train
    run_cfg = bench.cfg
    if bench.encoder_decoder:
        run_cfg = dataclasses.replace(run_cfg, max_source_length=max(len(x) for x in rows["input_ids"]),
                                      max_target_length=max(len(x) for x in rows["labels"]))
        seq_len, window = None, None
    else:
        seq_len = max(len(x) for x in rows["input_ids"])
        window = max(sum(t != -100 for t in x) for x in rows["labels"]) + 1
    plain = dataclasses.replace(PROFILES["cpu"], name="measured_run", cpu=not cuda,
                                mixed_precision=run_cfg.mixed_precision or "no",
                                memory_gib=(torch.cuda.get_device_properties(0).total_memory / GIB if cuda
                                            else PROFILES["cpu"].memory_gib))
    out = {}
    gc.collect()
    gc.freeze()  # the collections before each measured phase skip the long-lived objects (see Bench.run)
    try:
        peaks = {method: bench.train_once(method_name(method), snapshot=False)["memory"] for method in methods}
    finally:
        gc.unfreeze()
    for method in methods:
        mem = peaks[method]
        measured = mem["peak_bytes"] - baseline
        est = estimate(run_cfg.model, method_name(method), run_cfg, plain, seq_len=seq_len, answer_window=window)
        out[method] = {"measured_bytes": int(measured), "source": mem["source"], "estimate": est.to_dict(),
                       "ratio": est.peak_bytes / measured, "seq_len": seq_len, "answer_window": window,
                       "batch_size": run_cfg.per_device_train_batch_size, "steps": steps}
    return out


# --- command line -------------------------------------------------------------------------------------------------

def format_estimate(e: MemoryEstimate) -> str:
    """A printable breakdown of one estimate (GiB)."""
    p = e.profile
    quant = "LLM.int8 base, " if p.load_in_8bit else ("NF4 base, " if p.load_in_4bit else "")
    lines = [f"Memory estimate: {e.model}, method {e.method}, profile {p.name} ({p.num_gpus} x {p.memory_gib:.1f} GiB,"
             f" {quant}mixed precision {p.mixed_precision}, ZeRO {p.zero_stage}"
             f"{' + optimizer offload' if p.offload_optimizer else ''}, {p.optim}, gradient checkpointing "
             f"{'on' if p.gradient_checkpointing else 'off'})",
             "tokens: " + ", ".join(f"{k} {v}" for k, v in e.tokens.items()) +
             f"; {e.parameters / 1e6:,.1f}M parameters, {e.trainable_parameters:,} trainable", ""]
    for k, v in e.components.items():
        lines.append(f"  {k.replace('_', ' '):<28}{v / GIB:>10.3f} GiB")
    lines += [f"  {'peak (sum)':<28}{e.peak_bytes / GIB:>10.3f} GiB",
              f"  activations without / with gradient checkpointing: {e.activations_without_checkpointing / GIB:.3f}"
              f" / {e.activations_with_checkpointing / GIB:.3f} GiB",
              f"  required: peak x {1 + ALLOCATOR_MARGIN:.2f} + {e.overhead_bytes / GIB:.1f} GiB "
              f"{'process' if p.cpu else 'CUDA context'} = {e.required_bytes / GIB:.2f} GiB of "
              f"{e.device_bytes / GIB:.1f} GiB",
              f"fits: {'yes' if e.fits else 'NO'} ({100 * e.required_bytes / e.device_bytes:.0f}% of the device)"]
    return "\n".join(lines)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


PROFILE_OPTIONS = {
    "gpu_memory_gib": (float, "Memory of one device in GiB (overrides the profile's)."),
    "num_gpus": (int, "Devices (data parallel; ZeRO partitions over them)."),
    "zero_stage": (int, "DeepSpeed ZeRO stage 0-3."),
    "offload_optimizer": (_bool, "ZeRO-Offload: optimizer states on the CPU (true/false)."),
    "gradient_checkpointing": (_bool, "Recompute each layer in backward (true/false)."),
    "load_in_8bit": (_bool, "LLM.int8 base model (true/false)."),
    "load_in_4bit": (_bool, "NF4 base model (true/false)."),
    "optim": (str, "adamw or adamw_8bit."),
}
"""Options that change the profile; one that the training config already has (a later config key of the same
name) is read from there instead of being added twice."""


def build_estimate_parser() -> argparse.ArgumentParser:
    """``python -m deal_train``'s options plus ``--profile``, ``--seq_len``, ``--json`` and the profile overrides."""
    parser = build_parser(prog="python -m deal_train.estimate_memory",
                          description="Analytic peak training memory of a configuration and whether it fits a "
                                      "device (see the module docstring for how it counts).")
    parser.add_argument("--profile", default="a100_fp16", choices=sorted(PROFILES),
                        help="Device profile: " + "; ".join(f"{k}: {v.description}" for k, v in PROFILES.items()))
    parser.add_argument("--seq_len", type=int, default=None,
                        help="Tokens per row of a decoder-only model (default max_source_length + max_target_length).")
    parser.add_argument("--json", default=None, help="Also write the estimate as JSON to this file.")
    parser.add_argument("--measure_steps", type=int, default=0,
                        help="Also train this many optimizer steps on this machine (real rows of --measure_task, "
                             "as deal_train.bench does), measure the peak with deal_train.profiling and compare it "
                             "with the estimate of the same run (0: do not measure).")
    parser.add_argument("--measure_task", default="dbpedia", help="Task whose rows --measure_steps trains on.")
    existing = {name for name, *_ in config_fields()}
    for name, (typ, help_text) in PROFILE_OPTIONS.items():
        if name not in existing:
            parser.add_argument(f"--{name}", dest=f"profile_{name}", type=typ, default=None, help=help_text)
    return parser


def profile_from_args(args: argparse.Namespace, cfg: TrainConfig) -> HardwareProfile:
    """The named profile with the command line's overrides applied.

    Raises:
        ConfigError: a ZeRO stage outside 0-3, an unknown optimizer, 8-bit and 4-bit together, fewer than one GPU
            or no memory.
    """
    p = dataclasses.replace(PROFILES[args.profile])
    if cfg.mixed_precision:
        p.mixed_precision = cfg.mixed_precision
    for name in PROFILE_OPTIONS:
        value = getattr(args, f"profile_{name}", None)
        if value is None and hasattr(cfg, name) and getattr(cfg, name) not in (None, ""):
            value = getattr(cfg, name)  # a training config key of the same name
        if value is not None:
            setattr(p, "memory_gib" if name == "gpu_memory_gib" else name, value)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}.")
    if p.optim not in ("adamw", "adamw_8bit"):
        raise ConfigError(f"--optim must be adamw or adamw_8bit, got {p.optim!r}.")
    if p.load_in_8bit and p.load_in_4bit:
        raise ConfigError("--load_in_8bit and --load_in_4bit exclude each other.")
    if p.num_gpus < 1 or p.memory_gib <= 0:
        raise ConfigError("--num_gpus must be >= 1 and --gpu_memory_gib > 0.")
    return p


def method_name(method: str) -> str:
    """``train.memory.memory_kind``: ``lora`` or ``deal``, the benchmark variant that trains like ``method``."""
    return memory_kind(method)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train.estimate_memory``; exit code 2 on bad input, 0 otherwise (also when
    the configuration does not fit: the answer is printed)."""
    quiet_libraries()
    parser = build_estimate_parser()
    args = parser.parse_args(argv)

    def main_cfg(cfg: TrainConfig) -> None:
        profile = profile_from_args(args, cfg)
        result = estimate(cfg.model, method_name(cfg.method), cfg, profile, seq_len=args.seq_len)
        print(format_estimate(result))
        out = result.to_dict()
        if args.measure_steps > 0:
            m = measure(cfg, [cfg.method], args.measure_steps, args.measure_task)[cfg.method]
            e = m["estimate"]
            shape = ", ".join(f"{k} {v}" for k, v in e["tokens"].items())
            print(f"\nmeasured on this machine ({args.measure_steps} optimizer step(s); longest rows: {shape}; "
                  f"{m['source']}): {m['measured_bytes'] / GIB:.3f} GiB; estimate of that run "
                  f"{e['peak_bytes'] / GIB:.3f} GiB (estimate / measured = {m['ratio']:.3f})")
            out["measurement"] = m
        if args.json:
            atomic_write_json(args.json, out)

    return run_cli(main_cfg, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
