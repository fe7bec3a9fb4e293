"""Length-grouped batches (``group_by_length``, ``data.sampling``): every row exactly once per epoch, the order set
by the seed alone, less padding than the plain shuffle on real tokenised rows, the same batches after a resume in
the middle of an epoch, disjoint equal shards over 2 DDP processes; off, the loader is today's seeded shuffle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from deal_train.data import collate_train
from deal_train.config import ConfigError, TrainConfig, validate
from deal_train.data.sampling import (LengthGroupedBatchSampler, epoch_padding, padding_fraction, row_lengths,
                                      shuffled_batches)
from deal_train.train import loop, task
from deal_train.train.distributed import Zero3

from conftest import REPO, TINY_RUN


def _sampler(lengths, batch=4, group=3, seed=0):
    return LengthGroupedBatchSampler(lengths, batch, group, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def real_lengths(tokenizer, data_dir):
    """Token lengths of 200 real dbpedia training rows plus 20 replayed yahoo rows, as start_task's train set."""
    from datasets import concatenate_datasets

    from deal_train.data import Encoder, load_task, read_rows

    enc = Encoder(tokenizer, 512, 50, True)
    feats = [enc.train_features(load_task(data_dir, name), read_rows(load_task(data_dir, name), "train")[:n])[0]
             for name, n in (("dbpedia", 200), ("yahoo", 20))]
    return row_lengths(concatenate_datasets(feats))


@pytest.mark.parametrize("n, batch, group", [(220, 8, 50), (220, 8, 3), (37, 4, 2), (9, 8, 1), (1, 3, 5)])
def test_every_row_exactly_once_per_epoch_and_only_the_last_batch_short(n, batch, group):
    lengths = torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    sampler = _sampler(lengths, batch, group)
    for _epoch in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-n // batch)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest row comes first


def test_batches_are_sorted_within_mega_batches_and_epochs_differ():
    lengths = list(range(1, 97))  # all different
    sampler = _sampler(lengths, batch=4, group=3)
    first, second = list(sampler), list(sampler)
    assert first != second  # a new shuffle every epoch (the generator advances)
    for batches in (first, second):
        rest = batches[1:]  # the first batch was swapped in from elsewhere
        flat = [lengths[i] for b in batches for i in b]
        # each mega-batch of 12 rows is sorted longest first, apart from the swap of the longest batch
        assert all(lengths[b[0]] >= lengths[b[-1]] for b in rest)
        assert flat != sorted(flat, reverse=True)  # mega-batches: not one global sort


def test_one_mega_batch_is_not_fed_longest_to_shortest():
    lengths = list(range(1, 201))  # 200 rows, batch 8, group 50: the whole epoch is one mega-batch
    batches = list(_sampler(lengths, batch=8, group=50))
    heads = [lengths[b[0]] for b in batches]
    assert heads[0] == 200  # the longest row first
    assert heads[1:] != sorted(heads[1:], reverse=True)  # no length curriculum over the epoch
    # the same batches as a plain sort would give (same padding): consecutive runs of 8 by length
    assert sorted(tuple(sorted(lengths[i] for i in b)) for b in batches) == \
        [tuple(range(k, k + 8)) for k in range(1, 201, 8)]


def test_same_seed_same_batches_other_seed_other_batches(real_lengths):
    a, b, c = (list(_sampler(real_lengths, 8, 50, seed)) for seed in (42, 42, 43))
    assert a == b and a != c
    # the order comes from the given generator only: the global RNG has no say
    torch.manual_seed(0)
    x = list(_sampler(real_lengths, 8, 50, 42))
    torch.manual_seed(1)
    assert x == list(_sampler(real_lengths, 8, 50, 42)) == a


def test_padding_is_lower_than_the_shuffled_order_on_real_rows(real_lengths):
    assert max(real_lengths) > 2 * min(real_lengths)  # real rows of varied length
    grouped = padding_fraction(list(_sampler(real_lengths, 8, 50)), real_lengths)
    shuffled = padding_fraction(shuffled_batches(len(real_lengths), 8, torch.Generator().manual_seed(0)),
                                real_lengths)
    assert grouped < 0.5 * shuffled and shuffled > 0.05
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert epoch_padding(real_lengths, 8, 50, g) == pytest.approx((grouped, shuffled))
    assert torch.equal(g.get_state(), state)  # the measurement does not move the training order


def test_padding_fraction_counts_pad_positions():
    assert padding_fraction([[0, 1], [2]], [4, 2, 3]) == pytest.approx(1 - 9 / 11)
    assert padding_fraction([[0, 1]], [3, 3]) == 0.0


