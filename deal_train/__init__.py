"""deal_train: continual LoRA fine-tuning with DEAL (NeurIPS 2025) and its baselines on Hugging Face Accelerate."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns on import on CPU-only machines (missing CUDA library, missing ``kernels`` package), and through the
# ``kernels`` package (which transformers installs) it logs about fetching its kernels from the Hub ("Skipping
# publisher trust check ... offline mode"); PEFT imports it whenever it is installed, so every entry point (train,
# compare, sweep, bench, ...) would print them. Errors still show. Done here so it precedes any import of PEFT;
# ``precision.quiet_bitsandbytes`` does the same.
QUIET_LOGGERS = ("bitsandbytes", "kernels")
for _name in QUIET_LOGGERS:
    _logging.getLogger(_name).setLevel(_logging.ERROR)
