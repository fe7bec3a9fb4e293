"""Shared fixtures: a per-session model cache, the real benchmark directory, a tiny tokenizer/model."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("DEAL_TRAIN_DATA_DIR") or str((REPO / ".." / "shared" / "cl_benchmark").resolve())

# Tests write only to temporary directories: the converted SmolLM2 cache goes to a session temp dir
# unless the caller points DEAL_TRAIN_CACHE somewhere on purpose.
if not os.environ.get("DEAL_TRAIN_CACHE"):
    os.environ["DEAL_TRAIN_CACHE"] = tempfile.mkdtemp(prefix="deal_train_cache_")
os.environ["DEAL_TRAIN_DATA_DIR"] = DATA_DIR
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not os.path.isdir(DATA_DIR):
        pytest.fail(f"benchmark data not found at {DATA_DIR}; set DEAL_TRAIN_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer():
    from deal_train.models import load_tokenizer

    return load_tokenizer("tiny-random-llama")


@pytest.fixture()
def tiny_model(tokenizer):
    from deal_train.models import load_model

    return load_model("tiny-random-llama", tokenizer)
