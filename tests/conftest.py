"""Shared fixtures: a per-session model cache, the real benchmark directory, a tiny tokenizer/model."""

from __future__ import annotations

import atexit
import dataclasses
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("DEAL_TRAIN_DATA_DIR") or str((REPO / ".." / "shared" / "cl_benchmark").resolve())

# Tests write only to temporary directories: the converted SmolLM2 cache goes to a session temp dir
# unless the caller points DEAL_TRAIN_CACHE somewhere on purpose.
# The session's own cache (a converted SmolLM2 is ~0.5 GB) is removed when the session ends: 165 left-behind
# caches once filled the disk.
if not os.environ.get("DEAL_TRAIN_CACHE"):
    os.environ["DEAL_TRAIN_CACHE"] = tempfile.mkdtemp(prefix="deal_train_cache_")
    atexit.register(shutil.rmtree, os.environ["DEAL_TRAIN_CACHE"], True)
os.environ["DEAL_TRAIN_DATA_DIR"] = DATA_DIR
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not os.path.isdir(DATA_DIR):
        pytest.fail(f"benchmark data not found at {DATA_DIR}; set DEAL_TRAIN_DATA_DIR")
    return DATA_DIR


FIRST_CONVERSION: dict = {}
"""``rng_untouched``: whether the session's first conversion of SmolLM2 into its empty cache (``tokenizer``) left the
global torch RNG as it found it (checked in test_architectures.py)."""


def leaves_rng_alone(fn) -> bool:
    """Call ``fn()`` between ``torch.manual_seed`` and a draw; True when the draw equals one made without it."""
    import torch

    torch.manual_seed(1234)
    fn()
    after = torch.rand(8)
    torch.manual_seed(1234)
    return torch.equal(after, torch.rand(8))


@pytest.fixture(scope="session")
def tokenizer():
    from deal_train.model import loading as models

    if not os.path.isfile(os.path.join(models.cache_dir(), "smollm2-135m-instruct", "config.json")):
        FIRST_CONVERSION["rng_untouched"] = leaves_rng_alone(lambda: models.resolve_model_path("smollm2-135m-instruct"))
    return models.load_tokenizer("tiny-random-llama")


@pytest.fixture()
def tiny_model(tokenizer):
    from deal_train.model.loading import load_model

    return load_model("tiny-random-llama", tokenizer)


TINY_METHOD = dict(model="tiny-random-llama", tasks=["dbpedia", "amazon"], max_train_samples=8, max_test_samples=2,
                   per_device_train_batch_size=4, max_source_length=128, learning_rate=5e-3, deal_learning_rate=5e-3,
                   lora_rank=4, deal_mlp_hidden=8, replay_samples_per_task=3, ewc_fisher_batches=2,
                   output_dir="unused")


@pytest.fixture()
def tiny_method(tokenizer, data_dir):
    """``tiny_method(name, **overrides)`` -> (cfg, tokenised task data, method, wrapped tiny model), built as
    ``loop.run`` builds them: dbpedia then amazon, 8 training rows each, LoRA rank 4 (alpha 32); pass
    ``model="tiny-random-t5"`` for the encoder-decoder."""
    from deal_train.config import TrainConfig
    from deal_train.data import encoder_for
    from deal_train.train.loop import prepare_data, tokenise
    from deal_train.methods import get_method
    from deal_train.model.loading import load_model

    def make(name: str, **overrides):
        cfg = TrainConfig(method=name, **{**TINY_METHOD, **overrides})
        datas = prepare_data(cfg)
        method = get_method(cfg)
        base = load_model(cfg.model, tokenizer)
        tokenise(datas, encoder_for(base.config, tokenizer, cfg.max_source_length, cfg.max_target_length, True),
                 method)
        return cfg, datas, method, method.wrap(base)

    return make


TINY_RUN = dict(model="tiny-random-llama", tasks=["dbpedia", "amazon"], max_train_samples=8, max_test_samples=4,
                per_device_train_batch_size=4, max_source_length=128, max_new_tokens=3, per_device_eval_batch_size=4,
                learning_rate=5e-3, lora_rank=4, replay_samples_per_task=3, ewc_fisher_batches=2)
"""The settings of the shared two-task runs (``finished_run``)."""


