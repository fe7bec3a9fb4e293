"""The continual training loop on Accelerate: read it top to bottom.

``run(cfg)``: validate every task's data, load the model, then for each task
``method.before_task`` -> AdamW (constant LR) over ``method.param_groups`` -> micro batches (the task's rows
plus ``method.replay_rows``) with gradient accumulation and clipping -> ``method.after_task`` -> save a plain
PEFT adapter and ``method.state_dict`` -> evaluate every task seen so far -> write ``metrics.json``
(atomically). Inside a task, step checkpoints (``checkpoint_every_steps``, and on SIGINT/SIGTERM/SIGUSR1) are
written by ``deal_train.checkpointing``. A rerun of the same command resumes from the newest step checkpoint of
the unfinished task, else after the last finished task.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from datasets import concatenate_datasets
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import enable_full_determinism

from . import adapter_change, distributed
from ..model import precision
from .checkpointing import StepCheckpointer, StopSignals, TaskProgress
from ..config import METHOD_KEY_PREFIXES, ConfigError, TrainConfig, with_legacy_defaults
from ..data import Encoder, collate_train, encoder_for
from ..data.prepare import TaskData, prepare_data, truncation_report
from .evaluation import average_accuracy, backward_transfer, generate_predictions, score
from ..model.losses import answer_forward, token_cross_entropy_sum
from ..methods import ContinualMethod, get_method
from ..model.loading import check_target_modules, load_tokenizer, with_model_defaults
from ..outputs import (METRICS_FILE, atomic_write_dir, atomic_write_json, format_matrix, plot_accuracy_matrix,
                      write_predictions)
from .profiling import memory_phase, memory_scalars, memory_stats

METHOD_STATE_FILE = "method_state.safetensors"
"""``method.state_dict()`` after a task, written inside that task's adapter directory (when not empty)."""
RESUME_IGNORED_KEYS = frozenset({"output_dir", "overwrite_output_dir", "logging_steps", "per_device_eval_batch_size",
                                 "checkpoint_every_steps", "resume_from"})
"""Config keys that may differ between a partial run and the command that resumes it."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the CLI prints the message and exits with code 1."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``getrusage``; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def tokenise(datas: list[TaskData], encoder: Encoder, method: ContinualMethod) -> None:
    """Tokenise every task's rows in place, and the rows of earlier tasks that ``method.replay_rows`` mixes into
    each task, each with its own task's prompt."""
    for t, d in enumerate(datas):
        d.train_features, d.truncated_train = encoder.train_features(d.task, d.train_rows)
        d.test_features, d.truncated_test = encoder.eval_features(d.task, d.test_rows)
        extra = method.replay_rows(t, [(x.task, x.train_rows) for x in datas[:t]])
        d.replay_features = [encoder.train_features(task, rows)[0] for task, rows in extra if rows]


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: (",".join(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()}


def comparable_config(saved: dict) -> dict:
    """A run's config as saved in ``metrics.json``, ready to compare with another: keys added to TrainConfig
    after that run was made take the value that reproduces how it ran (``config.LEGACY_DEFAULTS``, else the
    key's default), an empty ``target_modules`` becomes the model type's default, and ``RESUME_IGNORED_KEYS`` and
    the keys of other methods (``METHOD_KEY_PREFIXES``: a new DEAL default does not make a finished SeqLoRA run
    stale) are dropped."""
    merged = with_legacy_defaults(saved)
    if not merged["target_modules"]:  # runs record the modules they adapt (``with_model_defaults``)
        merged["target_modules"] = with_model_defaults(TrainConfig(model=merged["model"])).target_modules
    other = [p for m, p in METHOD_KEY_PREFIXES.items() if m != merged.get("method")]
    return {k: v for k, v in merged.items()
            if k not in RESUME_IGNORED_KEYS and not k.startswith(tuple(other))
            and not (merged.get("method") != "deal" and k == "allow_unordered_norms")}


RUN_OUTPUT_DIRS = ("adapters", "predictions", "memory_snapshots")
"""Per-task output folders of a run, removed when ``overwrite_output_dir`` starts a run over (a shorter new run
would otherwise leave the old run's later adapters and predictions next to its own)."""


def clear_run_outputs(out: str) -> None:
    """Remove ``RUN_OUTPUT_DIRS`` and ``metrics.json`` of an earlier run in ``out``; other files (TensorBoard event
    files, anything of the user's) stay, as with Hugging Face's ``overwrite_output_dir``."""
    for name in RUN_OUTPUT_DIRS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, METRICS_FILE))


