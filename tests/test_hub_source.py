"""data_source: hub without network: each task's conversion is run on a small ``datasets.Dataset`` built from
real CL_Benchmark rows put back into that task's Hub schema (column names and label ids as on the Hub), and must
give back the very same sentences and labels; class-balanced sampling, the cache, the run's use of the cache,
and the message when the Hub cannot be reached."""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter

import pytest
from datasets import Dataset

from deal_train.train import loop
from deal_train.config import ConfigError, TrainConfig
from deal_train.data.hub import HUB_TASKS, balanced_sample, convert_rows, hub_spec, materialise
from deal_train.data.tasks import TASK_TYPES

# CL_Benchmark label -> label id of the Hub dataset (from the Hub datasets' ClassLabel names)
HUB_IDS = {
    "agnews": {"World": 0, "Sports": 1, "Business": 2, "Science or Technology": 3},
    "dbpedia": {n: i for i, n in enumerate(["Company", "Educational Institution", "Artist", "Athlete", "Office Holder",
                                            "Mean of Transportation", "Building", "Natural Place", "Village",
                                            "Animal", "Plant", "Album", "Film", "Written Work"])},
    "yahoo": {n: i for i, n in enumerate(["Society & Culture", "Science & Mathematics", "Health",
                                          "Education & Reference", "Computers & Internet", "Sports",
                                          "Business & Finance", "Entertainment & Music", "Family & Relationships",
                                          "Politics & Government"])},
    "yelp": {"very negative": 0, "negative": 1, "neutral": 2, "positive": 3, "very positive": 4},
    "amazon": {"very negative": 1, "negative": 2, "neutral": 3, "positive": 4, "very positive": 5},  # class_index
    "IMDB": {"Bad": 0, "Good": 1}, "SST-2": {"Bad": 0, "Good": 1},
    "MNLI": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "CB": {"entailment": 0, "contradiction": 1, "neutral": 2},
    "RTE": {"entailment": 0, "contradiction": 1},  # GLUE: 1 = not_entailment
    "QQP": {"False": 0, "True": 1}, "BoolQA": {"False": 0, "True": 1}, "MultiRC": {"False": 0, "True": 1},
    "WiC": {"False": 0, "True": 1}, "COPA": {"A": 0, "B": 1},
}


def _split2(text: str, first: str, second: str) -> tuple[str, str]:
    assert text.startswith(first)
    a, b = text[len(first):].split(second, 1)
    return a, b


SENTENCE_PAIRS = {  # task -> ((first prefix, second prefix) of the CL_Benchmark sentence, the two Hub fields)
    "MNLI": (("sentence 1: ", "\nsentence 2: "), ("premise", "hypothesis")),
    "CB": (("sentence 1: ", "\nsentence 2: "), ("premise", "hypothesis")),
    "RTE": (("sentence 1: ", "\nsentence 2: "), ("sentence1", "sentence2")),
    "QQP": (("first sentence: ", "\nsecond sentence: "), ("question1", "question2")),
    "BoolQA": (("question: ", "\npassage: "), ("question", "passage")),
}


def to_hub_schema(task: str, sentence: str) -> dict:
    """Invert the CL_Benchmark sentence of ``task`` into the fields of its Hub dataset."""
    if task in ("agnews", "dbpedia"):
        title, text = _split2(sentence[:-1], "Title: ", "\nText: ")
        return {"title": title, "description" if task == "agnews" else "content": text}
    if task == "amazon":
        title, text = _split2(sentence[:-1], "Title: ", "\nText: ")
        return {"review_title": title, "review_text": text}
    if task == "yahoo":
        if sentence.startswith("Title: "):
            title, rest = _split2(sentence[:-1], "Title: ", "\nQuestion: ")
            content, answer = rest.split("\nAnswer: ", 1)
        else:
            (title, answer), content = _split2(sentence[:-1], "Question: ", "\nAnswer: "), ""
        return {"question_title": title, "question_content": content, "best_answer": answer}
    if task == "yelp":
        return {"text": sentence[len("Text: "):-1]}
    if task == "IMDB":
        return {"text": sentence}
    if task == "SST-2":
        return {"sentence": sentence[len("Text: "):]}
    if task in SENTENCE_PAIRS:
        (first, second), keys = SENTENCE_PAIRS[task]
        return dict(zip(keys, _split2(sentence, first, second)))
    if task == "MultiRC":
        p, rest = _split2(sentence, "paragraph: ", "\nquestion: ")
        q, a = rest.split("\ncandidate answer: ", 1)
        return {"paragraph": p, "question": q, "answer": a}
    if task == "WiC":
        word, s1, s2 = sentence[len("word: "):].split("\n")
        return {"word": word, "sentence1": s1, "sentence2": s2}
    if task == "COPA":
        m = re.fullmatch(r'Which sentence is the (cause|effect) of "(.*)"\? Choose one between A and B\.\nA: (.*)\n'
                         r'B: (.*)', sentence, flags=re.S)
        return {"premise": m[2], "choice1": m[3], "choice2": m[4], "question": m[1]}
    raise KeyError(task)


def _cl_rows(data_dir: str, task: str, split: str = "train", n: int = 8) -> list[dict]:
    rows = json.loads((pathlib.Path(data_dir) / TASK_TYPES[task] / task / f"{split}.json").read_text())
    if task == "WiC":
        rows = [r for r in rows if r["sentence"].count("\n") == 2]
    return [r for r in rows if r["label"] != "-"][:n]


