"""Unfinished table runs that outlive the machine: save their finished tasks into the repo, restore them elsewhere.

A paper-budget run takes over an hour on 2 CPU cores and any machine may be stopped mid-run (each session of the
project gets a fresh machine: its ``outputs/`` folder is gone). The trainer itself resumes a run after its last
finished task from three things in the run folder (``train.loop.resume_after_tasks``): ``metrics.json`` (with
``completed_tasks`` k), the adapter folders ``adapters/<t>-<task>/`` of tasks 1..k (PEFT's files plus the method's
state) and, for the final copy, the ``predictions/`` folders of those tasks. This tool copies exactly those into a
committed folder and back:

* ``python -m deal_train.tools.partial_runs save --runs_root outputs/paper_table --results_dir results`` copies every
  unfinished run ``<runs_root>/<group>/<method>`` with k >= 1 finished tasks to
  ``<results_dir>/partial/<group>/<method>/`` (predictions gzipped), replacing an older copy only with a newer one
  (more finished tasks); a run's step checkpoints (the task in progress) are not copied, so at most one task is lost.
* ``python -m deal_train.tools.partial_runs restore --run_dir RUN --saved DIR`` puts a saved copy back into an empty
  or less advanced run folder, so that the same training command resumes it (``scripts/paper_table.sh`` does this
  before each run, and removes the saved copy once the run has finished).

* ``python -m deal_train.tools.partial_runs finished --run_dir RUN --dest DIR`` copies a *finished* run's
  ``metrics.json`` and predictions (gzipped) to ``DIR`` (``results/<group>/<method>/``, what ``deal_train.results``
  reads), replacing ``DIR`` atomically; ``scripts/paper_table.sh`` calls it after each run.

``<results_dir>/partial`` is not read by ``deal_train.results``: the page is made from finished runs only.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
from typing import Sequence

from ..outputs.layout import CHECKPOINTS_DIR, METRICS_FILE
from ..outputs.writing import atomic_write_dir

PARTIAL_DIR = "partial"
"""Folder inside the results folder that holds the saved unfinished runs."""


class PartialRunError(Exception):
    """A run folder or saved copy that cannot be saved or restored (the message names the path and what to do)."""


def read_progress(run_dir: str) -> dict | None:
    """The run's ``metrics.json``, or None when there is none.

    Raises:
        PartialRunError: the file is unreadable.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise PartialRunError(f"{path} is unreadable ({err}); delete the folder to start that run over.") from None


def _task_folders(metrics: dict, k: int) -> list[str]:
    """Folder names ``<t>-<task>`` of the first k tasks (1-based t)."""
    return [f"{t + 1}-{name}" for t, name in enumerate(metrics.get("tasks", [])[:k])]


def _gzip_folder(src_dir: str, dst_dir: str) -> None:
    """Every ``*.jsonl`` of ``src_dir`` as ``*.jsonl.gz`` in ``dst_dir`` (none: nothing is made)."""
    for src in sorted(glob.glob(os.path.join(src_dir, "*.jsonl"))):
        os.makedirs(dst_dir, exist_ok=True)
        with open(src, "rb") as fin, gzip.GzipFile(os.path.join(dst_dir, os.path.basename(src) + ".gz"), "wb",
                                                   compresslevel=9, mtime=0) as fout:
            shutil.copyfileobj(fin, fout)


def save_run(run_dir: str, dest: str) -> int:
    """Copy the finished tasks of the unfinished run in ``run_dir`` to ``dest``; returns the number of tasks saved
    (0: nothing to save: no ``metrics.json``, a finished run, no task finished yet, or ``dest`` already holds as
    many tasks). ``metrics.json`` is read first and only the tasks it counts are copied (the adapter and predictions
    of a task are written before the metrics that count it), and ``dest`` is replaced atomically.

    Raises:
        PartialRunError: unreadable metrics, or an adapter folder that the metrics count is missing.
    """
    metrics = read_progress(run_dir)
    if metrics is None or metrics.get("finished"):
        return 0
    k = int(metrics.get("completed_tasks", 0))
    saved = read_progress(dest)
    if k == 0 or (saved is not None and int(saved.get("completed_tasks", 0)) >= k):
        return 0
    folders = _task_folders(metrics, k)
    for name in folders:
        if not os.path.isdir(os.path.join(run_dir, "adapters", name)):
            raise PartialRunError(f"{run_dir}: metrics.json counts {k} finished task(s) but adapters/{name} is "
                                  f"missing; this run cannot be saved.")

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, METRICS_FILE), "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        for name in folders:
            shutil.copytree(os.path.join(run_dir, "adapters", name), os.path.join(tmp, "adapters", name))
        for pred in ["zero_shot"] + [f"after_{name}" for name in folders]:
            _gzip_folder(os.path.join(run_dir, "predictions", pred), os.path.join(tmp, "predictions", pred))

    atomic_write_dir(dest, write)
    return k


