"""The 15 benchmark tasks from their public Hugging Face Hub datasets (``data_source: hub``).

Each task's Hub rows are converted to the CL_Benchmark row format — the same label strings and the same
``sentence`` text, e.g. ``"sentence 1: <premise>\\nsentence 2: <hypothesis>"`` for MNLI — then a class-balanced
subset is drawn with the run's seed and written, once, as ``train.json`` / ``test.json`` / ``labels.json`` under
``$DEAL_TRAIN_CACHE/hub/``; later runs read the cached files. The test split is the Hub ``test`` split where it
has labels and the ``validation`` split for GLUE / SuperGLUE (their test labels are hidden), as CL_Benchmark did.

Columns are looked up by name with a few alternatives (``HubSpec.fields``), so mirrors of the same data with other
column names convert too; ``hub_datasets`` (``task=owner/name[:config]``) points a task at such a mirror.

One difference from CL_Benchmark: ``fancyzhx/ag_news`` stores title and description joined in one ``text``
column, so its sentence is ``"Text: <text>\\n"``; a mirror with ``title`` and ``description`` columns gives
CL_Benchmark's ``"Title: <title>\\nText: <description>\\n"``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from ..config import ConfigError
from ..outputs import atomic_write_dir, atomic_write_json
from .tasks import INSTRUCTIONS, TASK_TYPES, Task

SENTIMENT_5 = ("very negative", "negative", "neutral", "positive", "very positive")
FALSE_TRUE = ("False", "True")
ONE_BASED_LABEL_COLUMNS = frozenset({"class_index", "stars"})
"""Label columns that count classes from 1 (Zhang et al.'s CSV ``class_index``, Amazon ``stars``)."""


@dataclass(frozen=True)
class HubSpec:
    """Where a task lives on the Hub and how its rows become CL_Benchmark rows.

    Attributes:
        task: the CL_Benchmark task name.
        path, config: the ``datasets.load_dataset`` arguments.
        train_split, test_split: the splits used as train and test.
        labels: label id -> CL_Benchmark label string (ids outside the range, e.g. -1 for hidden labels, are
            skipped).
        fields: logical field -> accepted column names, first present wins; the label field is ``label``.
        sentence: values of the logical fields (str) -> the CL_Benchmark sentence.
        optional: fields that may be missing (the sentence function copes).
        options: the label strings in CL_Benchmark's ``labels.json`` order, which the prompt lists
            (None: the order of ``labels``).
    """

    task: str
    path: str
    config: str | None
    train_split: str
    test_split: str
    labels: tuple[str, ...]
    fields: dict[str, tuple[str, ...]]
    sentence: Callable[[dict], str]
    optional: tuple[str, ...] = field(default=())
    options: tuple[str, ...] | None = None

    @property
    def label_set(self) -> tuple[str, ...]:
        """The labels in the order the prompt lists them (CL_Benchmark's ``labels.json``)."""
        return self.options or self.labels

    @property
    def dataset_name(self) -> str:
        """``path`` or ``path:config``, as messages and the cache directory name it."""
        return self.path + (f":{self.config}" if self.config else "")


def _agnews(v: dict) -> str:
    if v.get("title") is not None and v.get("description") is not None:
        return f"Title: {v['title']}\nText: {v['description']}\n"
    return f"Text: {v['text']}\n"


def _yahoo(v: dict) -> str:
    if v["content"]:  # CL_Benchmark names the title "Title" only when the question has a body
        return f"Title: {v['title']}\nQuestion: {v['content']}\nAnswer: {v['answer']}\n"
    return f"Question: {v['title']}\nAnswer: {v['answer']}\n"


def _pair(first: str, second: str) -> Callable[[dict], str]:
    return lambda v: f"{first}: {v['a']}\n{second}: {v['b']}"


_LABEL = ("label",)
_NLI = {"label": _LABEL, "a": ("premise",), "b": ("hypothesis",)}

HUB_TASKS: dict[str, HubSpec] = {s.task: s for s in [
    HubSpec("agnews", "fancyzhx/ag_news", None, "train", "test",
            ("World", "Sports", "Business", "Science or Technology"),
            {"label": _LABEL, "text": ("text",), "title": ("title",), "description": ("description",)}, _agnews,
            optional=("text", "title", "description")),
    HubSpec("dbpedia", "fancyzhx/dbpedia_14", None, "train", "test",
            ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
             "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"),
            {"label": _LABEL, "title": ("title",), "content": ("content",)},
            lambda v: f"Title: {v['title']}\nText: {v['content']}\n"),
    HubSpec("yahoo", "community-datasets/yahoo_answers_topics", None, "train", "test",
            ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
             "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
             "Family & Relationships", "Politics & Government"),
            {"label": ("topic", "label", "class_index"), "title": ("question_title", "title"),
             "content": ("question_content", "content"), "answer": ("best_answer", "answer")}, _yahoo),
    HubSpec("yelp", "Yelp/yelp_review_full", None, "train", "test", SENTIMENT_5,
            {"label": _LABEL, "text": ("text",)}, lambda v: f"Text: {v['text']}\n"),
    # Zhang et al.'s amazon_review_full (title, text, class 1-5), the source of CL_Benchmark's amazon task
    HubSpec("amazon", "yassiracharki/Amazon_Reviews_for_Sentiment_Analysis_fine_grained_5_classes", None, "train",
            "test", SENTIMENT_5,
            {"label": ("class_index", "label", "stars"), "title": ("review_title", "title"),
             "text": ("review_text", "content", "text", "review_body")},
            lambda v: f"Title: {v['title']}\nText: {v['text']}\n"),
    HubSpec("IMDB", "stanfordnlp/imdb", None, "train", "test", ("Bad", "Good"),
            {"label": _LABEL, "text": ("text",)}, lambda v: v["text"], options=("Good", "Bad")),
    HubSpec("SST-2", "nyu-mll/glue", "sst2", "train", "validation", ("Bad", "Good"),
            {"label": _LABEL, "text": ("sentence",)}, lambda v: f"Text: {v['text']}", options=("Good", "Bad")),
    HubSpec("MNLI", "nyu-mll/glue", "mnli", "train", "validation_matched", ("entailment", "neutral", "contradiction"),
            _NLI, _pair("sentence 1", "sentence 2"), options=("neutral", "entailment", "contradiction")),
    HubSpec("CB", "aps/super_glue", "cb", "train", "validation", ("entailment", "contradiction", "neutral"),
            _NLI, _pair("sentence 1", "sentence 2")),
    # GLUE's not_entailment is CL_Benchmark's "contradiction"
    HubSpec("RTE", "nyu-mll/glue", "rte", "train", "validation", ("entailment", "contradiction"),
            {"label": _LABEL, "a": ("sentence1",), "b": ("sentence2",)}, _pair("sentence 1", "sentence 2"),
            options=("contradiction", "entailment")),
    HubSpec("QQP", "nyu-mll/glue", "qqp", "train", "validation", FALSE_TRUE,
            {"label": _LABEL, "a": ("question1",), "b": ("question2",)}, _pair("first sentence", "second sentence")),
    HubSpec("BoolQA", "aps/super_glue", "boolq", "train", "validation", FALSE_TRUE,
            {"label": _LABEL, "a": ("question",), "b": ("passage",)}, _pair("question", "passage"),
            options=("True", "False")),
    HubSpec("MultiRC", "aps/super_glue", "multirc", "train", "validation", FALSE_TRUE,
            {"label": _LABEL, "paragraph": ("paragraph",), "question": ("question",), "answer": ("answer",)},
            lambda v: f"paragraph: {v['paragraph']}\nquestion: {v['question']}\ncandidate answer: {v['answer']}"),
    HubSpec("WiC", "aps/super_glue", "wic", "train", "validation", FALSE_TRUE,
            {"label": _LABEL, "word": ("word",), "a": ("sentence1",), "b": ("sentence2",)},
            lambda v: f"word: {v['word']}\n{v['a']}\n{v['b']}", options=("True", "False")),
    HubSpec("COPA", "aps/super_glue", "copa", "train", "validation", ("A", "B"),
            {"label": _LABEL, "premise": ("premise",), "question": ("question",), "a": ("choice1",),
             "b": ("choice2",)},
            lambda v: f'Which sentence is the {v["question"]} of "{v["premise"]}"? Choose one between A and B.\n'
                      f'A: {v["a"]}\nB: {v["b"]}'),
]}
"""Task name -> its Hub dataset and conversion, for every task of ``tasks.TASK_TYPES``."""


