"""Where a run's tasks come from (``data_source``): one small class per source, all with the same three methods
that ``loop.prepare_data`` calls — ``task_names()``, ``load_task(name)`` and ``read_rows(task, split, dropped)``.

* ``cl_benchmark``: a folder in the CL_Benchmark layout (``data_dir``).
* ``hub``: the public Hugging Face Hub datasets of the 15 tasks, converted and cached (``hub.py``).
* ``files``: the user's own files, described by ``tasks_file`` (``files.py``).
"""

from __future__ import annotations

import os

from ..config import ConfigError, TrainConfig
from .dataset import read_rows
from .files import read_file_rows, read_tasks_file
from .hub import hub_spec, materialise
from .tasks import Task, load_task, task_sequence


class CLBenchmarkSource:
    """Tasks of ``benchmark`` / ``order`` (or ``tasks``) read from ``<data_dir>/<Type>/<task>/``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.data_dir = cfg.resolved_data_dir()

    def task_names(self) -> list[str]:
        """Raises: ConfigError: unknown benchmark, order or task name."""
        return task_sequence(self.cfg.benchmark, self.cfg.order, self.cfg.tasks)

    def load_task(self, name: str) -> Task:
        """The task's labels and prompt parts. Raises: ConfigError: missing folder or labels.json."""
        return load_task(self.data_dir, name)

    def read_rows(self, task: Task, split: str, dropped: dict | None = None) -> list[dict]:
        """Validated ``{"sentence", "label"}`` rows of ``split`` (train/test); rows without a gold label are
        dropped and counted in ``dropped[split]``. Raises: ConfigError: missing or malformed file or rows."""
        return read_rows(task, split, dropped)


class HubSource(CLBenchmarkSource):
    """The same task names, converted from their Hub datasets into ``$DEAL_TRAIN_CACHE/hub/`` on first use, with
    class-balanced subsets of ``max_train_samples`` / ``max_test_samples`` rows drawn with ``seed``."""

    def load_task(self, name: str) -> Task:
        """The task converted into the cache (``hub.materialise``). Raises: ConfigError: Hub unreachable, a
        missing column, or a task without a Hub dataset."""
        from ..model.loading import cache_dir

        spec = hub_spec(name, self.cfg.hub_datasets)
        return materialise(spec, os.path.join(cache_dir(), "hub"), self.cfg.max_train_samples,
                           self.cfg.max_test_samples, self.cfg.seed)


class FilesSource:
    """The tasks of ``tasks_file``, in its order (or the order ``tasks`` names them)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tasks = read_tasks_file(cfg.tasks_file)

    def task_names(self) -> list[str]:
        """Raises: ConfigError: ``tasks`` names a task the file lacks, or names one twice."""
        if not self.cfg.tasks:
            return list(self.tasks)
        unknown = [t for t in self.cfg.tasks if t not in self.tasks]
        if unknown:
            raise ConfigError(f"tasks {unknown} are not in tasks_file {self.cfg.tasks_file}; it has "
                              f"{', '.join(self.tasks)}.")
        if len(set(self.cfg.tasks)) != len(self.cfg.tasks):
            raise ConfigError(f"'tasks' lists a task twice: {self.cfg.tasks}.")
        return list(self.cfg.tasks)

    def load_task(self, name: str) -> Task:
        """The task as the tasks_file describes it (already validated when the file was read)."""
        return self.tasks[name].task

    def read_rows(self, task: Task, split: str, dropped: dict | None = None) -> list[dict]:
        """Validated rows of the task's ``split`` file (``files.read_file_rows``)."""
        return read_file_rows(self.tasks[task.name], split, dropped)


SOURCES = {"cl_benchmark": CLBenchmarkSource, "hub": HubSource, "files": FilesSource}


def task_source(cfg: TrainConfig):
    """The source object for ``cfg.data_source``.

    Raises:
        ConfigError: unknown source, or (files) an unreadable ``tasks_file``.
    """
    if cfg.data_source not in SOURCES:
        raise ConfigError(f"Unknown data_source '{cfg.data_source}'. Choose one of {', '.join(SOURCES)}.")
    return SOURCES[cfg.data_source](cfg)