def copy_finished_run(run_dir: str, dest: str) -> None:
    """Copy the finished run in ``run_dir`` to ``dest``: ``metrics.json`` and every ``predictions/<folder>/*.jsonl``
    gzipped (no adapters, no checkpoints); ``dest`` is replaced atomically.

    Raises:
        PartialRunError: ``run_dir`` holds no finished run.
    """
    metrics = read_progress(run_dir)
    if metrics is None or not metrics.get("finished"):
        raise PartialRunError(f"{run_dir} holds no finished run (metrics.json missing or not finished); rerun its "
                              f"training command to finish it first.")

    def write(tmp: str) -> None:
        shutil.copyfile(os.path.join(run_dir, METRICS_FILE), os.path.join(tmp, METRICS_FILE))
        for folder in sorted(glob.glob(os.path.join(run_dir, "predictions", "*"))):
            _gzip_folder(folder, os.path.join(tmp, "predictions", os.path.basename(folder)))

    atomic_write_dir(dest, write)


def save_all(runs_root: str, results_dir: str) -> list[tuple[str, int]]:
    """``save_run`` for every ``<runs_root>/<group>/<method>``; returns (saved folder, tasks) of those saved."""
    out = []
    for metrics_path in sorted(glob.glob(os.path.join(runs_root, "*", "*", METRICS_FILE))):
        run_dir = os.path.dirname(metrics_path)
        rel = os.path.relpath(run_dir, runs_root)
        dest = os.path.join(results_dir, PARTIAL_DIR, rel)
        k = save_run(run_dir, dest)
        if k:
            out.append((dest, k))
    return out


def restore_run(saved: str, run_dir: str) -> int:
    """Put the saved copy ``saved`` back into ``run_dir`` (predictions un-gzipped) when ``run_dir`` has no
    ``metrics.json`` or counts fewer finished tasks; returns the tasks restored (0: nothing done).

    Raises:
        PartialRunError: the saved copy is unreadable, or ``run_dir`` holds a finished run.
    """
    saved_metrics = read_progress(saved)
    if saved_metrics is None:
        return 0
    current = read_progress(run_dir)
    if current is not None and current.get("finished"):
        raise PartialRunError(f"{run_dir} holds a finished run; the saved copy {saved} is out of date: delete it.")
    k = int(saved_metrics.get("completed_tasks", 0))
    if current is not None and int(current.get("completed_tasks", 0)) >= k:
        return 0
    # step checkpoints of a less advanced run belong to a task the saved copy has finished: never resume those
    shutil.rmtree(os.path.join(run_dir, CHECKPOINTS_DIR), ignore_errors=True)
    for name in _task_folders(saved_metrics, k):
        shutil.rmtree(os.path.join(run_dir, "adapters", name), ignore_errors=True)
        shutil.copytree(os.path.join(saved, "adapters", name), os.path.join(run_dir, "adapters", name))
    for src in sorted(glob.glob(os.path.join(saved, "predictions", "*", "*.jsonl.gz"))):
        out = os.path.join(run_dir, "predictions", os.path.relpath(src, os.path.join(saved, "predictions"))[:-3])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with gzip.open(src, "rb") as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    # the metrics last: a restore cut off half way leaves no metrics.json that counts missing files
    shutil.copyfile(os.path.join(saved, METRICS_FILE), os.path.join(run_dir, METRICS_FILE))
    return k


def main(argv: Sequence[str] | None = None) -> int:
    """``save`` / ``restore`` command line; exit 0, or 2 with a one-line message on bad input."""
    parser = argparse.ArgumentParser(prog="python -m deal_train.tools.partial_runs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_save = sub.add_parser("save", help="copy the finished tasks of every unfinished run to <results_dir>/partial")
    p_save.add_argument("--runs_root", default="outputs/paper_table")
    p_save.add_argument("--results_dir", default="results")
    p_restore = sub.add_parser("restore", help="put a saved unfinished run back into its run folder")
    p_restore.add_argument("--saved", required=True)
    p_restore.add_argument("--run_dir", required=True)
    p_finished = sub.add_parser("finished", help="copy a finished run's metrics and gzipped predictions to --dest")
    p_finished.add_argument("--run_dir", required=True)
    p_finished.add_argument("--dest", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "finished":
            copy_finished_run(args.run_dir, args.dest)
            print(f"copied: {args.dest}")
        elif args.command == "save":
            saved = save_all(args.runs_root, args.results_dir)
            for dest, k in saved:
                print(f"saved {k} finished task(s): {dest}")
            if not saved:
                print(f"nothing new to save under {args.runs_root}")
        else:
            k = restore_run(args.saved, args.run_dir)
            if k:
                print(f"restored {k} finished task(s) from {args.saved} into {args.run_dir}")
    except PartialRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
