"""Subspace overlap of each task's update next to the forgetting it caused, as a Markdown table.

``python -m deal_train.tools.overlap_table RUN_DIR [RUN_DIR ...]`` reads each run's ``metrics.json`` and prints,
per run and task t, ``per_task[t]["subspace_overlap"]`` (the share of the task's LoRA update inside the earlier
tasks' top-k subspace: output, input and both sides of ΔW, and the A and B factors; definitions in
``deal_train.train.adapter_change``) next to the accuracy drop of every earlier task i over task t,
``accuracy_matrix[i][t-1] − accuracy_matrix[i][t]`` in points (positive: forgotten). Task 1 has no history: its
overlaps and drops are "–". Runs made before the overlap was measured print "–" as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..train.adapter_change import OVERLAP_KEYS

HEADER = ("| run | method | task | output | input | both | A | B | accuracy drop of earlier tasks over this task "
          "(points) |")


def _fraction(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def accuracy_drops(metrics: dict, t: int) -> list[tuple[str, float | None]]:
    """(task name, ``accuracy_matrix[i][t-1] − accuracy_matrix[i][t]``) for every earlier task i < t; None where
    either accuracy is missing."""
    acc, names = metrics["accuracy_matrix"], metrics["tasks"]
    out = []
    for i in range(t):
        before, after = acc[i][t - 1], acc[i][t]
        out.append((names[i], None if before is None or after is None else before - after))
    return out


def rows(metrics: dict, label: str) -> list[str]:
    """One Markdown row per finished task of one run."""
    method = metrics.get("config", {}).get("method", "?")
    lines = []
    for t, task in enumerate(metrics.get("per_task", [])):
        overlap = task.get("subspace_overlap") or {}
        drops = ", ".join(f"{name} {'n/a' if d is None else f'{d:+.1f}'}" for name, d in accuracy_drops(metrics, t))
        cells = [label, method, f"{t + 1} {task.get('task', metrics['tasks'][t])}",
                 *(_fraction(overlap.get(k)) for k in OVERLAP_KEYS), drops or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(run_dirs: Sequence[str]) -> str:
    """The Markdown table over ``run_dirs`` (each holding a ``metrics.json``), labelled by folder name.

    Raises:
        FileNotFoundError: a folder has no ``metrics.json``.
    """
    lines = [HEADER, "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as fh:
            metrics = json.load(fh)
        lines += rows(metrics, os.path.basename(os.path.normpath(run_dir)))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; exit code 2 when a folder has no ``metrics.json``."""
    parser = argparse.ArgumentParser(prog="python -m deal_train.tools.overlap_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="Run output folders (each with a metrics.json).")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.isfile(os.path.join(d, "metrics.json"))]
    if missing:
        print(f"error: no metrics.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    print(table(args.run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
