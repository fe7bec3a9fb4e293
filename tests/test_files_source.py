"""data_source: files: a tasks_file naming JSON-lines / CSV / JSON-list files with their own column names, label
sets and instructions; the shipped example reads the CL_Benchmark files and gives exactly the rows and prompts of
the cl_benchmark source; bad task files stop with one message naming the file, task and fix."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest

from deal_train.train import loop
from deal_train.config import ConfigError, TrainConfig
from deal_train.data import build_prompt

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cl(data_dir: str, kind: str, task: str, split: str) -> list[dict]:
    return json.loads((pathlib.Path(data_dir) / kind / task / f"{split}.json").read_text())


def _write_tasks(tmp_path: pathlib.Path, data_dir: str) -> pathlib.Path:
    """agnews as JSON lines with columns text/topic and integer labels; SST-2 as CSV with review/sentiment."""
    (tmp_path / "data").mkdir()
    ids = {"World": 0, "Sports": 1, "Business": 2, "Science or Technology": 3}
    for split in ("train", "test"):
        rows = _cl(data_dir, "TC", "agnews", split)[:20]
        (tmp_path / "data" / f"news_{split}.jsonl").write_text(
            "".join(json.dumps({"text": r["sentence"], "topic": ids[r["label"]], "id": i}) + "\n"
                    for i, r in enumerate(rows)))
        with open(tmp_path / "data" / f"sst_{split}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["review", "sentiment"])
            w.writeheader()
            w.writerows({"review": r["sentence"], "sentiment": r["label"]} for r in _cl(data_dir, "SC", "SST-2", split)[:20])
    path = tmp_path / "tasks.yaml"
    path.write_text("""tasks:
  - name: news
    type: TC
    labels: [World, Sports, Business, Science or Technology]
    label_map: {0: World, 1: Sports, 2: Business, 3: Science or Technology}
    train: data/news_train.jsonl
    test: data/news_test.jsonl
    text_column: text
    label_column: topic
  - name: movies
    instruction: "Is this review Good or Bad?\\n"
    labels: [Good, Bad]
    train: data/sst_train.csv
    test: data/sst_test.csv
    text_column: review
    label_column: sentiment
""")
    return path


def test_jsonl_and_csv_tasks(tmp_path, data_dir):
    path = _write_tasks(tmp_path, data_dir)
    datas = loop.prepare_data(TrainConfig(validation_rows=0, data_source="files", tasks_file=str(path), max_train_samples=0,
                                          max_test_samples=0))
    assert [d.task.name for d in datas] == ["news", "movies"]
    news, movies = datas
    for d, kind, task in ((news, "TC", "agnews"), (movies, "SC", "SST-2")):
        for split, rows in (("train", d.train_rows), ("test", d.test_rows)):
            expected = [{"sentence": r["sentence"], "label": r["label"]} for r in _cl(data_dir, kind, task, split)[:20]]
            assert sorted(rows, key=json.dumps) == sorted(expected, key=json.dumps)
    assert news.task.instruction.startswith("What is the topic") and news.task.type == "TC"
    prompt = build_prompt(movies.task, "Text: fine")
    assert prompt == "Task:custom\nDataset:movies\nIs this review Good or Bad?\nOption: Good, Bad \nText: fine\nAnswer:"
    only = loop.prepare_data(TrainConfig(validation_rows=0, data_source="files", tasks_file=str(path), tasks=["movies"]))
    assert [d.task.name for d in only] == ["movies"]


def test_shipped_example_equals_the_cl_benchmark_source(data_dir):
    files = loop.prepare_data(TrainConfig(data_source="files", tasks_file=str(REPO / "configs" / "tasks" /
                                                                                "cl_benchmark_tc.yaml"),
                                          max_train_samples=16, max_test_samples=8))
    cl = loop.prepare_data(TrainConfig(benchmark="tc", max_train_samples=16, max_test_samples=8))
    assert [d.task.name for d in files] == [d.task.name for d in cl] == ["dbpedia", "yahoo", "agnews"]
    for a, b in zip(files, cl):
        assert (a.task.type, a.task.labels, a.task.instruction) == (b.task.type, b.task.labels, b.task.instruction)
        assert a.train_rows == b.train_rows and a.test_rows == b.test_rows


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace("label_column: topic", "label_column: category"),
     r"data/news_train.jsonl has no column 'category' \(label_column\); its columns are \['id', 'text', 'topic'\]"),
    (lambda t: t.replace("3: Science or Technology}", "3: Science}"),
     r"task 'news': label_map values \['Science'\] are not in 'labels'"),
    (lambda t: t.replace("labels: [Good, Bad]", "labels: [Good, Neutral]"),
     r"Task 'movies': bad rows in .*sst_train.csv: row \d+: label 'Bad' is not in labels"),
    (lambda t: t.replace("    text_column: review", "    text_colum: review"),
     r"task 'movies': unknown key\(s\) text_colum"),
    (lambda t: t.replace("data/sst_test.csv", "data/missing.csv"), r"Task 'movies': .*data/missing.csv not found"),
    (lambda t: t.replace("  - name: movies", "  - name: news"), r"the name 'news' is used twice"),
])
def test_bad_tasks_file(tmp_path, data_dir, change, message):
    path = _write_tasks(tmp_path, data_dir)
    path.write_text(change(path.read_text()))
    with pytest.raises(ConfigError, match=message):
        loop.prepare_data(TrainConfig(validation_rows=0, data_source="files", tasks_file=str(path)))


def test_files_source_needs_a_tasks_file_and_known_tasks(tmp_path, data_dir, capsys):
    from deal_train.cli import run_cli

    assert run_cli(lambda cfg: None, ["--data_source", "files"]) == 2
    assert "data_source: files needs tasks_file" in capsys.readouterr().err
    path = _write_tasks(tmp_path, data_dir)
    with pytest.raises(ConfigError, match=r"tasks \['agnews'\] are not in tasks_file .* it has news, movies"):
        loop.prepare_data(TrainConfig(validation_rows=0, data_source="files", tasks_file=str(path), tasks=["agnews"]))


def test_readme_example_tasks_file_parses(tmp_path):
    from deal_train.data.files import read_tasks_file

    readme = (REPO / "README.md").read_text()
    (block,) = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:] if b.startswith("# my_tasks.yaml")]
    (tmp_path / "my_tasks.yaml").write_text(block)
    (spec,) = read_tasks_file(str(tmp_path / "my_tasks.yaml")).values()
    assert spec.task.name == "reviews" and spec.task.labels == ("Good", "Bad") and spec.task.type == "SC"
    assert spec.label_map == {"0": "Bad", "1": "Good"} and spec.text_column == "text"
    assert spec.files["test"] == str(tmp_path / "data" / "reviews_test.csv")
    assert spec.task.instruction.endswith("Choose one from the option.\n")
