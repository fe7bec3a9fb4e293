"""One task of the continual protocol: the optimisation of ``train_task``, read top to bottom.

Set up (``start_task``: the method's ``before_task``, AdamW over its ``param_groups``, the shuffled loader of the
task's rows plus ``replay_features``, ``accelerator.prepare``) -> for every accumulation window of micro batches
(``backward_window``: answer-token cross-entropy + the method's extra loss, backward, clipping) an optimizer
step, or a skipped step when the loss or gradient is not finite (``skip_step``) -> the method's ``after_task``
and the task's statistics (``finish_task``). Step checkpoints and stop signals go through ``checkpoints``
(``StepCheckpointer``, or ``NoCheckpoints``); ZeRO-3 specifics through ``distributed.Zero3``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import concatenate_datasets
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data import collate_train
from ..data.prepare import TaskData
from ..data.sampling import LengthGroupedBatchSampler, epoch_padding, row_lengths
from ..methods.base import ContinualMethod
from ..model import precision
from ..model import prefix as shared_prefix
from ..model.losses import answer_forward, token_cross_entropy_sum
from . import adapter_change
from .checkpointing import NoCheckpoints, StepCheckpointer, TaskProgress
from .distributed import Zero3


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the CLI prints the message and exits with code 1."""


@dataclass
class TaskSetup:
    """What ``start_task`` prepared for one task (model, optimizer and loader as ``accelerator.prepare`` returned
    them)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    generator: torch.Generator  # the data order's generator (its state is checkpointed)
    params: list  # every trained tensor, for clipping
    n_trainable: int
    start_factors: dict  # the trained adapter's factors at the task start (``adapter_change.snapshot``)
    steps_per_epoch: int
    total_steps: int
    shared_prefix: bool = False  # micro batches carry their shared prefix length (model/prefix.py)
    forward_tokens: int = 0  # token positions the forward passes computed (the shared prefix once per micro batch)
    padded_tokens: int = 0  # token positions of the padded micro batches (what the full pass computes)
    history: adapter_change.SubspaceHistory | None = None  # the earlier tasks' update (``adapter_change.history``)


@dataclass
class StepLoss:
    """One accumulation window after its backward pass: mean answer-token CE over all processes, the method's
    extra loss (mean over micro batches), its log values, and the clipped gradient's norm before clipping."""

    loss: float
    extra: float
    logs: dict
    grad_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm) and math.isfinite(self.loss) and math.isfinite(self.extra)


