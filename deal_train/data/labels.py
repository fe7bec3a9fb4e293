"""Label strings: how answers are compared (exact match's normalisation) and which label sets can be scored.

Exact match compares normalised strings (``normalize_answer``), so two labels that normalise alike cannot be told
apart by any prediction; ``check_label_set`` refuses such a set before anything trains. The prompt lists a task's
labels as its options (``format_options``).
"""

from __future__ import annotations

import json
import re
import string

from ..config import ConfigError

_SPECIAL_TOKEN = re.compile(r"<\|?[a-zA-Z_/]+\|?>")
_PUNCTUATION = set(string.punctuation)
OPTION_SEPARATOR = ", "
"""What joins the options in the prompt (the reference code's ``", "``)."""


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: drop special tokens such as ``</s>`` / ``<pad>`` / ``<|im_end|>``,
    lower-case, strip punctuation, collapse whitespace. Articles are kept (COPA's labels are "A" and "B")."""
    text = _SPECIAL_TOKEN.sub(" ", text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(text.split())


def check_label_set(labels, where: str) -> None:
    """Refuse a label set that exact match cannot score: labels equal after ``normalize_answer`` (``positive``,
    ``positive `` and ``Positive.``), or a label that normalises to the empty string.

    Args:
        labels: the label strings, in the prompt's order.
        where: the task and file, for the message ("Task 'x': data/x/labels.json").
    Raises:
        ConfigError: naming the labels that collide and what to do.
    """
    seen: dict[str, str] = {}
    for label in labels:
        key = normalize_answer(label)
        if not key:
            raise ConfigError(f"{where}: label {label!r} is empty after exact match's normalisation (lower-case, no "
                              f"punctuation or extra spaces), so no prediction can match it. Rename it.")
        if key in seen:
            raise ConfigError(f"{where}: labels {seen[key]!r} and {label!r} are the same answer to exact match "
                              f"(which ignores case, punctuation and extra spaces), so a prediction could never be "
                              f"scored right for one of them. Merge them or rename one.")
        seen[key] = label


def format_options(labels) -> str:
    """The option list of the prompt: the labels joined by ``", "``, as the reference code writes it; when a label
    itself holds a comma (``yes, definitely``), every label is written as a JSON string (``"yes, definitely",
    "no"``) so the list stays unambiguous."""
    if any("," in label for label in labels):
        return OPTION_SEPARATOR.join(json.dumps(label, ensure_ascii=False) for label in labels)
    return OPTION_SEPARATOR.join(labels)
