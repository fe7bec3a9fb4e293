"""deal_train/tools/forgetting.py: the kinds of wrong answers on earlier tasks after the last task, on prediction
files written in the run layout with known answers (counted by hand below)."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from deal_train.outputs.layout import RunLayout
from deal_train.tools.forgetting import breakdown_table, forgetting_breakdown

TASKS = ["dbpedia", "yahoo", "agnews"]


def _write(run_dir, t: int, i: int, pairs, gz: bool = False) -> None:
    """Predictions of task ``i`` evaluated after task ``t``: (prediction, label) per row."""
    folder = RunLayout(str(run_dir)).predictions(t, TASKS[t])
    os.makedirs(folder, exist_ok=True)
    path = RunLayout.prediction_file(folder, i, TASKS[i]) + (".gz" if gz else "")
    lines = [json.dumps({"index": n, "prediction": p, "label": g, "exact_match": float(p == g)})
             for n, (p, g) in enumerate(pairs)]
    with (gzip.open(path, "wt") if gz else open(path, "w")) as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def run_dir(tmp_path):
    # dbpedia: 6 rows; 1 right, 2 answered with agnews' labels, 1 with yahoo's (later), 1 own confusion, 1 junk
    _write(tmp_path, 2, 0, [("Company", "Company"), ("Sports", "Athlete"), ("Business", "Company"),
                            ("Health", "Artist"), ("Company", "Artist"), ("Compny!!", "Athlete")])
    # yahoo: 4 rows, collapse on "Sports" (a yahoo label and an agnews label: its own, so never a later one)
    _write(tmp_path, 2, 1, [("Sports", "Sports"), ("Sports", "Health"), ("  sports ", "Business"),
                            ("World", "Health")], gz=True)
    _write(tmp_path, 2, 2, [("Sports", "Sports"), ("Business", "Business"), ("World", "World")])
    return tmp_path


def test_error_kinds_and_collapse(run_dir):
    db, yahoo = forgetting_breakdown(str(run_dir), TASKS)
    assert (db.task, db.rows, db.wrong, db.later_label, db.own_label, db.other) == ("dbpedia", 6, 5, 3, 1, 1)
    assert (db.top_prediction, db.top_share) == ("Company", pytest.approx(2 / 6))
    # white space and case are ignored in the comparison ("  sports " is the label Sports)
    assert (yahoo.rows, yahoo.wrong, yahoo.later_label, yahoo.own_label, yahoo.other) == (4, 3, 1, 2, 0)
    assert yahoo.top_prediction == "Sports" and yahoo.top_share == pytest.approx(2 / 4)
    table = breakdown_table([("deal", str(run_dir), TASKS)])
    assert "| `deal` | dbpedia | 6 | 5 | 3 (60 %) | 1 (20 %) | 1 (20 %) | Company (33 %) |" in table


def test_missing_or_bad_files_are_named(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="agnews"):
        forgetting_breakdown(str(tmp_path / "nowhere"), TASKS)
    with pytest.raises(ValueError, match="at least two tasks"):
        forgetting_breakdown(str(run_dir), TASKS[:1])
    path = RunLayout.prediction_file(RunLayout(str(run_dir)).predictions(2, "agnews"), 2, "agnews")
    with open(path, "a") as f:
        f.write(json.dumps({"index": 9, "exact_match": 0.0}) + "\n")
    with pytest.raises(ValueError, match=r"3-agnews\.jsonl:4: a predictions row needs"):
        forgetting_breakdown(str(run_dir), TASKS)
    assert "no predictions" in breakdown_table([("x", str(tmp_path / "nowhere"), TASKS)])[-1]
