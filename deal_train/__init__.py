"""deal_train: continual LoRA fine-tuning with DEAL (NeurIPS 2025) and its baselines on Hugging Face Accelerate."""

__version__ = "0.1.0"
