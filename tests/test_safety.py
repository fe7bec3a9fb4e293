"""Safe by default: YAML's safe loader, safetensors-only weights unless pickle is allowed explicitly, no code shipped
with a model runs unless trust_remote_code is set, no config value reaches a shell, and names cannot leave
output_dir."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest
import torch

from deal_train.cli import run_cli
from deal_train.config import ConfigError, TrainConfig
from deal_train.train.loop import run
from deal_train.model.loading import load_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_yaml_tags_that_run_code_are_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text(f'method: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert run_cli(run, ["--config", str(cfg_file)]) == 2
    assert f"Config file {cfg_file} is not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


@pytest.fixture()
def tiny_dir(tokenizer, tiny_model, tmp_path):
    """The tiny model saved as a local model directory (config, tokenizer; weights added by each test)."""
    path = tmp_path / "model"
    tiny_model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _refused_run(model_dir, capsys) -> str:
    """Train on ``model_dir`` (one task, two rows) and return the error the CLI printed; asserts it refused the
    run (exit code 2) before writing any metrics."""
    out = model_dir.parent / "o"
    code = run_cli(run, ["--model", str(model_dir), "--tasks", "agnews", "--max_train_samples", "2",
                         "--max_test_samples", "2", "--output_dir", str(out)])
    assert code == 2
    assert not (out / "metrics.json").exists()
    return capsys.readouterr().err


def test_pickle_weights_need_an_explicit_opt_in(tiny_dir, tiny_model, tokenizer, data_dir, capsys):
    torch.save(tiny_model.state_dict(), tiny_dir / "pytorch_model.bin")
    err = _refused_run(tiny_dir, capsys)
    assert f"Model '{tiny_dir}' has only pickle-based weights (pytorch_model.bin)" in err
    assert "--allow_pickle_weights true" in err
    loaded = load_model(str(tiny_dir), tokenizer, allow_pickle=True)  # the opt-in loads them
    want = tiny_model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def test_code_shipped_with_a_model_does_not_run_by_default(tiny_dir, tiny_model, data_dir, capsys):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items() if k != "lm_head.weight"},
              tiny_dir / "model.safetensors")
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (tiny_dir / "config.json").write_text(json.dumps(config))
    marker = tiny_dir.parent / "PWNED"
    (tiny_dir / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    err = _refused_run(tiny_dir, capsys)
    assert f"Model '{tiny_dir}' ships its own Python code, which is not run by default" in err
    assert "--trust_remote_code true" in err
    assert not marker.exists()
    assert TrainConfig().trust_remote_code is False and TrainConfig().allow_pickle_weights is False


def test_no_config_value_reaches_a_shell():
    """No module of the package starts a shell or a subprocess (the slurm/ scripts pass arguments as "$@" words,
    tested in test_slurm.py)."""
    offending = []
    for path in sorted((REPO / "deal_train").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n in ("subprocess", "pty", "commands") for n in names if n):
                    offending.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen", "execv", "execvp", "spawnv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                offending.append(f"{path.name}:{node.lineno} os.{node.attr}")
            if isinstance(node, ast.keyword) and node.arg == "shell":
                offending.append(f"{path.name}:{node.lineno} shell=")
    assert offending == []


def test_names_cannot_leave_output_dir(tmp_path, capsys):
    from deal_train.tools.compare import main as compare_main
    from deal_train.tools.sweep import parse_grid, point_configs

    assert compare_main(["--methods", "deal,../x", "--output_dir", str(tmp_path / "c")]) == 2
    assert "unknown: ../x" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()
    base = TrainConfig(output_dir=str(tmp_path / "s"))
    for _name, _settings, cfg in point_configs(base, parse_grid(["model=../../x,/abs/y,..", "seed=1"])):
        assert pathlib.Path(cfg.output_dir).resolve().parent == (tmp_path / "s").resolve()
    with pytest.raises(ConfigError, match="Unknown task '../x'"):
        from deal_train.data import task_sequence

        task_sequence("tc", 1, ["../x"])
