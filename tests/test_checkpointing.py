"""Step checkpoints and resume, for real on the tiny model (DEAL, agnews -> amazon, 2 epochs of 2 optimizer steps):
a process SIGKILLed while it writes a checkpoint in the middle of task 2, and a run stopped by SIGINT, both resume
to the same final adapter (byte for byte) and metrics as an uninterrupted run; corrupt or foreign checkpoints are
reported and never used; the same config and seed give identical adapters and metrics in separate processes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from deal_train.train.checkpointing import (CHECKPOINTS_DIR, StepCheckpointer, StopSignals, TrainingStopped,
                                      list_checkpoints, verify_checkpoint)
from deal_train.cli import build_parser, config_from_args, run_cli
from deal_train.data import Encoder
from deal_train.train.loop import prepare_data, run, tokenise
from deal_train.methods import get_method
from deal_train.model.loading import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--method", "deal", "--model", "tiny-random-llama", "--tasks", "agnews,amazon", "--max_train_samples", "6",
        "--max_test_samples", "2", "--per_device_train_batch_size", "3", "--num_train_epochs", "2",
        "--max_source_length", "96",
        "--max_new_tokens", "2", "--per_device_eval_batch_size", "2", "--learning_rate", "5e-3",
        "--deal_learning_rate", "5e-3", "--lora_rank", "4", "--deal_mlp_hidden", "8", "--deal_lambda_drift", "0.1"]
"""Two tasks of 6 rows, batch 3, 2 epochs: optimizer steps 1-4 train agnews (plain LoRA), 5-8 amazon (DEAL); steps
5-6 are amazon's first epoch, 7-8 its second (another data order, drawn from the data-order generator)."""
# measured over what this process ran (a resumed task counts its token saving from the resume on)
TIMING = {"train_seconds", "eval_seconds", "samples_per_second", "peak_rss_bytes", "wall_seconds",
          "shared_prefix_token_saving", "padded_token_positions", "computed_token_positions"}
ADAPTERS = ["1-agnews", "2-amazon"]


def _without_timing(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k not in TIMING | {"config"}}
    out["per_task"] = [{k: v for k, v in p.items() if k not in TIMING} for p in metrics["per_task"]]
    return out