def hub_dataset(task: str, rows: list[dict], hidden_label: bool = False) -> Dataset:
    """Rows in the Hub schema of ``task`` (its label column name and ids); optionally one GLUE-style row with the
    hidden label -1 first."""
    label_col = {"yahoo": "topic", "amazon": "class_index"}.get(task, "label")
    records = [{**to_hub_schema(task, r["sentence"]), label_col: HUB_IDS[task][r["label"]]} for r in rows]
    if hidden_label:
        records.insert(0, {**records[0], label_col: -1})
    return Dataset.from_list(records)


@pytest.mark.parametrize("task", sorted(TASK_TYPES))
def test_hub_rows_convert_to_the_cl_benchmark_format(task, data_dir):
    spec = hub_spec(task)
    labels = json.loads((pathlib.Path(data_dir) / TASK_TYPES[task] / task / "labels.json").read_text())
    assert list(spec.label_set) == labels  # the prompt lists the options in CL_Benchmark's order
    assert set(spec.labels) == set(labels) and sorted(HUB_IDS[task].values()) == list(
        range(min(HUB_IDS[task].values()), min(HUB_IDS[task].values()) + len(labels)))
    rows = _cl_rows(data_dir, task) + _cl_rows(data_dir, task, "test", 4)
    assert convert_rows(spec, hub_dataset(task, rows, hidden_label=True)) == rows


def test_agnews_text_schema_and_missing_columns(data_dir):
    rows = _cl_rows(data_dir, "agnews", n=3)
    joined = [{"text": " ".join(to_hub_schema("agnews", r["sentence"]).values()), "label": HUB_IDS["agnews"][r["label"]]}
              for r in rows]
    out = convert_rows(hub_spec("agnews"), Dataset.from_list(joined))
    assert [o["sentence"] for o in out] == [f"Text: {j['text']}\n" for j in joined]
    assert [o["label"] for o in out] == [r["label"] for r in rows]
    with pytest.raises(ConfigError, match=r"'fancyzhx/dbpedia_14' has columns \['text', 'label'\].*'title' field"):
        convert_rows(hub_spec("dbpedia"), Dataset.from_list(joined))
    spec = hub_spec("amazon", ["agnews=x/y", "amazon=me/amazon_full:en"])
    assert (spec.path, spec.config, spec.dataset_name) == ("me/amazon_full", "en", "me/amazon_full:en")
    assert set(HUB_TASKS) == set(TASK_TYPES)


def test_balanced_sample():
    rows = [{"sentence": str(i), "label": "a"} for i in range(30)] + \
           [{"sentence": str(i), "label": "b"} for i in range(30, 40)] + [{"sentence": "x", "label": "c"}]
    sample = balanced_sample(rows, 13, seed=3)
    assert Counter(r["label"] for r in sample) == {"a": 6, "b": 6, "c": 1}
    assert sample == balanced_sample(rows, 13, seed=3) and sample != balanced_sample(rows, 13, seed=4)
    assert Counter(r["label"] for r in balanced_sample(rows, 21, seed=0)) == {"a": 10, "b": 10, "c": 1}
    everything = balanced_sample(rows, 0, seed=1)
    assert sorted(r["sentence"] for r in everything) == sorted(r["sentence"] for r in rows)


def balanced_counts(available: Counter, n: int) -> Counter:
    """Per-class counts of a balanced sample of n: equal shares, classes with fewer rows give up the rest."""
    counts, left = Counter(), n
    while left:
        open_classes = [c for c in sorted(available) if counts[c] < available[c]]
        for c in open_classes[:left]:
            counts[c] += 1
            left -= 1
    return counts


def test_materialise_caches_and_the_run_reads_the_cache(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DEAL_TRAIN_CACHE", str(tmp_path))
    calls = []

    def load(spec, split):
        calls.append((spec.task, split))
        return hub_dataset(spec.task, _cl_rows(data_dir, spec.task, "train" if split == "train" else "test", 40))

    for name in ("CB", "SST-2"):
        task = materialise(hub_spec(name), str(tmp_path / "hub"), 12, 6, seed=42, load=load)
        train = json.loads((pathlib.Path(task.directory) / "train.json").read_text())
        counts = Counter(r["label"] for r in train)
        available = Counter(r["label"] for r in _cl_rows(data_dir, name, "train", 40))
        assert len(train) == 12 and counts == balanced_counts(available, 12)
    assert calls == [("CB", "train"), ("CB", "validation"), ("SST-2", "train"), ("SST-2", "validation")]
    materialise(hub_spec("CB"), str(tmp_path / "hub"), 12, 6, seed=42, load=load)
    assert len(calls) == 4  # read from the cache, not loaded again
    datas = loop.prepare_data(TrainConfig(validation_rows=0, data_source="hub", tasks=["CB", "SST-2"], max_train_samples=12,
                                          max_test_samples=6, seed=42))
    assert [len(d.train_rows) for d in datas] == [12, 12] and [len(d.test_rows) for d in datas] == [6, 6]
    assert datas[0].task.labels == ("entailment", "contradiction", "neutral") and datas[0].task.type == "NLI"
    cl = {r["sentence"]: r["label"] for r in _cl_rows(data_dir, "CB", "train", 40)}
    assert all(cl[r["sentence"]] == r["label"] for r in datas[0].train_rows)


def test_unreachable_hub_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("DEAL_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        loop.prepare_data(TrainConfig(validation_rows=0, data_source="hub", tasks=["agnews"]))
    msg = str(err.value)
    assert "'fancyzhx/ag_news'" in msg and "unreachable" in msg and "data_dir" in msg
