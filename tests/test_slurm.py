"""slurm/*.sbatch under a fake SLURM (``srun`` and ``scontrol`` scripts on PATH, SLURM_* variables for a 2-node job):
each node gets its own machine rank, the main process address is the first host, arguments reach the trainer as
words (never evaluated by a shell), and the time-limit signal makes a real tiny training run checkpoint and the job
requeue."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from deal_train.train.checkpointing import CHECKPOINTS_DIR, list_checkpoints, verify_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/single_node.sbatch", "slurm/multi_node.sbatch", "slurm/launch_node.sh", "slurm/common.sh"]

FAKE_SRUN = r"""#!/bin/bash
# fake srun: one copy of the command per node (SLURM_NNODES), each with its own SLURM_PROCID and SLURM_NODEID, as
# srun --ntasks-per-node=1 starts them; forwards USR1 and TERM to them as srun does
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do
  SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for p in "${pids[@]}"; do
  while true; do
    wait "$p" && s=0 || s=$?
    kill -0 "$p" 2>/dev/null || break
  done
  [ "$s" = 0 ] || status=$s
done
exit "$status"
"""
FAKE_SCONTROL = r"""#!/bin/bash
# fake scontrol: `show hostnames a,b` prints one host a line; `requeue <job id>` is recorded in $FAKE_SLURM_LOG
if [ "$1 $2" = "show hostnames" ]; then tr ',' '\n' <<< "$3"; exit 0; fi
if [ "$1" = requeue ]; then echo "requeue $2" >> "$FAKE_SLURM_LOG"; exit 0; fi
exit 1
"""
RECORDING_ACCELERATE = """#!{python}
# stands in for `accelerate` when only the command line matters: records its arguments and this node's SLURM_PROCID
import json, os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "procid": os.environ.get("SLURM_PROCID")}}) + "\\n")
"""


def _bin(tmp_path: pathlib.Path, recording_accelerate: bool) -> dict:
    """A fake SLURM bin directory and the environment of a job on nodes ``nodeA,nodeB``."""
    fake = tmp_path / "bin"
    fake.mkdir()
    files = {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}
    if recording_accelerate:
        files["accelerate"] = RECORDING_ACCELERATE.format(python=sys.executable)
    for name, text in files.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    path = os.pathsep.join([str(fake), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "nodeA,nodeB", "SLURM_SUBMIT_DIR": str(REPO), "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_bash_syntax_check(script):
    proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_scripts_ask_for_the_time_limit_signal_and_requeue():
    for script in SCRIPTS[:2]:
        text = (REPO / script).read_text()
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text and "deal_train_srun" in text


def test_two_nodes_get_distinct_ranks_and_the_first_host_as_main(tmp_path):
    env = {**_bin(tmp_path, recording_accelerate=True), "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    odd = "$(touch PWNED) x;y"  # must arrive as one word, unevaluated
    proc = subprocess.run(["bash", "slurm/multi_node.sbatch", "configs/smoke_tiny.yaml", "--output_dir", odd],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "slurm.log").read_text().splitlines()]
    assert len(calls) == 2
    ranks = {}
    for call in calls:
        argv = call["argv"]
        opts = {argv[i]: argv[i + 1] for i in range(1, argv.index("-m")) if argv[i].startswith("--")
                and i + 1 < len(argv) and not argv[i + 1].startswith("--")}
        assert argv[0] == "launch"
        assert opts["--num_machines"] == "2" and opts["--num_processes"] == "8"
        assert opts["--main_process_ip"] == "nodeA" and opts["--main_process_port"] == str(20000 + 4242)
        assert opts["--config_file"] == "accelerate_configs/multi_gpu_bf16.yaml"
        assert argv[argv.index("-m"):] == ["-m", "deal_train", "--config", "configs/smoke_tiny.yaml", "--output_dir",
                                           odd]
        ranks[call["procid"]] = opts["--machine_rank"]
    assert ranks == {"0": "0", "1": "1"}  # each node's rank is its own, read on that node
    assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    # one node, 4 GPUs: one machine, 4 processes
    (tmp_path / "slurm.log").unlink()
    env.update(SLURM_NNODES="1")
    proc = subprocess.run(["bash", "slurm/single_node.sbatch", "configs/smoke_tiny.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (call,) = [json.loads(line) for line in (tmp_path / "slurm.log").read_text().splitlines()]
    argv = call["argv"]
    assert argv[argv.index("--num_machines") + 1] == "1" and argv[argv.index("--num_processes") + 1] == "4"
    assert argv[argv.index("--machine_rank") + 1] == "0"
    assert argv[argv.index("--config_file") + 1] == "accelerate_configs/multi_gpu_bf16.yaml"


def test_time_limit_signal_checkpoints_a_real_run_and_requeues(tmp_path):
    """SLURM's warning (USR1 to the batch shell) reaches the trainer under a real ``accelerate launch``; it saves a
    step checkpoint and stops, and the job is requeued."""
    env = {**_bin(tmp_path, recording_accelerate=False), "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1",
           "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml"}
    out = tmp_path / "run"
    cmd = ["bash", "slurm/single_node.sbatch", "configs/smoke_tiny.yaml", "--tasks", "agnews,amazon",
           "--max_train_samples", "40", "--per_device_train_batch_size", "1", "--max_test_samples", "2",
           "--max_new_tokens", "2", "--checkpoint_every_steps", "1", "--output_dir", str(out)]
    log = open(tmp_path / "job.out", "w")
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    try:
        while not list_checkpoints(str(out / CHECKPOINTS_DIR))[0]:  # training has started
            assert job.poll() is None, (tmp_path / "job.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` does
        code = job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    text = (tmp_path / "job.out").read_text()
    assert code != 0, text[-3000:]
    assert "stopped: Stopped on SIGUSR1 in task 1 (agnews) after optimizer step" in text
    assert "task amazon: " in text and "prompts were longer than max_source_length=160 tokens" in text
    assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
    (_t, step, path), = list_checkpoints(str(out / CHECKPOINTS_DIR))[0]
    assert verify_checkpoint(path)["progress"]["global_step"] == step < 40  # stopped early, checkpoint intact
    assert json.loads((out / "metrics.json").read_text())["completed_tasks"] == 0
