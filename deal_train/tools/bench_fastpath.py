"""The fast-path benchmark (issue 20): ``python -m deal_train.bench --suite fastpath`` measures, in one process and
on the same rows, a table of variants (``VARIANTS``: a name, a kind and TrainConfig overrides) and reports paired
ratios between them (``RATIOS``: numerator, denominator, figure, target):

* ``train_fast_today_{lora,deal}``: training samples/s with ``shared_prefix`` on / off (LoRA, and DEAL as task 2
  of a continual run, as the classic bench's ``deal`` variant);
* ``eval_fast_today``: evaluation samples/s of ``generate_predictions`` with ``shared_prefix`` on / off
  (``per_device_eval_batch_size`` and ``max_new_tokens`` of the config), with the fraction of identical greedy
  predictions and, for each differing row, the top-2 logit gap at its first differing step (a near tie);
* ``deal_lora_step_time_fast``: DEAL / LoRA time per optimizer step with the fast path on;
* ``loop_bare_step_time``: ``train_task`` / ``backward_window`` (shared prefix off) against a bare PyTorch + PEFT
  step (forward, answer-token CE, clipping, AdamW) on the same batches, time per step;
* ``ours_{fast,today}_over_trl``: our samples/s over TRL's ``SFTTrainer`` (same PEFT LoRA, rows and settings,
  completion-only loss), when ``trl`` is importable (``pip install -e .[bench]``).

Every repeat runs all variants, the order reversed on every other repeat (ABBA), after ``warmup`` excluded
repeats; each ratio is taken per repeat (paired) and summarised by its median, min, max and spread = the largest
deviation from the median in % of it. ``torch.set_num_threads`` is pinned for the run. Losses: the batches the
fast and today training variants saw are recorded (first measured repeat) and must be the same tensors; their
answer-token CE is recomputed at the start weights with and without the shared prefix (``loss_check``: relative
difference, target <= 1e-5), and the per-repeat trained mean losses are compared too.

To add a variant: a ``Variant`` row (kind ``train`` / ``bare`` / ``eval`` / ``trl`` and config overrides); to add
a ratio: a ``Ratio`` row naming two variants and a figure both report.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import torch
from datasets import Dataset

from ..config import ConfigError, TrainConfig
from ..model.loading import is_encoder_decoder, model_config


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured variant.

    Attributes:
        name: its key in ``repeats`` and in ``Ratio`` rows.
        kind: ``train`` (the trainer's ``train_task``), ``bare`` (a bare PyTorch + PEFT step), ``eval``
            (``generate_predictions``) or ``trl`` (TRL's ``SFTTrainer``; skipped when trl is not importable).
        method: ``lora`` or ``deal`` (``train`` only; DEAL runs as task 2).
        overrides: TrainConfig keys replaced for this variant (e.g. ``{"shared_prefix": False}``).
        sort_prompts: ``eval`` only: batch the prompts longest first (False: row order, the path before the fast
            path).
    """

    name: str
    kind: str
    method: str = "lora"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sort_prompts: bool = True


@dataclasses.dataclass(frozen=True)
class Ratio:
    """``numerator`` / ``denominator`` of ``figure`` per repeat; ``target`` e.g. ``(">=", 2.0)`` or None."""

    name: str
    numerator: str
    denominator: str
    figure: str  # samples_per_second | time_per_step
    target: tuple[str, float] | None = None


