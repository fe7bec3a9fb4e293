"""Task registry and benchmark sequences (docs/design.md section 2, paper Table 6).

Each task lives in the CL_Benchmark layout as ``<data_dir>/<type>/<task>/{train,test,labels}.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..config import ConfigError
from .labels import check_label_set

INSTRUCTIONS = {
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
           "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
           "Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.\n",
    "COPA": "",  # COPA's sentence already asks the question; no instruction and no options.
}

TASK_TYPES = {
    "agnews": "TC", "dbpedia": "TC", "yahoo": "TC",
    "amazon": "SC", "yelp": "SC", "IMDB": "SC", "SST-2": "SC",
    "MNLI": "NLI", "CB": "NLI", "RTE": "NLI",
    "QQP": "QQP", "BoolQA": "BoolQA", "MultiRC": "MultiRC", "WiC": "WiC", "COPA": "COPA",
}

BENCHMARKS: dict[str, dict[int, list[str]]] = {
    "tc": {1: ["dbpedia", "yahoo", "agnews"]},
    "standard": {
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long": {1: ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
                 "yahoo", "MultiRC", "BoolQA", "WiC"]},
}


@dataclass(frozen=True)
class Task:
    """One task of the benchmark: its name, type (TC, SC, NLI, ...), label strings and instruction."""

    name: str
    type: str
    labels: tuple[str, ...]
    instruction: str
    directory: str

    @property
    def has_options(self) -> bool:
        return self.type != "COPA"

    def split_path(self, split: str) -> str:
        return os.path.join(self.directory, f"{split}.json")


def task_sequence(benchmark: str, order: int, tasks: list[str] | None = None) -> list[str]:
    """Names of the tasks in training order.

    Raises:
        ConfigError: unknown benchmark, an order the benchmark does not have, or an unknown task name.
    """
    if tasks:
        for name in tasks:
            if name not in TASK_TYPES:
                raise ConfigError(f"Unknown task '{name}' in 'tasks'. Known tasks: {', '.join(TASK_TYPES)}.")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"'tasks' lists a task twice: {tasks}.")
        return list(tasks)
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"Unknown benchmark '{benchmark}'. Choose one of {', '.join(BENCHMARKS)}.")
    orders = BENCHMARKS[benchmark]
    if order not in orders:
        if len(orders) == 1:
            return list(orders[1])
        raise ConfigError(f"Benchmark '{benchmark}' has orders {sorted(orders)}, not {order}.")
    return list(orders[order])


def load_task(data_dir: str, name: str) -> Task:
    """Look a task up in the CL_Benchmark layout under ``data_dir``.

    Raises:
        ConfigError: ``data_dir`` or the task's directory or ``labels.json`` is missing or unreadable, or two labels
            are the same answer to exact match (``labels.check_label_set``).
    """
    if name not in TASK_TYPES:
        raise ConfigError(f"Unknown task '{name}'. Known tasks: {', '.join(TASK_TYPES)}.")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"Data directory not found: {data_dir}. Set data_dir (or $DEAL_TRAIN_DATA_DIR) to the "
                          f"CL_Benchmark folder that holds TC/, SC/, NLI/, ...")
    ttype = TASK_TYPES[name]
    directory = os.path.join(data_dir, ttype, name)
    labels_path = os.path.join(directory, "labels.json")
    if not os.path.isfile(labels_path):
        raise ConfigError(f"Task '{name}': {labels_path} not found. Expected the CL_Benchmark layout "
                          f"<data_dir>/{ttype}/{name}/{{train,test,labels}}.json.")
    try:
        with open(labels_path, encoding="utf-8") as fh:
            labels = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Task '{name}': cannot read {labels_path}: {err}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ConfigError(f"Task '{name}': {labels_path} must be a non-empty JSON list of label strings.")
    check_label_set(labels, f"Task '{name}': {labels_path}")
    return Task(name=name, type=ttype, labels=tuple(labels), instruction=INSTRUCTIONS[ttype], directory=directory)
