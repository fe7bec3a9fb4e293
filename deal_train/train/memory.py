"""Analytic estimate of the peak training memory of one configuration, and whether it fits a GPU; also the dry
run's lower bound (``lower_bound``: weights and Adam states only).

``python -m deal_train.estimate_memory`` (``tools/estimate_memory.py``: the command line and the measurement) --model <id|alias|architecture> --method deal --profile a100_fp16
[--key value ...]`` prints a breakdown (weights, trainable parameters, gradients, optimizer states, DEAL's buffers,
activations with and without gradient checkpointing, logits, backward workspace) for one device and says whether
it fits that device's memory; ``--json FILE`` writes the same as JSON. Every training key of ``python -m
deal_train`` is accepted (batch size, lengths, LoRA rank and targets, DEAL sizes); the profile's precision, GPU
memory, ZeRO stage and 8-bit settings can be overridden with ``--gpu_memory_gib``, ``--num_gpus``,
``--zero_stage``, ``--mixed_precision``, ``--gradient_checkpointing``, ``--load_in_8bit``/``--load_in_4bit`` and
``--optim adamw_8bit``.

How it counts (bytes; b = micro batch, s = tokens per row, L layers, h hidden, i MLP width, r LoRA rank):

* **Weights**: the model is built on the meta device from its config (no weights are read), so parameter counts
  and every LoRA target's shape are exact. 4 bytes per parameter in fp32 (the trainer's default, also under
  Accelerate's fp16/bf16 autocast, which keeps fp32 weights); 2 under DeepSpeed fp16/bf16 (it casts the module);
  ``load_in_8bit``: 1 byte per ``nn.Linear`` weight (LLM.int8, lm_head kept) and ``load_in_4bit``: 0.5625 (NF4
  plus one fp32 absmax per 64 values), other parameters at 2 bytes.
* **Trainable parameters** (LoRA: r (d_in + d_out) per target; DEAL: per factor n × r the J × r gains, J
  centres and the update MLP r h + h + h r + r), their **gradients** (4 bytes; 2 under DeepSpeed half precision,
  which also keeps a 4-byte fp32 master copy in the optimizer) and **AdamW** states (8 bytes; ``adamw_8bit``: 2
  bytes for tensors of >= 4096 values, bitsandbytes keeps smaller ones 32-bit). DEAL adds, per factor, its frozen
  history and SVD buffers (Y and U: n × r each, s, V: r × r) and a start copy of its parameters (the Eq. 12
  regulariser's θ₀). ZeRO stage 1 divides optimizer states by the number of GPUs, stage 2 also gradients, stage 3
  also parameters (frozen weights included); ``deepspeed_zero2_offload`` keeps optimizer states on the CPU.
* **Activations** saved for backward, per token and decoder layer (LLaMA family, SDPA attention with a padding
  mask, so K and V are expanded to all heads; LoRA on the base's linear layers, base frozen)::

      fp32 residual stream entering both RMSNorms: 2 h (4 bytes each)
      LoRA inputs (normed hidden states) h, q h, expanded k and v 2 h, attention output h, MLP gate, up and
      SiLU(gate) 3 i, LoRA A outputs r per target (activation dtype: 4 bytes fp32, 2 under autocast)
      SDPA's 4-D float padding mask, b × s × s × 4 bytes per layer

  plus, at the start of backward, the larger of two transients: the answer-window logits with their log-softmax
  and gradients (3 × b × (max_target_length + 1) × vocab, fp32), or one layer's activations as gradients. T5 (encoder-decoder): per encoder token 2 h fp32 + (h + 3 d_inner
  + d_ff) + dropout masks (2 h + d_ff bytes); decoder tokens add cross-attention (h fp32 + 2 d_inner), and every
  decoder layer saves K and V of the encoder output (2 d_inner per source token); the attention bias (heads × s ×
  s) is counted once per attention type; logits over all target tokens. With gradient checkpointing only each
  layer's input (h, fp32) is kept, plus one layer recomputed during backward.
* **Peak** = weights + LoRA adapter + DEAL parameters and buffers + gradients + optimizer states + saved
  activations + the larger of the logits and the backward workspace.
  **Fits** when peak × 1.10 (allocator fragmentation: reserved vs allocated) + the runtime overhead (CUDA context
  0.5 GiB; CPU: the process's interpreter and libraries, 0.6 GiB) <= the device's memory.

Checked against ``train.profiling`` (tests/test_estimate_memory.py): on CPU the measured quantity is the
process's peak RSS during training minus its RSS before the model was built; the test states the tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..config import ConfigError, TrainConfig

GIB = 2**30
ALLOCATOR_MARGIN = 0.10
"""Fraction added to the peak for the caching allocator's fragmentation (reserved minus allocated)."""
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
CPU_PROCESS_BYTES = int(0.6 * GIB)
ADAM8BIT_MIN_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep tensors with fewer values than this in 32 bit (``min_8bit_size``)."""


@dataclasses.dataclass
class HardwareProfile:
    """One device and how training uses it.

    Attributes:
        name, description: the profile's key and one line for humans.
        memory_gib: memory of one device (GiB).
        num_gpus: devices the run is spread over (data parallel; ZeRO partitions over them).
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (autocast; activations in half precision).
        zero_stage: DeepSpeed ZeRO stage 0-3 (0: plain Accelerate/DDP).
        offload_optimizer: ZeRO-Offload of optimizer states to the CPU.
        optim: ``adamw`` or ``adamw_8bit``.
        load_in_8bit, load_in_4bit: quantised base model (bitsandbytes).
        gradient_checkpointing: recompute each layer in backward.
        cpu: the device is the host (overhead = the process, not a CUDA context).
    """

    name: str
    description: str
    memory_gib: float
    num_gpus: int = 1
    mixed_precision: str = "fp16"
    zero_stage: int = 0
    offload_optimizer: bool = False
    optim: str = "adamw"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    cpu: bool = False


def _host_memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (
    HardwareProfile("a100_fp16", "one A100 40 GB, fp16 mixed precision (the paper's setting; --gpu_memory_gib 80 "
                                 "for the 80 GB card)", 40.0),
    HardwareProfile("a100_80gb_fp16", "one A100 80 GB, fp16 mixed precision", 80.0),
    HardwareProfile("h100_bf16", "one H100 80 GB, bf16 mixed precision", 80.0, mixed_precision="bf16"),
    HardwareProfile("multi_gpu_bf16", "8 GPUs of 80 GB, DDP, bf16 (each holds the whole model)", 80.0, num_gpus=8,
                    mixed_precision="bf16"),
    HardwareProfile("deepspeed_zero2", "8 GPUs of 80 GB, DeepSpeed ZeRO-2, bf16", 80.0, num_gpus=8,
                    mixed_precision="bf16", zero_stage=2),
    HardwareProfile("deepspeed_zero3", "8 GPUs of 80 GB, DeepSpeed ZeRO-3, bf16", 80.0, num_gpus=8,
                    mixed_precision="bf16", zero_stage=3),
    HardwareProfile("deepspeed_zero2_offload", "one GPU of 24 GB, ZeRO-2 with optimizer states on the CPU, fp16",
                    24.0, mixed_precision="fp16", zero_stage=2, offload_optimizer=True),
    HardwareProfile("a100_8bit", "one A100 40 GB, LLM.int8 base model and 8-bit AdamW, fp16", 40.0,
                    load_in_8bit=True, optim="adamw_8bit"),
    HardwareProfile("a100_4bit", "one A100 40 GB, NF4 base model (QLoRA-style), fp16", 40.0, load_in_4bit=True),
    HardwareProfile("cpu", "this machine's RAM, fp32", round(_host_memory_gib(), 1), mixed_precision="no",
                    cpu=True),
)}
"""Profiles by name; the names follow ``accelerate_configs/`` where one exists."""


# --- the model's shapes -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelShapes:
    """What the estimate needs from a model: parameter counts, the LoRA targets' shapes and the config."""

    name: str
    config: object
    encoder_decoder: bool
    parameters: int
    linear_parameters: int
    targets: list[tuple[str, int, int]]  # (module name, d_in, d_out) of every LoRA target