def _check_output_dir(cfg: TrainConfig) -> dict | None:
    """Return the partial metrics of an earlier run to resume, or None to start fresh.

    Raises:
        ConfigError: the directory holds a finished run, or a run with a different config, and
            ``overwrite_output_dir`` is off.
    """
    path = os.path.join(cfg.output_dir, METRICS_FILE)
    if cfg.overwrite_output_dir or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); pass --overwrite_output_dir to start over.") from None
    if old.get("finished"):
        raise ConfigError(f"Output directory {cfg.output_dir} already holds a finished run. Choose another "
                          f"output_dir or pass --overwrite_output_dir true.")
    old_cfg = comparable_config(old.get("config", {}))
    new_cfg = comparable_config(cfg.to_dict())
    if old_cfg != new_cfg:
        diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        raise ConfigError(f"Output directory {cfg.output_dir} holds a partial run with a different config "
                          f"(keys: {', '.join(diff)}). Rerun with the same settings to resume, or pass "
                          f"--overwrite_output_dir true.")
    return old


def train_task(accelerator: Accelerator, model, method: ContinualMethod, data: TaskData, cfg: TrainConfig,
               task_index: int, global_step: int, pad_token_id: int,
               checkpoints: StepCheckpointer | None = None) -> tuple[int, dict]:
    """Train one task for ``num_train_epochs``; returns the new global step and the task's statistics.

    Loss per optimizer step = (sum of answer-token CE over the accumulation window) / (answer tokens in
    the window, over all processes) + the method's extra loss, so micro batch × accumulation gives the
    same gradient as one large batch whatever the answer lengths.

    With ``checkpoints``, the task starts from its pending step checkpoint (if any), a checkpoint is written
    every ``checkpoint_every_steps`` optimizer steps, and a stop signal checkpoints and raises
    ``TrainingStopped`` (``deal_train.checkpointing``).

    Raises:
        TrainingError: ``max_nonfinite_steps`` consecutive steps had a non-finite loss or gradient (a checkpoint
            is written first when ``checkpoints`` is given).
    """
    set_seed(cfg.seed + task_index)  # same state at each task start, also after a resume
    distributed.gather_adapters(model)  # ZeRO-3: the methods read adapter tensors between forward passes
    method.before_task(model, task_index, data.train_rows)
    precision.check_trainable_float32(model)
    start_factors = adapter_change.snapshot(model, method.trained_adapter())
    groups = [g for g in method.param_groups(model) if g["params"]]
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    optimizer = precision.build_optimizer(cfg, groups)
    generator = torch.Generator().manual_seed(cfg.seed + task_index)
    train_set = concatenate_datasets([data.train_features, *data.replay_features]) if data.replay_features \
        else data.train_features
    loader = DataLoader(train_set, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                        generator=generator, collate_fn=lambda b: collate_train(b, pad_token_id))
    accelerator.free_memory()  # also destroys the previous task's DeepSpeed engine
    distributed.configure_deepspeed(accelerator, cfg, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if distributed.keeps_engine(accelerator):
        distributed.check_persistent(accelerator.unwrap_model(model))
    model.train()
    gas = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(loader) / gas)
    total_steps = steps_per_epoch * cfg.num_train_epochs
    name = data.task.name
    progress = (checkpoints.begin_task(task_index, global_step, method) if checkpoints is not None
                else TaskProgress(task_index=task_index, global_step=global_step))
    done = progress.epoch * steps_per_epoch + math.ceil(progress.micro_batches / gas)
    bar = tqdm(total=total_steps, initial=done, desc=f"task {task_index + 1} {name}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start = time.perf_counter() - progress.train_seconds
    params = [p for g in groups for p in g["params"]]
    for epoch in range(progress.epoch, cfg.num_train_epochs):
        it = iter(checkpoints.epoch_batches(loader, generator, progress, epoch) if checkpoints is not None
                  else loader)
        while True:
            window = []
            for _ in range(gas):
                batch = next(it, None)
                if batch is None:
                    break
                window.append(batch)
            if not window:
                break
            progress.micro_batches += len(window)
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            window_tokens = int(accelerator.gather(torch.tensor([local_tokens], device=accelerator.device)).sum())
            scale = accelerator.num_processes * gas / max(window_tokens, 1)
            step_ce, step_extra, logs = 0.0, 0.0, {}
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                accelerator.gradient_state._set_sync_gradients(last)  # as transformers.Trainer does
                ctx = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with ctx:
                    outputs = answer_forward(model, batch)
                    ce_sum, _n = token_cross_entropy_sum(outputs.logits, batch["labels"])
                    loss = ce_sum * scale
                    extra, logs = method.extra_loss(model, batch, outputs)
                    if extra is not None:
                        loss = loss + extra * gas / len(window)
                        step_extra += float(extra.detach()) / len(window)
                    accelerator.backward(loss)
                step_ce += float(ce_sum.detach())
                progress.samples += batch["input_ids"].shape[0] * accelerator.num_processes
            # gradients are synchronised here, so every process takes the same skip decision (DeepSpeed has
            # already clipped and stepped inside accelerator.backward and reports its norm, or None)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            grad_norm = 0.0 if grad_norm is None else float(grad_norm)
            # the step's answer-token CE over all processes (each holds only its own rows' sum), so the logged
            # loss and the skip decision below are the same on every process and equal a one-process run's
            window_ce = float(accelerator.gather(torch.tensor([step_ce], dtype=torch.float64,
                                                              device=accelerator.device)).sum())
            ce_mean = window_ce / max(window_tokens, 1)
            if not (math.isfinite(grad_norm) and math.isfinite(ce_mean) and math.isfinite(step_extra)):
                if accelerator.scaler is not None:
                    optimizer.step()  # fp16: the GradScaler skips this step itself and lowers the loss scale
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                progress.nonfinite += 1
                progress.skipped += 1
                accelerator.print(f"task {task_index + 1} {name}: non-finite loss or gradient "
                                  f"(loss {ce_mean}, grad norm {float(grad_norm)}); step skipped "
                                  f"({progress.nonfinite} in a row)")
                if progress.nonfinite >= cfg.max_nonfinite_steps:
                    saved = ""
                    if checkpoints is not None:
                        progress.train_seconds = time.perf_counter() - start
                        saved = (f" The last good state (optimizer step {progress.global_step}, after the skipped "
                                 f"batches) is checkpointed in {checkpoints.save(progress)}.")
                    raise TrainingError(
                        f"Task '{name}': {progress.nonfinite} consecutive optimizer steps had a NaN/inf loss or "
                        f"gradient. Lower learning_rate (or deal_learning_rate), check the data, or use fp32. Tasks "
                        f"finished before this one are saved in {cfg.output_dir}.{saved}")
                continue
            progress.nonfinite = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.global_step += 1
            progress.losses.append(ce_mean)
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{ce_mean:.3f}", samples_s=f"{progress.samples / elapsed:.2f}")
            if progress.global_step % cfg.logging_steps == 0:
                accelerator.log({"train/loss": ce_mean, "train/extra_loss": step_extra,
                                 "train/learning_rate": optimizer.param_groups[0]["lr"],
                                 "train/samples_per_second": progress.samples / elapsed, "train/task": task_index + 1,
                                 **adapter_change.change_logs(adapter_change.relative_change(
                                     accelerator.unwrap_model(model), start_factors)),
                                 **logs}, step=progress.global_step)
            if checkpoints is not None:
                progress.train_seconds = time.perf_counter() - start
                checkpoints.after_step(progress, name)
    bar.close()
    accelerator.gradient_state._set_sync_gradients(True)
    model = accelerator.unwrap_model(model)
    model.eval()
    distributed.gather_adapters(model)
    own_batches = DataLoader(data.train_features, batch_size=cfg.per_device_train_batch_size, shuffle=False,
                             collate_fn=lambda b: collate_train(b, pad_token_id))
    method.after_task(model, task_index, own_batches)
    change = adapter_change.relative_change(model, start_factors)
    seconds = time.perf_counter() - start
    if not distributed.keeps_engine(accelerator):  # ZeRO-3: the engine's hooks run the evaluation's forward passes
        accelerator.free_memory()
    losses, samples = progress.losses, progress.samples
    stats = {"train_seconds": seconds, "optimizer_steps": total_steps, "train_samples": samples,
             "samples_per_second": samples / seconds if seconds > 0 else 0.0,
             "final_loss": losses[-1] if losses else None,
             "mean_loss": sum(losses) / len(losses) if losses else None,
             "trainable_parameters": n_trainable, "skipped_nonfinite_steps": progress.skipped,
             "relative_change": change}
    return progress.global_step, stats


def evaluate_seen(accelerator, model, method: ContinualMethod | None, tokenizer, datas: list[TaskData], upto: int,
                  cfg: TrainConfig, pred_dir: str | None) -> list[dict]:
    """Evaluate tasks 0..upto; returns one score dict per task and writes predictions under ``pred_dir``.

    ``method`` picks the adapter per task (``eval_adapter``); None evaluates the model as it stands.
    """
    results = []
    for i in range(upto + 1):
        d = datas[i]
        with method.eval_adapter(model, i) if method is not None else contextlib.nullcontext():
            preds = generate_predictions(model, tokenizer, d.test_features, cfg.per_device_eval_batch_size,
                                         cfg.max_new_tokens, accelerator, desc=f"eval {d.task.name}")
        scores = score(preds)
        if pred_dir and accelerator.is_main_process:
            write_predictions(os.path.join(pred_dir, f"{i + 1}-{d.task.name}.jsonl"), preds)
        results.append(scores)
    return results


def save_task_outputs(method: ContinualMethod, model, path: str) -> None:
    """The method's adapter and, when it has any, its state (``METHOD_STATE_FILE``) into directory ``path``."""
    method.save_adapter(model, path)
    distributed.check_saved_adapter(path)
    state = method.state_dict()
    if state:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(path, METHOD_STATE_FILE))