TODAY, FAST = {"shared_prefix": False}, {"shared_prefix": True}
GROUPED = {"shared_prefix": True, "group_by_length": True}
VARIANTS: tuple[Variant, ...] = (
    Variant("lora_today", "train", "lora", TODAY),
    Variant("lora_fast", "train", "lora", FAST),
    Variant("lora_fast_grouped", "train", "lora", GROUPED),
    Variant("deal_today", "train", "deal", TODAY),
    Variant("deal_fast", "train", "deal", FAST),
    Variant("bare", "bare", "lora", TODAY),
    Variant("eval_today", "eval", overrides=TODAY, sort_prompts=False),
    Variant("eval_sorted", "eval", overrides=TODAY),
    Variant("eval_fast", "eval", overrides=FAST),
    Variant("trl", "trl", "lora", TODAY),
)
RATIOS: tuple[Ratio, ...] = (
    Ratio("train_fast_today_lora", "lora_fast", "lora_today", "samples_per_second", (">=", 2.0)),
    Ratio("train_fast_today_deal", "deal_fast", "deal_today", "samples_per_second", (">=", 2.0)),
    Ratio("train_grouped_today_lora", "lora_fast_grouped", "lora_today", "samples_per_second", (">=", 2.0)),
    Ratio("eval_fast_today", "eval_fast", "eval_today", "samples_per_second", (">=", 2.5)),
    Ratio("eval_sorted_today", "eval_sorted", "eval_today", "samples_per_second"),
    Ratio("deal_lora_step_time_fast", "deal_fast", "lora_fast", "time_per_step"),
    Ratio("loop_bare_step_time", "lora_today", "bare", "time_per_step", ("<=", 1.02)),
    Ratio("ours_fast_over_trl", "lora_fast", "trl", "samples_per_second"),
    Ratio("ours_today_over_trl", "lora_today", "trl", "samples_per_second"),
)
LOSS_REL_TOL = 1e-5
TIE_GAP = 1e-3
TRL_HINT = "trl is not installed: TRL's SFTTrainer comparison skipped (pip install -e '.[bench]' to add it)."


def trl_available() -> bool:
    """Whether ``trl`` (with its ``SFTTrainer``) imports."""
    try:
        from trl import SFTConfig, SFTTrainer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def ratio_spread(values: Sequence[float]) -> dict[str, Any]:
    """``median``, ``min``, ``max``, ``n``, ``spread_pct`` (max |v - median| / median in %) and ``per_repeat``."""
    med = statistics.median(values)
    dev = max(abs(v - med) for v in values) / med * 100 if med else math.inf
    return {"median": med, "min": min(values), "max": max(values), "n": len(values), "spread_pct": dev,
            "per_repeat": list(values)}


def relative_difference(a: float, b: float) -> float:
    """|a - b| / max(|b|, 1e-12)."""
    return abs(a - b) / max(abs(b), 1e-12)


@dataclasses.dataclass
class TaskRows:
    """One task's benchmark rows: ``data`` (the classic ``BenchData``: training rows and features) and
    ``eval_features`` (a Dataset of ``input_ids`` prompts, ``label``, ``index``, as ``Encoder.eval_features``)."""

    data: Any
    eval_features: Dataset


