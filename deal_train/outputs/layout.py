"""The one owner of a run folder's layout: where the loop writes, and where compare, results and export read.

::

    <output_dir>/
      metrics.json                         METRICS_FILE: config, accuracy matrix, metrics, per-task figures
      accuracy_matrix.png                  heat map of the accuracy matrix
      adapters/<t>-<task>/                 a plain PEFT LoRA adapter after task t (1-based), plus METHOD_STATE_FILE
      predictions/after_<t>-<task>/<i>-<task>.jsonl, predictions/zero_shot/<i>-<task>.jsonl
      checkpoints/task<k>-step<s>/         step checkpoints inside a task (``train.checkpointing``)
      memory_snapshots/<t>-<task>.pickle   CUDA allocator snapshots (``memory_snapshot``)
      tensorboard/                         TensorBoard event files
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

from .writing import METRICS_FILE

METHOD_STATE_FILE = "method_state.safetensors"
"""``method.state_dict()`` after a task, written inside that task's adapter folder (when not empty)."""
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""PEFT's weights file inside an adapter folder."""
CHECKPOINTS_DIR = "checkpoints"
"""Step checkpoints' folder inside a run folder."""
PER_TASK_DIRS = ("adapters", "predictions", "memory_snapshots")
"""Per-task output folders of a run, removed when ``overwrite_output_dir`` starts a run over (a shorter new run
would otherwise leave the old run's later adapters and predictions next to its own)."""


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder ``root`` (the run's ``output_dir``). Task indices ``t`` are 0-based; folder
    names count from 1."""

    root: str

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, METRICS_FILE)

    @property
    def accuracy_plot(self) -> str:
        return os.path.join(self.root, "accuracy_matrix.png")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tensorboard")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, CHECKPOINTS_DIR)

    def adapter(self, t: int, task: str) -> str:
        """The adapter folder saved after task ``t``."""
        return os.path.join(self.root, "adapters", f"{t + 1}-{task}")

    def predictions(self, t: int | None, task: str = "") -> str:
        """The predictions folder of the evaluation after task ``t`` (None: the zero-shot pass)."""
        name = "zero_shot" if t is None else f"after_{t + 1}-{task}"
        return os.path.join(self.root, "predictions", name)

    @staticmethod
    def prediction_file(folder: str, i: int, task: str) -> str:
        """Task ``i``'s predictions inside a ``predictions`` folder."""
        return os.path.join(folder, f"{i + 1}-{task}.jsonl")

    def memory_snapshot(self, t: int, task: str) -> str:
        return os.path.join(self.root, "memory_snapshots", f"{t + 1}-{task}.pickle")

    def clear(self) -> None:
        """Remove ``PER_TASK_DIRS`` and ``metrics.json`` of an earlier run; other files (TensorBoard event files,
        anything of the user's) stay, as with Hugging Face's ``overwrite_output_dir``."""
        for name in PER_TASK_DIRS:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.metrics)


def run_of_adapter(adapter_dir: str) -> RunLayout:
    """The run folder an adapter folder ``<output_dir>/adapters/<t>-<task>`` belongs to."""
    return RunLayout(os.path.dirname(os.path.dirname(os.path.abspath(adapter_dir))))
