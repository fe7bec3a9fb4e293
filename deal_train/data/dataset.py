"""Reading task rows and tokenising prompts and answers (batching: ``batching``).

Decoder-only training rows are ``prompt + answer + EOS``; the loss sees only the answer and EOS
positions (labels of the prompt positions are -100). Masking is by position, never by token id:
SmolLM2's pad token *is* its EOS token, so masking pads by id would also hide the real EOS.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from datasets import Dataset

from ..config import ConfigError
from .batching import IGNORE_INDEX
from .prompts import apply_chat, prompt_parts
from .tasks import Task

NO_GOLD_LABEL = "-"
"""GLUE/SNLI's marker for a row without a gold label (annotators disagreed); 125 of the 500 MNLI test
rows of CL_Benchmark carry it. Such rows cannot be scored, so they are dropped (and counted)."""


def read_rows(task: Task, split: str, dropped: dict | None = None) -> list[dict]:
    """All rows of ``<task dir>/<split>.json`` as ``{"sentence": str, "label": str}`` dicts, validated
    (``check_rows``).

    Raises:
        ConfigError: the file is missing or is not a JSON list, or ``check_rows`` refuses its rows (a row lacks a
            non-empty sentence or label or has a label outside the task's label set; the message names the file and
            the first five offending rows with their 0-based index), or no usable row is left.
    """
    path = task.split_path(split)
    if not os.path.isfile(path):
        raise ConfigError(f"Task '{task.name}': {path} not found.")
    try:
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Task '{task.name}': {path} is not valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise ConfigError(f"Task '{task.name}': {path} must be a JSON list of {{\"label\", \"sentence\"}} rows.")
    return check_rows(task, path, split, rows, dropped, "labels.json")


def check_rows(task: Task, path: str, split: str, rows: list, dropped: dict | None = None,
               label_source: str = "the label set") -> list[dict]:
    """Validate the rows of ``split`` read from ``path`` and keep ``{"sentence", "label"}`` of each.

    Rows labelled ``"-"`` (no gold label) are dropped; their count goes to ``dropped[split]`` if given.

    Raises:
        ConfigError: a row lacks a non-empty sentence or has a label outside ``task.labels`` (the message names
            ``path``, the first offending rows and ``label_source``), or no usable row is left.
    """
    labels = set(task.labels)
    skip = set()
    if NO_GOLD_LABEL not in labels:
        skip = {i for i, r in enumerate(rows) if isinstance(r, dict) and r.get("label") == NO_GOLD_LABEL}
    if dropped is not None:
        dropped[split] = len(skip)
    bad = []
    for i, row in enumerate(rows):  # i is the row's index in the file, as reported
        if i in skip:
            continue
        if not isinstance(row, dict):
            bad.append(f"row {i}: not an object")
        elif not isinstance(row.get("sentence"), str) or not row["sentence"].strip():
            bad.append(f"row {i}: missing or empty 'sentence'")
        elif not isinstance(row.get("label"), str) or not row["label"].strip():
            bad.append(f"row {i}: missing or empty 'label'")
        elif row["label"] not in labels:
            bad.append(f"row {i}: label {row['label']!r} is not in {label_source}")
        if len(bad) >= 5:
            break
    if bad:
        raise ConfigError(f"Task '{task.name}': bad rows in {path}: " + "; ".join(bad) +
                          f". Fix the file or the task's {label_source}.")
    kept = [{"sentence": r["sentence"], "label": r["label"]} for i, r in enumerate(rows) if i not in skip]
    if not kept:
        raise ConfigError(f"Task '{task.name}': {path} has no usable rows.")
    return kept


def sample_rows(rows: list[dict], max_samples: int, seed: int) -> list[dict]:
    """A seeded random subset of at most ``max_samples`` rows (0 = all), in a seeded random order."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:max_samples] if max_samples > 0 else rows