class FastpathBench:
    """The variant table run on one loaded model (``bench.Bench`` provides model, history adapter, accelerator).

    Args:
        cfg: the training settings of every variant before its overrides (decoder-only models only).
        opts: ``bench.BenchOptions``; ``tasks`` (or ``task``), ``train_steps``, ``eval_samples``, ``repeats``,
            ``warmup``, ``num_threads`` (0: pin torch's current count) and ``trl`` are read.
        variants, ratios: the tables (default ``VARIANTS`` / ``RATIOS``).
    Raises:
        ConfigError: an encoder-decoder model (the fast path is decoder-only), or a task with too few rows.
    """

    def __init__(self, cfg: TrainConfig, opts, variants: Sequence[Variant] = VARIANTS,
                 ratios: Sequence[Ratio] = RATIOS):
        from .bench import Bench, bench_data

        torch.set_num_threads(opts.num_threads or torch.get_num_threads())
        tasks = list(opts.tasks or (opts.task,))
        opts = dataclasses.replace(opts, task=tasks[0], num_threads=torch.get_num_threads())
        if is_encoder_decoder(model_config(cfg.model)):  # refused before any weights are built
            raise ConfigError("--suite fastpath: the shared-prefix fast path is decoder-only; pick a decoder-only "
                              "model (or run the classic suite).")
        self.bench = b = Bench(cfg, opts)
        self.cfg, self.opts = b.cfg, opts
        self.trl = opts.trl and trl_available()
        self.variants = [v for v in variants if v.kind != "trl" or self.trl]
        self.ratios = [r for r in ratios if {r.numerator, r.denominator} <= {v.name for v in self.variants}]
        self.tasks: list[TaskRows] = []
        for name in tasks:
            data = bench_data(self.cfg, dataclasses.replace(opts, task=name, inference_samples=opts.eval_samples),
                              b.tokenizer, b.model.config)
            feats = Dataset.from_list([{"input_ids": p, "label": "", "index": i} for i, p in enumerate(data.prompts)])
            self.tasks.append(TaskRows(data=data, eval_features=feats))

    def config(self, variant: Variant) -> TrainConfig:
        return dataclasses.replace(self.cfg, **dict(variant.overrides))

    # --- one repeat of one variant ----------------------------------------------------------------------------

    def run_variant(self, variant: Variant, record: bool) -> dict:
        """One repeat of ``variant`` over every task; figures summed over tasks. With ``record``, the batches
        (train, bare), losses and predictions are kept under ``seen`` (not written to bench.json)."""
        cfg = self.config(variant)
        if variant.kind == "train":
            return self._train(variant, cfg, record)
        if variant.kind == "bare":
            return self._bare(cfg, record)
        if variant.kind == "eval":
            return self._eval(cfg, record, variant.sort_prompts)
        if variant.kind == "trl":
            return self._trl(cfg)
        raise ValueError(f"unknown variant kind {variant.kind!r}")

    @staticmethod
    def _train_figures(seconds: float, steps: int, samples: int, losses: list[float]) -> dict:
        return {"train_seconds": seconds, "optimizer_steps": steps, "time_per_step": seconds / steps,
                "samples_per_second": samples / seconds, "train_samples": samples,
                "mean_loss": statistics.fmean(losses) if losses else None}

    def _train(self, variant: Variant, cfg: TrainConfig, record: bool) -> dict:
        seconds = steps = samples = padded = computed = 0
        losses, seen, savings = [], [], []
        for t in self.tasks:
            r = self.bench.train_once(variant.method, False, cfg=cfg, data=t.data, seen=seen if record else None)
            seconds += r["train_seconds"]
            steps += r["optimizer_steps"]
            samples += r["train_samples"]
            losses.append(r["mean_loss"])
            savings.append(r["shared_prefix_token_saving"] or 0.0)
            padded += r["padded_token_positions"]
            computed += r["computed_token_positions"]
        out = self._train_figures(seconds, steps, samples, losses)
        out["padded_token_positions"], out["computed_token_positions"] = padded, computed
        # the fast path's ceiling: padded token positions / positions it runs (1 / (1 - saving); 1 when off)
        out["token_ratio_bound"] = 1 / (1 - statistics.fmean(savings))
        if record:
            out["seen"] = seen
        return out

    def _bare(self, cfg: TrainConfig, record: bool) -> dict:
        """A bare PyTorch + PEFT loop on the same batches as ``train_task`` (same seeded shuffle and collation):
        forward with ``logits_to_keep``, answer-token CE (sum / tokens of the accumulation window), backward,
        ``clip_grad_norm_`` at ``max_grad_norm``, ``torch.optim.AdamW`` step. Its optimizer is built before the
        clock starts (as ``train_task`` builds its own in ``start_task``)."""
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader
        from ..data import collate_train
        from ..model.losses import answer_window, token_cross_entropy_sum

        b = self.bench
        model = b.model
        seconds = steps = samples = 0
        losses, seen = [], []
        for t in self.tasks:
            b.restore_history(trainable=True)
            params = [p for _n, p in b._lora_parameters()]
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            set_seed(cfg.seed + 1)
            generator = torch.Generator().manual_seed(cfg.seed + 1)
            loader = DataLoader(t.data.train, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                                generator=generator, collate_fn=lambda rows: collate_train(rows, b.pad_id))
            model.train()
            gas = cfg.gradient_accumulation_steps
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            start = time.perf_counter()
            batches = iter(loader)
            while window := [x for _, x in zip(range(gas), batches)]:
                tokens = sum(int((x["labels"][:, 1:] != -100).sum()) for x in window)
                step_ce = 0.0
                for batch in window:
                    batch = {k: v.to(b.device) for k, v in batch.items()}
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], use_cache=False,
                                logits_to_keep=answer_window(batch["labels"]))
                    ce, _n = token_cross_entropy_sum(out.logits, batch["labels"])
                    (ce / max(tokens, 1)).backward()
                    step_ce += float(ce.detach())
                    samples += batch["input_ids"].shape[0]
                    if record:
                        seen.append(batch)
                torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                losses.append(step_ce / max(tokens, 1))
            seconds += time.perf_counter() - start
        out = self._train_figures(seconds, steps, samples, [statistics.fmean(losses)])
        if record:
            out["seen"] = seen
        return out

    def zero_shot(self) -> None:
        """The LoRA adapter with B = 0 (the model of a run's zero-shot pass): the bench's random history adapter
        would turn the instruct model's answers into noise, and the prediction check wants real answers."""
        self.bench.restore_history(trainable=False)
        with torch.no_grad():
            for name, p in self.bench._lora_parameters():
                if ".lora_B." in name:
                    p.zero_()

    def _eval(self, cfg: TrainConfig, record: bool, sort_prompts: bool = True) -> dict:
        """``generate_predictions`` over every task's evaluation rows (``zero_shot`` adapter); the timed call
        includes the prefix pass (once per task)."""
        from ..train.evaluation import generate_predictions

        b = self.bench
        self.zero_shot()
        seconds, rows, predictions = 0.0, 0, []
        for t in self.tasks:
            start = time.perf_counter()
            preds = generate_predictions(b.model, b.tokenizer, t.eval_features, cfg.per_device_eval_batch_size,
                                         cfg.max_new_tokens, shared_prefix=cfg.shared_prefix,
                                         sort_by_length=sort_prompts)
            seconds += time.perf_counter() - start
            rows += len(preds)
            predictions.append([p["prediction"] for p in preds])
        out = {"eval_seconds": seconds, "samples_per_second": rows / seconds, "rows": rows,
               "prompt_token_positions": sum(prompt_token_positions(t.data.prompts, cfg.per_device_eval_batch_size,
                                                                    cfg.shared_prefix, sort_prompts)
                                             for t in self.tasks)}
        if record:
            out["seen"] = predictions
        return out

    def _trl(self, cfg: TrainConfig) -> dict:
        """TRL's ``SFTTrainer`` on the same rows (pre-tokenised ``input_ids`` + ``completion_mask``,
        completion-only loss), the same PEFT LoRA model (history adapter trainable), batch, accumulation,
        learning rate (constant), clipping and AdamW, no activation checkpointing and our mixed precision (TRL
        defaults to both on); ``max_steps`` = the bench's steps. Time:
        ``train_runtime`` of ``trainer.train()`` (excludes building the trainer)."""
        from trl import SFTConfig, SFTTrainer

        b = self.bench
        seconds = steps = samples = 0
        for t in self.tasks:
            b.restore_history(trainable=True)
            rows = [{"input_ids": ids, "completion_mask": [int(x != -100) for x in labels]}
                    for ids, labels in zip(t.data.train["input_ids"], t.data.train["labels"])]
            n_steps = math.ceil(len(rows) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps))
            with tempfile.TemporaryDirectory() as tmp:
                args = SFTConfig(output_dir=tmp, per_device_train_batch_size=cfg.per_device_train_batch_size,
                                 gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                 learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                                 weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                 max_steps=n_steps, logging_steps=10**6, save_strategy="no", report_to="none",
                                 completion_only_loss=True, max_length=None, packing=False, seed=cfg.seed,
                                 use_cpu=b.device.type == "cpu", disable_tqdm=True, optim="adamw_torch",
                                 dataloader_num_workers=0, activation_checkpointing=False,
                                 bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16")
                trainer = SFTTrainer(model=b.model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=b.tokenizer)
                result = trainer.train()
            seconds += result.metrics["train_runtime"]
            steps += n_steps
            samples += len(rows)
        b.model.train()
        return self._train_figures(seconds, steps, samples, [])

    # --- the run ----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Warm-up repeats, then ``repeats`` repeats of every variant, the order reversed every other repeat;
        returns the ``bench.json`` content (``checks`` from the first measured repeat)."""
        opts = self.opts
        gc.collect()
        gc.freeze()
        raw: dict[str, list[dict]] = {v.name: [] for v in self.variants}
        recorded: dict[str, dict] = {}
        try:
            for _ in range(opts.warmup):
                for v in self.variants:
                    print(f"warm-up: {v.name}", file=sys.stderr, flush=True)
                    self.run_variant(v, record=False)
            for k in range(opts.repeats):
                order = self.variants if k % 2 == 0 else self.variants[::-1]
                for v in order:
                    print(f"repeat {k + 1}/{opts.repeats}: {v.name}", file=sys.stderr, flush=True)
                    figures = self.run_variant(v, record=(k == 0))
                    if "seen" in figures:
                        recorded[v.name] = {**figures}
                        del figures["seen"]
                    raw[v.name].append(figures)
                self.save_partial(raw)
        finally:
            gc.unfreeze()
        checks = self.checks(recorded, raw)
        return self.report(raw, checks)

    def save_partial(self, raw: dict[str, list[dict]]) -> None:
        """``<output_dir>/bench_partial.json``: the raw repeats so far (a run cut short keeps them)."""
        from ..outputs import atomic_write_json
        import os

        atomic_write_json(os.path.join(self.cfg.output_dir, "bench_partial.json"), {"repeats": raw})

    # --- equality checks ----------------------------------------------------------------------------------------

    def checks(self, recorded: dict[str, dict], raw: dict[str, list[dict]]) -> dict:
        """Loss and prediction equality between the paired variants (first measured repeat's recordings). A check
        that fails to run is reported as ``<name>_error`` (the timings are kept)."""
        out: dict[str, Any] = {}
        try:
            self._checks(recorded, raw, out)
        except Exception as err:  # noqa: BLE001 - keep the measured repeats whatever a check hits
            out["error"] = f"{type(err).__name__}: {err}"
        return out

    def _checks(self, recorded: dict[str, dict], raw: dict[str, list[dict]], out: dict) -> None:
        for method in ("lora", "deal"):
            fast, today = recorded.get(f"{method}_fast"), recorded.get(f"{method}_today")
            if fast and today:
                out[f"loss_{method}"] = self.loss_check(method, today["seen"], fast["seen"])
                out[f"loss_{method}"]["trained_mean_loss_rel_diff_max"] = max(
                    relative_difference(f["mean_loss"], t["mean_loss"])
                    for f, t in zip(raw[f"{method}_fast"], raw[f"{method}_today"]))
        if "bare" in recorded and "lora_today" in recorded:
            loop, bare = recorded["lora_today"]["seen"], recorded["bare"]["seen"]
            out["bare_same_batches"] = same_batches(loop, bare)
            out["bare_mean_loss_rel_diff_max"] = max(
                relative_difference(x["mean_loss"], y["mean_loss"]) for x, y in zip(raw["bare"], raw["lora_today"]))
        if "eval_fast" in recorded and "eval_today" in recorded:
            out["predictions"] = self.prediction_check(recorded["eval_today"]["seen"], recorded["eval_fast"]["seen"])

    @torch.no_grad()
    def loss_check(self, method_name: str, today: list[dict], fast: list[dict]) -> dict:
        """Answer-token CE of every recorded micro batch, without (``today``'s batches) and with (``fast``'s, same
        tokens plus ``shared_prefix``) the shared prefix, at the start weights of the variant (the history
        adapter; DEAL attached as task 2).

        Returns:
            ``same_batches`` (bool: identical input ids, masks and labels in the same order), ``batches``,
            ``mean_shared_prefix`` (tokens), ``max_rel_diff`` (of the per-batch mean CE) and ``ok``
            (<= ``LOSS_REL_TOL``).
        """
        from ..methods import DEAL
        from ..model.losses import answer_forward, token_cross_entropy_sum

        b = self.bench
        same = same_batches(today, fast)
        b.restore_history(trainable=False)
        method = DEAL(self.cfg) if method_name == "deal" else None
        if method is not None:
            method.before_task(b.model, 1)
        b.model.eval()
        diffs = []
        try:
            for t, f in zip(today, fast):
                losses = []
                for batch in (t, f):
                    batch = {k: v.to(b.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    ce, n = token_cross_entropy_sum(answer_forward(b.model, batch).logits, batch["labels"])
                    losses.append(float(ce) / n)
                diffs.append(relative_difference(losses[1], losses[0]))
        finally:
            if method is not None:
                method.after_task(b.model, 1)
            b.model.train()
        worst = max(diffs) if diffs else math.nan
        return {"same_batches": same, "batches": len(diffs),
                "mean_shared_prefix": statistics.fmean(int(f.get("shared_prefix", 0)) for f in fast) if fast else 0,
                "max_rel_diff": worst, "ok": same and worst <= LOSS_REL_TOL}

    def prediction_check(self, today: list[list[str]], fast: list[list[str]]) -> dict:
        """Fraction of identical greedy predictions, and for every differing row its near tie: the top-2 logit gap
        of a full forward pass (batch 1) of prompt + the two predictions' common tokens (the first differing
        step; predictions re-tokenised from their text)."""
        b = self.bench
        self.zero_shot()
        total = same = 0
        differing = []
        for task_rows, t_preds, f_preds in zip(self.tasks, today, fast):
            for i, (a, c) in enumerate(zip(t_preds, f_preds)):
                total += 1
                if a == c:
                    same += 1
                    continue
                prompt = list(task_rows.eval_features[i]["input_ids"])
                differing.append({"task": task_rows.data.task.name, "row": i, "today": a, "fast": c,
                                  **self.first_step_gap(prompt, a, c)})
        return {"rows": total, "identical": same, "identical_fraction": same / total if total else math.nan,
                "differing": differing,
                "all_differing_near_ties": all(d["top2_gap"] < TIE_GAP for d in differing)}

    @torch.no_grad()
    def first_step_gap(self, prompt: list[int], a: str, c: str) -> dict:
        """``step`` (first differing generated token, 0-based) and ``top2_gap`` (logit units) there."""
        b = self.bench
        ta = b.tokenizer(a, add_special_tokens=False)["input_ids"]
        tc = b.tokenizer(c, add_special_tokens=False)["input_ids"]
        k = 0
        while k < min(len(ta), len(tc)) and ta[k] == tc[k]:
            k += 1
        b.model.eval()
        ids = torch.tensor([prompt + ta[:k]], device=b.device)
        logits = b.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1].float()
        top = logits.topk(2)
        return {"step": k, "top2_gap": float(top.values[0] - top.values[1]),
                "top2_tokens": [b.tokenizer.decode([x]) for x in top.indices.tolist()]}

    # --- report -------------------------------------------------------------------------------------------------

    def report(self, raw: dict[str, list[dict]], checks: dict) -> dict:
        """The ``bench.json`` content: settings, raw repeats, per-variant medians, ratios and checks."""
        cfg, opts = self.cfg, self.opts
        ratios, summary = summarise(raw, self.ratios)
        b = self.bench
        return {
            "suite": "fastpath", "model": cfg.model, "device": str(b.device),
            "device_name": torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "trl": self.trl, "trl_installed": trl_available(),
            "settings": {"tasks": [t.data.task.name for t in self.tasks], "repeats": opts.repeats,
                         "warmup": opts.warmup, "train_steps": opts.train_steps, "eval_samples": opts.eval_samples,
                         "per_device_train_batch_size": cfg.per_device_train_batch_size,
                         "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                         "per_device_eval_batch_size": cfg.per_device_eval_batch_size,
                         "max_new_tokens": cfg.max_new_tokens, "lora_rank": cfg.lora_rank,
                         "lora_alpha": cfg.lora_alpha, "target_modules": list(cfg.target_modules),
                         "max_source_length": cfg.max_source_length, "chat_template": cfg.chat_template,
                         "mixed_precision": cfg.mixed_precision or "no",
                         "variants": [dataclasses.asdict(v) | {"overrides": dict(v.overrides)} for v in self.variants],
                         "mean_train_tokens_per_row": statistics.fmean(
                             len(x) for t in self.tasks for x in t.data.train["input_ids"]),
                         "mean_prompt_tokens": statistics.fmean(len(p) for t in self.tasks for p in t.data.prompts)},
            "repeats": raw, "summary": summary, "ratios": ratios, "checks": checks,
        }


def summarise(raw: dict[str, list[dict]], ratios: Sequence[Ratio] = RATIOS) -> tuple[dict, dict]:
    """``(ratios, summary)`` of raw repeats (``bench.json``'s or ``bench_partial.json``'s ``repeats``): each ratio
    whose two variants are present, per repeat (paired; the shorter list decides how many) with ``ratio_spread``
    and its target; each variant's numeric figures with ``ratio_spread``."""
    out = {}
    for r in ratios:
        if not raw.get(r.numerator) or not raw.get(r.denominator):
            continue
        values = [n[r.figure] / d[r.figure] for n, d in zip(raw[r.numerator], raw[r.denominator])]
        s = ratio_spread(values)
        if r.target is not None:
            op, bound = r.target
            s["target"] = f"{op} {bound}"
            s["meets_target"] = s["median"] >= bound if op == ">=" else s["median"] <= bound
        out[r.name] = {**s, "numerator": r.numerator, "denominator": r.denominator, "figure": r.figure}
    summary = {name: {key: ratio_spread([rep[key] for rep in reps]) for key in reps[0]
                      if isinstance(reps[0][key], (int, float)) and reps[0][key] is not None}
               for name, reps in raw.items() if reps}
    return out, summary


def prompt_token_positions(prompts: Sequence[Sequence[int]], batch_size: int, shared_prefix: bool,
                           sort_prompts: bool = True) -> int:
    """Prompt token positions the first (prefill) forward pass of ``generate_predictions`` runs over one task:
    batches of ``batch_size`` prompts (sorted longest first, or in row order), each ``rows x width``; with
    ``shared_prefix`` the common prefix (``common_prefix_length``) once plus ``rows x (width - P)``. Decoding steps
    are not counted."""
    from ..train.evaluation import common_prefix_length

    lengths = [len(p) for p in prompts]
    if sort_prompts:
        lengths.sort(reverse=True)
    p = common_prefix_length(prompts) if shared_prefix else 0
    total = p
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        total += len(chunk) * (max(chunk) - p)
    return total


def token_bounds_vs_today(summary: dict) -> dict[str, float]:
    """For each variant ``<kind>_...`` other than ``<kind>_today``: today's padded token positions / the positions
    the variant computes (medians; training: the micro batches, evaluation: the prompts' prefill pass), the most a
    variant that only drops token positions (shared prefix, less padding) can gain over today's path on the same
    rows."""
    out = {}
    for name, s in summary.items():
        method = name.split("_")[0]
        today = summary.get(f"{method}_today")
        if name == f"{method}_today" or not today:
            continue
        if "computed_token_positions" in s and "padded_token_positions" in today:
            if s["computed_token_positions"]["median"]:
                out[name] = today["padded_token_positions"]["median"] / s["computed_token_positions"]["median"]
        elif "prompt_token_positions" in s and "prompt_token_positions" in today:  # evaluation: the prefill
            if s["prompt_token_positions"]["median"]:
                out[name] = today["prompt_token_positions"]["median"] / s["prompt_token_positions"]["median"]
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """Whether two recorded batch lists hold the same ``input_ids``, ``attention_mask`` and ``labels`` in order."""
    if len(a) != len(b):
        return False
    return all(torch.equal(x[k].cpu(), y[k].cpu()) for x, y in zip(a, b) for k in ("input_ids", "attention_mask",
                                                                                    "labels"))


def format_fastpath_table(result: dict) -> str:
    """The printed report: per-variant medians, the ratios (median [min-max], spread, target) and the checks."""
    st = result["settings"]
    lines = [f"{result['model']} on {', '.join(st['tasks'])} ({result['device_name']}, {result['threads']} threads "
             f"pinned), train batch {st['per_device_train_batch_size']} x accumulation "
             f"{st['gradient_accumulation_steps']}, {st['train_steps']} optimizer steps per task and repeat, eval "
             f"{st['eval_samples']} rows at batch {st['per_device_eval_batch_size']}, max_new_tokens "
             f"{st['max_new_tokens']}; {st['repeats']} interleaved repeats (ABBA) after {st['warmup']} warm-up",
             "", f"{'variant':<18}{'samples/s':>14}{'time/step (s)':>16}{'spread %':>10}"]
    for name, s in result["summary"].items():
        step = f"{s['time_per_step']['median']:.3f}" if "time_per_step" in s else "-"
        lines.append(f"{name:<18}{s['samples_per_second']['median']:>14.2f}{step:>16}"
                     f"{s['samples_per_second']['spread_pct']:>10.1f}")
    bounds = {n: s["token_ratio_bound"]["median"] for n, s in result["summary"].items() if "token_ratio_bound" in s}
    if any(b > 1 for b in bounds.values()):
        lines.append("token bound of the fast path (padded / computed token positions): " +
                     ", ".join(f"{n} {b:.2f}x" for n, b in bounds.items() if b > 1))
    vs_today = token_bounds_vs_today(result["summary"])
    if vs_today:
        lines.append("token bound against today's path (today's padded positions / positions the variant "
                     "computes, same rows): " + ", ".join(f"{n} {b:.2f}x" for n, b in vs_today.items()))
    lines += ["", f"{'ratio (paired per repeat)':<28}{'figure':<20}{'median':>8}  {'[min-max]':<16}{'spread %':>9}"
                  f"  target"]
    for name, r in result["ratios"].items():
        target = f"{r['target']} {'ok' if r['meets_target'] else 'MISSED'}" if "target" in r else ""
        lines.append(f"{name:<28}{r['figure']:<20}{r['median']:>8.3f}  [{r['min']:.3f}-{r['max']:.3f}]"
                     f"{r['spread_pct']:>9.1f}  {target}")
    if not result["trl"]:
        lines += ["", TRL_HINT if not result.get("trl_installed") else "TRL's SFTTrainer skipped (--no_trl)."]
    c = result["checks"]
    lines.append("")
    if "error" in c:
        lines.append(f"checks stopped with {c['error']}")
    for method in ("lora", "deal"):
        if f"loss_{method}" in c:
            x = c[f"loss_{method}"]
            lines.append(f"loss fast vs today, {method}: same batches {x['same_batches']}, {x['batches']} batches "
                         f"(mean shared prefix {x['mean_shared_prefix']:.0f} tokens), max relative difference "
                         f"{x['max_rel_diff']:.2e} at the start weights ({'ok' if x['ok'] else 'ABOVE'} "
                         f"{LOSS_REL_TOL:g}); trained mean loss {x['trained_mean_loss_rel_diff_max']:.2e}")
    if "bare_same_batches" in c:
        lines.append(f"bare vs loop: same batches {c['bare_same_batches']}, trained mean loss relative difference "
                     f"{c['bare_mean_loss_rel_diff_max']:.2e}")
    if "predictions" in c:
        p = c["predictions"]
        lines.append(f"greedy predictions fast vs today: {p['identical']}/{p['rows']} identical "
                     f"({100 * p['identical_fraction']:.1f} %)")
        for d in p["differing"]:
            lines.append(f"  {d['task']} row {d['row']}: today {d['today']!r} fast {d['fast']!r}: step {d['step']}, "
                         f"top-2 logit gap {d['top2_gap']:.2e} ({'near tie' if d['top2_gap'] < TIE_GAP else 'NOT a tie'}"
                         f", top-2 {d['top2_tokens']})")
    return "\n".join(lines)
