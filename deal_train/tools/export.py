"""``python -m deal_train.export --adapter <dir> --merge --output <dir>``: a standalone model from a saved adapter.

Loads the adapter's base model (``--model``, else the adapter's ``base_model_name_or_path``, else the ``model`` of
the run whose ``adapters/`` folder holds the adapter), applies the adapter with stock
``PeftModel.from_pretrained``, folds it into the base weights with PEFT's ``merge_and_unload`` and saves model and
tokenizer (safetensors) with ``save_pretrained``, atomically. Works for decoder-only and encoder-decoder models;
the result loads with ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM.from_pretrained(<output>)`` and needs
neither PEFT nor deal_train. Bad input exits with code 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..config import ConfigError
from ..outputs import atomic_write_dir, run_of_adapter

ADAPTER_CONFIG = "adapter_config.json"


def base_model_name(adapter_dir: str, override: str | None = None) -> str:
    """The base model to load for ``adapter_dir``: ``override``, else ``base_model_name_or_path`` of its
    ``adapter_config.json``, else ``config.model`` of ``<run>/metrics.json`` when the adapter is
    ``<run>/adapters/<k>-<task>``.

    Raises:
        ConfigError: no adapter config in ``adapter_dir``, or no base model can be found (asks for ``--model``).
    """
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{adapter_dir} holds no {ADAPTER_CONFIG}: pass the directory of a saved PEFT adapter, "
                          f"e.g. <output_dir>/adapters/2-amazon.")
    if override:
        return override
    with open(path, encoding="utf-8") as fh:
        name = json.load(fh).get("base_model_name_or_path")
    if name:
        return name
    metrics = run_of_adapter(adapter_dir).metrics
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as fh:
            name = json.load(fh).get("config", {}).get("model")
        if name:
            return name
    raise ConfigError(f"{path} names no base model and no run's metrics.json lies above it: pass --model.")


def export_merged(adapter_dir: str, output_dir: str, model: str | None = None) -> str:
    """Merge the adapter in ``adapter_dir`` into its base model and save the result in ``output_dir``.

    Returns:
        The base model name used.
    Raises:
        ConfigError: missing adapter, unknown base model, or an adapter that does not fit the base model.
    """
    from peft import PeftModel

    from ..model.loading import load_model, load_tokenizer

    name = base_model_name(adapter_dir, model)
    tokenizer = load_tokenizer(name)
    base = load_model(name, tokenizer)
    try:
        peft_model = PeftModel.from_pretrained(base, adapter_dir)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"The adapter in {adapter_dir} does not fit base model '{name}': {err}") from None
    merged = peft_model.merge_and_unload()

    def write(tmp: str) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_write_dir(output_dir, write)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train.export``; returns the exit code (0, or 2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m deal_train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="Directory of a saved adapter (adapters/<k>-<task>).")
    parser.add_argument("--merge", action="store_true",
                        help="Merge the adapter into the base weights (PEFT merge_and_unload); required.")
    parser.add_argument("--output", required=True, help="Directory for the standalone model and tokenizer.")
    parser.add_argument("--model", default=None, help="Base model (id, directory or alias); default: the adapter's "
                                                     "base_model_name_or_path or its run's model.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks for errors.")
    args = parser.parse_args(argv)
    from ..cli import quiet_libraries

    quiet_libraries()
    try:
        if not args.merge:
            raise ConfigError("Nothing to do: pass --merge to write a standalone model with the adapter merged in "
                              "(the adapter directory itself is already a plain PEFT adapter).")
        name = export_merged(args.adapter, args.output, args.model)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Merged {args.adapter} into {name}; standalone model saved in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
