"""scripts/search_deal_defaults.py keeps finished round-2 points across machines (``copy_finished``, ``--save``):
finished metrics are copied, unfinished ones and places that already hold a finished run are left alone."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "search_deal_defaults.py"


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("search_deal_defaults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: pathlib.Path, **metrics):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_copy_finished_copies_only_finished_points_and_never_overwrites_one(search, tmp_path):
    src, dst = tmp_path / "runs", tmp_path / "kept"
    _write(src / "stage1" / "deal_grow_adapter=true", finished=True, average_accuracy=50.0)
    _write(src / "stage1" / "deal_grow_adapter=false", finished=False, completed_tasks=2)
    _write(src / "reference" / "method=o_lora", finished=True, average_accuracy=40.0)
    _write(dst / "reference" / "method=o_lora", finished=True, average_accuracy=41.0)
    (src / "stage1" / "deal_grow_adapter=true" / "adapters").mkdir()  # large files stay behind
    copied = search.copy_finished(str(src), str(dst))
    assert copied == ["stage1/deal_grow_adapter=true/metrics.json"]
    assert json.loads((dst / "stage1" / "deal_grow_adapter=true" / "metrics.json").read_text())["average_accuracy"] == 50
    assert not (dst / "stage1" / "deal_grow_adapter=false").exists()
    assert not (dst / "stage1" / "deal_grow_adapter=true" / "adapters").exists()
    assert json.loads((dst / "reference" / "method=o_lora" / "metrics.json").read_text())["average_accuracy"] == 41
    assert search.copy_finished(str(src), str(dst)) == []  # nothing new
    assert search.copy_finished(str(tmp_path / "missing"), str(dst)) == []


def test_save_refuses_another_output_folder(search, tmp_path, capsys):
    with pytest.raises(SystemExit):
        search.main(["--round", "2", "--save", "--output_dir", str(tmp_path)])
    assert "--save keeps round 2's points of its default output folder" in capsys.readouterr().err