def model_shapes(name: str, target_modules: Sequence[str]) -> ModelShapes:
    """Build the model on the meta device (no memory, no weights) and read its parameter counts and the shapes of
    every ``nn.Linear`` whose name ends in one of ``target_modules`` (empty: PEFT's default for the model type,
    ``deal_train.models.default_target_modules``).

    Raises:
        ConfigError: no linear layer matches a target (lists the names that exist).
    """
    from ..model.loading import default_target_modules, is_encoder_decoder, meta_model, model_config

    config = model_config(name)
    target_modules = list(target_modules) or default_target_modules(config)
    enc_dec = is_encoder_decoder(config)
    model = meta_model(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = {n.split(".")[-1] for n, _ in linears}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ConfigError(f"target_modules {missing} match no linear layer of {name}. Linear layer names: "
                          f"{', '.join(sorted(names))}.")
    targets = [(n, m.in_features, m.out_features) for n, m in linears if n.split(".")[-1] in target_modules]
    lm_head = model.get_output_embeddings()
    linear_params = sum(m.weight.numel() for _, m in linears if m is not lm_head)
    return ModelShapes(name=name, config=config, encoder_decoder=enc_dec,
                       parameters=sum(p.numel() for p in model.parameters()), linear_parameters=linear_params,
                       targets=targets)


# --- the estimate -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per device, by component, and the verdict. ``peak_bytes`` = the sum of the components (activations
    with or without checkpointing as configured); ``required_bytes`` = peak × (1 + margin) + overhead."""

    model: str
    method: str
    profile: HardwareProfile
    tokens: dict
    parameters: int
    trainable_parameters: int
    components: dict
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    peak_bytes: int
    overhead_bytes: int
    required_bytes: int
    device_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        """JSON-ready: every field, the profile as a dict, plus ``*_gib`` views of the totals."""
        d = dataclasses.asdict(self)
        d.update(peak_gib=self.peak_bytes / GIB, required_gib=self.required_bytes / GIB,
                 device_gib=self.device_bytes / GIB)
        return d


def _deal_factor_counts(n: int, r: int, cfg: TrainConfig, which: str = "") -> tuple[int, int]:
    """(trainable parameters, buffer values) of one DEAL factor n × r (``deal_train.deal``; ``which``: A or B, for
    ``deal_project_residual``)."""
    k = min(n, r)
    spectral = cfg.deal_drift_weighting == "spectral"
    # the history's basis U (n × k) and s (k) of the projection / spectral drift, and the drift weights (k)
    basis = n * k + k + (k if spectral else 0) if spectral or cfg.deal_project_residual in ("both", which) else 0
    if cfg.deal_kernel == "haar":
        retention = math.ceil(n / 2) * math.ceil(r / 2) * cfg.deal_layers
        buffers = n * r + basis
    else:
        retention = (cfg.deal_scales * r + cfg.deal_scales) * cfg.deal_layers
        buffers = n * r + n * r + r + r * r + r + cfg.deal_scales * cfg.deal_layers + basis  # Y, U, s, Vh, ŝ, sigma
    h = cfg.deal_mlp_hidden
    return retention + (r * h + h + h * r + r), buffers


def _deal_residual_count(n: int, r: int, cfg: TrainConfig) -> int:
    """Trainable values of one DEAL factor's residual R (n × r with ``deal_residual_update``, else 0)."""
    return n * r if cfg.deal_residual_update else 0


