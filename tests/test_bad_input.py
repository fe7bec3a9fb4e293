"""Bad input found by trying the trainer as a new user would: each case gives one clear message (exit 2) or is
supported, and a run never saves a broken task. Every test here failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deal_train.cli import run_cli
from deal_train.config import ConfigError, TrainConfig
from deal_train.data import build_prompt
from deal_train.data.files import read_tasks_file
from deal_train.data.tasks import load_task
from deal_train.deal import DRIFT_FLOOR_FRACTION, DEALFactor, set_drift_floors
from deal_train.train.loop import TrainingError, run

TINY = ["--model", "tiny-random-llama", "--tasks", "dbpedia,amazon", "--max_train_samples", "4",
        "--max_test_samples", "2", "--per_device_train_batch_size", "4", "--max_source_length", "128",
        "--max_new_tokens", "2", "--per_device_eval_batch_size", "2"]


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate", "inf"], "'learning_rate' must be a finite number, got inf"),
    (["--learning_rate", "nan"], "'learning_rate' must be a finite number, got nan"),
    (["--deal_lambda_drift=-inf"], "'deal_lambda_drift' must be a finite number"),
    (["--max_grad_norm", "inf"], "'max_grad_norm' must be a finite number"),
    (["--lora_dropout", "1.5"], "'lora_dropout' must be in [0, 1)"),
    (["--lora_dropout", "1"], "'lora_dropout' must be in [0, 1)"),
    (["--lora_alpha", "0"], "'lora_alpha' must be > 0"),
])
def test_bad_float_options_exit_2_before_anything_loads(argv, message, tmp_path, capsys):
    code = run_cli(run, [*TINY, "--output_dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_fp16_on_a_cpu_is_refused_not_silently_fp32(tmp_path, data_dir):
    """From the shell: Accelerate's state (mixed precision included) is per process."""
    proc = subprocess.run([sys.executable, "-m", "deal_train", *TINY, "--method", "seq_lora", "--mixed_precision",
                           "fp16", "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fp16 does nothing on a CPU" in proc.stderr and "bf16" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_adapter_that_training_made_non_finite_is_never_saved(tmp_path, data_dir):
    """Task 2 (DEAL) takes one optimizer step whose loss and gradient are finite, but at deal_learning_rate 1e30
    its filter and MLP parameters land near 1e30 and the folded factors overflow to inf: the run stops with
    TrainingError instead of saving task 2 as finished; task 1 stays saved."""
    out = tmp_path / "run"
    cfg = TrainConfig(method="deal", model="tiny-random-llama", tasks=["dbpedia", "amazon"], max_train_samples=4,
                      max_test_samples=2, per_device_train_batch_size=4, max_source_length=128, max_new_tokens=2,
                      lora_rank=4, deal_learning_rate=1e30, max_grad_norm=0.0, output_dir=str(out))
    with pytest.raises(TrainingError, match=r"Task 'amazon': after training, \d+ adapter tensor\(s\) hold NaN/inf"):
        run(cfg)
    assert (out / "adapters" / "1-dbpedia" / "adapter_model.safetensors").is_file()
    assert not (out / "adapters" / "2-amazon").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["completed_tasks"] == 1 and not saved["finished"]
    assert all(p["skipped_nonfinite_steps"] == 0 for p in saved["per_task"])  # no step saw a non-finite loss


def test_deal_with_a_rank_above_a_layers_width_trains_and_folds(tmp_path, data_dir):
    """tiny LLaMA's v_proj has 32 outputs; rank 33 gives lora_B factors (32 × 33) with 32 singular values."""
    out = tmp_path / "run"
    cfg = TrainConfig(method="deal", model="tiny-random-llama", tasks=["dbpedia", "amazon"], max_train_samples=4,
                      max_test_samples=2, per_device_train_batch_size=4, max_source_length=128, max_new_tokens=2,
                      lora_rank=33, learning_rate=5e-3, deal_learning_rate=5e-3, output_dir=str(out))
    metrics = run(cfg)
    assert metrics["finished"]
    first, second = (load_file(out / "adapters" / t / "adapter_model.safetensors") for t in ("1-dbpedia", "2-amazon"))
    narrow = [k for k in second if "v_proj.lora_B" in k]
    assert narrow and all(second[k].shape == (32, 33) for k in narrow)
    assert all(torch.isfinite(t).all() for t in second.values())
    assert any(not torch.equal(first[k], second[k]) for k in second)  # task 2 changed the adapter


def test_spectral_gains_follow_the_thin_svd_when_the_rank_exceeds_the_width():
    torch.manual_seed(0)
    weight = torch.randn(4, 6)  # a lora_B of width n = 4 and rank r = 6: 4 singular values
    factor = DEALFactor(weight, transpose=False, num_scales=3, hidden=5, activation="gelu")
    layer = factor.retention.layers[0]
    assert layer.gains.shape == (3, 4) and layer.s.shape == (4,)
    assert torch.equal(factor(weight), weight)  # identity at start: exact by construction (Y + a zero correction)
    with torch.no_grad():
        layer.gains.add_(0.5)
    out = factor(weight)
    assert out.shape == weight.shape and not torch.allclose(out, weight)


def _factors(b_scale: float) -> list[DEALFactor]:
    torch.manual_seed(0)
    a = DEALFactor(torch.randn(4, 16), transpose=True, num_scales=2, hidden=4, activation="gelu", residual=True)
    b = DEALFactor(b_scale * torch.randn(16, 4), transpose=False, num_scales=2, hidden=4, activation="gelu",
                   residual=True)
    return [a, b]


def test_drift_of_an_all_zero_history_stays_on_the_adapters_scale():
    a, b = factors = _factors(0.0)
    set_drift_floors(factors)
    floor = DRIFT_FLOOR_FRACTION * a.history.pow(2).sum() / 2  # the mean energy of all factors (B's is 0)
    assert b.drift_floor == pytest.approx(float(floor), rel=1e-6)
    with torch.no_grad():
        b.residual.fill_(1e-2)  # one small step of the residual
    drift = b.drift()
    assert torch.isfinite(drift)
    torch.testing.assert_close(drift, b.residual.pow(2).sum() / floor, rtol=1e-5, atol=0)
    assert drift < 100  # the old division by the 1e-12 clamp gave 1.6e9 here


def test_drift_floor_leaves_a_normal_history_almost_alone():
    a, b = factors = _factors(0.5)
    set_drift_floors(factors)
    with torch.no_grad():
        b.residual.fill_(1e-2)
    plain = b.residual.pow(2).sum() / b.history.pow(2).sum()
    torch.testing.assert_close(b.drift(), plain, rtol=2 * DRIFT_FLOOR_FRACTION, atol=0)
    assert a.drift() == 0


def _cl_task(root, labels: list[str], train: list[dict], test: list[dict]) -> str:
    task_dir = root / "TC" / "agnews"
    task_dir.mkdir(parents=True)
    (task_dir / "labels.json").write_text(json.dumps(labels))
    (task_dir / "train.json").write_text(json.dumps(train))
    (task_dir / "test.json").write_text(json.dumps(test))
    return str(root)


@pytest.mark.parametrize("labels,pair", [
    (["positive", "positive ", "negative"], "'positive' and 'positive '"),
    (["Positive.", "negative", "positive"], "'Positive.' and 'positive'"),
])
def test_labels_that_exact_match_cannot_tell_apart_are_refused(tmp_path, labels, pair):
    root = _cl_task(tmp_path, labels, [], [])
    with pytest.raises(ConfigError, match="are the same answer to exact match") as err:
        load_task(root, "agnews")
    assert pair in str(err.value) and "labels.json" in str(err.value)


def test_labels_with_a_comma_are_quoted_in_the_option_list(tmp_path):
    root = _cl_task(tmp_path, ["yes, definitely", "no"], [], [])
    prompt = build_prompt(load_task(root, "agnews"), "Is it?")
    assert 'Option: "yes, definitely", "no" \n' in prompt
    plain = build_prompt(load_task(_cl_task(tmp_path / "b", ["yes", "no"], [], []), "agnews"), "Is it?")
    assert "Option: yes, no \n" in plain  # the reference format is kept when no label holds a comma


def test_rows_in_both_train_and_test_are_counted_and_warned(tmp_path, capsys):
    train = [{"sentence": f"text {i}", "label": "World" if i % 2 else "Sports"} for i in range(6)]
    test = [train[0], train[3], {"sentence": "new text", "label": "World"}]
    root = _cl_task(tmp_path, ["World", "Sports"], train, test)
    out = tmp_path / "run"
    metrics = run(TrainConfig(method="seq_lora", model="tiny-random-llama", tasks=["agnews"], data_dir=root,
                              validation_rows=0, max_train_samples=4, per_device_train_batch_size=4,
                              max_source_length=128, max_new_tokens=2, output_dir=str(out)))
    assert metrics["train_test_overlap"] == {"agnews": 2}
    assert "warning: task agnews: 2 test rows have a sentence that is also in the training file" in \
        capsys.readouterr().out


@pytest.mark.parametrize("key", ["train", "labels"])
def test_an_unset_variable_in_a_tasks_file_path_is_named(tmp_path, monkeypatch, key):
    monkeypatch.delenv("DEAL_TRAIN_TEST_UNSET", raising=False)
    paths = {"train": "train.json", "test": "test.json", "labels": "[a, b]"}
    paths[key] = "${DEAL_TRAIN_TEST_UNSET}/" + ("labels.json" if key == "labels" else "train.json")
    path = tmp_path / "tasks.yaml"
    path.write_text(f"tasks:\n  - name: t\n    labels: {paths['labels']}\n    train: {paths['train']}\n"
                    f"    test: {paths['test']}\n")
    with pytest.raises(ConfigError) as err:
        read_tasks_file(str(path))
    message = str(err.value)
    assert "environment variable DEAL_TRAIN_TEST_UNSET, which is not set" in message
    assert f"'{key}: ${{DEAL_TRAIN_TEST_UNSET}}" in message and "task 't'" in message


def test_a_set_variable_in_a_tasks_file_path_is_expanded(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.setenv("DEAL_TRAIN_TEST_DIR", str(tmp_path / "d"))
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  - name: t\n    labels: [a, b]\n    train: $DEAL_TRAIN_TEST_DIR/train.json\n"
                    "    test: ${DEAL_TRAIN_TEST_DIR}/test.json\n")
    files = read_tasks_file(str(path))["t"].files
    assert files == {"train": os.path.join(str(tmp_path / "d"), "train.json"),
                     "test": os.path.join(str(tmp_path / "d"), "test.json")}
