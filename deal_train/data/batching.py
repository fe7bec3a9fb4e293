"""Batching for both model kinds: training rows (decoder-only: left padding; encoder-decoder: right padding, the
decoder sequence layout) and evaluation prompts (left padding for generation).

Labels are -100 (``IGNORE_INDEX``) wherever the loss must not look: prompt positions, padding, and a seq2seq
row's first decoder position.
"""

from __future__ import annotations

import torch

from ..model.prefix import shared_prefix_length

IGNORE_INDEX = -100
"""Label of positions the loss ignores (PyTorch's ``cross_entropy`` default ``ignore_index``)."""


def collate_train(features: list[dict], pad_token_id: int, shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Left-pad a list of training features, so every row's answer ends at the last position.

    Seq2seq features (with ``decoder_input_ids``, from ``Seq2SeqEncoder``) go to
    ``collate_seq2seq_train`` instead (right padding, the decoder sequence layout).

    Left padding lets the loop ask the model for logits of the last ``max answer length + 1`` positions
    only (``logits_to_keep``) instead of a (batch × seq × vocab) tensor for the whole prompt.

    Args:
        shared_prefix: also return ``shared_prefix``, the number of leading tokens every row shares before any
            answer token (``model.prefix.shared_prefix_length``; 0 for a single row), which ``answer_forward``
            then computes once (decoder-only only).
    Returns:
        ``input_ids``, ``attention_mask`` and ``position_ids`` (batch × max_len, int64; positions count real
        tokens from 0) and ``labels`` (batch × max_len, -100 on prompt and padding positions); with
        ``shared_prefix``, also ``shared_prefix`` (int).
    """
    if "decoder_input_ids" in features[0]:
        return collate_seq2seq_train(features, pad_token_id)
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, width - n:] = torch.tensor(f["input_ids"])
        mask[i, width - n:] = 1
        labels[i, width - n:] = torch.tensor(f["labels"])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    if shared_prefix:
        batch["shared_prefix"] = shared_prefix_length(ids, mask, labels) if len(features) > 1 else 0
    return batch


def collate_eval(features: list[dict], pad_token_id: int) -> dict:
    """Left-pad prompts for batched generation; keeps ``label`` strings and row ``index``.

    Returns:
        ``input_ids``/``attention_mask`` (batch × max_len), ``labels`` (list of str), ``index`` (list of int).
    """
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, width - n:] = torch.tensor(f["input_ids"])
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": [f["label"] for f in features],
            "index": [f["index"] for f in features]}


def collate_seq2seq_train(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad seq2seq training features (from ``Seq2SeqEncoder.train_features``).

    Returns:
        ``input_ids`` / ``attention_mask`` (batch × max prompt length), ``decoder_input_ids`` /
        ``decoder_attention_mask`` (batch × max decoder length; pad ``pad_token_id``) and ``labels``
        (batch × max decoder length, -100 at the first position and on padding), all int64.
    """
    src = max(len(f["input_ids"]) for f in features)
    tgt = max(len(f["decoder_input_ids"]) for f in features)
    n = len(features)
    ids = torch.full((n, src), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, src), dtype=torch.long)
    dec = torch.full((n, tgt), pad_token_id, dtype=torch.long)
    dec_mask = torch.zeros((n, tgt), dtype=torch.long)
    labels = torch.full((n, tgt), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        k, m = len(f["input_ids"]), len(f["decoder_input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        mask[i, :k] = 1
        dec[i, :m] = torch.tensor(f["decoder_input_ids"])
        dec_mask[i, :m] = 1
        labels[i, :m] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask,
            "labels": labels}
