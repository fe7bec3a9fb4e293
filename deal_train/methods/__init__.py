"""Continual-learning methods, one module each, behind ``ContinualMethod``; ``get_method`` looks one up by name."""

from __future__ import annotations

from ..config import ConfigError, TrainConfig
from .base import ContinualMethod
from .deal import DEAL
from .ewc import EWC
from .lwf import LwF
from .o_lora import OLoRA
from .per_task import PerTaskFT
from .replay import Replay
from .seq_lora import SeqLoRA

METHODS: dict[str, type[ContinualMethod]] = {cls.name: cls for cls in (SeqLoRA, DEAL, OLoRA, PerTaskFT, Replay,
                                                                        EWC, LwF)}


def get_method(cfg: TrainConfig) -> ContinualMethod:
    """Instantiate the method named by ``cfg.method``.

    Raises:
        ConfigError: unknown method name.
    """
    if cfg.method not in METHODS:
        raise ConfigError(f"Unknown method '{cfg.method}'. Choose one of {', '.join(METHODS)}.")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "ContinualMethod", "DEAL", "EWC", "LwF", "OLoRA", "PerTaskFT", "Replay", "SeqLoRA",
           "get_method"]
