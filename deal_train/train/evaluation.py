"""Evaluation protocol (docs/design.md section 2): greedy generation, exact match, ROUGE-1, AA and BWT.

After training task t every task i <= t is evaluated on its test split, filling the accuracy matrix
``a[i][t]`` (row i = task i, column t = after training task t; None where not evaluated).
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
from rouge_score import rouge_scorer
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from ..model import prefix as kv_prefix
from ..data import collate_eval
from ..data.labels import normalize_answer

_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 from the ``rouge-score`` package, Porter stemmer on (0..1)."""
    return _scorer.score(reference, prediction)["rouge1"].fmeasure


def average_accuracy(matrix: Sequence[Sequence[float | None]]) -> float:
    """AA = mean_i a[i][T] over the last column (paper Sec. 4).

    Raises:
        ValueError: an entry of the last column is missing.
    """
    last = [row[-1] for row in matrix]
    if any(v is None for v in last):
        raise ValueError("average_accuracy needs every task evaluated after the last task.")
    return sum(last) / len(last)


def backward_transfer(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """BWT = mean_{i<T} (a[i][T] - a[i][i]); None for a single task."""
    n = len(matrix)
    if n < 2:
        return None
    return sum(matrix[i][n - 1] - matrix[i][i] for i in range(n - 1)) / (n - 1)


@torch.no_grad()
def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, at most the shortest prompt's length - 1 (its last token stays in every
    row's suffix: its logit is the first generated token's). 0 for fewer than two prompts."""
    if len(prompts) < 2:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def generate_predictions(model, tokenizer, features, batch_size: int, max_new_tokens: int,
                         accelerator=None, desc: str | None = None, shared_prefix: bool = False,
                         sort_by_length: bool = True) -> list[dict]:
    """Greedy generation for a tokenised evaluation set (left padding; only the new tokens are decoded: for a
    decoder-only model the tokens after the prompt, for an encoder-decoder model the decoder's tokens after its
    start token). Batches hold prompts of similar length (longest first: less padding); generation of a batch
    stops when every row has produced EOS.

    With ``shared_prefix`` (decoder-only), the tokens all prompts share (``common_prefix_length``) run once, at
    batch 1, into a key/value cache, and every batch's generation starts from it (``model/prefix.py``): the same
    greedy predictions up to near ties (batch-1 and batched products round differently in the last bits).

    Args:
        features: rows with ``input_ids`` (prompt), ``label`` and ``index`` (from ``Encoder.eval_features``).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: generation stops at EOS or after this many tokens.
        accelerator: when given (several processes), each process generates a shard and the results are gathered.
        desc: label of a progress bar (none when None or on processes other than the main one).
        shared_prefix: start every batch from the cached shared prompt prefix (ignored for encoder-decoders).
        sort_by_length: batch the prompts longest first (False: in row order, the path before the fast path;
            the benchmark's baseline). The returned rows are in row order either way.
    Returns:
        One dict per row in row order: ``index``, ``prediction`` (str), ``label`` (str).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_echoed = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    out: list[dict] = []
    indices = list(range(len(features)))
    prompts = list(features["input_ids"])
    prefix_ids, cache = None, None
    if shared_prefix and prompt_echoed and (p := common_prefix_length(prompts)) > 0:
        prefix_ids = torch.tensor([prompts[0][:p]], device=device)
        cache = kv_prefix.prefix_cache(model, prefix_ids)
    # ZeRO-3: every forward pass gathers weights from all ranks, so all ranks run the same number of batches and
    # generation steps (synced_gpus); short shards repeat their last row, dropped again after the gather
    synced = accelerator is not None and accelerator.num_processes > 1 and distributed.keeps_engine(accelerator)
    if accelerator is not None and accelerator.num_processes > 1:
        indices = indices[accelerator.process_index::accelerator.num_processes]
        if synced:
            per_rank = -(-len(features) // accelerator.num_processes)
            indices = indices + (indices[-1:] or [0]) * (per_rank - len(indices))
    if sort_by_length:
        indices.sort(key=lambda i: -len(prompts[i]))  # longest first (stable): similar lengths share a batch
    loader = DataLoader(features.select(indices), batch_size=batch_size, shuffle=False,
                        collate_fn=lambda b: collate_eval(b, tokenizer.pad_token_id))
    show = desc is not None and (accelerator is None or accelerator.is_local_main_process)
    for batch in tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        extra = {"synced_gpus": True} if synced else {}
        if cache is not None:
            p = prefix_ids.shape[1]
            _, suffix_ids, _, mask = kv_prefix.split_batch(ids, mask, p)
            ids = torch.cat([prefix_ids.expand(ids.shape[0], -1), suffix_ids], dim=1)
            extra["cache"] = kv_prefix.expand_cache(cache, ids.shape[0])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **extra)
        new_tokens = gen[:, ids.shape[1]:] if prompt_echoed else gen[:, 1:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for idx, text, label in zip(batch["index"], texts, batch["labels"]):
            out.append({"index": int(idx), "prediction": text.strip(), "label": label})
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        out = list({r["index"]: r for r in gather_object(out)}.values())  # one row per index
    model.train(was_training)
    out.sort(key=lambda r: r["index"])
    return out


def score(predictions: list[dict]) -> dict[str, float]:
    """Exact match and ROUGE-1 (both in %, 0..100) over a list of predictions; adds per-row scores in place."""
    if not predictions:
        return {"exact_match": 0.0, "rouge1": 0.0}
    em = r1 = 0.0
    for row in predictions:
        row["exact_match"] = exact_match(row["prediction"], row["label"])
        row["rouge1"] = rouge1(row["prediction"], row["label"])
        em += row["exact_match"]
        r1 += row["rouge1"]
    return {"exact_match": 100.0 * em / len(predictions), "rouge1": 100.0 * r1 / len(predictions)}


def spread(values: Sequence[float | None]) -> dict:
    """How values of repeated measurements spread: ``mean``, ``std`` (sample standard deviation, n - 1; None for
    fewer than two values), ``median``, ``min``, ``max`` and ``n``, None values left out; all None but ``n`` (0)
    when nothing is left."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
