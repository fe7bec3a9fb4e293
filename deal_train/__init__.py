"""deal_train: continual LoRA fine-tuning with DEAL (NeurIPS 2025) and its baselines on Hugging Face Accelerate."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns on import on CPU-only machines (missing CUDA library, missing ``kernels`` package); PEFT imports
# it whenever it is installed, so every entry point (train, compare, sweep, bench, ...) would print it. Errors still
# show. Same as ``precision.quiet_bitsandbytes``, done here so it precedes any import of PEFT.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