def split_validation(rows: list[dict], validation_rows: int, task_name: str) -> tuple[list[dict], list[dict]]:
    """Carve a validation split from a task's training rows: (validation, remaining training rows).

    The choice depends only on the task name and the file's rows, not on the run's seed, so every run and
    every sweep point scores the same validation rows; the remaining rows keep their file order (the run's
    seeded ``sample_rows`` picks from them).

    Raises:
        ConfigError: ``validation_rows`` would leave fewer than one training row.
    """
    if validation_rows <= 0:
        return [], list(rows)
    if validation_rows >= len(rows):
        raise ConfigError(f"Task '{task_name}': validation_rows = {validation_rows} leaves no training rows "
                          f"(the training file has {len(rows)}). Lower validation_rows.")
    order = list(range(len(rows)))
    random.Random(f"validation:{task_name}").shuffle(order)
    chosen = set(order[:validation_rows])
    return [rows[i] for i in sorted(chosen)], [r for i, r in enumerate(rows) if i not in chosen]


@dataclass
class Encoder:
    """Turns (task, row) into token ids for a decoder-only model.

    Attributes:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id`` and ``pad_token_id``.
        max_source_length: prompt length limit in tokens; the sentence is cut, never head or tail.
        max_target_length: answer length limit in tokens (label + EOS).
        chat_template: wrap the prompt in the tokenizer's chat template.
    """

    tokenizer: object
    max_source_length: int
    max_target_length: int
    chat_template: bool

    def _prompt_text(self, head: str, sentence: str, tail: str) -> str:
        text = head + sentence + tail
        return apply_chat(self.tokenizer, text) if self.chat_template else text

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]

    def encode_prompt(self, task: Task, sentence: str) -> tuple[list[int], bool]:
        """Prompt token ids (length <= max_source_length) and whether the sentence was truncated.

        Raises:
            ConfigError: the prompt without any sentence already exceeds ``max_source_length``.
        """
        head, sentence, tail = prompt_parts(task, sentence)
        ids = self._ids(self._prompt_text(head, sentence, tail))
        if len(ids) <= self.max_source_length:
            return ids, False
        sent_ids = self.tokenizer(sentence, add_special_tokens=False)["input_ids"]
        keep = len(sent_ids) - (len(ids) - self.max_source_length)
        while True:
            if keep <= 0:
                empty = self._ids(self._prompt_text(head, "", tail))
                if len(empty) > self.max_source_length:
                    raise ConfigError(
                        f"Task '{task.name}': the prompt without its sentence is {len(empty)} tokens, more than "
                        f"max_source_length={self.max_source_length}. Raise max_source_length.")
                return empty, True
            cut = self.tokenizer.decode(sent_ids[:keep])
            ids = self._ids(self._prompt_text(head, cut, tail))
            if len(ids) <= self.max_source_length:
                return ids, True
            keep -= max(1, len(ids) - self.max_source_length)

    def encode_answer(self, label: str) -> list[int]:
        """Answer token ids: the label (after a space without chat template) followed by EOS."""
        text = label if self.chat_template else " " + label
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[: self.max_target_length - 1] + [self.tokenizer.eos_token_id]
        return ids

    def train_features(self, task: Task, rows: list[dict]) -> tuple[Dataset, int]:
        """Tokenised training rows: ``input_ids``, ``labels`` (-100 on the prompt), and the count truncated."""
        feats, truncated = [], 0
        for row in rows:
            prompt, cut = self.encode_prompt(task, row["sentence"])
            truncated += cut
            answer = self.encode_answer(row["label"])
            feats.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
        return Dataset.from_list(feats), truncated

    def eval_features(self, task: Task, rows: list[dict]) -> tuple[Dataset, int]:
        """Tokenised evaluation prompts with their reference labels, and the count truncated."""
        feats, truncated = [], 0
        for i, row in enumerate(rows):
            prompt, cut = self.encode_prompt(task, row["sentence"])
            truncated += cut
            feats.append({"input_ids": prompt, "label": row["label"], "index": i})
        return Dataset.from_list(feats), truncated
