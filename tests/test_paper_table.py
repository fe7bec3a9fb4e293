"""scripts/paper_table.sh across machines, for real on the tiny model (O-LoRA, which needs every earlier task's
adapter back): a table run killed after task 1 of 2 is saved into the results folder (``scripts/paper_table.sh
save``), its run folder is deleted (a fresh machine has no outputs/), and the same script on the "new machine"
restores it, resumes after task 1 and ends with the same accuracy matrix and predictions as the session's
uninterrupted run of the same settings (``conftest.finished_run``); the saved copy is removed once the run has
finished."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import conftest

from deal_train.tools import partial_runs

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "paper_table.sh"

KILL_AFTER_TASK_1 = """
import os, signal, sys
from deal_train.train import loop
from deal_train.cli import main

write_metrics = loop.write_metrics

def write_metrics_then_die(state):
    write_metrics(state)
    if state.metrics["completed_tasks"] == 1 and not state.metrics.get("finished"):
        os.kill(os.getpid(), signal.SIGKILL)  # the machine goes away right after task 1 was saved

loop.write_metrics = write_metrics_then_die
sys.exit(main(sys.argv[1:]))
"""

WRAPPER = """#!/bin/sh
# "python -m deal_train ..." runs the trainer with a SIGKILL after task 1; every other call is plain python
if [ "$1" = "-m" ] && [ "$2" = "deal_train" ]; then shift 2; exec "{python}" -c '{code}' "$@"; fi
exec "{python}" "$@"
"""


def _script(tmp: pathlib.Path, runs: str, results: str, *args: str, python: str = sys.executable):
    env = {**os.environ, "PYTHON": python, "RUNS_ROOT": str(tmp / runs), "RESULTS_DIR": str(tmp / results),
           "METHODS1": "o_lora", "ORDERS23": "", "CONFIG_PREFIX": str(tmp / "tiny_order"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _predictions(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): gzip.decompress(p.read_bytes()) for p in sorted(folder.rglob("*.jsonl.gz"))}


@pytest.fixture(scope="module")
def table(tmp_path_factory, finished_run):
    """(tmp folder, the uninterrupted run's output folder, the killed script, the save command)."""
    cfg, _metrics, _ = finished_run("o_lora")
    tmp = tmp_path_factory.mktemp("paper_table")
    # the script's config for "order 1": the settings of the session's uninterrupted two-task run
    (tmp / "tiny_order1.yaml").write_text(yaml.safe_dump({**conftest.TINY_RUN, "method": "o_lora"}))
    wrapper = tmp / "python_killed_after_task_1"
    wrapper.write_text(WRAPPER.format(python=sys.executable, code=KILL_AFTER_TASK_1))
    wrapper.chmod(0o755)
    killed = _script(tmp, "runs_a", "results", python=str(wrapper))
    saved = _script(tmp, "runs_a", "results", "save")
    return tmp, pathlib.Path(cfg.output_dir), killed, saved


def test_a_run_killed_after_task_1_is_saved_with_its_finished_task(table):
    tmp, _ref, killed, saved = table
    assert "FAILED: order 1 o_lora" in killed.stdout, killed.stdout + killed.stderr
    assert saved.returncode == 0, saved.stderr
    copy = tmp / "results" / "partial" / "standard_order1" / "o_lora"
    assert f"saved 1 finished task(s): {copy}" in saved.stdout
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["completed_tasks"] == 1 and not metrics.get("finished")
    assert sorted(p.name for p in (copy / "adapters").iterdir()) == ["1-dbpedia"]
    assert sorted(p.name for p in (copy / "predictions").iterdir()) == ["after_1-dbpedia"]
    assert not (tmp / "results" / "standard_order1").exists()  # the page reads finished runs only
    again = _script(tmp, "runs_a", "results", "save")
    assert "nothing new to save" in again.stdout  # the copy is not replaced by an equally advanced one


def test_a_new_machine_restores_the_saved_run_and_ends_with_the_uninterrupted_result(table):
    tmp, ref_dir, _killed, _saved = table
    shutil.rmtree(tmp / "runs_a")  # the stopped machine's outputs/ are gone
    resumed = _script(tmp, "runs_b", "results")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "restored 1 finished task(s)" in resumed.stdout
    assert "1 of 2 tasks already done" in resumed.stdout + resumed.stderr
    assert not (tmp / "results" / "partial" / "standard_order1" / "o_lora").exists()
    got_dir = tmp / "results" / "standard_order1" / "o_lora"
    ref, got = (json.loads((d / "metrics.json").read_text()) for d in (ref_dir, got_dir))
    assert got["finished"] and got["accuracy_matrix"] == ref["accuracy_matrix"]
    expected = {str(p.relative_to(ref_dir / "predictions")) + ".gz": p.read_bytes()
                for p in sorted((ref_dir / "predictions").rglob("*.jsonl"))}
    assert len(expected) == 1 + 2  # after task 1, after task 2
    assert _predictions(got_dir / "predictions") == expected


def test_restore_refuses_a_finished_run_and_never_rewinds_a_more_advanced_one(table, tmp_path):
    _tmp, finished, *_ = table
    copy = tmp_path / "copy"
    assert partial_runs.save_run(str(finished), str(copy)) == 0  # a finished run is not a partial one
    assert not copy.exists()
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    metrics = json.loads((partial / "metrics.json").read_text())
    metrics.update(finished=False, completed_tasks=1)
    (partial / "metrics.json").write_text(json.dumps(metrics))
    assert partial_runs.save_run(str(partial), str(copy)) == 1
    with pytest.raises(partial_runs.PartialRunError, match="holds no finished run"):  # the final copy needs one
        partial_runs.copy_finished_run(str(partial), str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    with pytest.raises(partial_runs.PartialRunError, match="holds a finished run"):
        partial_runs.restore_run(str(copy), str(finished))
    metrics.update(completed_tasks=2)
    (partial / "metrics.json").write_text(json.dumps(metrics))
    assert partial_runs.restore_run(str(copy), str(partial)) == 0  # 2 finished tasks are not rewound to 1
    assert json.loads((partial / "metrics.json").read_text())["completed_tasks"] == 2
    (copy / "metrics.json").write_text("{not json")
    assert partial_runs.main(["restore", "--saved", str(copy), "--run_dir", str(tmp_path / "x")]) == 2