def _act_bytes(profile: HardwareProfile) -> int:
    return 2 if profile.mixed_precision in ("fp16", "bf16") else 4


def _decoder_activations(c, b: int, s: int, window: int, targets_per_layer: int, r: int, a: int,
                         checkpointing: bool) -> tuple[int, int, int]:
    """(saved activations, logits, workspace) in bytes for a LLaMA-family decoder (see the module docstring)."""
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    tokens = b * s
    mask = b * s * s * 4  # SDPA's 4-D float padding mask, one per layer
    per_layer = tokens * (2 * h * 4 + (5 * h + 3 * i) * a + targets_per_layer * r * a) + mask
    saved = tokens * h * 4 * L + per_layer if checkpointing else per_layer * L
    # logits of the answer window, their log-softmax and the two gradients (fp32; the picked rows are at most all)
    logits = 3 * b * window * V * 4
    workspace = per_layer
    return saved, logits, workspace


def _t5_activations(c, b: int, src: int, tgt: int, r: int, a: int, checkpointing: bool) -> tuple[int, int, int]:
    """(saved activations, logits, workspace) in bytes for T5 (see the module docstring)."""
    h, inner, ff, heads = c.d_model, c.num_heads * c.d_kv, c.d_ff, c.num_heads
    enc_tok, dec_tok = b * src, b * tgt
    enc_layer = enc_tok * (2 * h * 4 + (h + 3 * inner + ff) * a + (2 * h + ff) + 2 * r * a)
    dec_layer = (dec_tok * (3 * h * 4 + (2 * h + 4 * inner + ff) * a + (3 * h + ff) + 3 * r * a)
                 + enc_tok * (2 * inner * a + r * a))
    bias = 4 * heads * (src * src + tgt * tgt + tgt * src) * b
    if checkpointing:
        saved = (enc_tok * c.num_layers + dec_tok * c.num_decoder_layers) * h * 4 + max(enc_layer, dec_layer) + bias
    else:
        saved = enc_layer * c.num_layers + dec_layer * c.num_decoder_layers + bias
    logits = 3 * dec_tok * c.vocab_size * 4
    return saved, logits, max(enc_layer, dec_layer)


