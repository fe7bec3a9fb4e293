"""Step checkpoints inside a task (Accelerate ``save_state``/``load_state``), and stopping cleanly on a signal.

A finished task is saved by the loop itself (its adapter and ``metrics.json``); this module covers the time
in between. Every ``checkpoint_every_steps`` optimizer steps, and when SIGINT, SIGTERM or SIGUSR1 arrives,
the loop writes ``<output_dir>/checkpoints/task<k>-step<global step>/``:

* Accelerate's ``save_state``: ``optimizer.bin`` (AdamW moments and step counts), ``random_states_<rank>.pkl``
  (Python, NumPy, torch and CUDA generators of every process) and, through a save hook, ``adapter_state.safetensors``
  instead of the whole model: every entry of the model's ``state_dict`` that belongs to a LoRA module
  (``ADAPTER_KEY``), which covers all adapters of all methods and, for DEAL, the parametrizations' trainable
  retention/update parameters and their history buffers;
* ``method_task_state.safetensors``: ``method.task_state_dict()`` when not empty (DEAL's start-of-task parameter
  values that its regulariser measures from; what methods keep across tasks is restored from the finished tasks'
  adapter folders, as for a resume between tasks);
* ``trainer_state.json``: where the task stands (epoch, micro batches consumed in the epoch, global step, losses
  so far, samples, skipped steps) and the state of the data-order generator at the start of the epoch, so a
  resumed run draws the same permutation and skips the batches already seen (``Accelerator.skip_first_batches``);
* ``manifest.json``, written last: the size and SHA-256 of every other file.

Each checkpoint is written into ``checkpoints/.tmp-<name>`` and renamed into place once complete, so a
process killed while writing leaves only a temporary folder, which is reported and removed. A checkpoint whose
files do not match its manifest (or that has none) is reported and never used. Only the newest checkpoint is
kept, and the checkpoints of a task are deleted once that task's outputs are saved.

Rerunning the same command resumes from the newest checkpoint of the unfinished task (or ``resume_from``):
the same seed, the same start-of-task set-up (``method.before_task``), then ``load_state``; the remaining steps
then see the same data, random numbers and parameters as an uninterrupted run, which gives the same adapter and
metrics (tested bit for bit on CPU in fp32).

Files read back by Accelerate (``optimizer.bin``, ``random_states_*.pkl``) are pickles written by this
program; Accelerate reads them with torch's weights-only unpickler, and their hashes must match the manifest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..outputs import RunLayout, atomic_write_json
from ..outputs.layout import CHECKPOINTS_DIR  # noqa: F401  (the folder's name, for callers)

ADAPTER_STATE_FILE = "adapter_state.safetensors"
TASK_STATE_FILE = "method_task_state.safetensors"
"""``method.task_state_dict()`` inside a step checkpoint (the after-task state is ``outputs.METHOD_STATE_FILE``)."""
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
ADAPTER_KEY = re.compile(r"(^|\.)lora_")
"""``state_dict`` keys saved in a step checkpoint: those inside a PEFT LoRA module (``lora_A``, ``lora_B``,
``lora_embedding_*``, ``lora_magnitude_vector``), including parametrizations installed on them (DEAL)."""
_NAME = re.compile(r"^task(\d+)-step(\d+)$")
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, s))
"""Signals that make the trainer checkpoint and stop: Ctrl-C, ``kill``/``scancel``, and SLURM's time-limit warning
(``#SBATCH --signal=B:USR1@<seconds>``, forwarded by the scripts in ``slurm/``)."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be used (corrupt, partial, from another run or task). The CLI exits with code 2."""


class TrainingStopped(RuntimeError):
    """Training stopped on a signal after saving its progress; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


@dataclass
class TaskProgress:
    """Where the training of one task stands, as saved in ``trainer_state.json``.

    ``micro_batches`` counts the micro batches of epoch ``epoch`` already consumed (by steps taken or skipped);
    ``generator_state`` is the data-order generator's state at the start of that epoch (``torch.Generator``
    state bytes). ``train_seconds`` is the training time spent before the last resume.
    """

    task_index: int
    global_step: int
    epoch: int = 0
    micro_batches: int = 0
    losses: list = field(default_factory=list)
    samples: int = 0
    skipped: int = 0
    nonfinite: int = 0
    train_seconds: float = 0.0
    generator_state: bytes | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["generator_state"] = (base64.b64encode(self.generator_state).decode("ascii")
                                  if self.generator_state is not None else None)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TaskProgress":
        data = dict(data)
        if data.get("generator_state") is not None:
            data["generator_state"] = base64.b64decode(data["generator_state"])
        return cls(**data)


class StopSignals:
    """Turns SIGINT, SIGTERM and SIGUSR1 into a request to checkpoint and stop (``requested`` holds the signal).

    A second SIGINT while a stop is pending raises ``KeyboardInterrupt`` at once (progress since the last
    checkpoint is then lost). Use as a context manager; the previous handlers are restored on exit. Outside the
    main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, announce: bool = True):
        self.requested: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            if self.announce:
                msg = (f"\n{signal.Signals(signum).name} received: the trainer saves a checkpoint at the end of "
                       f"the current optimizer step (or after the current evaluation) and stops"
                       + ("; press Ctrl-C again to stop at once" if signum == signal.SIGINT else "") + ".\n")
                with contextlib.suppress(OSError):
                    os.write(2, msg.encode())  # not print(): a handler may interrupt a print in progress

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that ``ADAPTER_KEY`` selects, detached, contiguous, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ADAPTER_KEY.search(k)}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str) -> None:
    """Write ``MANIFEST_FILE`` listing every other file under ``directory`` with its size (bytes) and SHA-256."""
    files = {}
    for root, _dirs, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST_FILE:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    atomic_write_json(os.path.join(directory, MANIFEST_FILE), {"format": FORMAT_VERSION, "files": files})


