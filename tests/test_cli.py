"""Command line: --help, precedence of defaults < YAML < command line, clear errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deal_train.cli import build_parser, config_from_args, run_cli

REQUIRED_KEYS = ["method", "benchmark", "order", "data_dir", "model", "lora_rank", "lora_alpha", "target_modules",
                 "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_samples",
                 "max_test_samples", "max_source_length", "max_new_tokens", "seed", "output_dir"]


def test_help_lists_every_key_with_default():
    out = subprocess.run([sys.executable, "-m", "deal_train", "--help"], capture_output=True, text=True, check=True)
    for key in REQUIRED_KEYS:
        assert f"--{key}" in out.stdout
    text = " ".join(out.stdout.split())  # argparse wraps help lines
    assert "Default: deal" in text and "Empty: chosen from the model type" in text


@pytest.mark.parametrize("tool", ["compare", "sweep"])
def test_tools_keep_bitsandbytes_noise_off_the_console(tool):
    """The tools import the loop (and so PEFT, which imports bitsandbytes) at module import; bitsandbytes' CPU-only
    warnings must not reach the user's console there either."""
    out = subprocess.run([sys.executable, "-m", f"deal_train.{tool}", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--method" in out.stdout
    assert "gemm_4bit" not in out.stderr and "bitsandbytes" not in out.stderr, out.stderr[-2000:]


def test_yaml_then_command_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: seq_lora\nlora_rank: 4\ntarget_modules: [q_proj]\nlearning_rate: 1.0e-3\n")
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["--config", str(cfg_file), "--lora_rank", "16",
                                              "--target_modules", "q_proj,k_proj"]))
    assert cfg.method == "seq_lora" and cfg.lora_rank == 16 and cfg.learning_rate == 1e-3
    assert cfg.target_modules == ["q_proj", "k_proj"]
    assert cfg.order == 1  # default kept


@pytest.mark.parametrize("argv,message", [
    (["--lora_rank", "zero"], "lora_rank' expects a int"),
    (["--lora_rank", "0"], "lora_rank' must be > 0"),
    (["--method", "magic"], "'method' = 'magic' is not one of"),
    (["--config", "/nonexistent.yaml"], "Config file not found"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys):
    code = run_cli(lambda cfg: None, argv)
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_yaml_key(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora_rnak: 4\n")
    assert run_cli(lambda cfg: None, ["--config", str(cfg_file)]) == 2
    assert "unknown key(s) lora_rnak" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    cfg = config_from_args(build_parser().parse_args(["--config", str(path)]))
    assert cfg.method in ("deal", "seq_lora") and cfg.output_dir.startswith("outputs/")
