"""Length-grouped micro batches (``group_by_length``): rows of similar length share a batch, so less of each
batch is padding.

As Hugging Face transformers' ``LengthGroupedSampler``: every epoch the rows are shuffled with the task's data
order generator, cut into mega-batches of ``length_group_size × batch_size`` rows, each mega-batch sorted by
length (longest first) and cut into micro batches. Unlike Hugging Face's sampler the micro batches are then put in
a random order (the short last batch stays last), so that an epoch of one mega-batch is not fed from its longest
rows to its shortest; the batch holding the longest row goes first, so an out-of-memory error shows at the first
step rather than late in the epoch. All randomness comes from the
generator, so restoring its state at an epoch start (``train.checkpointing``) gives the same batches again.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def row_lengths(features) -> list[int]:
    """Token count of every row of a tokenised training set (a ``datasets.Dataset`` or list of dicts):
    ``len(input_ids)``, plus ``len(decoder_input_ids)`` for seq2seq (encoder-decoder) features."""
    columns = features.column_names if hasattr(features, "column_names") else list(features[0])
    lengths = [len(ids) for ids in features["input_ids"]] if hasattr(features, "column_names") \
        else [len(f["input_ids"]) for f in features]
    if "decoder_input_ids" in columns:
        dec = features["decoder_input_ids"] if hasattr(features, "column_names") \
            else [f["decoder_input_ids"] for f in features]
        lengths = [n + len(d) for n, d in zip(lengths, dec)]
    return lengths


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of row indices grouped by length; a ``DataLoader(batch_sampler=...)`` argument.

    Args:
        lengths: token count of each row (``row_lengths``), one per dataset row.
        batch_size: rows per micro batch (> 0); only the last batch of an epoch may be smaller.
        group_size: micro batches per mega-batch (> 0): rows are sorted by length within ``group_size ×
            batch_size`` shuffled rows; 1 keeps the shuffled batches (only sorted within), a value ≥ the number
            of batches sorts the whole epoch (least padding, no mixing of lengths).
        generator: the source of all randomness (one ``torch.randperm`` per epoch).

    Every epoch yields each index in ``range(len(lengths))`` exactly once, in ``len(self)`` =
    ceil(rows / batch_size) batches.

    Raises:
        ValueError: ``batch_size`` or ``group_size`` is not positive.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_size: int, generator: torch.Generator):
        if batch_size <= 0 or group_size <= 0:
            raise ValueError(f"batch_size and group_size must be > 0, got {batch_size} and {group_size}.")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.group_size = group_size
        self.generator = generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # a generator function: nothing is drawn until the first batch is asked for, so the DataLoader draws its base
        # seed from the same generator first whether it iterates this sampler or Accelerate's SkipBatchSampler
        # around it (a resume inside an epoch); an eager draw at iter() would swap the two draws there
        n, size = len(self.lengths), self.batch_size
        if n == 0:
            return
        order = torch.randperm(n, generator=self.generator).tolist()
        mega = self.group_size * size
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            group = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])  # stable: ties keep the shuffle
            batches.extend(group[j:j + size] for j in range(0, len(group), size))
        # the batches in random order (the short last one stays last): sorted mega-batches alone would feed an
        # epoch that fits in one mega-batch from its longest rows to its shortest, a length curriculum (measured
        # on SmolLM2 dbpedia, 200 rows: 24 % exact match after the task against 33 % shuffled)
        full = [b for b in batches if len(b) == size]
        short = [b for b in batches if len(b) < size]
        batches = [full[i] for i in torch.randperm(len(full), generator=self.generator).tolist()] + short
        # each batch is sorted, so its first row is its longest
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        if len(batches[longest]) == len(batches[0]):
            batches[0], batches[longest] = batches[longest], batches[0]
        else:  # the longest row is in the short last batch: swap just that row, so only the last batch is short
            batches[0][0], batches[longest][0] = batches[longest][0], batches[0][0]
        yield from batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction (0 ... 1) of the token positions of ``batches`` (lists of row indices, each padded to its
    longest row) that are padding; with ``lengths`` from ``row_lengths``. For seq2seq rows this counts the
    encoder and decoder sequences together (each padded to its own longest is not modelled: an approximation)."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if len(b))
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / total if total else 0.0


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """The batches ``DataLoader(shuffle=True, generator=generator)`` draws over ``n`` rows (its ``RandomSampler``:
    one ``torch.randperm``), for comparing padding with ``LengthGroupedBatchSampler``."""
    order = torch.randperm(n, generator=generator).tolist()
    return [order[j:j + batch_size] for j in range(0, n, batch_size)]


def epoch_padding(lengths: Sequence[int], batch_size: int, group_size: int,
                  generator: torch.Generator) -> tuple[float, float]:
    """Padding fractions (0 ... 1) of one epoch's batches, length-grouped and plainly shuffled, each drawn from
    a copy of ``generator``'s current state (``generator`` itself is not advanced, so the training order is
    unchanged): ``(grouped, shuffled)``."""
    def copy() -> torch.Generator:
        g = torch.Generator()
        g.set_state(generator.get_state())
        return g

    grouped = list(LengthGroupedBatchSampler(lengths, batch_size, group_size, copy()))
    return (padding_fraction(grouped, lengths),
            padding_fraction(shuffled_batches(len(lengths), batch_size, copy()), lengths))
