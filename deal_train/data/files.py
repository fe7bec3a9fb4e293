"""Your own tasks from your own files (``data_source: files``), described by a small YAML file (``tasks_file``)::

    tasks:
      - name: reviews                    # any name; the prompt's "Dataset:" line
        type: SC                         # optional; a benchmark type (TC, SC, NLI, QQP, BoolQA, MultiRC, WiC,
                                         # COPA) also picks that type's instruction; default "custom"
        instruction: "What is the sentiment of the following paragraph? Choose one from the option.\\n"
        labels: [Good, Bad]              # the label strings, or a path to a JSON list of them
        label_map: {0: Bad, 1: Good}     # optional: raw label values -> label strings
        train: data/reviews_train.jsonl  # JSON lines, a JSON list, or CSV (by extension: .json/.jsonl/.csv)
        test: data/reviews_test.csv
        text_column: text                # default: sentence
        label_column: label              # default: label

Paths are relative to the YAML file; ``$VARS`` and ``~`` are expanded (an unset variable is an error that names it). The task sequence is the file's order,
or the ``tasks`` key's names. Rows go through the same checks as CL_Benchmark rows (``dataset.check_rows``).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass


from ..config import ConfigError, read_yaml
from .dataset import check_rows
from .labels import check_label_set
from .tasks import INSTRUCTIONS, Task

TASK_KEYS = {"name", "type", "instruction", "labels", "label_map", "train", "test", "text_column", "label_column"}
REQUIRED_KEYS = ("name", "labels", "train", "test")


@dataclass(frozen=True)
class FileTask:
    """One task of a ``tasks_file``: the ``Task`` (prompt parts and labels) and where its rows are."""

    task: Task
    files: dict  # split -> path
    text_column: str
    label_column: str
    label_map: dict | None  # str(raw value) -> label string


_ENV_VAR = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _path(base: str, value: str, where: str, key: str) -> str:
    """``value`` with ``$VAR`` / ``${VAR}`` and ``~`` expanded, relative to ``base`` (the tasks_file's folder).

    Raises:
        ConfigError: ``value`` names an environment variable that is not set (naming it, the task and the key).
    """
    text = str(value)
    unset = [a or b for a, b in _ENV_VAR.findall(text) if (a or b) not in os.environ]
    if unset:
        raise ConfigError(f"{where}: '{key}: {text}' uses the environment variable {unset[0]}, which is not set. "
                          f"Set it (export {unset[0]}=...) or write the path without it.")
    path = os.path.expanduser(os.path.expandvars(text))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _labels(where: str, base: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        path = _path(base, value, where, "labels")
        try:
            with open(path, encoding="utf-8") as fh:
                value = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{where}: cannot read the labels file {path}: {err}") from None
    if not isinstance(value, list) or not value or not all(isinstance(x, (str, int, float)) for x in value):
        raise ConfigError(f"{where}: 'labels' must be a non-empty list of label strings or the path of a JSON list.")
    labels = tuple(str(x) for x in value)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: 'labels' lists a label twice: {list(labels)}.")
    check_label_set(labels, where)
    return labels


def read_tasks_file(path: str) -> dict[str, FileTask]:
    """Parse a ``tasks_file`` into name -> ``FileTask``, in the file's order.

    Raises:
        ConfigError: the file is missing or not YAML, a task entry has unknown or missing keys, a repeated name,
            bad labels (also two labels that exact match cannot tell apart), a path with an unset ``$VAR``, or a
            ``label_map`` value outside the labels (each message names the file and the task).
    """
    data = read_yaml(path, "tasks_file")
    entries = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"tasks_file {path} must hold 'tasks:', a list of task entries (see README, 'Your own "
                          f"tasks').")
    base = os.path.dirname(os.path.abspath(path))
    out: dict[str, FileTask] = {}
    for i, entry in enumerate(entries):
        where = f"tasks_file {path}, task {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: each entry must be a mapping of keys ({', '.join(sorted(TASK_KEYS))}).")
        if entry.get("name"):
            where = f"tasks_file {path}, task '{entry['name']}'"
        unknown = sorted(set(entry) - TASK_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TASK_KEYS))}.")
        missing = [k for k in REQUIRED_KEYS if not entry.get(k)]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}.")
        name = str(entry["name"])
        if name in out:
            raise ConfigError(f"{where}: the name '{name}' is used twice.")
        ttype = str(entry.get("type") or "custom")
        instruction = entry.get("instruction")
        if instruction is None:
            instruction = INSTRUCTIONS.get(ttype, "")
        labels = _labels(where, base, entry["labels"])
        label_map = entry.get("label_map")
        if label_map is not None:
            if not isinstance(label_map, dict):
                raise ConfigError(f"{where}: 'label_map' must map raw label values to label strings.")
            label_map = {str(k): str(v) for k, v in label_map.items()}
            outside = sorted(v for v in label_map.values() if v not in labels)
            if outside:
                raise ConfigError(f"{where}: label_map values {outside} are not in 'labels' {list(labels)}.")
        task = Task(name=name, type=ttype, labels=labels, instruction=str(instruction), directory=base)
        out[name] = FileTask(task=task, files={s: _path(base, entry[s], where, s) for s in ("train", "test")},
                             text_column=str(entry.get("text_column") or "sentence"),
                             label_column=str(entry.get("label_column") or "label"), label_map=label_map)
    return out


def read_table(path: str, task_name: str) -> list[dict]:
    """Rows of a CSV file (header row) or a JSON file (a list of objects, or one object per line).

    Raises:
        ConfigError: the file is missing or cannot be parsed (names the task, file and line).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"Task '{task_name}': {path} not found.")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.lower().endswith(".csv"):
                return list(csv.DictReader(fh))
            text = fh.read()
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"Task '{task_name}': cannot read {path}: {err}") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"Task '{task_name}': {path} is not valid JSON: {err}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"Task '{task_name}': {path} line {n} is not a JSON object: {err}") from None
    return rows


def read_file_rows(spec: FileTask, split: str, dropped: dict | None = None) -> list[dict]:
    """The ``split`` rows of a file task as ``{"sentence", "label"}`` dicts, label strings mapped through
    ``label_map`` (or taken as ``str`` of the raw value) and validated by ``check_rows``.

    Raises:
        ConfigError: unreadable file, a missing text or label column (lists the file's columns), or rows that
            ``check_rows`` refuses.
    """
    path = spec.files[split]
    name = spec.task.name
    rows = read_table(path, name)
    if not rows:
        raise ConfigError(f"Task '{name}': {path} has no rows.")
    first = rows[0] if isinstance(rows[0], dict) else {}
    for role, col in (("text_column", spec.text_column), ("label_column", spec.label_column)):
        if col not in first:
            raise ConfigError(f"Task '{name}': {path} has no column '{col}' ({role}); its columns are "
                              f"{sorted(first)}. Set {role} in the tasks_file.")
    out = []
    for row in rows:
        if not isinstance(row, dict):
            out.append(row)  # check_rows reports it
            continue
        raw = row.get(spec.label_column)
        label = None if raw is None else str(raw)
        if spec.label_map is not None and label is not None:
            label = spec.label_map.get(label, label)
        out.append({"sentence": row.get(spec.text_column), "label": label})
    return check_rows(spec.task, path, split, out, dropped, "labels (or label_map) of the tasks_file")
