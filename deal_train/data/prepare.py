"""A run's data, read and checked before anything trains: every task's training, validation and test rows from
the configured source (``sources``), and what tokenising them cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TrainConfig
from .dataset import sample_rows, split_validation
from .sources import task_source


@dataclass
class TaskData:
    """One task's rows and tokenised features."""

    task: object
    train_rows: list
    test_rows: list
    train_features: object = None
    test_features: object = None
    truncated_train: int = 0
    truncated_test: int = 0
    dropped: dict | None = None  # rows without a gold label, per split
    replay_features: list = field(default_factory=list)  # tokenised rows of earlier tasks trained with this one
    train_test_overlap: int = 0  # test rows whose sentence is also in the training file


def prepare_data(cfg: TrainConfig) -> list[TaskData]:
    """Load and validate every task of the sequence before any training starts, from ``cfg.data_source``
    (``data/sources.py``: a CL_Benchmark folder, the Hugging Face Hub, or the user's files).

    Each task's training file loses ``validation_rows`` rows to the validation split first
    (``split_validation``); the training rows are sampled from the rest. With ``eval_split: validation`` the
    validation rows take the test rows' place in evaluation (all of them; ``max_test_samples`` does not apply).

    Raises:
        ConfigError: unknown task/benchmark, missing or malformed files, labels outside the label set,
            an unreachable Hub, or a task left empty after ``max_train_samples``.
    """
    source = task_source(cfg)
    out = []
    for i, name in enumerate(source.task_names()):
        task = source.load_task(name)
        dropped: dict = {}
        train_file = source.read_rows(task, "train", dropped)
        test_file = source.read_rows(task, "test", dropped)
        validation, pool = split_validation(train_file, cfg.validation_rows, name)
        train = sample_rows(pool, cfg.max_train_samples, cfg.seed + i)
        test = sample_rows(test_file, cfg.max_test_samples, cfg.seed + 1000 + i)
        seen = {r["sentence"] for r in train_file}
        overlap = sum(r["sentence"] in seen for r in test_file)
        if cfg.eval_split == "validation":
            test = validation  # scored in place of the test rows (the test file is still checked above)
        out.append(TaskData(task=task, train_rows=train, test_rows=test, dropped=dropped, train_test_overlap=overlap))
    return out


def truncation_report(datas: list[TaskData], max_source_length: int) -> list[str]:
    """One line per task with prompts cut to ``max_source_length`` tokens (counts of training and test rows)."""
    return [f"task {d.task.name}: {d.truncated_train} of {len(d.train_rows)} training and {d.truncated_test} of "
            f"{len(d.test_rows)} test prompts were longer than max_source_length={max_source_length} tokens; their "
            f"sentences were cut (instruction, options and answer kept)"
            for d in datas if d.truncated_train or d.truncated_test]


def overlap_report(datas: list[TaskData]) -> list[str]:
    """One warning line per task whose test file repeats sentences of its training file."""
    return [f"warning: task {d.task.name}: {d.train_test_overlap} test rows have a sentence that is also in the "
            f"training file; their scores measure memorisation, not generalisation (deduplicate the files)"
            for d in datas if d.train_test_overlap]
