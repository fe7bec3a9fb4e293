"""Uncertainty of the results table: power calculation, bootstrap intervals for AA and BWT, paired differences.

All statistics are built from per-row exact-match scores (0 or 1) of the test rows, as written by a run's
predictions files (``predictions/after_<t>-<task>/<i>-<task>.jsonl``, key ``exact_match``). Accuracies are fractions
in [0, 1] here; the pages print them as percentages.

Definitions (docs/design.md): with T tasks and a[i][j] the accuracy on task i after training task j,
AA = mean_i a[i][T] and BWT = mean_{i<T} (a[i][T] - a[i][i]).

The bootstrap resamples the test rows of each task independently (scipy.stats.bootstrap with one sample per task,
``paired=False`` across tasks). Where two numbers come from the same rows (a[i][T] and a[i][i] for BWT; two methods'
a[i][T] for a paired difference) the per-row difference is resampled, so both are recomputed on the same row
indices.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_METHOD = "percentile"
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (fractions, not percentages)."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return self.low > 0.0 or self.high < 0.0


def _mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over tasks of each task's mean over rows (vectorised along ``axis`` for scipy)."""
    return np.mean([np.mean(s, axis=axis) for s in samples], axis=0)


def bootstrap_mean_of_task_means(per_task: Sequence[Sequence[float]], n_resamples: int = N_RESAMPLES,
                                 seed: int = SEED) -> Interval:
    """95% bootstrap interval of mean_i mean(per_task[i]), resampling each task's rows independently.

    ``per_task``: one 1-D array of per-row values per task (exact match 0/1, or a per-row difference of two exact
    matches on the same row). Raises ValueError when there are no tasks or a task has no rows.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in per_task]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("bootstrap needs at least one task and at least one row per task")
    estimate = float(_mean_of_means(*arrays))
    if all(np.all(a == a[0]) for a in arrays):  # no spread: every resample gives the estimate
        return Interval(estimate, estimate, estimate)
    res = stats.bootstrap(tuple(arrays), _mean_of_means, n_resamples=n_resamples, confidence_level=CONFIDENCE,
                          method=BOOTSTRAP_METHOD, paired=False, vectorized=True,
                          rng=np.random.default_rng(seed))
    return Interval(estimate, float(res.confidence_interval.low), float(res.confidence_interval.high))


def aa_interval(final_em: Sequence[Sequence[float]], **kw) -> Interval:
    """AA with its interval; ``final_em[i]``: per-row exact match on task i after the last task."""
    return bootstrap_mean_of_task_means(final_em, **kw)


def bwt_interval(final_em: Sequence[Sequence[float]], diag_em: Sequence[Sequence[float]], **kw) -> Interval:
    """BWT with its interval; ``diag_em[i]``: per-row exact match on task i right after training task i.

    Uses the first T-1 tasks; row r of ``final_em[i]`` and ``diag_em[i]`` must be the same test row. Raises
    ValueError on fewer than two tasks or on mismatched row counts.
    """
    if len(final_em) < 2 or len(final_em) != len(diag_em):
        raise ValueError("BWT needs at least two tasks and a diagonal entry for each")
    return bootstrap_mean_of_task_means(_row_differences(final_em[:-1], diag_em[:-1]), **kw)


def paired_difference_interval(em_a: Sequence[Sequence[float]], em_b: Sequence[Sequence[float]], **kw) -> Interval:
    """AA(a) - AA(b) with its paired interval: the same row indices are resampled for both methods.

    ``em_a[i]``, ``em_b[i]``: per-row exact match on task i after the last task, same rows in the same order.
    Raises ValueError when the tasks or row counts differ.
    """
    return bootstrap_mean_of_task_means(_row_differences(em_a, em_b), **kw)


def _row_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired statistic over different task counts ({len(a)} vs {len(b)})")
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"task {i}: {x.size} vs {y.size} rows; a paired statistic needs the same test rows")
        out.append(x - y)
    return out


def aa_standard_error(rows_per_task: Sequence[int], accuracy: float = 0.5) -> float:
    """Binomial standard error of AA (fraction) when every task has accuracy ``accuracy``.

    SE = sqrt(sum_i p(1-p)/n_i) / T; p = 0.5 is the worst case. Raises ValueError on an empty list or n_i <= 0.
    """
    if not rows_per_task or min(rows_per_task) <= 0:
        raise ValueError("rows_per_task must be a non-empty list of positive row counts")
    p = accuracy
    return math.sqrt(sum(p * (1 - p) / n for n in rows_per_task)) / len(rows_per_task)


def paired_difference_standard_error(rows_per_task: Sequence[int], disagreement: float) -> float:
    """Standard error of a paired AA difference when two methods disagree on a fraction ``disagreement`` of rows.

    A per-row difference d takes -1, 0, +1; with equal accuracies Var(d) = disagreement, so
    SE = sqrt(sum_i q / n_i) / T. Raises ValueError on bad counts or q outside [0, 1].
    """
    if not 0.0 <= disagreement <= 1.0:
        raise ValueError(f"disagreement must be in [0, 1], got {disagreement}")
    if not rows_per_task or min(rows_per_task) <= 0:
        raise ValueError("rows_per_task must be a non-empty list of positive row counts")
    return math.sqrt(sum(disagreement / n for n in rows_per_task)) / len(rows_per_task)


def read_prediction_rows(path: str) -> list[dict]:
    """The rows of a predictions .jsonl or .jsonl.gz file (blank lines skipped), in file order."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_exact_match(path: str) -> np.ndarray:
    """Per-row exact match (0/1, float64, shape [rows], ordered by ``index``) from a predictions .jsonl(.gz) file.

    Raises ValueError naming the file when a line lacks ``exact_match``.
    """
    rows = []
    for n, r in enumerate(read_prediction_rows(path), 1):
        if "exact_match" not in r:
            raise ValueError(f"{path}:{n}: no 'exact_match' in the predictions row")
        rows.append((r.get("index", n), float(r["exact_match"])))
    rows.sort()
    return np.array([v for _, v in rows], dtype=np.float64)


