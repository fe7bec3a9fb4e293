"""SeqLoRA: one LoRA adapter trained on task after task, nothing else (paper Sec. 4 baseline)."""

from __future__ import annotations

from .base import ContinualMethod, paper_row


class SeqLoRA(ContinualMethod):
    """Sequential LoRA fine-tuning: the base class's behaviour, unchanged."""

    name = "seq_lora"
    label = "SeqLoRA"
    results_role = "plain"
    paper_aa = paper_row(52.4, 44.6, 42.1, 54.1, 47.6, 45.2)