def train_task(accelerator: Accelerator, model, method: ContinualMethod, data: TaskData, cfg: TrainConfig,
               task_index: int, global_step: int, pad_token_id: int,
               checkpoints: StepCheckpointer | NoCheckpoints | None = None) -> tuple[int, dict]:
    """Train one task for ``num_train_epochs``; returns the new global step and the task's statistics.

    Loss per optimizer step = (sum of answer-token CE over the accumulation window) / (answer tokens in
    the window, over all processes) + the method's extra loss, so micro batch × accumulation gives the
    same gradient as one large batch whatever the answer lengths.

    With a ``StepCheckpointer``, the task starts from its pending step checkpoint (if any), a checkpoint is
    written every ``checkpoint_every_steps`` optimizer steps, and a stop signal checkpoints and raises
    ``TrainingStopped`` (``train.checkpointing``); None trains without checkpoints (``NoCheckpoints``).

    Raises:
        TrainingError: ``max_nonfinite_steps`` consecutive steps had a non-finite loss or gradient (a checkpoint
            is written first when checkpointing).
    """
    checkpoints = checkpoints or NoCheckpoints()
    zero3 = Zero3(accelerator)
    setup = start_task(accelerator, zero3, model, method, data, cfg, task_index, pad_token_id)
    progress = checkpoints.begin_task(task_index, global_step, method)
    name, gas = data.task.name, cfg.gradient_accumulation_steps
    done = progress.epoch * setup.steps_per_epoch + math.ceil(progress.micro_batches / gas)
    bar = tqdm(total=setup.total_steps, initial=done, desc=f"task {task_index + 1} {name}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start = time.perf_counter() - progress.train_seconds
    for epoch in range(progress.epoch, cfg.num_train_epochs):
        for window in windows(checkpoints.epoch_batches(setup.loader, setup.generator, progress, epoch), gas):
            progress.micro_batches += len(window)
            step = backward_window(accelerator, setup, method, window, cfg, progress)
            bar.update(1)
            if not step.finite:
                skip_step(accelerator, setup.optimizer, step, progress, cfg, name, checkpoints, start)
                continue
            progress.nonfinite = 0
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
            progress.global_step += 1
            progress.losses.append(step.loss)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{step.loss:.3f}", samples_s=f"{progress.samples / elapsed:.2f}")
            if progress.global_step % cfg.logging_steps == 0:
                accelerator.log(step_scalars(accelerator, setup, step, progress, elapsed), step=progress.global_step)
            progress.train_seconds = time.perf_counter() - start
            checkpoints.after_step(progress, name)
    bar.close()
    stats = finish_task(accelerator, zero3, setup, method, data, cfg, task_index, pad_token_id, progress, start)
    return progress.global_step, stats


def start_task(accelerator: Accelerator, zero3: Zero3, model, method: ContinualMethod, data: TaskData,
               cfg: TrainConfig, task_index: int, pad_token_id: int) -> TaskSetup:
    """The same seed at every task start (also after a resume), ``method.before_task``, AdamW over the method's
    non-empty parameter groups, the loader of the task's rows plus its replayed rows (seeded shuffle, or
    length-grouped batches with ``group_by_length``: ``data.sampling``), and
    ``accelerator.prepare`` of all three (``Zero3.prepare``).

    Raises:
        ValueError: a trainable tensor is not float32 (``precision.check_trainable_float32``).
    """
    set_seed(cfg.seed + task_index)
    zero3.gather(model)  # ZeRO-3: the methods read adapter tensors between forward passes
    history = adapter_change.history(model, cfg.subspace_energy)  # before the method adds or parametrizes factors
    method.before_task(model, task_index, data.train_rows)
    precision.check_trainable_float32(model)
    start_factors = adapter_change.snapshot(model, method.trained_adapter())
    history.bind(method.trained_adapter())
    groups = [g for g in method.param_groups(model) if g["params"]]
    optimizer = precision.build_optimizer(cfg, groups)
    generator = torch.Generator().manual_seed(cfg.seed + task_index)
    use_prefix = use_shared_prefix(accelerator, model, cfg, data.task.name, method, zero3.active, task_index)
    train_set = concatenate_datasets([data.train_features, *data.replay_features]) if data.replay_features \
        else data.train_features
    order = dict(batch_size=cfg.per_device_train_batch_size, shuffle=True) if not cfg.group_by_length \
        else dict(batch_sampler=length_grouped(accelerator, train_set, cfg, data.task.name, task_index, generator))
    loader = DataLoader(train_set, **order,
                        generator=generator, collate_fn=lambda b: collate_train(b, pad_token_id, use_prefix))
    model, optimizer, loader = zero3.prepare(cfg, model, optimizer, loader)
    model.train()
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    params = [p for g in groups for p in g["params"]]
    return TaskSetup(model, optimizer, loader, generator, params, sum(p.numel() for p in params), start_factors,
                     steps_per_epoch, steps_per_epoch * cfg.num_train_epochs, use_prefix, history=history)


def use_shared_prefix(accelerator: Accelerator, model, cfg: TrainConfig, task_name: str,
                      method: ContinualMethod | None = None, zero3: bool = False, task_index: int = 0) -> bool:
    """Whether this task's micro batches take the shared-prefix path (``cfg.shared_prefix`` and a model it
    supports, ``model.prefix.supported``; under ZeRO-3 also a method that allows it, ``shared_prefix_zero3``, on
    the tasks where its own modules train, i.e. after the first); prints why not when it was asked for but cannot
    run."""
    if not cfg.shared_prefix:
        return False
    reason = shared_prefix.supported(model)
    if reason is None and zero3 and method is not None and not method.shared_prefix_zero3 and task_index > 0:
        reason = (f"method {method.name} under ZeRO-3 (its trainable modules are ZeRO-3 leaf modules whose gradients "
                  f"would be reduced once per pass)")
    if reason is not None:
        accelerator.print(f"task {task_name}: shared_prefix is on but training uses the full forward pass with "
                          f"{reason}.")
        return False
    return True


def count_tokens(setup: TaskSetup, batch: dict) -> None:
    """Add one micro batch's computed and padded token positions to ``setup`` (the shared-prefix saving)."""
    rows, width = batch["input_ids"].shape[:2]
    p = int(batch.get("shared_prefix", 0))
    setup.padded_tokens += rows * width
    setup.forward_tokens += p + rows * (width - p)


def length_grouped(accelerator: Accelerator, train_set, cfg: TrainConfig, name: str, task_index: int,
                   generator: torch.Generator) -> LengthGroupedBatchSampler:
    """The ``group_by_length`` batch sampler over ``train_set`` (task rows plus replayed rows), drawing from the
    task's data-order ``generator``; prints once per task the padding share of tokens with it and with the plain
    shuffle (one epoch each, from a copy of the generator)."""
    lengths = row_lengths(train_set)
    grouped, shuffled = epoch_padding(lengths, cfg.per_device_train_batch_size, cfg.length_group_size, generator)
    accelerator.print(f"task {task_index + 1} {name}: length-grouped batches, padding {100 * grouped:.1f} % of "
                      f"tokens (shuffled order: {100 * shuffled:.1f} %)")
    return LengthGroupedBatchSampler(lengths, cfg.per_device_train_batch_size, cfg.length_group_size, generator)


def windows(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive accumulation windows of ``size`` micro batches (the last one may be shorter)."""
    it = iter(batches)
    while window := list(itertools.islice(it, size)):
        yield window


def backward_window(accelerator: Accelerator, setup: TaskSetup, method: ContinualMethod, window: list[dict],
                    cfg: TrainConfig, progress: TaskProgress) -> StepLoss:
    """Forward and backward passes of one accumulation window, gradients synchronised on its last micro batch
    only, then clipping to ``max_grad_norm`` (0: none). Counts the window's samples into ``progress``."""
    model, gas = setup.model, cfg.gradient_accumulation_steps
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    window_tokens = int(accelerator.gather(torch.tensor([local_tokens], device=accelerator.device)).sum())
    scale = accelerator.num_processes * gas / max(window_tokens, 1)
    step_ce, step_extra, logs = 0.0, 0.0, {}
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        accelerator.gradient_state._set_sync_gradients(last)  # as transformers.Trainer does
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with method.forward_context(model):  # e.g. DEAL's factors built once per micro batch
                outputs = answer_forward(model, batch)
                ce_sum, _n = token_cross_entropy_sum(outputs.logits, batch["labels"])
                loss = ce_sum * scale
                extra, logs = method.extra_loss(model, batch, outputs)
            if extra is not None:
                loss = loss + extra * gas / len(window)
                step_extra += float(extra.detach()) / len(window)
            accelerator.backward(loss)
        step_ce += float(ce_sum.detach())
        if "decoder_input_ids" not in batch:
            count_tokens(setup, batch)
        progress.samples += batch["input_ids"].shape[0] * accelerator.num_processes
    # gradients are synchronised here, so every process takes the same skip decision (DeepSpeed has already
    # clipped and stepped inside accelerator.backward and reports its norm, or None)
    grad_norm = accelerator.clip_grad_norm_(setup.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    # the step's answer-token CE over all processes (each holds only its own rows' sum), so the logged loss and
    # the skip decision are the same on every process and equal a one-process run's
    window_ce = float(accelerator.gather(torch.tensor([step_ce], dtype=torch.float64, device=accelerator.device)).sum())
    return StepLoss(window_ce / max(window_tokens, 1), step_extra, logs, 0.0 if grad_norm is None else float(grad_norm))


def skip_step(accelerator: Accelerator, optimizer, step: StepLoss, progress: TaskProgress, cfg: TrainConfig,
              name: str, checkpoints: StepCheckpointer | NoCheckpoints, start: float) -> None:
    """Drop a window whose loss or gradient is not finite, and count it.

    Raises:
        TrainingError: the ``max_nonfinite_steps``-th such window in a row (after checkpointing the last good
            state, when checkpointing).
    """
    if accelerator.scaler is not None:
        optimizer.step()  # fp16: the GradScaler skips this step itself and lowers the loss scale
    optimizer.zero_grad(set_to_none=True)
    progress.nonfinite += 1
    progress.skipped += 1
    accelerator.print(f"task {progress.task_index + 1} {name}: non-finite loss or gradient (loss {step.loss}, grad "
                      f"norm {float(step.grad_norm)}); step skipped ({progress.nonfinite} in a row)")
    if progress.nonfinite >= cfg.max_nonfinite_steps:
        progress.train_seconds = time.perf_counter() - start
        path = checkpoints.save(progress)
        saved = (f" The last good state (optimizer step {progress.global_step}, after the skipped batches) is "
                 f"checkpointed in {path}." if path else "")
        raise TrainingError(
            f"Task '{name}': {progress.nonfinite} consecutive optimizer steps had a NaN/inf loss or gradient. Lower "
            f"learning_rate (or deal_learning_rate), check the data, or use fp32. Tasks finished before this one are "
            f"saved in {cfg.output_dir}.{saved}")


def learning_rate_scalars(optimizer) -> dict[str, float]:
    """``train/learning_rate/<group name>`` for every parameter group of ``optimizer`` (the methods name their
    groups: ``lora``; DEAL after task 1 ``deal`` and ``residual``); unnamed groups are ``group<i>``."""
    return {f"train/learning_rate/{g.get('name', f'group{i}')}": g["lr"] for i, g in enumerate(optimizer.param_groups)}


def step_scalars(accelerator: Accelerator, setup: TaskSetup, step: StepLoss, progress: TaskProgress,
                 elapsed: float) -> dict[str, float]:
    """The TensorBoard scalars of one logged optimizer step: loss, extra loss, the learning rate of every group,
    samples per second, the task (1-based), how far the adapter moved and how much of the move lies in the earlier
    tasks' top subspace, and the method's own terms."""
    model = accelerator.unwrap_model(setup.model)
    return {"train/loss": step.loss, "train/extra_loss": step.extra, **learning_rate_scalars(setup.optimizer),
            "train/samples_per_second": progress.samples / elapsed, "train/task": progress.task_index + 1,
            **adapter_change.change_logs(adapter_change.relative_change(model, setup.start_factors)),
            **adapter_change.overlap_logs(subspace_overlap(model, setup)), **step.logs}


def subspace_overlap(model, setup: TaskSetup) -> dict:
    """``adapter_change.subspace_overlap`` since the task's start (every value None without a history)."""
    if setup.history is None:
        return dict.fromkeys(adapter_change.OVERLAP_KEYS)
    return adapter_change.subspace_overlap(model, setup.history)


def finish_task(accelerator: Accelerator, zero3: Zero3, setup: TaskSetup, method: ContinualMethod, data: TaskData,
                cfg: TrainConfig, task_index: int, pad_token_id: int, progress: TaskProgress, start: float) -> dict:
    """``method.after_task`` on the task's own rows (unshuffled), then the task's statistics: seconds, steps,
    samples, losses, trainable parameters, skipped steps, the adapter's relative change and the update's overlap
    with the earlier tasks' subspace."""
    accelerator.gradient_state._set_sync_gradients(True)
    model = accelerator.unwrap_model(setup.model)
    model.eval()
    zero3.gather(model)
    own_batches = DataLoader(data.train_features, batch_size=cfg.per_device_train_batch_size, shuffle=False,
                             collate_fn=lambda b: collate_train(b, pad_token_id, setup.shared_prefix))
    method.after_task(model, task_index, own_batches)
    change = adapter_change.relative_change(model, setup.start_factors)
    overlap = subspace_overlap(model, setup)
    seconds = time.perf_counter() - start
    zero3.release()
    losses, samples = progress.losses, progress.samples
    saving = 1 - setup.forward_tokens / setup.padded_tokens if setup.padded_tokens else 0.0
    if setup.shared_prefix and setup.padded_tokens:
        accelerator.print(f"task {task_index + 1} {data.task.name}: shared prefix computed once per micro batch: "
                          f"{setup.forward_tokens} of {setup.padded_tokens} padded token positions run through the "
                          f"model ({100 * saving:.1f} % saved)")
    return {"train_seconds": seconds, "optimizer_steps": setup.total_steps, "train_samples": samples,
            "samples_per_second": samples / seconds if seconds > 0 else 0.0,
            "final_loss": losses[-1] if losses else None,
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "trainable_parameters": setup.n_trainable, "skipped_nonfinite_steps": progress.skipped,
            "relative_change": change, "subspace_overlap": overlap,
            "shared_prefix_token_saving": saving if setup.shared_prefix else None,
            # token positions of this process's micro batches: padded (batch x width, what the full pass runs) and
            # computed (prefix once + suffixes); decoder-only, 0 for encoder-decoder models
            "padded_token_positions": setup.padded_tokens, "computed_token_positions": setup.forward_tokens}
