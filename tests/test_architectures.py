"""Architecture-only models through ``deal_train.model.loading``: the published configs build the right model classes (on
the meta device here: no memory), seeded random weights, and a tokenizer whose ids fit (or a flag that they do
not)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5ForConditionalGeneration

from deal_train.model import architectures
from deal_train.config import ConfigError
from deal_train.model.loading import build_architecture, load_model, load_tokenizer, resolve_model_path, token_ids_fit

from conftest import FIRST_CONVERSION, leaves_rng_alone


@pytest.mark.parametrize("name, cls, vocab, fits", [
    ("smollm2-135m-arch", LlamaForCausalLM, 49152, True),
    ("llama-3.1-8b-arch", LlamaForCausalLM, 128256, True),
    ("t5-large-arch", T5ForConditionalGeneration, 32128, False),
])
def test_published_architectures_build(tokenizer, name, cls, vocab, fits):
    model = build_architecture(name, tokenizer, device="meta")
    assert isinstance(model, cls) and model.config.vocab_size == vocab and not model.training
    assert all(p.device.type == "meta" for p in model.parameters())
    assert token_ids_fit(name, tokenizer) is fits
    if fits:  # SmolLM2's ids (and its pad token) are used as they are
        assert model.config.pad_token_id == tokenizer.pad_token_id


def test_architecture_names_load_through_the_model_functions(tokenizer, monkeypatch):
    small = lambda: LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setitem(architectures.ARCHITECTURES, "llama-test-arch", small)
    tok = load_tokenizer("llama-test-arch")
    assert tok.get_vocab() == tokenizer.get_vocab()
    a, b = load_model("llama-test-arch", tok), load_model("llama-test-arch", tok)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded
    ids = torch.tensor([tok("Answer: Company")["input_ids"]])
    assert a(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    with pytest.raises(ConfigError, match="Unknown architecture"):
        build_architecture("gpt-5-arch")


def test_first_smollm2_conversion_leaves_the_global_rng_alone(tokenizer, tmp_path, monkeypatch):
    """The first use of SmolLM2 converts its GGUF into the cache and draws random initial weights on the way; it
    must not move the global RNG, or a run on a fresh machine would initialise its LoRA factors differently from
    the same run later (found as a ZeRO-2 test that failed only when run on its own)."""
    if "rng_untouched" not in FIRST_CONVERSION:  # the session's cache was filled before: convert into an empty one
        monkeypatch.setenv("DEAL_TRAIN_CACHE", str(tmp_path))
        FIRST_CONVERSION["rng_untouched"] = leaves_rng_alone(lambda: resolve_model_path("smollm2-135m-instruct"))
    assert FIRST_CONVERSION["rng_untouched"]
