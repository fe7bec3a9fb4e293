"""Where the forgetting goes: what a finished run answers on its earlier tasks after the last task.

A wrong answer on an old task after training on later ones is one of three kinds, read from the run's per-row
predictions (``predictions/after_<t>-<task>/<i>-<task>.jsonl[.gz]``, outputs/layout.py):

* *a later task's label*: the prediction is a gold label of a task trained after it and not one of its own
  labels (e.g. agnews' ``Sports`` for a DBpedia article): the new task's output vocabulary leaks into old prompts;
* *another of its own labels*: a confusion inside the task's label set;
* *other text*: anything else (a made-up label, a malformed answer).

Next to these, the share of the task's rows given its single most frequent prediction measures collapse onto one
answer (a task with balanced classes has a most-frequent share of 1/classes when nothing collapses).

The label sets are the gold labels present in the run's own final predictions files, so nothing but the run's
folder is read.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

from ..data.labels import normalize_answer
from ..outputs.layout import RunLayout
from .stats import find_prediction_file, read_prediction_rows


@dataclasses.dataclass(frozen=True)
class TaskErrors:
    """One earlier task after the run's last task. Counts are rows; ``top_share`` a fraction of ``rows``.

    Attributes:
        task: the task's name.
        rows: test (or validation) rows scored.
        wrong: rows whose prediction is not the gold label.
        later_label: wrong rows answered with a later task's label (not one of the task's own).
        own_label: wrong rows answered with another of the task's own labels.
        other: the remaining wrong rows.
        top_prediction: the most frequent prediction; ``top_share`` its share of all rows.
    """

    task: str
    rows: int
    wrong: int
    later_label: int
    own_label: int
    other: int
    top_prediction: str
    top_share: float


def _read_rows(path: str) -> list[dict]:
    rows = read_prediction_rows(path)
    for n, r in enumerate(rows, 1):
        if "prediction" not in r or "label" not in r:
            raise ValueError(f"{path}:{n}: a predictions row needs 'prediction' and 'label'")
    return rows


def forgetting_breakdown(run_dir: str, tasks: Sequence[str]) -> list[TaskErrors]:
    """The error kinds of every task but the last, from the predictions after the last task.

    Args:
        run_dir: a run folder with ``predictions/after_<n>-<last task>/``.
        tasks: the run's task order (``metrics.json``'s ``tasks``), at least two.
    Returns:
        One ``TaskErrors`` per earlier task, in task order. Predictions and labels are compared after the exact
        match's own ``normalize_answer`` (data/labels.py), so ``wrong`` counts the rows the accuracy scores 0.
    Raises:
        FileNotFoundError: a predictions file of the last evaluation is missing (named).
        ValueError: fewer than two tasks, or a row without ``prediction``/``label`` (file and line named).
    """
    if len(tasks) < 2:
        raise ValueError("forgetting_breakdown needs a run of at least two tasks")
    layout = RunLayout(run_dir)
    last = len(tasks) - 1
    folder = layout.predictions(last, tasks[last])
    rows = [_read_rows(find_prediction_file(folder, i, t)) for i, t in enumerate(tasks)]
    labels = [{normalize_answer(r["label"]) for r in task_rows} for task_rows in rows]
    out = []
    for i, t in enumerate(tasks[:-1]):
        later = set().union(*labels[i + 1:]) - labels[i]
        answers = [(normalize_answer(r["prediction"]), normalize_answer(r["label"])) for r in rows[i]]
        wrong = [p for p, g in answers if p != g]
        counts = collections.Counter(str(r["prediction"]).strip() for r in rows[i])
        top, top_n = counts.most_common(1)[0] if counts else ("", 0)
        n_later = sum(p in later for p in wrong)
        n_own = sum(p in labels[i] for p in wrong)
        out.append(TaskErrors(t, len(rows[i]), len(wrong), n_later, n_own, len(wrong) - n_later - n_own, top,
                              top_n / max(len(rows[i]), 1)))
    return out


def breakdown_table(runs: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    """Markdown table of ``forgetting_breakdown`` for several runs.

    Args:
        runs: (label shown in the first column, run folder, task order) per run.
    Returns:
        Lines of a Markdown table (header included); a run whose predictions cannot be read gets one line saying
        why instead of raising.
    """
    lines = ["| run | task | rows | wrong | a later task's label | another own label | other text | "
             "most frequent answer (share of rows) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, run_dir, tasks in runs:
        try:
            rows = forgetting_breakdown(run_dir, tasks)
        except (OSError, ValueError) as err:
            lines.append(f"| `{name}` | — | — | — | — | — | — | no predictions ({str(err)[:80]}) |")
            continue
        for e in rows:
            pct = lambda k: f"{k} ({100 * k / max(e.wrong, 1):.0f} %)"
            lines.append(f"| `{name}` | {e.task} | {e.rows} | {e.wrong} | {pct(e.later_label)} | {pct(e.own_label)} "
                         f"| {pct(e.other)} | {e.top_prediction} ({100 * e.top_share:.0f} %) |")
    return lines