def test_seq2seq_length_counts_encoder_and_decoder_tokens():
    rows = [{"input_ids": [1, 2, 3], "decoder_input_ids": [0, 5]}, {"input_ids": [1], "decoder_input_ids": [0, 5, 6]}]
    assert row_lengths(rows) == [5, 4]
    assert row_lengths([{"input_ids": [1, 2, 3]}]) == [3]


def test_config_defaults_and_a_zero_group_size_is_a_clear_error():
    cfg = TrainConfig()
    assert cfg.group_by_length is False and cfg.length_group_size == 50
    with pytest.raises(ConfigError, match="length_group_size' must be > 0"):
        validate(TrainConfig(group_by_length=True, length_group_size=0))
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler([1, 2], 2, 0, torch.Generator())


def _batch_sampler(loader):
    """The batch sampler behind a prepared loader (a ``BatchSamplerShard`` wraps it on several processes)."""
    return getattr(loader.batch_sampler, "batch_sampler", loader.batch_sampler)


def _loader_batches(tiny_method, **overrides):
    """start_task's loader (one process): the token ids of every row of one epoch's batches, and what it printed."""
    cfg, datas, method, model = tiny_method("seq_lora", max_train_samples=16, per_device_train_batch_size=4,
                                            **overrides)
    datas[1].replay_features = [datas[0].train_features.select(range(3))]
    setup = task.start_task(Accelerator(), Zero3(Accelerator()), model, method, datas[1], cfg, 1, 0)
    return [b["attention_mask"].sum(-1).tolist() for b in setup.loader], setup


def test_start_task_uses_grouped_batches_only_when_asked(tiny_method, capsys):
    plain, setup = _loader_batches(tiny_method)
    assert "length-grouped" not in capsys.readouterr().out
    assert not isinstance(_batch_sampler(setup.loader), LengthGroupedBatchSampler)
    # off: today's loader, DataLoader(shuffle=True) drawing from the task's generator (seed + task index)
    rows = setup.loader.dataset
    today = DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(42 + 1),
                       collate_fn=lambda b: collate_train(b, 0))
    assert plain == [b["attention_mask"].sum(-1).tolist() for b in today]
    grouped, setup = _loader_batches(tiny_method, group_by_length=True)  # one mega-batch: all sorted
    printed = capsys.readouterr().out
    assert isinstance(_batch_sampler(setup.loader), LengthGroupedBatchSampler)
    assert "task 2 amazon: length-grouped batches, padding " in printed and "(shuffled order: " in printed
    # the same 19 rows (16 of amazon, 3 replayed), in other batches with less padding
    assert sorted(n for b in plain for n in b) == sorted(n for b in grouped for n in b) and len(grouped) == 5
    assert plain != grouped
    pad = [sum(len(b) * max(b) - sum(b) for b in bs) for bs in (plain, grouped)]
    assert pad[1] < pad[0]


GROUPED_RUN = {**TINY_RUN, "method": "seq_lora", "per_device_train_batch_size": 2, "num_train_epochs": 2,
               "group_by_length": True, "length_group_size": 2, "checkpoint_every_steps": 1}
"""dbpedia then amazon, 8 rows each, batch 2, 2 epochs: 4 optimizer steps per epoch, 16 in all (steps 13-16: amazon's
second epoch)."""


class Crash(RuntimeError):
    pass


def _recorded_run(out, crash_at: int | None = None) -> list[list[int]]:
    """``loop.run`` of GROUPED_RUN into ``out``, returning the token ids of the rows of every collated batch;
    ``crash_at``: raise ``Crash`` when collating that many batches (as a crash in the middle of the run)."""
    trained: list[list[list[int]]] = []
    collate = task.collate_train

    def recording_collate(features, pad_token_id, shared_prefix=False):
        if crash_at is not None and len(trained) == crash_at:
            raise Crash()
        trained.append([list(f["input_ids"]) for f in features])
        return collate(features, pad_token_id, shared_prefix)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task, "collate_train", recording_collate)
        loop.run(TrainConfig(output_dir=str(out), **GROUPED_RUN))
    return trained