TINY_T5_RUN = dict(model="tiny-random-t5", tasks=["dbpedia", "amazon"], max_train_samples=4, max_test_samples=2,
                   per_device_train_batch_size=4, max_source_length=128, max_new_tokens=2, per_device_eval_batch_size=2,
                   learning_rate=5e-3, lora_rank=4, deal_mlp_hidden=8, replay_samples_per_task=2, ewc_fisher_batches=1)
"""Two-task runs on the tiny random T5 (``finished_t5_run``), one optimizer step per task to stay fast."""


def _run_cache(root, settings: dict):
    """``get(method)`` -> (cfg, metrics, trained_batches) for ``settings``, one run per method, cached."""
    from deal_train.train import loop, task
    from deal_train.config import TrainConfig

    cache = {}

    def get(method: str):
        if method not in cache:
            cfg = TrainConfig(method=method, output_dir=str(root / method), **settings)
            trained: list[list[int]] = []
            collate = task.collate_train

            def recording_collate(features, pad_token_id, shared_prefix=False):
                trained.extend(list(f["input_ids"]) for f in features)
                return collate(features, pad_token_id, shared_prefix)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(task, "collate_train", recording_collate)
                # another test may have run this method into the shared root already (test_compare runs
                # seq_lora there through compare): run it again over that run, so its batches are recorded here
                # (the cached cfg itself does not overwrite: tests resume from copies of it)
                again = (root / method / "metrics.json").exists()
                metrics = loop.run(dataclasses.replace(cfg, overwrite_output_dir=True) if again else cfg)
            cache[method] = (cfg, metrics, trained)
        return cache[method]

    get.root = root
    return get


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """``finished_run(method)`` -> (cfg, metrics, trained_batches): one two-task run per method per session, with
    the token ids of every training row collated (in order), recorded by wrapping ``train.task.collate_train``."""
    return _run_cache(tmp_path_factory.mktemp("runs"), TINY_RUN)


@pytest.fixture(scope="session")
def finished_t5_run(tmp_path_factory):
    """``finished_t5_run(method)``: as ``finished_run``, on the tiny random T5 (encoder-decoder)."""
    return _run_cache(tmp_path_factory.mktemp("t5_runs"), TINY_T5_RUN)


def forget_last_task(out) -> bytes:
    """Simulate a crash during task 2 of a finished two-task run in ``out`` (a pathlib.Path): metrics.json says one
    task is done and task 2's adapter was never written. Returns the bytes of the task-2 adapter it removed."""
    import json
    import shutil

    final = (out / "adapters" / "2-amazon" / "adapter_model.safetensors").read_bytes()
    saved = json.loads((out / "metrics.json").read_text())
    saved.update(finished=False, completed_tasks=1, per_task=saved["per_task"][:1])
    for row in saved["accuracy_matrix"]:
        row[1] = None
    (out / "metrics.json").write_text(json.dumps(saved))
    shutil.rmtree(out / "adapters" / "2-amazon")
    return final


def varied_tiny_llama(tokenizer):
    """A tiny LLaMA whose untied, large random output layer gives varied tokens (the tied test model only repeats its
    input), with a rank-4 LoRA of non-zero B on q/v, so padding, position or mask errors would change the argmax."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from deal_train.model.loading import tiny_llama_config

    config = tiny_llama_config(tokenizer)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        base.lm_head.weight.normal_(0.0, 1.0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def predictions_on_test_rows(model, tokenizer, cfg, task_index: int) -> list[str]:
    """Greedy predictions of ``model`` on task ``task_index``'s test rows of the run ``cfg`` (the rows and prompts
    the loop evaluates), one string per row."""
    from deal_train.data import Encoder, load_task
    from deal_train.train import loop
    from deal_train.train.evaluation import generate_predictions

    datas = loop.prepare_data(cfg)
    enc = Encoder(tokenizer, cfg.max_source_length, cfg.max_target_length, True)
    task = load_task(cfg.resolved_data_dir(), cfg.tasks[task_index])
    feats, _ = enc.eval_features(task, datas[task_index].test_rows)
    preds = generate_predictions(model, tokenizer, feats, cfg.per_device_eval_batch_size, cfg.max_new_tokens)
    return [p["prediction"] for p in preds]


def saved_predictions(out: pathlib.Path, after: str, task_file: str) -> list[str]:
    """The predictions a run in ``out`` wrote to ``predictions/<after>/<task_file>``, one string per row."""
    import json

    lines = (out / "predictions" / after / task_file).read_text().splitlines()
    return [json.loads(x)["prediction"] for x in lines]
