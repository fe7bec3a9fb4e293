"""The continual protocol on Accelerate: read ``run`` top to bottom.

``run(cfg)`` has four phases: prepare (``prepare_run``: read and check every task's data, refuse an output folder
that holds another run, build the Accelerator, load the model, wrap it with the method, resume after the finished
tasks or evaluate zero-shot), then for every task train it (``train_one_task``: ``train.task.train_task``), save
its plain PEFT adapter and the method's state (``save_task``), evaluate every task seen so far (``evaluate_task``,
which also records the accuracy matrix and writes ``metrics.json`` atomically), and finish (``finish_run``: AA,
BWT, the plot, the summary). Inside a task, step checkpoints (``checkpoint_every_steps``, and on
SIGINT/SIGTERM/SIGUSR1) are written by ``train.checkpointing``. A rerun of the same command resumes from the newest
step checkpoint of the unfinished task, else after the last finished task. Where each file goes:
``outputs.RunLayout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from transformers import enable_full_determinism

from ..config import ConfigError, TrainConfig, with_legacy_defaults
from ..data import Encoder, encoder_for
from ..data.prepare import TaskData, overlap_report, prepare_data, truncation_report
from ..methods import get_method, is_foreign_key
from ..methods.base import ContinualMethod
from ..model import precision
from ..model.loading import check_target_modules, load_tokenizer, with_model_defaults
from ..outputs.layout import ADAPTER_WEIGHTS_FILE
from ..outputs import (METHOD_STATE_FILE, RunLayout, atomic_write_dir, atomic_write_json, format_matrix,
                       plot_accuracy_matrix, write_predictions)
from . import distributed
from .checkpointing import StepCheckpointer, StopSignals
from .distributed import Zero3, check_saved_adapter
from .evaluation import average_accuracy, backward_transfer, generate_predictions, score
from .profiling import memory_phase, memory_scalars, memory_stats, ru_maxrss_bytes
from .task import TrainingError, train_task

RESUME_IGNORED_KEYS = frozenset({"output_dir", "overwrite_output_dir", "logging_steps", "per_device_eval_batch_size",
                                 "checkpoint_every_steps", "resume_from"})
"""Config keys that may differ between a partial run and the command that resumes it."""


@dataclass
class RunState:
    """Everything the phases of one run share; ``metrics`` is what ``metrics.json`` holds."""

    cfg: TrainConfig
    layout: RunLayout
    accelerator: Accelerator
    zero3: Zero3
    tokenizer: object
    datas: list[TaskData]
    method: ContinualMethod
    model: object
    metrics: dict
    checkpoints: StepCheckpointer | None = None
    global_step: int = 0
    start_task: int = 0
    memory: dict = field(default_factory=dict)  # the task's memory profilers (``memory_phase``)

    @property
    def names(self) -> list[str]:
        return [d.task.name for d in self.datas]


def run(cfg: TrainConfig) -> dict:
    """Train the configured method on the task sequence; returns the final metrics dict.

    Outputs under ``cfg.output_dir`` (``outputs.RunLayout``): ``metrics.json``, ``accuracy_matrix.png``,
    ``predictions/``, ``adapters/<k>-<task>/`` (plain PEFT LoRA, plus ``METHOD_STATE_FILE`` for methods with
    state), ``tensorboard/``, and step checkpoints under ``checkpoints/`` while a task trains
    (``train.checkpointing``). SIGINT, SIGTERM and SIGUSR1 checkpoint and stop the run.

    Raises:
        ConfigError: any invalid input, before training starts (``CheckpointError``: an unusable checkpoint).
        TrainingError: repeated non-finite losses.
        TrainingStopped: a stop signal arrived; progress is saved (``exit_code`` = 128 + signal number).
    """
    cfg = with_model_defaults(cfg)
    with StopSignals(announce=os.environ.get("LOCAL_RANK", "0") == "0") as signals:
        state = prepare_run(cfg, signals)
        for t in range(state.start_task, len(state.datas)):
            state.checkpoints.stop_between_tasks(t, len(state.datas))
            stats = train_one_task(state, t)
            save_task(state, t)
            evaluate_task(state, t, stats)
            state.checkpoints.task_finished(t)
        return finish_run(state)


# --- phase 1: prepare ----------------------------------------------------------------------------------------------

def prepare_run(cfg: TrainConfig, signals: StopSignals) -> RunState:
    """Data, Accelerator, model and method of the run, then resume or the zero-shot pass; writes ``metrics.json``.

    Raises:
        ConfigError: invalid data, model, output folder or checkpoint (before anything trains).
    """
    datas = prepare_data(cfg)
    resume = _check_output_dir(cfg)
    layout = RunLayout(cfg.output_dir)
    distributed.skip_cpu_shared_memory_op()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision or None,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=layout.root, logging_dir=layout.tensorboard),
        **distributed.accelerator_kwargs(),
    )
    distributed.check_profile(cfg, accelerator)
    if cfg.full_determinism:
        enable_full_determinism(cfg.seed)
    set_seed(cfg.seed)
    zero3 = Zero3(accelerator)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    base = precision.load_base_model(cfg, tokenizer, accelerator.device, reentrant_checkpointing=zero3.active)
    check_target_modules(base, cfg.target_modules)
    encoder = encoder_for(base.config, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.chat_template)
    method = get_method(cfg)
    tokenise(datas, encoder, method)
    for line in truncation_report(datas, cfg.max_source_length) + overlap_report(datas):
        accelerator.print(line)
    model = method.wrap(base)
    zero3.place(model)
    accelerator.init_trackers("deal_train", config=_flat_config(cfg))
    state = RunState(cfg, layout, accelerator, zero3, tokenizer, datas, method, model, new_metrics(cfg, datas))
    state.checkpoints = StepCheckpointer(accelerator, layout.root, cfg.checkpoint_every_steps,
                                         comparable_config(cfg.to_dict()), signals)
    if resume is None:
        state.checkpoints.discard_all()  # a fresh start: checkpoints of an earlier run must not be resumed
        if cfg.overwrite_output_dir and accelerator.is_main_process:
            layout.clear()
    if resume is not None and resume.get("completed_tasks", 0) > 0:
        resume_after_tasks(state, resume)
    elif cfg.eval_zero_shot:
        evaluate_zero_shot(state)
    write_metrics(state)
    note = state.checkpoints.prepare_resume(state.start_task, cfg.resume_from) if state.start_task < len(datas) \
        else None
    if note:
        accelerator.print(note)
    return state


def new_metrics(cfg: TrainConfig, datas: list[TaskData]) -> dict:
    """The ``metrics.json`` of a run before its first task: empty matrices, the data counts and the config."""
    n = len(datas)
    return {
        "tasks": [d.task.name for d in datas], "method": cfg.method, "model": cfg.model, "finished": False,
        "completed_tasks": 0,
        "accuracy_matrix": [[None] * n for _ in range(n)], "rouge1_matrix": [[None] * n for _ in range(n)],
        "average_accuracy": None, "backward_transfer": None, "average_rouge1": None,
        "zero_shot": None, "per_task": [],
        "truncated_rows": {d.task.name: {"train": d.truncated_train, "test": d.truncated_test} for d in datas},
        "dropped_rows_without_gold_label": {d.task.name: d.dropped for d in datas if any(d.dropped.values())},
        "train_test_overlap": {d.task.name: d.train_test_overlap for d in datas if d.train_test_overlap},
        "eval_split": cfg.eval_split, "config": cfg.to_dict(),
    }


def resume_after_tasks(state: RunState, resume: dict) -> None:
    """Load the adapters and method state of the ``completed_tasks`` tasks a partial run finished, and its metrics.

    Raises:
        ConfigError: an adapter that ``metrics.json`` counts as done is missing.
    """
    k = resume["completed_tasks"]
    adapters = [state.layout.adapter(i, state.names[i]) for i in range(k)]
    for adapter in adapters:
        if not os.path.isfile(os.path.join(adapter, ADAPTER_WEIGHTS_FILE)):
            raise ConfigError(f"Cannot resume: {adapter} is missing although metrics.json says {k} task(s) are "
                              f"done. Pass --overwrite_output_dir true to start over.")
    method = state.method
    method.load_adapter_weights(state.model, adapters)
    state_file = os.path.join(adapters[-1], METHOD_STATE_FILE)
    method.load_state_dict(load_file(state_file) if os.path.isfile(state_file) else {})
    method.task_index = k - 1
    state.metrics.update({key: resume[key] for key in ("accuracy_matrix", "rouge1_matrix", "zero_shot", "per_task")})
    state.metrics["completed_tasks"] = k
    state.global_step = resume.get("global_step", 0)
    state.start_task = k
    state.accelerator.print(f"Resuming {state.layout.root}: {k} of {len(state.datas)} tasks already done.")


def evaluate_zero_shot(state: RunState) -> None:
    """Exact match of the untouched base model (adapter disabled) on every task, into ``metrics["zero_shot"]``."""
    with state.model.disable_adapter():
        zs = evaluate_seen(state.accelerator, state.model, None, state.tokenizer, state.datas, len(state.datas) - 1,
                           state.cfg, state.layout.predictions(None))
    state.metrics["zero_shot"] = {name: s["exact_match"] for name, s in zip(state.names, zs)}
    state.accelerator.print("zero-shot exact match: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                   state.metrics["zero_shot"].items()))


# --- phases 2-4: train one task, save it, evaluate the tasks seen so far ---------------------------------------------

def train_one_task(state: RunState, t: int) -> dict:
    """``train_task`` of task ``t`` under the memory profiler (``profile_memory``); returns its statistics."""
    cfg, d = state.cfg, state.datas[t]
    snapshot = state.layout.memory_snapshot(t, d.task.name) if cfg.memory_snapshot else None
    with memory_phase(cfg.profile_memory, state.accelerator.device, snapshot) as train_memory:
        state.global_step, stats = train_task(state.accelerator, state.model, state.method, d, cfg, t,
                                              state.global_step, state.tokenizer.pad_token_id, state.checkpoints)
    state.memory["train"] = train_memory
    return stats


def save_task(state: RunState, t: int) -> None:
    """The method's adapter and state after task ``t``, into ``adapters/<t>-<task>/`` (atomically, main process).

    Raises:
        TrainingError: the adapter holds NaN/inf (``check_finite_adapter``); nothing of task ``t`` is saved.
    """
    state.zero3.gather(state.model)  # ZeRO-3: whole adapter tensors for the save (collective)
    check_finite_adapter(state.model, state.names[t], state.cfg)
    if state.accelerator.is_main_process:
        atomic_write_dir(state.layout.adapter(t, state.names[t]),
                         lambda tmp: save_task_outputs(state.method, state.model, tmp))


def check_finite_adapter(model, task_name: str, cfg: TrainConfig) -> None:
    """Refuse to save a task whose adapter holds NaN/inf (e.g. one optimizer step at an enormous learning rate:
    the loss was finite, the update was not).

    Raises:
        TrainingError: naming the task, the first bad tensors and what to change; earlier tasks stay saved.
    """
    bad = precision.nonfinite_adapter_tensors(model)
    if bad:
        raise TrainingError(f"Task '{task_name}': after training, {len(bad)} adapter tensor(s) hold NaN/inf (e.g. "
                            f"{', '.join(bad[:3])}); the task is not saved. Lower learning_rate (now "
                            f"{cfg.learning_rate:g}) or deal_learning_rate, or use fp32. Tasks finished before this "
                            f"one are saved in {cfg.output_dir}.")


def evaluate_task(state: RunState, t: int, stats: dict) -> None:
    """Evaluate tasks 0..t after task ``t`` (under the memory profiler), fill column t of the matrices, log the
    scores, print them and write ``metrics.json``."""
    cfg, accelerator, datas = state.cfg, state.accelerator, state.datas
    eval_start = time.perf_counter()
    with memory_phase(cfg.profile_memory, accelerator.device) as eval_memory:
        results = evaluate_seen(accelerator, state.model, state.method, state.tokenizer, datas, t, cfg,
                                state.layout.predictions(t, state.names[t]))
    stats["eval_seconds"] = time.perf_counter() - eval_start
    stats["peak_rss_bytes"] = ru_maxrss_bytes()
    stats.update(memory_stats(state.memory.pop("train"), eval_memory))
    metrics = state.metrics
    for i, s in enumerate(results):
        metrics["accuracy_matrix"][i][t] = s["exact_match"]
        metrics["rouge1_matrix"][i][t] = s["rouge1"]
    seen_aa = sum(metrics["accuracy_matrix"][i][t] for i in range(t + 1)) / (t + 1)
    logs = {f"eval/{datas[i].task.name}/exact_match": s["exact_match"] for i, s in enumerate(results)}
    logs.update({f"eval/{datas[i].task.name}/rouge1": s["rouge1"] for i, s in enumerate(results)})
    logs["eval/average_accuracy"] = seen_aa
    logs.update(memory_scalars(stats))
    accelerator.log(logs, step=state.global_step)
    metrics["per_task"].append({"task": state.names[t], **stats, "average_accuracy_so_far": seen_aa})
    metrics["completed_tasks"] = t + 1
    accelerator.print(f"after task {t + 1} ({state.names[t]}): " + ", ".join(
        f"{datas[i].task.name} {s['exact_match']:.1f}" for i, s in enumerate(results)) +
        f" | AA so far {seen_aa:.1f} | train {stats['train_seconds']:.0f}s, eval {stats['eval_seconds']:.0f}s")
    write_metrics(state)


# --- phase 5: finish ----------------------------------------------------------------------------------------------

def finish_run(state: RunState) -> dict:
    """AA, BWT, average ROUGE-1 and wall time into the finished ``metrics.json``, the accuracy-matrix plot, and the
    printed summary; returns the metrics."""
    cfg, metrics, accelerator, names = state.cfg, state.metrics, state.accelerator, state.names
    state.checkpoints.close()
    acc = metrics["accuracy_matrix"]
    metrics["average_accuracy"] = average_accuracy(acc)
    metrics["backward_transfer"] = backward_transfer(acc)
    metrics["average_rouge1"] = average_accuracy(metrics["rouge1_matrix"])
    metrics["wall_seconds"] = sum(p["train_seconds"] + p["eval_seconds"] for p in metrics["per_task"])
    metrics["finished"] = True
    if accelerator.is_main_process:
        write_metrics(state)
        title = f"{cfg.method} on {cfg.benchmark}" + (f" order {cfg.order}" if cfg.benchmark == "standard" else "")
        title += f" | AA {metrics['average_accuracy']:.1f}"
        if metrics["backward_transfer"] is not None:
            title += f", BWT {metrics['backward_transfer']:+.1f}"
        plot_accuracy_matrix(state.layout.accuracy_plot, names, acc, title)
    accelerator.end_training()
    bwt = metrics["backward_transfer"]
    accelerator.print("\nAccuracy matrix (exact match %, row = task, column = after training task t):\n" +
                      format_matrix(names, acc) +
                      f"\n\nAverage accuracy {metrics['average_accuracy']:.2f} | backward transfer "
                      f"{'n/a' if bwt is None else f'{bwt:+.2f}'} | average ROUGE-1 {metrics['average_rouge1']:.2f}"
                      f" | wall {metrics['wall_seconds']:.0f}s\nOutputs in {state.layout.root}")
    return metrics


def write_metrics(state: RunState) -> None:
    """``metrics.json`` with the global step, atomically, from the main process."""
    if state.accelerator.is_main_process:
        atomic_write_json(state.layout.metrics, {**state.metrics, "global_step": state.global_step})


# --- helpers -----------------------------------------------------------------------------------------------------

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
    the keys only other methods read (``methods.is_foreign_key``: a new DEAL default does not make a finished
    SeqLoRA run stale) are dropped."""
    merged = with_legacy_defaults(saved)
    if not merged["target_modules"]:  # runs record the modules they adapt (``with_model_defaults``)
        merged["target_modules"] = with_model_defaults(TrainConfig(model=merged["model"])).target_modules
    return {k: v for k, v in merged.items()
            if k not in RESUME_IGNORED_KEYS and not is_foreign_key(k, merged.get("method"))}


def _check_output_dir(cfg: TrainConfig) -> dict | None:
    """Return the partial metrics of an earlier run to resume, or None to start fresh.

    Raises:
        ConfigError: the directory holds a finished run, or a run with a different config, and
            ``overwrite_output_dir`` is off.
    """
    path = RunLayout(cfg.output_dir).metrics
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
                                         cfg.max_new_tokens, accelerator, desc=f"eval {d.task.name}",
                                         shared_prefix=cfg.shared_prefix)
        scores = score(preds)
        if pred_dir and accelerator.is_main_process:
            write_predictions(RunLayout.prediction_file(pred_dir, i, d.task.name), preds)
        results.append(scores)
    return results


def save_task_outputs(method: ContinualMethod, model, path: str) -> None:
    """The method's adapter and, when it has any, its state (``METHOD_STATE_FILE``) into directory ``path``."""
    method.save_adapter(model, path)
    check_saved_adapter(path)
    state = method.state_dict()
    if state:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(path, METHOD_STATE_FILE))