def find_prediction_file(folder: str, i: int, task: str) -> str:
    """The predictions file of task ``i`` (0-based) in ``folder``: ``<i+1>-<task>.jsonl`` or ``.jsonl.gz``
    (``RunLayout.prediction_file``). Raises FileNotFoundError naming both candidates.
    """
    from deal_train.outputs.layout import RunLayout

    base = RunLayout.prediction_file(folder, i, task)
    for p in (base, base + ".gz"):
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no predictions for task {i} ({task}): neither {base} nor {base}.gz exists")


def run_row_scores(run_dir: str, tasks: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-row exact matches of a finished run: (final[i] after the last task, diag[i] right after task i).

    Reads ``<run_dir>/predictions/after_<t>-<task>/<i>-<task>.jsonl[.gz]`` (outputs/layout.py). Raises
    FileNotFoundError naming the missing file.
    """
    from deal_train.outputs.layout import RunLayout

    layout = RunLayout(run_dir)
    last = len(tasks) - 1
    final = [read_exact_match(find_prediction_file(layout.predictions(last, tasks[last]), i, t))
             for i, t in enumerate(tasks)]
    diag = [read_exact_match(find_prediction_file(layout.predictions(i, t), i, t)) for i, t in enumerate(tasks)]
    return final, diag


def significance_sentence(name: str, ref: str, iv: Interval) -> str:
    """One verdict sentence on AA(name) - AA(ref): a ranking claim only when the 95% interval excludes 0."""
    diff = f"{100 * iv.estimate:+.1f} points (95% CI {100 * iv.low:+.1f} to {100 * iv.high:+.1f})"
    if iv.excludes_zero:
        word = "above" if iv.estimate > 0 else "below"
        return f"`{name}` is {word} `{ref}` in AA: {diff}; the interval excludes 0."
    return f"`{name}` and `{ref}` cannot be told apart in AA: {diff}; the interval contains 0."
