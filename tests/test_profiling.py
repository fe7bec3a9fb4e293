"""The memory profiler: CPU peak RSS around a phase (with the high-water mark reset between phases), the CUDA
allocator path where a GPU exists, and ``profile_memory: true`` in a real (tiny) training run."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from deal_train.config import ConfigError, TrainConfig, validate
from deal_train.train.loop import run
from deal_train.train.profiling import (MemoryProfiler, memory_scalars, memory_stats, reset_peak_rss)

MIB = 2**20


def _touch(n_bytes: int) -> torch.Tensor:
    return torch.ones(n_bytes // 4, dtype=torch.float32)  # ones() writes every page, so they become resident


def test_cpu_phase_sees_its_own_peak_and_not_an_earlier_one():
    with MemoryProfiler("cpu") as big:
        x = _touch(96 * MIB)
        del x
    res = big.result
    assert res.device == "cpu" and res.source in ("vmhwm", "ru_maxrss")
    assert res.delta_bytes >= 90 * MIB, res
    assert res.peak_bytes >= res.start_bytes
    # the next phase allocates little: with the reset its peak is its own, far below the 96 MiB phase
    with MemoryProfiler("cpu") as small:
        y = _touch(4 * MIB)
        del y
    if small.result.resettable:
        assert small.result.delta_bytes < 48 * MIB, small.result
        assert small.result.peak_bytes < res.peak_bytes
    else:  # no /proc/self/clear_refs: the fallback reports the process peak so far, and says so
        assert small.result.source == "ru_maxrss" and not reset_peak_rss()


def test_memory_stats_and_scalars_from_profilers():
    with MemoryProfiler("cpu") as train:
        _touch(8 * MIB)
    with MemoryProfiler("cpu") as ev:
        pass
    stats = memory_stats(train, ev)
    assert set(stats["peak_memory"]) == {"train", "eval"}
    assert stats["peak_rss_bytes"] == max(train.result.peak_bytes, ev.result.peak_bytes)
    scalars = memory_scalars(stats)
    assert scalars["memory/train_peak_gib"] == pytest.approx(train.result.peak_bytes / 2**30)
    assert "memory/eval_delta_gib" in scalars and "memory/train_reserved_peak_gib" not in scalars
    assert memory_stats(None, None) == {} and memory_scalars({}) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_and_snapshot(tmp_path):
    path = str(tmp_path / "snap.pickle")
    with MemoryProfiler("cuda", snapshot_path=path) as prof:
        x = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
        del x
    res = prof.result
    assert res.source == "cuda_allocator" and res.delta_bytes >= 64 * MIB
    assert res.reserved_peak_bytes >= res.peak_bytes
    with open(path, "rb") as fh:
        snap = pickle.load(fh)
    assert "segments" in snap and "device_traces" in snap


def test_memory_snapshot_needs_profile_memory():
    with pytest.raises(ConfigError, match="profile_memory"):
        validate(TrainConfig(memory_snapshot=True))


def test_profile_memory_in_training_writes_metrics_and_tensorboard(tmp_path, tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(model="tiny-random-llama", tasks=["dbpedia"], max_train_samples=8, max_test_samples=2,
                      per_device_train_batch_size=4, max_source_length=128, max_new_tokens=2, lora_rank=4,
                      output_dir=str(tmp_path / "run"), profile_memory=True)
    run(cfg)
    with open(os.path.join(cfg.output_dir, "metrics.json"), encoding="utf-8") as fh:
        task = json.load(fh)["per_task"][0]
    train, ev = task["peak_memory"]["train"], task["peak_memory"]["eval"]
    for phase in (train, ev):
        assert phase["source"] in ("vmhwm", "ru_maxrss") and phase["peak_bytes"] >= phase["start_bytes"] > 0
    # the model (~13 MiB of weights) is resident during both phases
    assert train["start_bytes"] > 13 * MIB
    assert task["peak_rss_bytes"] == max(train["peak_bytes"], ev["peak_bytes"])
    tags = set()
    for root, _dirs, files in os.walk(os.path.join(cfg.output_dir, "tensorboard")):
        if any(f.startswith("events.out") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    assert {"memory/train_peak_gib", "memory/train_delta_gib", "memory/eval_peak_gib"} <= tags
