"""Failure behaviour, for real on the tiny model: non-finite losses stop the run with a clear message
and keep earlier tasks' outputs; bad input exits with code 2 before anything trains."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from deal_train.config import TrainConfig
from deal_train.loop import TrainingError, run

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_diverging_task_stops_with_message_and_keeps_earlier_tasks(tmp_path):
    # task 2 is trained by DEAL with an absurd learning rate: its loss becomes inf/NaN after one step
    cfg = TrainConfig(method="deal", model="tiny-random-llama", tasks=["agnews", "amazon"], max_train_samples=40,
                      max_test_samples=4, per_device_train_batch_size=2, max_source_length=128, max_new_tokens=2,
                      lora_rank=4, deal_learning_rate=1e30, max_grad_norm=0.0, max_nonfinite_steps=3,
                      output_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingError, match="3 consecutive optimizer steps had a NaN/inf"):
        run(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["completed_tasks"] == 1 and not saved["finished"]
    assert (tmp_path / "run" / "adapters" / "1-agnews" / "adapter_model.safetensors").is_file()


BAD_INPUT = [
    (["--tasks", "agnews,nope"], "Unknown task 'nope'"),
    (["--benchmark", "huge"], "'benchmark' = 'huge' is not one of"),
    (["--data_dir", "/nonexistent/cl"], "Data directory not found: /nonexistent/cl"),
    (["--target_modules", "q_proj,not_a_layer"], "target_modules ['not_a_layer'] match no linear layer"),
    (["--model", "/nonexistent/model"], "Model path not found: /nonexistent/model"),
]


def _argv(tmp_path, args):
    return ["--model", "tiny-random-llama", "--tasks", "agnews", "--max_train_samples", "4", "--max_test_samples",
            "2", "--output_dir", str(tmp_path / "o"), *args]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_2_with_message(tmp_path, capsys, args, message):
    from deal_train.cli import run_cli

    assert run_cli(run, _argv(tmp_path, args)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()  # nothing trained


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deal_train", *_argv(tmp_path, BAD_INPUT[3][0])],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert BAD_INPUT[3][1] in proc.stderr and "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "deal_train", *_argv(tmp_path, BAD_INPUT[0][0]), "--debug"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
