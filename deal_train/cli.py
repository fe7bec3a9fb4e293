"""Command line: ``python -m deal_train --config file.yaml [--key value ...]``.

Precedence: defaults < YAML file < command line. Bad input exits with code 2 and one message,
no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence


from .config import (OPTIONAL_FLOAT, apply_profile, ConfigError, TrainConfig, coerce_value, config_fields, read_yaml,
                     validate)
from .methods import METHOD_NAMES, check_method_name


def _fmt_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) if value else "(empty)"
    if value == "":
        return "(empty)"
    if value is None:
        return "null"
    return str(value)


def build_parser(prog: str = "deal_train", description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config``, ``--debug`` and one ``--<key>`` option per config key."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or "Continual LoRA fine-tuning with DEAL and its baselines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of config keys (command-line options win).")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks for errors.")
    for name, typ, default, meta in config_fields():
        help_text = meta["help"]
        choices = METHOD_NAMES if name == "method" else meta.get("choices")
        if choices is not None:
            help_text += f" Choices: {', '.join(map(str, choices))}."
        help_text += f" Default: {_fmt_default(default)}."
        metavar = ("BOOL" if typ is bool else "A,B,..." if typ == list[str] else "FLOAT|null" if typ == OPTIONAL_FLOAT
                   else typ.__name__.upper())
        parser.add_argument(f"--{name}", dest=name, default=None, metavar=metavar, help=help_text)
    parser.add_argument("--allow-unordered-norms", dest="allow_unordered_norms", action="store_const", const="true",
                        help="Flag form of --allow_unordered_norms true.")
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config with the safe loader.

    Raises:
        ConfigError: missing file, YAML syntax error, or a top level that is not a mapping.
    """
    data = read_yaml(path, "Config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of key: value, got {type(data).__name__}.")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the YAML file named by ``--config`` and command-line values into a validated config.

    Raises:
        ConfigError: unknown key in the YAML file, a value of the wrong type, or a value out of range.
    """
    fields = {name: (typ, default) for name, typ, default, _ in config_fields()}
    values: dict[str, Any] = {}
    if args.config:
        data = load_yaml(args.config)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"Config file {args.config}: unknown key(s) {', '.join(unknown)}. "
                              f"Run with --help to list the valid keys.")
        for key, value in data.items():
            values[key] = coerce_value(key, fields[key][0], value, f"config file {args.config}")
    for key, (typ, _default) in fields.items():
        raw = getattr(args, key, None)
        if raw is not None:
            values[key] = coerce_value(key, typ, raw, "command line")
    cfg = TrainConfig(**apply_profile(values))
    validate(cfg)
    check_method_name(cfg.method)
    return cfg


def run_cli(main: Callable[[TrainConfig], Any], argv: Sequence[str] | None = None, prog: str = "deal_train",
            parser: argparse.ArgumentParser | None = None) -> int:
    """Parse ``argv``, build the config and call ``main(cfg)``; returns the exit code: 0 done, 2 bad input
    (``ConfigError``), 1 ``TrainingError``, 128 + signal number when a signal stopped training after a checkpoint
    (``TrainingStopped``: 130 SIGINT, 143 SIGTERM, 138 SIGUSR1), 130 on a second Ctrl-C."""
    parser = parser or build_parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        main(cfg)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .train.checkpointing import TrainingStopped
        from .train.task import TrainingError

        if isinstance(err, TrainingStopped) and not args.debug:
            print(f"\nstopped: {err}", file=sys.stderr)
            return err.exit_code
        if args.debug or not isinstance(err, TrainingError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted. Finished tasks and step checkpoints are saved in the output directory; rerun the same "
              "command to resume.", file=sys.stderr)
        return 130
    return 0


def quiet_libraries() -> None:
    """Keep library noise (weight-loading progress bars, deprecation warnings of dependencies) off the console."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from .model.precision import quiet_bitsandbytes

    quiet_bitsandbytes()
    logging.getLogger("DeepSpeed").addFilter(_DeepSpeedCpuFallback())


class _DeepSpeedCpuFallback(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU ... unable to detect it" warning, which its import prints on
    every machine without a GPU (transformers and Accelerate import DeepSpeed whenever it is installed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def run(cfg: TrainConfig) -> dict:
    """Train ``cfg`` (``train.loop.run``) and return its metrics, or with ``dry_run`` print and return its plan
    (``train.plan``)."""
    if cfg.dry_run:
        from .train.plan import dry_run

        return dry_run(cfg)
    from .train.loop import run as train_run

    return train_run(cfg)


def train(cfg: TrainConfig) -> None:
    """``run(cfg)`` with the training loop imported only now (torch, transformers, PEFT take seconds to import),
    so ``--help`` and bad options answer at once."""
    quiet_libraries()
    run(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train`` / ``accelerate launch -m deal_train``."""
    return run_cli(train, argv)
