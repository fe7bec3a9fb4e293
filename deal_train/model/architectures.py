"""Published model architectures written as code, for benchmarks and dry runs with no hub access.

``--model t5-large-arch`` / ``llama-3.1-8b-arch`` / ``smollm2-135m-arch`` build a *randomly initialised*
model of that published architecture (speed and memory do not depend on the weights' values). The configs
are copied from the models' published ``config.json`` files (numbers only):

* ``t5-large-arch``: T5 v1.0 large (the paper's encoder-decoder, Table 4), 24 + 24 layers, d_model 1024,
  d_ff 4096, 16 heads of 64, vocabulary 32,128; about 738M parameters.
* ``llama-3.1-8b-arch``: LLaMA-3.1-8B (the paper's decoder-only backbone), 32 layers, hidden 4096,
  intermediate 14,336, 32 query / 8 KV heads, vocabulary 128,256; about 8.0B parameters.
* ``smollm2-135m-arch``: SmolLM2-135M, 30 layers, hidden 576, intermediate 1536, 9 query / 3 KV heads,
  vocabulary 49,152, tied embeddings; about 135M parameters.

Token ids fed to an architecture-only model must be below its ``vocab_size``; a benchmark draws them at
random or uses a tokenizer whose ids fit.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig, T5Config

ARCH_SUFFIX = "-arch"

HUB_IDS = {
    "t5-large-arch": "google-t5/t5-large",
    "llama-3.1-8b-arch": "meta-llama/Llama-3.1-8B",
    "smollm2-135m-arch": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
"""The Hub model each architecture reproduces (for the record and for paper profiles' dry runs)."""


def _t5_large() -> PretrainedConfig:
    return T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24,
                    num_heads=16, relative_attention_num_buckets=32, dropout_rate=0.1, feed_forward_proj="relu",
                    tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _llama_31_8b() -> PretrainedConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       bos_token_id=128000, eos_token_id=128001)


def _smollm2_135m() -> PretrainedConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


ARCHITECTURES = {
    "t5-large-arch": _t5_large,
    "llama-3.1-8b-arch": _llama_31_8b,
    "smollm2-135m-arch": _smollm2_135m,
}
"""Name -> function returning a fresh ``PretrainedConfig`` of that architecture."""


def is_architecture(name: str) -> bool:
    """True when ``name`` is one of ``ARCHITECTURES`` (an architecture-only model)."""
    return name in ARCHITECTURES


def architecture_config(name: str) -> PretrainedConfig:
    """A fresh config of the published architecture ``name``.

    Raises:
        KeyError: ``name`` is not in ``ARCHITECTURES`` (the message lists the known names).
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"Unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]()


def is_encoder_decoder(name: str) -> bool:
    """True for encoder-decoder architectures (T5)."""
    return bool(getattr(architecture_config(name), "is_encoder_decoder", False))
