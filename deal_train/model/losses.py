"""The answer-token forward pass and losses shared by the loop and the methods.

Two batch layouts from ``collate_train``, told apart by ``decoder_input_ids``:

* decoder-only: left-padded ``prompt + answer`` rows, each answer ending at the last position;
* encoder-decoder (seq2seq): the prompt as encoder input and ``decoder_input_ids`` = start + answer, with
  ``labels`` in the same decoder sequence layout (``data/seq2seq.py``).

In both, logit position i predicts label i + 1, so ``answer_logits`` and ``token_cross_entropy_sum`` serve both.
"""

from __future__ import annotations

import torch

from . import prefix as shared_prefix


def answer_window(labels: torch.Tensor) -> int:
    """How many final positions hold every logit the loss needs: longest answer (labelled tokens) + 1.

    Valid for left-padded batches (``collate_train``), where each answer ends at the last position.
    """
    return int((labels != -100).sum(dim=1).max()) + 1


def answer_forward(model, batch: dict):
    """The model's outputs on a training batch, with logits for the positions the loss needs.

    Args:
        batch: decoder-only: ``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` (batch × seq);
            seq2seq: ``input_ids``, ``attention_mask`` (batch × source), ``decoder_input_ids``,
            ``decoder_attention_mask``, ``labels`` (batch × target); on the model's device.
        A decoder-only batch with ``shared_prefix`` = P > 0 (``collate_train(..., shared_prefix=True)``) runs
            its P shared tokens once (``shared_prefix_forward``).
    Returns:
        The model output; ``.logits`` is (batch, answer_window, vocab) for decoder-only batches (the last
        positions only) and (batch, target, vocab) for seq2seq batches (every decoder position).
    """
    if "decoder_input_ids" in batch:
        return seq2seq_forward(model, batch)
    if batch.get("shared_prefix", 0) > 0:
        return shared_prefix_forward(model, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], use_cache=False, logits_to_keep=answer_window(batch["labels"]))


def shared_prefix_forward(model, batch: dict):
    """``answer_forward`` of a decoder-only batch whose rows share their first ``batch["shared_prefix"]`` = P tokens
    (model/prefix.py): the prefix once at batch 1 into a key/value cache (gradients kept), the suffixes against it.
    The same logits as the full pass up to float rounding: (batch, answer_window, vocab).

    The prefix pass runs on the unwrapped model (``.module`` of DDP or a DeepSpeed engine), so a distributed
    wrapper sees one forward per backward; Accelerate's autocast sits on the unwrapped model's forward.
    """
    p = int(batch["shared_prefix"])
    prefix_ids, suffix_ids, _suffix_mask, full_mask = shared_prefix.split_batch(batch["input_ids"],
                                                                               batch["attention_mask"], p)
    cache = shared_prefix.prefix_cache(getattr(model, "module", model), prefix_ids)
    return shared_prefix.suffix_forward(model, cache, suffix_ids, full_mask, batch["position_ids"][:, p:],
                                        answer_window(batch["labels"]))


def seq2seq_forward(model, batch: dict):
    """An encoder-decoder model's outputs with teacher forcing on ``decoder_input_ids`` (no ``labels`` passed, so
    the model computes no loss of its own); ``.logits`` is (batch, target, vocab)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"],
                 use_cache=False)


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a labelled token, and those tokens (next-token shift applied).

    Args:
        logits: (batch, k, vocab), the logits of the last k positions (k <= seq; k = seq for all).
        labels: (batch, seq), -100 where ignored.
    Returns:
        (n, vocab) logits in the input dtype and (n,) target ids, n = number of labelled tokens, in row-major
        order of (row, position).
    """
    k = logits.shape[1]
    seq = labels.shape[1]
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, seq - k + 1:]
    mask = shift_labels != -100
    return shift_logits[mask], shift_labels[mask]


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions.

    Args:
        logits: (batch, k, vocab), the logits of the last k positions (k <= seq; k = seq for all).
        labels: (batch, seq), -100 where ignored.
    Returns:
        (sum of CE in nats as a float32 scalar, number of labelled tokens).
    """
    picked, targets = answer_logits(logits, labels)
    ce = torch.nn.functional.cross_entropy(picked.float(), targets, reduction="sum")
    return ce, int(targets.numel())
