"""Prompt text as the reference code builds it (docs/design.md section 2).

``Task:<type>\\nDataset:<task>\\n`` + instruction + ``Option: <labels joined by ", "> \\n`` + sentence +
``\\nAnswer:``; COPA has no instruction and no options. The target is the label string.
"""

from __future__ import annotations

from .labels import format_options
from .tasks import Task


def prompt_parts(task: Task, sentence: str) -> tuple[str, str, str]:
    """Split the prompt into (head, sentence, tail) so truncation can cut the sentence only."""
    head = f"Task:{task.type}\nDataset:{task.name}\n"
    if task.has_options:
        head += task.instruction + "Option: " + format_options(task.labels) + " \n"
    return head, sentence, "\nAnswer:"


def build_prompt(task: Task, sentence: str) -> str:
    """The full prompt string for one row (no chat template)."""
    return "".join(prompt_parts(task, sentence))


def apply_chat(tokenizer, prompt: str) -> str:
    """Wrap ``prompt`` as one user turn of the tokenizer's chat template with the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