def _outputs(out: pathlib.Path) -> tuple[dict, dict]:
    """(metrics without timings, adapter file bytes per task)."""
    metrics = json.loads((out / "metrics.json").read_text())
    return _without_timing(metrics), {a: (out / "adapters" / a / "adapter_model.safetensors").read_bytes()
                                      for a in ADAPTERS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same config at the same time (the machine's cores are used by both): an uninterrupted run
    in this process, and a separate process (the CLI, checkpoint every step) SIGKILLed while it writes its second
    checkpoint of task 2. Returns ((metrics without timings, adapter bytes), (killed output dir, argv, process))."""
    killed_out = tmp_path_factory.mktemp("killed") / "run"
    argv = [*ARGS, "--checkpoint_every_steps", "1", "--output_dir", str(killed_out)]
    proc = subprocess.Popen([sys.executable, "-c", KILLER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO,
                            # the same thread count as this process: byte-identical results are promised for the same
                            # operations on the same inputs, and another count would sum in another order
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        out = tmp_path_factory.mktemp("reference") / "run"
        assert run_cli(run, [*ARGS, "--output_dir", str(out)]) == 0
        _stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return _outputs(out), (killed_out, argv, subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr))


@pytest.fixture(scope="module")
def reference(runs):
    """The uninterrupted run: (metrics without timings, adapter bytes)."""
    return runs[0]


@pytest.fixture(scope="module")
def killed(runs):
    """The SIGKILLed process: (output dir, argv, completed process)."""
    return runs[1]


KILLER = """
import os, signal, sys
from deal_train.train import checkpointing
from deal_train.cli import main

write_manifest = checkpointing.write_manifest
seen = []

def write_manifest_then_die(directory):
    # SIGKILL this process while the second checkpoint of task 2 is half written (its files are in the temporary
    # folder, the manifest is not)
    if os.path.basename(directory).startswith(".tmp-task2-"):
        seen.append(directory)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(directory)

checkpointing.write_manifest = write_manifest_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_same_config_and_seed_give_identical_adapter_and_metrics(reference, killed):
    """Task 1 of the killed process (a fresh start in another process) equals task 1 of the reference run."""
    out, _argv, _proc = killed
    metrics = json.loads((out / "metrics.json").read_text())
    ref_metrics, ref_adapters = reference
    assert (out / "adapters" / "1-agnews" / "adapter_model.safetensors").read_bytes() == ref_adapters["1-agnews"]
    assert _without_timing(metrics)["per_task"] == ref_metrics["per_task"][:1]  # losses, samples, steps
    assert [row[0] for row in metrics["accuracy_matrix"]] == [row[0] for row in ref_metrics["accuracy_matrix"]]
    assert [row[0] for row in metrics["rouge1_matrix"]] == [row[0] for row in ref_metrics["rouge1_matrix"]]
    assert metrics["truncated_rows"] == ref_metrics["truncated_rows"]
    assert ref_metrics["per_task"][0]["mean_loss"] > 0
    # the truncation counts reported are those of the rows trained and evaluated
    cfg = config_from_args(build_parser().parse_args(ARGS))
    datas = prepare_data(cfg)
    tokenise(datas, Encoder(load_tokenizer(cfg.model), cfg.max_source_length, cfg.max_target_length, True),
             get_method(cfg))
    assert metrics["truncated_rows"] == {d.task.name: {"train": d.truncated_train, "test": d.truncated_test}
                                         for d in datas}
    assert metrics["truncated_rows"]["amazon"]["train"] > 0


def test_sigkill_while_writing_a_checkpoint_in_task_2_then_resume_gives_the_same_run(reference, killed, capsys):
    out, argv, proc = killed
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["completed_tasks"] == 1  # killed inside task 2
    done, partial = list_checkpoints(str(out / CHECKPOINTS_DIR))
    assert [os.path.basename(p) for _t, _s, p in done] == ["task2-step0000005"]  # step 5 complete ...
    assert [os.path.basename(p) for p in partial] == [".tmp-task2-step0000006"]  # ... step 6 half written
    assert not (out / "adapters" / "2-amazon").exists()

    assert run_cli(run, argv) == 0  # the same command again
    printed = capsys.readouterr().out
    assert ".tmp-task2-step0000006, a checkpoint whose writing was interrupted (never used)" in printed
    assert "resuming task 2 from" in printed and "task2-step0000005 (optimizer step 5)" in printed
    metrics, adapters = _outputs(out)
    assert adapters == reference[1]
    assert metrics == reference[0]
    assert list_checkpoints(str(out / CHECKPOINTS_DIR)) == ([], [])  # finished tasks keep no checkpoints


@pytest.fixture(scope="module")
def stopped_by_sigint(tmp_path_factory):
    """A run that receives a real SIGINT after optimizer step 7 (task 2, DEAL, first step of the second epoch) with
    periodic checkpoints off:
    (output dir, argv, exit code, stderr, the SIGINT handler before the run)."""
    out = tmp_path_factory.mktemp("sigint") / "run"
    argv = [*ARGS, "--output_dir", str(out)]
    after_step = StepCheckpointer.after_step

    def interrupt_at_step_7(self, progress, task_name):
        if progress.global_step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return after_step(self, progress, task_name)

    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background CI shell, else Python's default
    with pytest.MonkeyPatch.context() as mp, redirect_stderr(err):
        mp.setattr(StepCheckpointer, "after_step", interrupt_at_step_7)
        code = run_cli(run, argv)
    return out, argv, code, err.getvalue(), before


def test_sigint_checkpoints_and_exits_with_130(stopped_by_sigint):
    out, _argv, code, err, before = stopped_by_sigint
    assert code == 130
    assert "Stopped on SIGINT in task 2 (amazon) after optimizer step 7; checkpoint saved in" in err
    assert "Rerun the same command to resume" in err
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is restored
    state = verify_checkpoint(str(out / CHECKPOINTS_DIR / "task2-step0000007"))
    progress = state["progress"]
    assert (progress["global_step"], progress["epoch"], progress["micro_batches"]) == (7, 1, 1)
    assert (out / "adapters" / "1-agnews" / "adapter_model.safetensors").is_file()  # task 1 intact
    assert json.loads((out / "metrics.json").read_text())["completed_tasks"] == 1


def test_rerun_after_sigint_resumes_to_the_same_run(stopped_by_sigint, reference, tmp_path):
    src, argv, _code, _err, _before = stopped_by_sigint
    out = tmp_path / "run"
    shutil.copytree(src, out)
    argv = [*argv[:-1], str(out)]
    assert run_cli(run, argv) == 0
    metrics, adapters = _outputs(out)
    assert adapters == reference[1]
    assert metrics == reference[0]


def _corrupt(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (lambda ck: _corrupt(ck / "optimizer.bin"), "is corrupt: optimizer.bin does not match the manifest"),
    (lambda ck: _corrupt(ck / "adapter_state.safetensors"), "adapter_state.safetensors does not match the manifest"),
    (lambda ck: (ck / "random_states_0.pkl").unlink(), "is corrupt: random_states_0.pkl is missing"),
    (lambda ck: (ck / "manifest.json").unlink(), "is incomplete or corrupt: cannot read manifest.json"),
])
def test_corrupt_checkpoint_is_reported_and_not_used(stopped_by_sigint, tmp_path, capsys, damage, message):
    src, argv, _code, _err, _before = stopped_by_sigint
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ck = out / CHECKPOINTS_DIR / "task2-step0000007"
    damage(ck)
    before = sorted(p.name for p in ck.iterdir())
    assert run_cli(run, [*argv[:-1], str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Delete" in err and "Traceback" not in err
    assert sorted(p.name for p in ck.iterdir()) == before  # left for the user to inspect
    assert not (out / "adapters" / "2-amazon").exists()


def test_checkpoint_of_another_config_or_task_is_refused(stopped_by_sigint, tmp_path, capsys):
    src, argv, _code, _err, _before = stopped_by_sigint
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ck = out / CHECKPOINTS_DIR / "task2-step0000007"
    # a checkpoint made with another config (metrics.json edited to match, so only the checkpoint disagrees)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["config"]["deal_mlp_hidden"] = 16
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert run_cli(run, [*argv[:-1], str(out), "--deal_mlp_hidden", "16"]) == 2
    assert "was made with a different config (keys: deal_mlp_hidden)" in capsys.readouterr().err
    # resume_from naming a checkpoint of task 2 while task 1 is unfinished
    metrics["config"]["deal_mlp_hidden"] = 8
    metrics.update(completed_tasks=0, per_task=[])
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert run_cli(run, [*argv[:-1], str(out), "--resume_from", str(ck)]) == 2
    assert "is from task 2, but the run has finished 0 task(s)" in capsys.readouterr().err


def test_sigterm_and_sigusr1_are_stop_requests_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s in (signal.SIGTERM, signal.SIGUSR1):
        with StopSignals(announce=False) as stop:
            os.kill(os.getpid(), s)
            assert stop.requested == s
        assert TrainingStopped("x", s).exit_code == 128 + s
    assert {s: signal.getsignal(s) for s in before} == before