def test_resume_in_the_middle_of_an_epoch_gives_the_same_grouped_batches(tmp_path, capsys):
    reference = _recorded_run(tmp_path / "ref")
    assert len(reference) == 16  # 2 tasks x 2 epochs x 4 batches
    assert reference[8:12] != reference[12:16]  # amazon's epochs differ
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        _recorded_run(out, crash_at=14)  # in amazon's second epoch (steps 13-16)
    capsys.readouterr()
    resumed = _recorded_run(out)
    printed = capsys.readouterr().out
    assert "resuming task 2 from" in printed
    # collating batch 15 fails while step 14's batch is fetched (the loader prefetches one batch), so the newest
    # checkpoint is step 13's: the resume skips 1 batch of the epoch and trains the last 3
    assert "(optimizer step 13)" in printed and len(resumed) == 3, printed
    assert resumed == reference[-len(resumed):]
    adapter = "adapters/2-amazon/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (tmp_path / "ref" / adapter).read_bytes()


SHARDS = r"""
import json, sys, torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from torch.utils.data import DataLoader
from deal_train.data.sampling import LengthGroupedBatchSampler

acc = Accelerator()
lengths = [(7 * i) % 23 + 1 for i in range(37)]  # 37 rows, batch 4: 10 batches, the last of 1 row
sampler = LengthGroupedBatchSampler(lengths, 4, 3, torch.Generator().manual_seed(5))
loader = acc.prepare(DataLoader(list(range(37)), batch_sampler=sampler))
epochs = [[b.tolist() for b in loader] for _ in range(2)]
with open(sys.argv[1] + f"/rank{acc.process_index}.json", "w") as f:
    json.dump({"len": len(loader), "epochs": epochs}, f)
"""


def test_two_ddp_processes_get_disjoint_shards_of_the_same_global_order(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    from test_distributed import _free_port

    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", port,
                           str(script), str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    lengths = [(7 * i) % 23 + 1 for i in range(37)]
    g = torch.Generator().manual_seed(5)
    sampler = LengthGroupedBatchSampler(lengths, 4, 3, g)
    want = [list(sampler), list(sampler)]
    assert ranks[0]["len"] == ranks[1]["len"] == 5
    for epoch in range(2):
        a, b = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert len(a) == len(b) == 5
        # batches alternate between the processes in the one-process order
        assert a == want[epoch][0::2] and b[:4] == want[epoch][1::2][:4]
        seen = [i for batch in a + b for i in batch]
        assert set(seen) == set(range(37))  # every row trained (even_batches fills the last batch from the start)
        assert not set(i for x in a[:4] for i in x) & set(i for x in b[:4] for i in x)


def test_a_two_process_grouped_run_completes(tmp_path):
    from test_distributed import _launch

    out = tmp_path / "run"
    proc = _launch("multi_cpu", out, "--group_by_length", "true", "--length_group_size", "2")
    assert proc.stdout.count("length-grouped batches, padding") == 2, proc.stdout[-2000:]  # once per task
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["config"]["group_by_length"] is True


def test_t5_rows_are_grouped_by_encoder_plus_decoder_length(tiny_method, capsys):
    cfg, datas, method, model = tiny_method("seq_lora", model="tiny-random-t5", max_train_samples=16,
                                            per_device_train_batch_size=4, group_by_length=True)
    feats = datas[0].train_features
    assert "decoder_input_ids" in feats.column_names
    setup = task.start_task(Accelerator(), Zero3(Accelerator()), model, method, datas[0], cfg, 0, 0)
    sampler = _batch_sampler(setup.loader)
    assert isinstance(sampler, LengthGroupedBatchSampler) and "task 1 dbpedia: length-grouped" in capsys.readouterr().out
    assert sampler.lengths == [len(a) + len(b) for a, b in zip(feats["input_ids"], feats["decoder_input_ids"])]
    batches = [b for b in setup.loader]
    assert sum(b["input_ids"].shape[0] for b in batches) == 16 and "decoder_input_ids" in batches[0]
    totals = [(b["attention_mask"].sum(-1) + b["decoder_attention_mask"].sum(-1)).tolist() for b in batches]
    assert all(t == sorted(t, reverse=True) for t in totals[1:])  # each batch sorted, longest first


def test_the_longest_row_comes_first_even_from_the_short_last_batch():
    lengths = [5] * 8 + [100]  # row 8 is the longest; find a seed whose shuffle leaves it alone in the last batch
    seed = next(s for s in range(200) if torch.randperm(9, generator=torch.Generator().manual_seed(s))[-1] == 8)
    batches = list(_sampler(lengths, batch=8, group=1, seed=seed))
    assert [len(b) for b in batches] == [8, 1] and batches[0][0] == 8
    assert sorted(batches[0] + batches[1]) == list(range(9))
