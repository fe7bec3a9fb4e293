"""The shared-prefix fast path (docs/design.md, "Fast path"): every prompt of a task starts with the same tokens
(chat template, instruction, option list), so their keys and values are computed once and reused by every row.

Decoder-only, left-padded batches (``data.batching.collate_train`` / ``collate_eval``) of width L, row i holding
``n_i`` real tokens in columns ``[L - n_i, L)``. With a common prefix of P tokens (no answer token in it):

* the prefix runs once, at batch 1, positions ``0 .. P-1``, into a key/value cache (with gradients when training:
  LoRA on q/v still learns from the prefix positions);
* the cache is expanded along the batch (a view, no copy) and the suffixes run against it: columns ``[P, L)`` of
  the batch, with each row's prefix tokens that fall there masked out, attention mask ``[1]*P + suffix mask`` and
  the rows' own position ids. Columns ``[0, P)`` are padding or prefix in every row, so they are dropped.

Each suffix token then sees exactly the keys and values it sees in the full forward pass (the same tokens at the
same positions), so loss and gradients are the full pass's up to float rounding (batch-1 and batched matrix
products round differently in the last bits). Answers still end at the last column, so ``logits_to_keep`` keeps
working and the logits and labels line up as before (``losses.answer_logits``).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor | None = None) -> int:
    """Length P of the longest token prefix common to every row of a left-padded batch, stopped so that no
    answer token, and no position whose logit predicts one, lies in it.

    Args:
        input_ids, attention_mask: (batch, L) int64, left padded (real tokens right-aligned).
        labels: (batch, L), -100 where not trained on; None for prompts (evaluation), where the last prompt token
            is kept out of the prefix (its logit is the first generated token's).
    Returns:
        P in tokens, 0 <= P <= min real length - 1 (0: no common prefix).
    """
    lengths = attention_mask.sum(dim=1)
    width = input_ids.shape[1]
    shortest = int(lengths.min())
    limit = shortest - 1
    if labels is not None:
        labelled = labels != -100
        if bool(labelled.any(dim=1).all()):
            # first labelled column per row, as an offset into the row's real tokens; its logit is at offset - 1
            first = labelled.float().argmax(dim=1) - (width - lengths)
            limit = min(limit, int(first.min()) - 1)
        else:
            limit = min(limit, 0)
    if limit <= 0:
        return 0
    starts = (width - lengths).unsqueeze(1)
    aligned = input_ids.gather(1, starts + torch.arange(limit, device=input_ids.device))  # (batch, limit)
    same = (aligned == aligned[:1]).all(dim=0)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else limit


def split_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int) -> tuple[torch.Tensor, ...]:
    """Split a left-padded batch at a shared prefix of ``prefix`` tokens.

    Returns:
        ``prefix_ids`` (1, P): the shared tokens; ``suffix_ids`` (batch, L - P): columns P.. of the batch;
        ``suffix_mask`` (batch, L - P): its attention mask with each row's prefix tokens masked;
        ``full_mask`` (batch, L): ``[1]*P`` followed by ``suffix_mask`` (the mask of prefix cache + suffix).
    """
    lengths = attention_mask.sum(dim=1)
    width = input_ids.shape[1]
    start = int(width - lengths[0])
    prefix_ids = input_ids[:1, start:start + prefix]
    rank = attention_mask.cumsum(dim=1) - 1  # offset of each real token in its row
    keep = attention_mask.bool() & (rank >= prefix)
    suffix_mask = keep[:, prefix:].to(attention_mask.dtype)
    full_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], prefix), suffix_mask], dim=1)
    return prefix_ids, input_ids[:, prefix:], suffix_mask, full_mask


def expand_cache(cache: DynamicCache, batch_size: int) -> DynamicCache:
    """A new ``DynamicCache`` whose layers hold ``cache``'s batch-1 keys and values expanded to ``batch_size`` rows
    (views: no copy, gradients flow back into the batch-1 tensors). ``cache`` itself is left unchanged, so it can
    seed any number of batches.

    Raises:
        ValueError: a layer of ``cache`` holds more than one row.
    """
    data = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if keys.shape[0] != 1:
            raise ValueError(f"expand_cache needs a batch-1 cache, got {keys.shape[0]} rows.")
        data.append((keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1)))
    return DynamicCache(data)


def prefix_cache(model, prefix_ids: torch.Tensor) -> DynamicCache:
    """Run ``prefix_ids`` (1, P) through ``model`` (positions 0 .. P-1) and return its key/value cache; gradients
    are kept when autograd is on. Only one position's logits are computed (``logits_to_keep=1``)."""
    positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device).unsqueeze(0)
    out = model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), position_ids=positions,
                use_cache=True, logits_to_keep=1)
    return out.cache


def suffix_forward(model, cache: DynamicCache, suffix_ids: torch.Tensor, full_mask: torch.Tensor,
                   position_ids: torch.Tensor, logits_to_keep: int):
    """The suffixes' forward pass against an expanded prefix cache; ``.logits`` is (batch, logits_to_keep, vocab).

    Args:
        suffix_ids: (batch, S); full_mask: (batch, P + S); position_ids: (batch, S), the rows' own positions.
    """
    return model(input_ids=suffix_ids, attention_mask=full_mask, position_ids=position_ids,
                 cache=expand_cache(cache, suffix_ids.shape[0]), use_cache=False, logits_to_keep=logits_to_keep)


def pretrained_model(model):
    """The transformers ``PreTrainedModel`` inside ``model`` (unwrapping DDP/DeepSpeed ``.module`` and PEFT)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def supported(model) -> str | None:
    """Why the shared-prefix path cannot run on ``model``, or None when it can.

    It needs a decoder-only model (an encoder-decoder's prompt is the encoder input) and no gradient checkpointing
    while training: transformers' checkpointed decoder layers drop any cache (they log "Caching is incompatible
    with gradient checkpointing"), and recomputation would append to it twice.
    """
    base = pretrained_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model (its prompt is the encoder's input)"
    if getattr(base, "is_gradient_checkpointing", False):
        return "gradient checkpointing (transformers drops the cache inside checkpointed layers)"
    return None
