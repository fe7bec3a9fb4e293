"""Efficiency benchmark, DEAL against plain LoRA (the paper's Tables 9 and 10, side by side).

``python -m deal_train.bench --model <id|alias|architecture> --methods lora,deal [--key value ...]`` measures in
one process, on real rows of one benchmark task (default dbpedia, the paper's), for

* ``lora``: training a plain LoRA adapter (SeqLoRA's task 2: the adapter keeps training), and inference with it;
* ``deal``: DEAL while training, i.e. task 2 of a continual run: the LoRA adapter frozen as the history and the
  DEAL parametrization attached (``deal_train.methods.DEAL.before_task`` with ``task_index=1``; its SVD is timed
  separately as ``setup_seconds``, once per task), and inference with the model still wrapped (``deal_wrapped``)
  and with the folded adapter (``deal_folded``, a plain LoRA adapter after ``DEAL.after_task``);

training throughput (samples/s and real, unpadded tokens/s), time per optimizer step, peak training memory,
inference latency per sample (greedy generation of each row's label: exactly as many new tokens as the label
and EOS have, so random-weight models do the same work as trained ones; batch 1 and ``--inference_batch_size``)
and peak inference memory. Peak memory comes from ``deal_train.profiling.MemoryProfiler`` (CUDA allocator peak;
on CPU the process's peak RSS, reset before each phase).

The measurement is interleaved: after one warm-up repeat of every variant (excluded), each repeat runs LoRA and
DEAL one after the other, alternating which goes first (ABBA), so that slow drifts of a shared machine hit both;
every figure is the median over repeats with its min-max spread, and the DEAL/LoRA ratios are taken per repeat
(paired) and then summarised the same way.

Training of decoder-only models is the trainer's own ``loop.train_task`` (same forward, loss, accumulation,
clipping and optimizer as a real run; one call is one repeat, time per step = its training seconds / optimizer
steps), for decoder-only and encoder-decoder (``t5-large-arch``, LoRA on ``q``, ``v``) models alike.

Architecture-only models get token ids of the real rows (SmolLM2's tokenizer); where those ids do not fit the
vocabulary (T5), every id is mapped to a random one below the vocabulary size, keeping every length.

Outputs ``<output_dir>/bench.json`` (default ``outputs/bench``): ``settings``, ``repeats`` (raw per-repeat
figures per variant), ``summary`` (median/min/max per figure) and ``ratios`` (DEAL / LoRA, each with ``median``,
``min``, ``max``, ``per_repeat``): ``train_time_per_step``, ``train_samples_per_second``, ``train_peak_memory``,
``train_peak_memory_delta``, ``inference_latency_folded`` (batch 1), ``inference_latency_folded_batch``,
``inference_latency_wrapped``, ``inference_peak_memory_folded``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from typing import Any, Sequence

import torch
from datasets import Dataset

from ..model.architectures import is_architecture
from ..cli import build_parser
from ..config import ConfigError, TrainConfig
from ..data import IGNORE_INDEX, encoder_for, load_task, read_rows, sample_rows
from ..model.loading import is_encoder_decoder
from ..train.evaluation import spread as evaluation_spread
from ..train.profiling import MemoryProfiler, fix_malloc_mmap_threshold

BENCH_JSON = "bench.json"
DEFAULT_OUTPUT_DIR = "outputs/bench"
BENCH_METHODS = ("lora", "deal")


@dataclasses.dataclass
class BenchOptions:
    """The benchmark's own settings (the training settings are a ``TrainConfig``).

    Attributes:
        methods: a subset of ``("lora", "deal")``; ratios need both.
        repeats: measured repeats per variant (after ``warmup`` excluded ones).
        train_steps: optimizer steps per training repeat (each of ``per_device_train_batch_size`` ×
            ``gradient_accumulation_steps`` rows).
        inference_samples: test rows generated per inference repeat.
        inference_batch_size: the batch size measured besides batch 1.
        task: the benchmark task whose rows are used.
        memory_snapshot: on CUDA, dump an allocator snapshot of the first measured repeat of each phase.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        fix_malloc: on CPU, fix glibc's mmap threshold (``profiling.fix_malloc_mmap_threshold``) so that peak RSS
            follows tensor memory instead of heap fragmentation.
        num_threads: ``torch.set_num_threads`` for the run (0: torch's default). On a CPU shared with other jobs,
            1 avoids OpenMP/MKL threads waiting for a core that another process holds, which inflates every small
            operation (DEAL's per-factor maps most).
        suite: ``classic`` (DEAL against LoRA, this module) or ``fastpath`` (the variant table of
            ``bench_fastpath``: shared prefix on/off, loop/bare, TRL).
        tasks: ``fastpath``: the tasks whose rows every variant runs on, one after the other (empty: ``task``;
            the command line's ``--tasks a,b``, the TrainConfig key, sets it).
        eval_samples: ``fastpath``: test rows per task given to ``generate_predictions``.
        trl: ``fastpath``: include TRL's SFTTrainer when ``trl`` is importable.
    """

    methods: tuple[str, ...] = BENCH_METHODS
    repeats: int = 5
    warmup: int = 1
    train_steps: int = 2
    inference_samples: int = 4
    inference_batch_size: int = 4
    task: str = "dbpedia"
    memory_snapshot: bool = False
    device: str = "auto"
    fix_malloc: bool = True
    num_threads: int = 0
    suite: str = "classic"
    tasks: tuple[str, ...] = ()
    eval_samples: int = 40
    trl: bool = True


# --- data ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchData:
    """Tokenised rows: ``train`` (a Dataset of ``input_ids``/``labels``, decoder-only layout or seq2seq layout),
    ``prompts`` (list of prompt id lists) and ``answer_lengths`` (new tokens to generate per prompt)."""

    task: Any
    train_rows: list
    train: Dataset
    prompts: list
    answer_lengths: list
    train_tokens: int
    random_ids: bool


def _random_ids(vocab_size: int, tokenizer_size: int, gen: torch.Generator, keep: dict[int, int]) -> torch.Tensor:
    """A seeded lookup table from the tokenizer's ids to random ids in [2, vocab_size) (ids in ``keep`` map to
    their given value), for architecture-only models whose vocabulary is smaller than the tokenizer's."""
    table = torch.randint(2, vocab_size, (tokenizer_size,), generator=gen)
    for old, new in keep.items():
        table[old] = new
    return table


def bench_data(cfg: TrainConfig, opts: BenchOptions, tokenizer, config) -> BenchData:
    """Rows of ``opts.task`` tokenised for the benchmark by the trainer's own encoder for the model kind
    (``data.encoder_for``: prompt + answer + EOS for decoder-only models, the seq2seq layout for encoder-decoder
    ones). Where the tokenizer's ids do not fit ``config.vocab_size`` every id is mapped through a seeded random
    table into [2, vocab) (EOS to the model's EOS, the decoder start token kept), lengths unchanged.

    Raises:
        ConfigError: the task or its files are missing or malformed (see ``data.read_rows``).
    """
    task = load_task(cfg.resolved_data_dir(), opts.task)
    n_train = opts.train_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    train_rows = sample_rows(read_rows(task, "train"), n_train, cfg.seed)
    if len(train_rows) < n_train:
        raise ConfigError(f"Task '{opts.task}' has {len(train_rows)} training rows; the benchmark needs "
                          f"{n_train} (train_steps × batch × accumulation). Lower --train_steps.")
    test_rows = sample_rows(read_rows(task, "test"), opts.inference_samples, cfg.seed + 1000)
    encoder = encoder_for(config, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.chat_template)
    feats = encoder.train_features(task, train_rows)[0].to_list()
    prompts = [encoder.encode_prompt(task, row["sentence"])[0] for row in test_rows]
    lengths = [len(encoder.encode_answer(row["label"])) for row in test_rows]
    random_ids = len(tokenizer) > config.vocab_size
    if random_ids:
        keep = {tokenizer.eos_token_id: config.eos_token_id}
        if is_encoder_decoder(config):
            keep[encoder.decoder_start_token_id] = encoder.decoder_start_token_id
        table = _random_ids(config.vocab_size, len(tokenizer), torch.Generator().manual_seed(cfg.seed), keep).tolist()
        remap = lambda ids: [t if t == IGNORE_INDEX else table[t] for t in ids]  # noqa: E731
        feats = [{k: remap(v) for k, v in f.items()} for f in feats]
        prompts = [remap(p) for p in prompts]
    tokens = sum(len(f["input_ids"]) + len(f.get("decoder_input_ids", ())) for f in feats)
    return BenchData(task=task, train_rows=train_rows, train=Dataset.from_list(feats), prompts=prompts,
                     answer_lengths=lengths, train_tokens=tokens, random_ids=random_ids)


# --- inference -----------------------------------------------------------------------------------------------

@torch.no_grad()
def generation_latency(model, prompts: list[list[int]], answer_lengths: list[int], batch_size: int,
                       pad_token_id: int, eos_token_id: int, encoder_decoder: bool, device) -> float:
    """Seconds per sample of greedy generation over ``prompts`` in batches of ``batch_size``.

    Each batch generates exactly ``max(answer_lengths of its rows)`` new tokens (``min_new_tokens`` =
    ``max_new_tokens``), the work of generating the labels. Decoder-only prompts are left-padded, encoder
    prompts right-padded. CUDA is synchronised before the clock stops.
    """
    model.eval()
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        rows = prompts[i:i + batch_size]
        n_new = max(answer_lengths[i:i + batch_size])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            sl = slice(0, len(r)) if encoder_decoder else slice(width - len(r), width)
            ids[j, sl] = torch.tensor(r)
            mask[j, sl] = 1
        ids, mask = ids.to(device), mask.to(device)
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                       do_sample=False, num_beams=1, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        _sync(device)
        total += time.perf_counter() - start
    return total / len(prompts)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --- statistics ----------------------------------------------------------------------------------------------

def spread(values: Sequence[float]) -> dict[str, float]:
    """``median``, ``min``, ``max`` and ``n`` of ``values`` (non-empty): ``evaluation.spread``'s robust part."""
    s = evaluation_spread(values)
    return {k: s[k] for k in ("median", "min", "max", "n")}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Per-repeat ratios num[k] / den[k] and their ``spread``, plus ``per_repeat``."""
    values = [a / b for a, b in zip(num, den)]
    return {**spread(values), "per_repeat": values}


# --- the benchmark -------------------------------------------------------------------------------------------

class Bench:
    """Everything one benchmark run holds: the wrapped model, its history adapter, data, accelerator.

    ``run()`` executes warm-up and measured repeats and returns the ``bench.json`` content.
    """

    def __init__(self, cfg: TrainConfig, opts: BenchOptions):
        from accelerate import Accelerator
        from ..model.loading import build_architecture, check_target_modules, default_target_modules, load_model, load_tokenizer

        self.cfg, self.opts = cfg, opts
        if opts.num_threads > 0:
            torch.set_num_threads(opts.num_threads)
        if opts.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu or auto.")
        self.accelerator = Accelerator(cpu=opts.device == "cpu", mixed_precision=cfg.mixed_precision or None,
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        self.device = self.accelerator.device
        self.malloc_fixed = self.device.type == "cpu" and opts.fix_malloc and fix_malloc_mmap_threshold()
        self.tokenizer = load_tokenizer(cfg.model)
        if is_architecture(cfg.model):
            base = build_architecture(cfg.model, self.tokenizer, device=self.device)
        else:
            base = load_model(cfg.model, self.tokenizer).to(self.device)
        self.encoder_decoder = is_encoder_decoder(base.config)
        targets = list(cfg.target_modules) or default_target_modules(base.config)  # empty: q, v (T5) / q_proj, v_proj
        self.cfg = cfg = dataclasses.replace(cfg, target_modules=targets)
        check_target_modules(base, targets)
        if self.encoder_decoder:
            self.pad_id, self.eos_id = base.config.pad_token_id, base.config.eos_token_id
        else:
            self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.data = bench_data(cfg, opts, self.tokenizer, base.config)
        from ..methods import SeqLoRA
        self.model = SeqLoRA(cfg).wrap(base)
        self.model.to(self.device)
        self._make_history()

    def _lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        from ..methods.adapters import adapter_parameters
        return adapter_parameters(self.model, "default")

    def _make_history(self) -> None:
        """The task-1 adapter DEAL starts from: PEFT's A and a B drawn like A (PEFT starts B at zero, a
        degenerate history; the values of a trained adapter do not change the cost). Kept to restore before
        every repeat."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        with torch.no_grad():
            for name, p in self._lora_parameters():
                if ".lora_B." in name:
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        self.history = {n: p.detach().clone() for n, p in self._lora_parameters()}

    def restore_history(self, trainable: bool) -> None:
        """Put the history adapter back (the weights a previous repeat trained or folded) and set the LoRA
        weights' ``requires_grad`` to ``trainable``."""
        with torch.no_grad():
            for name, p in self._lora_parameters():
                p.copy_(self.history[name])
                p.requires_grad_(trainable)

    def _snapshot(self, label: str) -> str | None:
        if not self.opts.memory_snapshot or self.device.type != "cuda":
            return None
        return os.path.join(self.cfg.output_dir, "memory_snapshots", f"{label}.pickle")

    def train_once(self, variant: str, snapshot: bool, cfg: TrainConfig | None = None, data: BenchData | None = None,
                   seen: list | None = None) -> dict:
        """One training repeat of ``variant`` (``lora`` or ``deal``) on the benchmark rows, as task 2.

        Args:
            cfg, data: the training settings and rows (default: the bench's own; ``bench_fastpath`` passes a
                variant's config overrides and each of its tasks).
            seen: when given, every micro batch the loop trains on is appended to it (the batch dict, as
                collated; no copy, so the measured time is unchanged).
        """
        from ..data.prepare import TaskData
        from ..train.task import train_task
        from ..methods import DEAL, SeqLoRA

        cfg = cfg or self.cfg
        data_in = data or self.data
        self.restore_history(trainable=(variant == "lora"))
        method = DEAL(cfg) if variant == "deal" else SeqLoRA(cfg)
        if seen is not None:
            extra_loss = method.extra_loss

            def recording_extra_loss(model, batch, outputs):
                seen.append(batch)
                return extra_loss(model, batch, outputs)

            method.extra_loss = recording_extra_loss
        setup = {}
        before = method.before_task

        def timed_before_task(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            before(*args, **kwargs)
            _sync(self.device)
            setup["seconds"], setup["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0

        method.before_task = timed_before_task
        with MemoryProfiler(self.device, self._snapshot(f"train_{variant}") if snapshot else None) as prof:
            cpu0 = time.process_time()
            data = TaskData(task=data_in.task, train_rows=data_in.train_rows, test_rows=[],
                            train_features=data_in.train)
            _step, stats = train_task(self.accelerator, self.model, method, data, cfg, 1, 0, self.pad_id)
            cpu_seconds = time.process_time() - cpu0 - setup.get("cpu_seconds", 0.0)
        seconds, steps = stats["train_seconds"], stats["optimizer_steps"]
        return {"train_seconds": seconds, "optimizer_steps": steps, "time_per_step": seconds / steps,
                "cpu_time_per_step": cpu_seconds / steps,
                "samples_per_second": stats["train_samples"] / seconds,
                "tokens_per_second": data_in.train_tokens / seconds, "train_samples": stats["train_samples"],
                "mean_loss": stats["mean_loss"], "final_loss": stats["final_loss"],
                "shared_prefix_token_saving": stats.get("shared_prefix_token_saving"),
                "padded_token_positions": stats.get("padded_token_positions", 0),
                "computed_token_positions": stats.get("computed_token_positions", 0),
                "trainable_parameters": stats["trainable_parameters"],
                "skipped_nonfinite_steps": stats.get("skipped_nonfinite_steps", 0),
                "setup_seconds": setup.get("seconds", 0.0), "memory": prof.result.to_dict()}

    def infer_once(self, label: str, snapshot: bool) -> dict:
        """Latency (seconds per sample) at batch 1 and at ``inference_batch_size``, and the peak memory of the
        batched pass, for the model as it stands."""
        out = {}
        for bs in sorted({1, self.opts.inference_batch_size}):
            snap = self._snapshot(f"infer_{label}_batch{bs}") if snapshot else None
            with MemoryProfiler(self.device, snap) as prof, self.accelerator.autocast():  # fp16/bf16 as in training
                cpu0 = time.process_time()
                latency = generation_latency(self.model, self.data.prompts, self.data.answer_lengths, bs,
                                             self.pad_id, self.eos_id, self.encoder_decoder, self.device)
                cpu = (time.process_time() - cpu0) / len(self.data.prompts)
            out[f"batch_{bs}"] = {"latency": latency, "cpu_latency": cpu, "memory": prof.result.to_dict()}
        return out

    def repeat(self, variant: str, snapshot: bool) -> dict[str, dict]:
        """One repeat of ``variant``: ``lora`` -> {lora: train + inference}; ``deal`` -> {deal: train,
        deal_folded: inference after the fold, deal_wrapped: inference with the parametrization attached}."""
        from ..methods import DEAL

        if variant == "lora":
            result = self.train_once("lora", snapshot)
            result.update(self.infer_once("lora", snapshot))
            return {"lora": result}
        train = self.train_once("deal", snapshot)
        folded = self.infer_once("deal_folded", snapshot)
        self.restore_history(trainable=False)
        method = DEAL(self.cfg)
        method.before_task(self.model, 1)
        wrapped = self.infer_once("deal_wrapped", snapshot)
        method.after_task(self.model, 1)
        return {"deal": train, "deal_folded": folded, "deal_wrapped": wrapped}

    def run(self) -> dict:
        """Warm-up, then ``repeats`` interleaved repeats (ABBA). Returns the ``bench.json`` content.

        The objects alive at the start (model, tokenizer, libraries) are moved out of the garbage collector's
        reach for the run (``gc.freeze``): the collections before each measured phase then take milliseconds
        instead of ~0.3 s each.
        """
        opts = self.opts
        methods = list(opts.methods)
        gc.collect()
        gc.freeze()
        try:
            for _ in range(opts.warmup):
                for m in methods:
                    self.repeat(m, snapshot=False)
            raw: dict[str, list[dict]] = {}
            for k in range(opts.repeats):
                order = methods if k % 2 == 0 else methods[::-1]
                for m in order:
                    print(f"repeat {k + 1}/{opts.repeats}: {m}", file=sys.stderr, flush=True)
                    for variant, figures in self.repeat(m, snapshot=(k == 0)).items():
                        raw.setdefault(variant, []).append(figures)
        finally:
            gc.unfreeze()
        return self.report(raw)

    def report(self, raw: dict[str, list[dict]]) -> dict:
        """The ``bench.json`` content from the raw repeats."""
        cfg, opts = self.cfg, self.opts
        bs = opts.inference_batch_size
        figures: dict[str, dict[str, list[float]]] = {}
        for variant, reps in raw.items():
            f = figures.setdefault(variant, {})
            if "time_per_step" in reps[0]:
                for key in ("time_per_step", "cpu_time_per_step", "samples_per_second", "tokens_per_second",
                            "setup_seconds"):
                    f[key] = [r[key] for r in reps]
                f["train_peak_memory"] = [r["memory"]["peak_bytes"] for r in reps]
                f["train_peak_memory_delta"] = [r["memory"]["delta_bytes"] for r in reps]
            if "batch_1" in reps[0]:
                for b in sorted({1, bs}):
                    f[f"latency_batch_{b}"] = [r[f"batch_{b}"]["latency"] for r in reps]
                    f[f"cpu_latency_batch_{b}"] = [r[f"batch_{b}"]["cpu_latency"] for r in reps]
                    f[f"inference_peak_memory_batch_{b}"] = [r[f"batch_{b}"]["memory"]["peak_bytes"] for r in reps]
        summary = {v: {k: spread(vals) for k, vals in f.items()} for v, f in figures.items()}
        ratios = {}
        if "lora" in figures and "deal" in figures:
            lo, de = figures["lora"], figures["deal"]
            ratios = {
                "train_time_per_step": paired_ratios(de["time_per_step"], lo["time_per_step"]),
                "train_cpu_time_per_step": paired_ratios(de["cpu_time_per_step"], lo["cpu_time_per_step"]),
                "train_samples_per_second": paired_ratios(de["samples_per_second"], lo["samples_per_second"]),
                "train_peak_memory": paired_ratios(de["train_peak_memory"], lo["train_peak_memory"]),
                "train_peak_memory_delta": paired_ratios([max(x, 1) for x in de["train_peak_memory_delta"]],
                                                         [max(x, 1) for x in lo["train_peak_memory_delta"]]),
                "inference_latency_folded": paired_ratios(figures["deal_folded"]["latency_batch_1"],
                                                          lo["latency_batch_1"]),
                "inference_cpu_latency_folded": paired_ratios(figures["deal_folded"]["cpu_latency_batch_1"],
                                                              lo["cpu_latency_batch_1"]),
                "inference_latency_folded_batch": paired_ratios(figures["deal_folded"][f"latency_batch_{bs}"],
                                                                lo[f"latency_batch_{bs}"]),
                "inference_latency_wrapped": paired_ratios(figures["deal_wrapped"]["latency_batch_1"],
                                                           lo["latency_batch_1"]),
                "inference_peak_memory_folded": paired_ratios(
                    figures["deal_folded"][f"inference_peak_memory_batch_{bs}"],
                    lo[f"inference_peak_memory_batch_{bs}"]),
            }
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "model": cfg.model, "architecture_only": is_architecture(cfg.model),
            "encoder_decoder": self.encoder_decoder, "random_token_ids": self.data.random_ids,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "memory_source": "cuda_allocator (max_memory_allocated)" if self.device.type == "cuda"
            else "process peak RSS (VmHWM, reset before each phase)" + (
                ", glibc mmap threshold fixed at 64 KiB" if self.malloc_fixed else ""),
            "parameters": n_params,
            "settings": {**dataclasses.asdict(opts), "methods": list(opts.methods),
                         "per_device_train_batch_size": cfg.per_device_train_batch_size,
                         "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                         "mixed_precision": cfg.mixed_precision or "no", "lora_rank": cfg.lora_rank,
                         "lora_alpha": cfg.lora_alpha, "target_modules": list(cfg.target_modules),
                         "max_source_length": cfg.max_source_length, "deal_kernel": cfg.deal_kernel,
                         "deal_scales": cfg.deal_scales, "deal_mlp_hidden": cfg.deal_mlp_hidden,
                         "deal_update": cfg.deal_update, "chat_template": cfg.chat_template,
                         "train_rows_per_repeat": len(self.data.train_rows),
                         "train_tokens_per_repeat": self.data.train_tokens,
                         "mean_prompt_tokens": sum(map(len, self.data.prompts)) / len(self.data.prompts),
                         "mean_new_tokens": sum(self.data.answer_lengths) / len(self.data.answer_lengths)},
            "repeats": raw, "summary": summary, "ratios": ratios,
        }


# --- printing ------------------------------------------------------------------------------------------------

def _fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def format_table(result: dict) -> str:
    """The printed report: training and inference tables (median [min-max] over repeats) and the ratios."""
    s = result["summary"]
    st = result["settings"]
    bs = st["inference_batch_size"]
    mem = "GiB, CUDA max allocated" if result["device"].startswith("cuda") else "GiB, peak RSS"
    lines = [f"{result['model']} on {st['task']} ({result['device_name']}, {result['threads']} threads), "
             f"batch {st['per_device_train_batch_size']} x accumulation {st['gradient_accumulation_steps']}, "
             f"{st['train_steps']} optimizer steps per repeat, mixed precision {st['mixed_precision']}, "
             f"{st['repeats']} repeats after {st['warmup']} warm-up: median [min-max]", "",
             f"{'training':<14}{'time/step (s)':>24}{'CPU time/step (s)':>24}{'samples/s':>22}{'tokens/s':>24}"
             f"{'peak mem (' + mem + ')':>34}{'peak - start (GiB)':>24}"]
    names = {"lora": "lora", "deal": "deal (wrapped)"}
    for v in ("lora", "deal"):
        if v in s:
            x = s[v]
            lines.append(f"{names[v]:<14}{_fmt(x['time_per_step']):>24}{_fmt(x['cpu_time_per_step']):>24}"
                         f"{_fmt(x['samples_per_second'], 1, 2):>22}"
                         f"{_fmt(x['tokens_per_second'], 1, 1):>24}{_fmt(x['train_peak_memory'], 2**-30):>34}"
                         f"{_fmt(x['train_peak_memory_delta'], 2**-30):>24}")
    if "deal" in s:
        lines.append(f"DEAL setup per task (SVD + attach): {_fmt(s['deal']['setup_seconds'], 1000, 1)} ms")
    lines += ["", f"{'inference':<14}{'ms/sample, batch 1':>26}{'CPU ms/sample, batch 1':>26}"
                  f"{f'ms/sample, batch {bs}':>26}{f'peak mem batch {bs} (GiB)':>30}"]
    for v in ("lora", "deal_folded", "deal_wrapped"):
        if v in s:
            x = s[v]
            lines.append(f"{v:<14}{_fmt(x['latency_batch_1'], 1000, 1):>26}{_fmt(x['cpu_latency_batch_1'], 1000, 1):>26}"
                         f"{_fmt(x[f'latency_batch_{bs}'], 1000, 1):>26}"
                         f"{_fmt(x[f'inference_peak_memory_batch_{bs}'], 2**-30):>30}")
    if result["ratios"]:
        lines += ["", "DEAL / LoRA, per repeat (paired), median [min-max]:"]
        for key, r in result["ratios"].items():
            lines.append(f"  {key:<34}{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]")
    return "\n".join(lines)


def parse_methods(text: str) -> tuple[str, ...]:
    """``"lora,deal"`` -> ``("lora", "deal")`` (``seq_lora`` is accepted for ``lora``).

    Raises:
        ConfigError: an unknown name, a repeated one, or an empty list.
    """
    names = [{"seq_lora": "lora"}.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in BENCH_METHODS]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"--methods {text!r}: give a comma-separated subset of {', '.join(BENCH_METHODS)} "
                          f"without repeats.")
    return tuple(names)


def build_bench_parser() -> argparse.ArgumentParser:
    """``python -m deal_train``'s options (every TrainConfig key) plus the benchmark's own."""
    parser = build_parser(prog="python -m deal_train.bench",
                          description="Training and inference efficiency of DEAL against LoRA (paper Tables 9 "
                                      "and 10), interleaved repeats in one process; writes bench.json under "
                                      f"--output_dir (default {DEFAULT_OUTPUT_DIR}).")
    d = BenchOptions()
    parser.add_argument("--methods", default="lora,deal", help="Comma-separated subset of lora, deal.")
    parser.add_argument("--repeats", type=int, default=d.repeats, help=f"Measured repeats. Default {d.repeats}.")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"Excluded warm-up repeats. Default {d.warmup}.")
    parser.add_argument("--train_steps", type=int, default=d.train_steps,
                        help=f"Optimizer steps per training repeat. Default {d.train_steps}.")
    parser.add_argument("--inference_samples", type=int, default=d.inference_samples,
                        help=f"Test rows generated per inference repeat. Default {d.inference_samples}.")
    parser.add_argument("--inference_batch_size", type=int, default=d.inference_batch_size,
                        help=f"Batch size measured besides batch 1. Default {d.inference_batch_size}.")
    parser.add_argument("--task", default=d.task, help=f"Benchmark task whose rows are used. Default {d.task}.")
    parser.add_argument("--cuda_memory_snapshot", action="store_true",
                        help="CUDA: dump allocator snapshots of the first measured repeat of each phase into "
                             "<output_dir>/memory_snapshots/ (open at https://pytorch.org/memory_viz).")
    parser.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available.")
    parser.add_argument("--num_threads", type=int, default=d.num_threads,
                        help="torch.set_num_threads for the run (0: torch's default). Use 1 on a CPU shared with "
                             "other jobs (see BenchOptions).")
    parser.add_argument("--suite", default=d.suite, choices=("classic", "fastpath"),
                        help="classic: DEAL against LoRA; fastpath: shared prefix on/off for training and evaluation, "
                             "loop against a bare PyTorch step, TRL (docs/bench.md).")
    parser.add_argument("--eval_samples", type=int, default=d.eval_samples,
                        help=f"fastpath: test rows per task for generate_predictions. Default {d.eval_samples}.")
    parser.add_argument("--no_trl", action="store_true", help="fastpath: skip TRL's SFTTrainer even when installed.")
    parser.add_argument("--keep_malloc_defaults", action="store_true",
                        help="CPU: keep glibc's dynamic mmap threshold (by default it is fixed at 64 KiB so that "
                             "peak RSS follows tensor memory; see deal_train.profiling).")
    return parser


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The ``BenchOptions`` of parsed arguments.

    Raises:
        ConfigError: a count below its minimum (repeats, train_steps, inference samples and batch >= 1;
            warmup >= 0) or a bad ``--methods``.
    """
    opts = BenchOptions(methods=parse_methods(args.methods), repeats=args.repeats, warmup=args.warmup,
                        train_steps=args.train_steps, inference_samples=args.inference_samples,
                        inference_batch_size=args.inference_batch_size, task=args.task,
                        memory_snapshot=args.cuda_memory_snapshot, device=args.device,
                        fix_malloc=not args.keep_malloc_defaults, num_threads=args.num_threads, suite=args.suite,
                        eval_samples=args.eval_samples, trl=not args.no_trl)
    for name in ("repeats", "train_steps", "inference_samples", "inference_batch_size", "eval_samples"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(opts, name)}.")
    if opts.warmup < 0 or opts.num_threads < 0:
        raise ConfigError(f"--warmup and --num_threads must be >= 0, got {opts.warmup} and {opts.num_threads}.")
    return opts