def run(cfg: TrainConfig) -> dict:
    """Train the configured method on the task sequence; returns the final metrics dict.

    Outputs under ``cfg.output_dir``: ``metrics.json``, ``accuracy_matrix.png``, ``predictions/``,
    ``adapters/<k>-<task>/`` (plain PEFT LoRA, plus ``METHOD_STATE_FILE`` for methods with state),
    ``tensorboard/``, and step checkpoints under ``checkpoints/`` while a task trains
    (``deal_train.checkpointing``). SIGINT, SIGTERM and SIGUSR1 checkpoint and stop the run.

    Raises:
        ConfigError: any invalid input, before training starts (``CheckpointError``: an unusable checkpoint).
        TrainingError: repeated non-finite losses.
        TrainingStopped: a stop signal arrived; progress is saved (``exit_code`` = 128 + signal number).
    """
    cfg = with_model_defaults(cfg)
    with StopSignals(announce=os.environ.get("LOCAL_RANK", "0") == "0") as signals:
        return _run(cfg, signals)


def _run(cfg: TrainConfig, signals: StopSignals) -> dict:
    datas = prepare_data(cfg)
    resume = _check_output_dir(cfg)
    out = cfg.output_dir
    distributed.skip_cpu_shared_memory_op()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision or None,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "tensorboard")),
    )
    distributed.check_profile(cfg, accelerator)
    if cfg.full_determinism:
        enable_full_determinism(cfg.seed)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    base = precision.load_base_model(cfg, tokenizer, accelerator.device,
                                     reentrant_checkpointing=distributed.keeps_engine(accelerator))
    check_target_modules(base, cfg.target_modules)
    encoder = encoder_for(base.config, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.chat_template)
    method = get_method(cfg)
    tokenise(datas, encoder, method)
    for line in truncation_report(datas, cfg.max_source_length):
        accelerator.print(line)
    names = [d.task.name for d in datas]
    n = len(datas)
    model = method.wrap(base)
    if not distributed.keeps_engine(accelerator):  # ZeRO-3 moves only each rank's shard to the device
        model.to(accelerator.device)
    accelerator.init_trackers("deal_train", config=_flat_config(cfg))
    metrics = {
        "tasks": names, "method": cfg.method, "model": cfg.model, "finished": False, "completed_tasks": 0,
        "accuracy_matrix": [[None] * n for _ in range(n)], "rouge1_matrix": [[None] * n for _ in range(n)],
        "average_accuracy": None, "backward_transfer": None, "average_rouge1": None,
        "zero_shot": None, "per_task": [], "truncated_rows": {d.task.name: {"train": d.truncated_train, "test": d.truncated_test} for d in datas},
        "dropped_rows_without_gold_label": {d.task.name: d.dropped for d in datas if any(d.dropped.values())},
        "eval_split": cfg.eval_split, "config": cfg.to_dict(),
    }
    global_step = 0
    start_task = 0
    checkpoints = StepCheckpointer(accelerator, out, cfg.checkpoint_every_steps, comparable_config(cfg.to_dict()),
                                   signals)
    if resume is None:
        checkpoints.discard_all()  # a fresh start: checkpoints of an earlier run must not be resumed
        if cfg.overwrite_output_dir and accelerator.is_main_process:
            clear_run_outputs(out)
    if resume is not None and resume.get("completed_tasks", 0) > 0:
        k = resume["completed_tasks"]
        adapters = [os.path.join(out, "adapters", f"{i + 1}-{names[i]}") for i in range(k)]
        for adapter in adapters:
            if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
                raise ConfigError(f"Cannot resume: {adapter} is missing although metrics.json says {k} task(s) are "
                                  f"done. Pass --overwrite_output_dir true to start over.")
        method.load_adapter_weights(model, adapters)
        state_file = os.path.join(adapters[-1], METHOD_STATE_FILE)
        method.load_state_dict(load_file(state_file) if os.path.isfile(state_file) else {})
        method.task_index = k - 1
        metrics.update({key: resume[key] for key in ("accuracy_matrix", "rouge1_matrix", "zero_shot", "per_task")})
        metrics["completed_tasks"] = k
        global_step = resume.get("global_step", 0)
        start_task = k
        accelerator.print(f"Resuming {out}: {k} of {n} tasks already done.")
    elif cfg.eval_zero_shot:
        with model.disable_adapter():
            zs = evaluate_seen(accelerator, model, None, tokenizer, datas, n - 1, cfg,
                               os.path.join(out, "predictions", "zero_shot"))
        metrics["zero_shot"] = {name: s["exact_match"] for name, s in zip(names, zs)}
        accelerator.print("zero-shot exact match: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                 metrics["zero_shot"].items()))
    if accelerator.is_main_process:
        atomic_write_json(os.path.join(out, METRICS_FILE), {**metrics, "global_step": global_step})
    note = checkpoints.prepare_resume(start_task, cfg.resume_from) if start_task < n else None
    if note:
        accelerator.print(note)

    for t in range(start_task, n):
        d = datas[t]
        checkpoints.stop_between_tasks(t, n)
        snapshot = os.path.join(out, "memory_snapshots", f"{t + 1}-{d.task.name}.pickle")
        with memory_phase(cfg.profile_memory, accelerator.device, snapshot if cfg.memory_snapshot else None) \
                as train_memory:
            global_step, stats = train_task(accelerator, model, method, d, cfg, t, global_step,
                                            tokenizer.pad_token_id, checkpoints)
        distributed.gather_adapters(model)  # ZeRO-3: whole adapter tensors for the save (collective)
        if accelerator.is_main_process:
            atomic_write_dir(os.path.join(out, "adapters", f"{t + 1}-{d.task.name}"),
                             lambda tmp: save_task_outputs(method, model, tmp))
        eval_start = time.perf_counter()
        with memory_phase(cfg.profile_memory, accelerator.device) as eval_memory:
            results = evaluate_seen(accelerator, model, method, tokenizer, datas, t, cfg,
                                    os.path.join(out, "predictions", f"after_{t + 1}-{d.task.name}"))
        stats["eval_seconds"] = time.perf_counter() - eval_start
        stats["peak_rss_bytes"] = peak_rss_bytes()
        stats.update(memory_stats(train_memory, eval_memory))
        for i, s in enumerate(results):
            metrics["accuracy_matrix"][i][t] = s["exact_match"]
            metrics["rouge1_matrix"][i][t] = s["rouge1"]
        seen_aa = sum(metrics["accuracy_matrix"][i][t] for i in range(t + 1)) / (t + 1)
        logs = {f"eval/{datas[i].task.name}/exact_match": s["exact_match"] for i, s in enumerate(results)}
        logs.update({f"eval/{datas[i].task.name}/rouge1": s["rouge1"] for i, s in enumerate(results)})
        logs["eval/average_accuracy"] = seen_aa
        logs.update(memory_scalars(stats))
        accelerator.log(logs, step=global_step)
        metrics["per_task"].append({"task": d.task.name, **stats, "average_accuracy_so_far": seen_aa})
        metrics["completed_tasks"] = t + 1
        accelerator.print(f"after task {t + 1} ({d.task.name}): " + ", ".join(
            f"{datas[i].task.name} {s['exact_match']:.1f}" for i, s in enumerate(results)) +
            f" | AA so far {seen_aa:.1f} | train {stats['train_seconds']:.0f}s, eval {stats['eval_seconds']:.0f}s")
        if accelerator.is_main_process:
            atomic_write_json(os.path.join(out, METRICS_FILE), {**metrics, "global_step": global_step})
        checkpoints.task_finished(t)

    checkpoints.close()
    acc = metrics["accuracy_matrix"]
    metrics["average_accuracy"] = average_accuracy(acc)
    metrics["backward_transfer"] = backward_transfer(acc)
    metrics["average_rouge1"] = average_accuracy(metrics["rouge1_matrix"])
    metrics["wall_seconds"] = sum(p["train_seconds"] + p["eval_seconds"] for p in metrics["per_task"])
    metrics["finished"] = True
    if accelerator.is_main_process:
        atomic_write_json(os.path.join(out, METRICS_FILE), {**metrics, "global_step": global_step})
        title = f"{cfg.method} on {cfg.benchmark}" + (f" order {cfg.order}" if cfg.benchmark == "standard" else "")
        title += f" | AA {metrics['average_accuracy']:.1f}"
        if metrics["backward_transfer"] is not None:
            title += f", BWT {metrics['backward_transfer']:+.1f}"
        plot_accuracy_matrix(os.path.join(out, "accuracy_matrix.png"), names, acc, title)
    accelerator.end_training()
    bwt = metrics["backward_transfer"]
    accelerator.print("\nAccuracy matrix (exact match %, row = task, column = after training task t):\n" +
                      format_matrix(names, acc) +
                      f"\n\nAverage accuracy {metrics['average_accuracy']:.2f} | backward transfer "
                      f"{'n/a' if bwt is None else f'{bwt:+.2f}'} | average ROUGE-1 {metrics['average_rouge1']:.2f}"
                      f" | wall {metrics['wall_seconds']:.0f}s\nOutputs in {out}")
    return metrics