def hub_spec(task: str, overrides: list[str] | None = None) -> HubSpec:
    """The ``HubSpec`` of ``task``, with its dataset replaced when ``overrides`` (``task=owner/name[:config]``
    entries, the ``hub_datasets`` key) names it.

    Raises:
        ConfigError: the task has no Hub source.
    """
    if task not in HUB_TASKS:
        raise ConfigError(f"Task '{task}' has no Hub dataset. Hub tasks: {', '.join(HUB_TASKS)}.")
    spec = HUB_TASKS[task]
    for entry in overrides or []:
        name, _, target = entry.partition("=")
        if name.strip() == task:
            path, _, config = target.strip().partition(":")
            spec = dataclasses.replace(spec, path=path.strip(), config=config.strip() or None)
    return spec


def _resolve_columns(spec: HubSpec, columns: list[str]) -> dict[str, str]:
    """Logical field -> the dataset's column for it.

    Raises:
        ConfigError: a required field matches no column (names the dataset, the field and its columns).
    """
    found = {}
    for name, candidates in spec.fields.items():
        col = next((c for c in candidates if c in columns), None)
        if col is None and name not in spec.optional:
            raise ConfigError(
                f"Task '{spec.task}': Hub dataset '{spec.dataset_name}' has columns {columns}, none of "
                f"{list(candidates)} for the {name!r} field. Point hub_datasets at a dataset with these columns, or "
                f"use data_source: files.")
        if col is not None:
            found[name] = col
    return found


