"""SeqLoRA: one LoRA adapter trained on task after task, nothing else (paper Sec. 4 baseline)."""

from __future__ import annotations

from .base import ContinualMethod


class SeqLoRA(ContinualMethod):
    """Sequential LoRA fine-tuning: the base class's behaviour, unchanged."""

    name = "seq_lora"