def verify_checkpoint(directory: str) -> dict:
    """Check every file of a checkpoint against its manifest and return its ``trainer_state.json``.

    Raises:
        CheckpointError: the manifest is missing or unreadable, a listed file is missing or has another size or
            hash, or the trainer state is missing; the message names the file and says how to go on.
    """
    fix = (f"Delete {directory} to resume from the previous checkpoint or the last finished task, or pass "
           f"--overwrite_output_dir true to start over.")
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"Checkpoint {directory} is incomplete or corrupt: cannot read {MANIFEST_FILE} "
                              f"({err}). {fix}") from None
    if TRAINER_STATE_FILE not in files:
        raise CheckpointError(f"Checkpoint {directory} is corrupt: its manifest lists no {TRAINER_STATE_FILE}. {fix}")
    for rel, meta in files.items():
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"Checkpoint {directory} is corrupt: {rel} is missing. {fix}")
        size = os.path.getsize(file)
        if size != meta.get("bytes") or _sha256(file) != meta.get("sha256"):
            raise CheckpointError(f"Checkpoint {directory} is corrupt: {rel} does not match the manifest "
                                  f"({size} bytes, expected {meta.get('bytes')}; or its SHA-256 differs). {fix}")
    with open(os.path.join(directory, TRAINER_STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def checkpoint_name(task_index: int, global_step: int) -> str:
    """``task<k>-step<global step>`` with k = task_index + 1 (k as in ``adapters/<k>-<task>``)."""
    return f"task{task_index + 1}-step{global_step:07d}"


def list_checkpoints(root: str) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(task_index, global_step, path) of every finished checkpoint under ``root``, oldest first, and the paths
    of temporary folders left by writes that did not finish."""
    done, partial = [], []
    if not os.path.isdir(root):
        return done, partial
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".tmp-") or name.startswith(".old-"):
            partial.append(path)
            continue
        m = _NAME.match(name)
        if m and os.path.isdir(path):
            done.append((int(m.group(1)) - 1, int(m.group(2)), path))
    return sorted(done), partial


class NoCheckpoints:
    """The checkpointer of a task trained without step checkpoints (benchmarks, tests): a fresh start, the loader
    as it is, no saves, no stop signals; ``StepCheckpointer``'s interface, so ``train_task`` needs no branches."""

    def begin_task(self, task_index: int, global_step: int, method) -> TaskProgress:
        return TaskProgress(task_index=task_index, global_step=global_step)

    def epoch_batches(self, loader, generator: torch.Generator, progress: TaskProgress, epoch: int):
        return loader

    def after_step(self, progress: TaskProgress, task_name: str) -> None:
        pass

    def save(self, progress: TaskProgress) -> None:
        """Nothing is saved: returns None (no checkpoint path)."""
        return None


class StepCheckpointer:
    """Saves and restores step checkpoints of one run; see the module docstring for the layout.

    Args:
        accelerator: the run's ``Accelerator`` (its save/load hooks are registered here).
        output_dir: the run's output directory; checkpoints go to ``<output_dir>/checkpoints``.
        every_steps: checkpoint every this many optimizer steps (global step count; 0: only on a signal, or
            before a stop on non-finite losses).
        run_config: the run's comparable config (``train.loop.comparable_config``); a checkpoint made with another is
            refused.
        signals: the ``StopSignals`` whose request ``after_step`` honours (None: no signal handling).
    """

    def __init__(self, accelerator, output_dir: str, every_steps: int, run_config: dict,
                 signals: StopSignals | None = None):
        self.accelerator = accelerator
        self.root = RunLayout(output_dir).checkpoints
        self.every_steps = every_steps
        self.run_config = run_config
        self.signals = signals
        self.pending: tuple[str, TaskProgress] | None = None  # (path, progress) to resume from
        self.method = None
        self.last_saved: str | None = None
        self._handles = [accelerator.register_save_state_pre_hook(self._save_hook),
                         accelerator.register_load_state_pre_hook(self._load_hook)]

    # --- Accelerate hooks: the adapter state instead of the whole model --------------------------------
    def _save_hook(self, models, weights, output_dir) -> None:
        if len(weights) != len(models):  # DeepSpeed/FSDP save their engines themselves
            return
        for i, model in enumerate(models):
            if self.accelerator.is_main_process:
                name = ADAPTER_STATE_FILE if i == 0 else ADAPTER_STATE_FILE.replace(".", f"_{i}.", 1)
                save_file(adapter_state(self.accelerator.unwrap_model(model)), os.path.join(output_dir, name))
        weights.clear()  # nothing left for Accelerate to save: the frozen base model is not checkpointed

    def _load_hook(self, models, input_dir) -> None:
        for i, model in enumerate(list(models)):
            name = ADAPTER_STATE_FILE if i == 0 else ADAPTER_STATE_FILE.replace(".", f"_{i}.", 1)
            inner = self.accelerator.unwrap_model(model)
            state = load_file(os.path.join(input_dir, name))
            expected = set(adapter_state(inner))
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            if missing or unexpected:
                raise CheckpointError(f"Checkpoint {input_dir} does not fit the model: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}. Was it written by another method or config?")
            inner.load_state_dict(state, strict=False)
            models.remove(model)

    # --- finding the checkpoint to resume ------------------------------------------------------------
    def discard_all(self) -> None:
        """Remove every checkpoint (a run started over with ``overwrite_output_dir``)."""
        if self.accelerator.is_main_process and os.path.isdir(self.root):
            shutil.rmtree(self.root)
        self.accelerator.wait_for_everyone()

    def prepare_resume(self, completed_tasks: int, resume_from: str = "") -> str | None:
        """Pick the checkpoint to resume task ``completed_tasks`` (0-based index of the unfinished task) from.

        ``resume_from`` names a checkpoint directory explicitly; empty: the newest checkpoint under
        ``<output_dir>/checkpoints``. Temporary folders of interrupted writes and checkpoints of tasks already
        finished are reported and removed. Returns a line to print, or None.

        Raises:
            CheckpointError: the chosen checkpoint is corrupt or incomplete, belongs to another task, or was made
                with another config.
        """
        done, partial = list_checkpoints(self.root)
        notes = []
        if self.accelerator.is_main_process:
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"removed {path}, a checkpoint whose writing was interrupted (never used)")
            for task_index, _step, path in done:
                if task_index < completed_tasks:
                    shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if resume_from:
            path = resume_from
            if not os.path.isdir(path):
                raise CheckpointError(f"resume_from: {path} is not a directory. Give a folder under "
                                      f"{self.root}, or leave resume_from empty to take the newest one.")
        else:
            current = [d for d in done if d[0] >= completed_tasks]
            if not current:
                return "; ".join(notes) or None
            path = current[-1][2]
        state = verify_checkpoint(path)
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint {path} has format {state.get('format')}, this version reads "
                                  f"{FORMAT_VERSION}. Delete it or use the version that wrote it.")
        progress = TaskProgress.from_json(state["progress"])
        if progress.task_index != completed_tasks:
            raise CheckpointError(f"Checkpoint {path} is from task {progress.task_index + 1}, but the run has "
                                  f"finished {completed_tasks} task(s), so task {completed_tasks + 1} comes next. "
                                  f"Delete the checkpoint or pick another with resume_from.")
        saved_cfg = state.get("config", {})
        if saved_cfg != self.run_config:
            keys = sorted(k for k in set(saved_cfg) | set(self.run_config)
                          if saved_cfg.get(k) != self.run_config.get(k))
            raise CheckpointError(f"Checkpoint {path} was made with a different config (keys: {', '.join(keys)}). "
                                  f"Rerun with the same settings, or pass --overwrite_output_dir true.")
        self.pending = (path, progress)
        notes.append(f"resuming task {progress.task_index + 1} from {path} (optimizer step {progress.global_step})")
        return "; ".join(notes)

    # --- inside a task ---------------------------------------------------------------------------------
    def begin_task(self, task_index: int, global_step: int, method) -> TaskProgress:
        """The progress to start task ``task_index`` from: the pending checkpoint's (after Accelerate's
        ``load_state`` and ``method.load_task_state_dict``), else a fresh one. Call after ``accelerator.prepare``.

        Raises:
            CheckpointError: the checkpoint does not fit the model or optimizer.
        """
        self.method = method
        if self.pending is None or self.pending[1].task_index != task_index:
            return TaskProgress(task_index=task_index, global_step=global_step)
        path, progress = self.pending
        self.pending = None
        try:
            self.accelerator.load_state(path)
        except (ValueError, KeyError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"Checkpoint {path} does not fit this run's optimizer or model: {err}") from None
        state_file = os.path.join(path, TASK_STATE_FILE)
        try:
            method.load_task_state_dict(load_file(state_file) if os.path.isfile(state_file) else {})
        except ValueError as err:
            raise CheckpointError(f"Checkpoint {path}: {err}") from None
        return progress

    def epoch_batches(self, loader, generator: torch.Generator, progress: TaskProgress, epoch: int):
        """The loader to iterate for ``epoch``: records the data-order generator's state at the epoch start, or
        restores it and skips the micro batches already consumed when resuming inside this epoch."""
        if progress.epoch == epoch and progress.generator_state is not None:
            generator.set_state(torch.frombuffer(bytearray(progress.generator_state), dtype=torch.uint8))
            if progress.micro_batches:
                return self.accelerator.skip_first_batches(loader, progress.micro_batches)
            return loader
        progress.epoch, progress.micro_batches = epoch, 0
        progress.generator_state = bytes(generator.get_state().numpy().tobytes())
        return loader

    def stop_requested(self) -> int | None:
        """The signal that asked to stop, agreed on by all processes (the first process's that has one)."""
        local = self.signals.requested if self.signals is not None else None
        if self.accelerator.num_processes == 1:
            return local
        flags = self.accelerator.gather(torch.tensor([local or 0], device=self.accelerator.device))
        return next((int(f) for f in flags.tolist() if f), None)

    def after_step(self, progress: TaskProgress, task_name: str) -> None:
        """Call after every optimizer step: checkpoint every ``every_steps`` steps, and on a stop signal
        checkpoint and raise ``TrainingStopped``."""
        stop = self.stop_requested()
        due = self.every_steps > 0 and progress.global_step % self.every_steps == 0
        if due or stop:
            path = self.save(progress)
        if stop:
            self.accelerator.end_training()  # flush the trackers (TensorBoard) before the process exits
            raise TrainingStopped(
                f"Stopped on {signal.Signals(stop).name} in task {progress.task_index + 1} ({task_name}) after "
                f"optimizer step {progress.global_step}; checkpoint saved in {path}. Rerun the same command to "
                f"resume.", stop)

    def save(self, progress: TaskProgress) -> str:
        """Write a checkpoint of ``progress`` atomically (all processes call this); returns its path."""
        acc = self.accelerator
        name = checkpoint_name(progress.task_index, progress.global_step)
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, ".tmp-" + name)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = self.method.task_state_dict() if self.method is not None else {}
            if state:
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                          os.path.join(tmp, TASK_STATE_FILE))
            atomic_write_json(os.path.join(tmp, TRAINER_STATE_FILE),
                              {"format": FORMAT_VERSION, "progress": progress.to_json(), "config": self.run_config})
            umask = os.umask(0)
            os.umask(umask)
            for name in os.listdir(tmp):  # some writers create 0600 files; give them the usual permissions
                os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
            write_manifest(tmp)
            if os.path.isdir(final):  # same step again (a stop after skipped steps): the new one supersedes it
                old = os.path.join(self.root, ".old-" + name)
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            for _t, _s, path in list_checkpoints(self.root)[0]:
                if path != final:
                    shutil.rmtree(path, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_saved = final
        return final

    def task_finished(self, task_index: int) -> None:
        """Delete the checkpoints of tasks up to ``task_index`` (their outputs are saved now)."""
        if self.accelerator.is_main_process:
            for t, _s, path in list_checkpoints(self.root)[0]:
                if t <= task_index:
                    shutil.rmtree(path, ignore_errors=True)
        self.method = None

    def stop_between_tasks(self, completed_tasks: int, total: int) -> None:
        """Raise ``TrainingStopped`` if a stop signal arrived; call before each task (the outputs of finished
        tasks are saved by then, so no checkpoint is needed).

        Raises:
            TrainingStopped: a signal asked to stop.
        """
        stop = self.stop_requested()
        if stop:
            self.accelerator.end_training()
            raise TrainingStopped(f"Stopped on {signal.Signals(stop).name} before task {completed_tasks + 1} of "
                                  f"{total}; the {completed_tasks} finished task(s) are saved. Rerun the same command "
                                  f"to resume.", stop)

    def close(self) -> None:
        """Remove the Accelerate hooks."""
        for h in self._handles:
            h.remove()