def memory_kind(method: str) -> str:
    """What the estimate counts for ``method``'s later tasks, ``lora`` (one rank-r adapter) or ``deal``: its
    class's ``memory_kind``; ``lora`` itself (the benchmark's plain-LoRA variant) passes through.

    Raises:
        ConfigError: an unknown method name.
    """
    from ..methods import method_class

    return "lora" if method == "lora" else method_class(method).memory_kind


def estimate(model: str, method: str, cfg: TrainConfig, profile: HardwareProfile, seq_len: int | None = None,
             shapes: ModelShapes | None = None, answer_window: int | None = None) -> MemoryEstimate:
    """Peak training memory per device of ``method`` (``lora``/``seq_lora``/any baseline training one adapter, or
    ``deal`` in a task after the first; with ``deal_grow_adapter`` task 2: one earlier adapter and the new one) on
    ``model`` under ``profile`` and the batch, lengths and adapter of ``cfg``.

    Args:
        seq_len: tokens per decoder-only row (default ``max_source_length + max_target_length``, the longest).
            Encoder-decoder models use ``max_source_length`` source and ``max_target_length`` target tokens.
        shapes: a ``model_shapes`` result to reuse.
        answer_window: positions whose logits a decoder-only step computes (default ``max_target_length + 1``).
    Raises:
        ConfigError: unknown model, targets that match nothing, or a model family without an activation formula
            (neither LLaMA-like nor T5).
    """
    shapes = shapes or model_shapes(model, cfg.target_modules)
    c = shapes.config
    p = profile
    r = cfg.lora_rank
    n_gpu = max(p.num_gpus, 1)
    half_master = p.zero_stage > 0 and p.mixed_precision in ("fp16", "bf16")  # DeepSpeed casts the module
    a = _act_bytes(p)

    # base weights
    if p.load_in_8bit or p.load_in_4bit:
        per = 1.0 if p.load_in_8bit else 0.5625
        weights = shapes.linear_parameters * per + (shapes.parameters - shapes.linear_parameters) * 2
    else:
        weights = shapes.parameters * (2 if half_master else 4)
    lora_sizes = [(r * d_in, r * d_out, d_in, d_out) for _n, d_in, d_out in shapes.targets]
    lora_params = sum(x + y for x, y, _, _ in lora_sizes)
    param_bytes = 2 if half_master else 4
    lora_adapter = lora_params * param_bytes  # trained by LoRA, the frozen history under DEAL

    # trainable tensors: LoRA's A and B, or DEAL's filter, MLP and residual per factor
    deal = memory_kind(method) == "deal"
    tensors: list[int] = []
    deal_parameters = 0
    if deal:
        for _, _, d_in, d_out in lora_sizes:
            for n, which in ((d_in, "A"), (d_out, "B")):
                if cfg.deal_update not in ("both", which):
                    continue
                params, buffers = _deal_factor_counts(n, r, cfg, which)
                residual = _deal_residual_count(n, r, cfg)
                tensors.append(params)
                if residual:
                    tensors.append(residual)
                # θ and R, the θ₀ copy of the delta regulariser, Y/U/s/V
                deal_parameters += (params + residual) * param_bytes + params * 4 + buffers * 4
        if cfg.deal_grow_adapter:  # task 2: the new adapter's R (r × d_in) and B train; its A0 and basis V_k (≤ r
            for x, y, d_in, _ in lora_sizes:  # columns) are held besides
                tensors += [x, y]
                deal_parameters += x * 4
            lora_adapter *= 2
    else:
        tensors = [x for x, y, _, _ in lora_sizes] + [y for x, y, _, _ in lora_sizes]
    trainable = sum(tensors)
    grads = trainable * param_bytes
    if p.optim == "adamw_8bit":
        optim = sum(2 * t if t >= ADAM8BIT_MIN_SIZE else 8 * t for t in tensors)
    else:
        optim = 8 * trainable
    optim += trainable * 4 if half_master else 0  # DeepSpeed's fp32 master copy
    if p.offload_optimizer:
        optim = 0
    if p.zero_stage >= 1:
        optim /= n_gpu
    if p.zero_stage >= 2:
        grads /= n_gpu
    if p.zero_stage >= 3:
        weights /= n_gpu
        lora_adapter /= n_gpu
        deal_parameters /= n_gpu

    # activations
    b = cfg.per_device_train_batch_size
    if shapes.encoder_decoder:
        if getattr(c, "model_type", "") != "t5":
            raise ConfigError(f"No activation formula for encoder-decoder model type '{c.model_type}' (T5 only).")
        src, tgt = cfg.max_source_length, cfg.max_target_length
        tokens = {"batch": b, "source": src, "target": tgt}
        act = {ck: _t5_activations(c, b, src, tgt, r, a, ck) for ck in (False, True)}
    else:
        if not all(hasattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")):
            raise ConfigError(f"No activation formula for model type '{getattr(c, 'model_type', '?')}' "
                              f"(LLaMA-like decoders and T5 are supported).")
        s = seq_len or (cfg.max_source_length + cfg.max_target_length)
        window = answer_window or cfg.max_target_length + 1
        per_layer_targets = len(shapes.targets) // max(c.num_hidden_layers, 1)
        tokens = {"batch": b, "sequence": s, "answer_window": window}
        act = {ck: _decoder_activations(c, b, s, window, per_layer_targets, r, a, ck) for ck in (False, True)}
    if deal:
        # the factors O computed in the forward pass and the update MLP's saved inputs (n × r, 2 n × h)
        rows = sum(d_in * (cfg.deal_update in ("both", "A")) + d_out * (cfg.deal_update in ("both", "B"))
                   for _, _, d_in, d_out in lora_sizes)
        deal_graph = rows * (2 * r + 2 * cfg.deal_mlp_hidden) * 4
    else:
        deal_graph = 0
    saved, logits, workspace = act[p.gradient_checkpointing]
    components = {
        "base_weights": int(weights), "lora_adapter": int(lora_adapter), "deal_parameters": int(deal_parameters),
        "gradients": int(grads), "optimizer_states": int(optim), "activations": int(saved + deal_graph),
        "backward_transient": int(max(logits, workspace)),
    }
    peak = sum(components.values())
    overhead = CPU_PROCESS_BYTES if p.cpu else CUDA_CONTEXT_BYTES
    required = int(peak * (1 + ALLOCATOR_MARGIN)) + overhead
    device_bytes = int(p.memory_gib * GIB)
    return MemoryEstimate(
        model=model, method=method, profile=p, tokens=tokens, parameters=shapes.parameters,
        trainable_parameters=int(trainable), components=components,
        activations_without_checkpointing=int(act[False][0] + deal_graph),
        activations_with_checkpointing=int(act[True][0] + deal_graph),
        peak_bytes=int(peak), overhead_bytes=overhead, required_bytes=required, device_bytes=device_bytes,
        fits=required <= device_bytes)


def lower_bound(base_parameters: int, trainable_parameters: int, weight_bytes: int = 4) -> dict:
    """The dry run's lower bound on training memory: the base weights plus, per trainable parameter, an fp32
    weight, an fp32 gradient and AdamW's two fp32 moments (16 bytes). Activations, the CUDA context and allocator
    slack are NOT included (``estimate`` counts them).

    Args:
        weight_bytes: bytes per base weight (4: the loop loads float32 and mixed precision only autocasts).
    Returns:
        ``weights_bytes``, ``trainable_bytes``, ``total_bytes`` (bytes) and ``total_gib``.
    """
    weights = base_parameters * weight_bytes
    trainable = trainable_parameters * 16
    return {"weights_bytes": weights, "trainable_bytes": trainable, "total_bytes": weights + trainable,
            "total_gib": (weights + trainable) / GIB}