def convert_rows(spec: HubSpec, dataset) -> list[dict]:
    """A Hub split (a ``datasets.Dataset`` or anything with ``column_names`` that iterates over dict rows) as
    CL_Benchmark rows ``{"sentence": str, "label": str}``, in the dataset's order.

    Label ids outside ``spec.labels`` (GLUE's -1 for hidden labels) are skipped; 1-based label columns
    (``ONE_BASED_LABEL_COLUMNS``) are shifted to 0-based.

    Raises:
        ConfigError: a required column is missing (see ``_resolve_columns``).
    """
    cols = _resolve_columns(spec, list(dataset.column_names))
    if spec.task == "agnews" and "text" not in cols and not {"title", "description"} <= set(cols):
        raise ConfigError(f"Task 'agnews': Hub dataset '{spec.dataset_name}' has columns {dataset.column_names}; "
                          f"it needs 'text', or 'title' and 'description'.")
    offset = 1 if cols["label"] in ONE_BASED_LABEL_COLUMNS else 0
    out = []
    for row in dataset:
        label = int(row[cols["label"]]) - offset
        if not 0 <= label < len(spec.labels):
            continue
        values = {name: row[col] for name, col in cols.items() if name != "label"}
        out.append({"sentence": spec.sentence(values), "label": spec.labels[label]})
    return out


def balanced_indices(labels: list, n: int, seed: int) -> list[int]:
    """Indices of at most ``n`` items with the classes as equal as the data allows: round-robin over the labels
    (sorted), each label's items in a ``random.Random(seed)`` order; the result in a seeded random order. All
    indices when ``n`` is 0 or at least ``len(labels)``."""
    rng = random.Random(seed)
    if n <= 0 or n >= len(labels):
        out = list(range(len(labels)))
        rng.shuffle(out)
        return out
    groups: dict = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    queues = []
    for label in sorted(groups):
        members = groups[label]
        rng.shuffle(members)
        queues.append(members)
    out: list[int] = []
    depth = 0
    while len(out) < n:
        out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
        depth += 1
    rng.shuffle(out)
    return out


