"""Tasks, prompts, tokenisation and batching for the CL_Benchmark layout, and reading a run's data (``prepare``)."""

from .batching import IGNORE_INDEX, collate_eval, collate_seq2seq_train, collate_train
from .dataset import Encoder, read_rows, sample_rows, split_validation
from .seq2seq import Seq2SeqEncoder, encoder_for
from .prompts import apply_chat, build_prompt, prompt_parts
from .tasks import BENCHMARKS, INSTRUCTIONS, TASK_TYPES, Task, load_task, task_sequence

__all__ = ["IGNORE_INDEX", "Encoder", "collate_eval", "collate_train", "read_rows", "sample_rows", "split_validation",
           "Seq2SeqEncoder", "collate_seq2seq_train", "encoder_for", "apply_chat", "build_prompt", "prompt_parts",
           "BENCHMARKS", "INSTRUCTIONS", "TASK_TYPES", "Task", "load_task", "task_sequence"]
