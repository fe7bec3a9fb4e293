"""SeqLoRA: one LoRA adapter trained on task after task, nothing else (paper Sec. 4 baseline)."""

from __future__ import annotations

from .base import ContinualMethod


class SeqLoRA(ContinualMethod):
    """Sequential LoRA fine-tuning: the base class's behaviour, unchanged."""

    name = "seq_lora"
    label = "SeqLoRA"
    results_role = "plain"
    paper_aa = {"T5 TC": 52.4, "T5 standard": 44.6, "T5 long": 42.1,
                "LLaMA TC": 54.1, "LLaMA standard": 47.6, "LLaMA long": 45.2}