def balanced_sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``balanced_indices`` applied to rows with a ``label`` key."""
    return [rows[i] for i in balanced_indices([r["label"] for r in rows], n, seed)]


def balanced_hub_rows(spec: HubSpec, dataset, n: int, seed: int) -> list[dict]:
    """A class-balanced subset of ``n`` rows of a Hub split (0: all), converted with ``convert_rows``. Only the
    label column is read to choose the rows (fast on million-row splits); rows with an out-of-range label id
    are not eligible.

    Raises:
        ConfigError: a required column is missing.
    """
    cols = _resolve_columns(spec, list(dataset.column_names))
    offset = 1 if cols["label"] in ONE_BASED_LABEL_COLUMNS else 0
    ids = [int(x) - offset for x in dataset[cols["label"]]]
    valid = [i for i, label in enumerate(ids) if 0 <= label < len(spec.labels)]
    chosen = balanced_indices([ids[i] for i in valid], n, seed)
    return convert_rows(spec, dataset.select([valid[i] for i in chosen]))


def load_hub_split(spec: HubSpec, split: str):
    """``datasets.load_dataset(spec.path, spec.config, split=split)``.

    Raises:
        ConfigError: the dataset cannot be loaded (no network, Hub unreachable, offline mode, unknown id); the
            message names the dataset and how to use local data instead.
    """
    from datasets import load_dataset

    try:
        return load_dataset(spec.path, spec.config, split=split)
    except Exception as err:  # datasets raises many types for one cause (connection, offline mode, not found)
        raise ConfigError(
            f"Task '{spec.task}': cannot load Hub dataset '{spec.dataset_name}' (split {split}): the Hugging Face "
            f"Hub is unreachable from here or the dataset is not in the local cache ({type(err).__name__}: "
            f"{str(err)[:300]}). Without Hub access use data_source: cl_benchmark with data_dir (or "
            f"$DEAL_TRAIN_DATA_DIR) pointing at a CL_Benchmark folder, or data_source: files.") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def cached_task_dir(root: str, spec: HubSpec, train_rows: int, test_rows: int, seed: int) -> str:
    """The cache directory of one converted task: ``<root>/<task>/<dataset>/seed<seed>-train<n>-test<m>``."""
    return os.path.join(root, spec.task, _slug(spec.dataset_name), f"seed{seed}-train{train_rows}-test{test_rows}")


def materialise(spec: HubSpec, root: str, train_rows: int, test_rows: int, seed: int,
                load: Callable[[HubSpec, str], object] = load_hub_split) -> Task:
    """The task converted from the Hub, as a ``Task`` whose directory holds ``train.json``, ``test.json`` and
    ``labels.json`` in the CL_Benchmark format; written (atomically) on first use, read from the cache after.

    Args:
        train_rows, test_rows: class-balanced subset sizes (0: every row).
        seed: the training subset uses ``seed``, the test subset ``seed + 1``.
        load: ``(spec, split) -> dataset``; ``load_hub_split`` by default.
    Raises:
        ConfigError: the Hub cannot be reached, a column is missing, or a split has no usable row.
    """
    ttype = TASK_TYPES[spec.task]
    directory = cached_task_dir(root, spec, train_rows, test_rows, seed)
    if not all(os.path.isfile(os.path.join(directory, f)) for f in ("train.json", "test.json", "labels.json")):
        splits = {}
        for name, split, n, s in (("train", spec.train_split, train_rows, seed),
                                  ("test", spec.test_split, test_rows, seed + 1)):
            rows = balanced_hub_rows(spec, load(spec, split), n, s)
            if not rows:
                raise ConfigError(f"Task '{spec.task}': Hub dataset '{spec.dataset_name}' split {split} has no "
                                  f"labelled rows.")
            splits[name] = rows

        def write(tmp: str) -> None:
            for name, rows in splits.items():
                atomic_write_json(os.path.join(tmp, f"{name}.json"), rows)
            atomic_write_json(os.path.join(tmp, "labels.json"), list(spec.label_set))

        atomic_write_dir(directory, write)
    return Task(name=spec.task, type=ttype, labels=spec.label_set, instruction=INSTRUCTIONS[ttype],
                directory=directory)
