"""Replay (experience replay; docs/design.md section 4, paper Table 8): a small buffer of each earlier task's
training rows is mixed into every later task's training data; otherwise SeqLoRA (one adapter).

The buffer of task i is ``replay_samples_per_task`` of its training rows (all when it has fewer), chosen with
``random.Random(seed + 2000 + i)``. The choice depends only on the seed and task i's rows, so it is the same
for every later task and is rebuilt identically on resume instead of being stored.
"""

from __future__ import annotations

import random

from ..data import Task
from .base import ContinualMethod

REPLAY_SEED_OFFSET = 2000
"""Seed offset of the buffer choice (``sample_rows`` uses +0 for training rows and +1000 for test rows)."""


class Replay(ContinualMethod):
    """SeqLoRA trained on each task's rows plus a fixed buffer of every earlier task's rows."""

    name = "replay"
    label = "Replay"
    config_prefix = "replay_"

    @classmethod
    def plan_train_rows(cls, train_rows: list[int], task_index: int, cfg) -> int:
        """The task's rows plus ``replay_samples_per_task`` rows (at most all) of each earlier task."""
        return train_rows[task_index] + sum(min(cfg.replay_samples_per_task, r) for r in train_rows[:task_index])

    def buffer(self, task_index: int, rows: list[dict]) -> list[dict]:
        """The rows of task ``task_index`` kept for replay: a seeded random choice without repetition."""
        n = min(self.cfg.replay_samples_per_task, len(rows))
        return random.Random(self.cfg.seed + REPLAY_SEED_OFFSET + task_index).sample(rows, n)

    def replay_rows(self, task_index: int, earlier: list[tuple[Task, list[dict]]]) -> list[tuple[Task, list[dict]]]:
        return [(task, self.buffer(i, rows)) for i, (task, rows) in enumerate(earlier)]
