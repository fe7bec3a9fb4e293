#!/usr/bin/env python
"""GPU checks of the launch profiles that the CPU test suite cannot run (one GPU, a few minutes).

Usage (from the repository root, on a machine with one CUDA GPU)::

    GPU_CHECK_OUT=/path/to/results python scripts/gpu_check_distributed.py [--jobs 4]

Every check is a real ``accelerate launch --config_file accelerate_configs/<profile>.yaml -m deal_train`` of the
tiny random LLaMA on two tasks (dbpedia -> amazon, 8 training rows each, batch 4: LoRA on task 1, the method's
second-task path on task 2). Checks:

* ``ref_fp32``: one GPU, fp32 (a100_fp16.yaml with --mixed_precision no): the reference adapters.
* ``zero3_fp32_gc``: ZeRO-3, fp32, gradient checkpointing: adapters equal the reference (max abs diff <= 1e-5;
  GPU kernels differ in summation order, and checkpointing does not change the maths).
* ``a100_fp16``: the paper's reference profile (fp16 autocast + GradScaler) with DEAL.
* ``zero3_bf16_<method>`` for every method: ZeRO-3, bf16 (DeepSpeed torch_autocast), bfloat16 base.
* ``zero2_bf16_deal``, ``zero2_offload_bf16_deal``, ``multi_gpu_bf16_deal`` (DDP profile, one process).
* ``int8_deal`` / ``nf4_deal``: bitsandbytes LLM.int8 / NF4 bases on the GPU kernels, with ``optim: adamw_8bit``.

Each check passes when the run exits 0, ``metrics.json`` says finished, and every saved adapter is complete: the
reference's keys and shapes, no empty tensor, float32 (trainable tensors stay fp32 under every precision).
O-LoRA's adapter after task 2 has twice the rank (the concatenation of both tasks' adapters).

Writes into ``$GPU_CHECK_OUT``: ``results.json`` (one entry per check: command, exit code, seconds, passed,
problems, max abs diff to the reference where compared), ``summary.txt`` (one line per check) and
``logs/<check>.log``. Exit code 0 when every check passed, 1 otherwise. Without CUDA it runs the same checks on
the CPU (``DS_ACCELERATOR=cpu``; the fp16 profile and the GPU-only settings are skipped), which is slow but
shows the script works.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deal_train.methods import METHOD_NAMES as METHODS  # noqa: E402  (the registry; imports no torch)
TASKS = ["1-dbpedia", "2-amazon"]
BASE_ARGS = ["--model", "tiny-random-llama", "--tasks", "dbpedia,amazon", "--max_train_samples", "8",
             "--max_test_samples", "4", "--max_source_length", "128", "--max_new_tokens", "3",
             "--per_device_eval_batch_size", "4", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
             "--lora_rank", "4", "--replay_samples_per_task", "2", "--ewc_fisher_batches", "2",
             "--deal_lambda_drift", "0.1", "--o_lora_lambda_l2", "0.01", "--overwrite_output_dir", "true"]
COMPARE_TOL = 1e-5


def checks(cuda: bool) -> list[dict]:
    """The checks to run: name, profile, extra CLI options, and the reference to compare with (if any)."""
    out = [dict(name="ref_fp32", profile="a100_fp16", args=["--method", "deal", "--mixed_precision", "no"]),
           dict(name="zero3_fp32_gc", profile="deepspeed_zero3", compare="ref_fp32",
                args=["--method", "deal", "--mixed_precision", "no", "--gradient_checkpointing", "true"])]
    if cuda:
        out.append(dict(name="a100_fp16", profile="a100_fp16", args=["--method", "deal"]))
    out += [dict(name=f"zero3_bf16_{m}", profile="deepspeed_zero3",
                 args=["--method", m, "--mixed_precision", "bf16", "--model_dtype", "bfloat16"]) for m in METHODS]
    out += [dict(name="zero2_bf16_deal", profile="deepspeed_zero2", args=["--method", "deal", "--mixed_precision", "bf16"]),
            dict(name="zero2_offload_bf16_deal", profile="deepspeed_zero2_offload",
                 args=["--method", "deal", "--mixed_precision", "bf16", "--gradient_checkpointing", "true"]),
            dict(name="multi_gpu_bf16_deal", profile="multi_gpu_bf16" if cuda else "multi_cpu",
                 args=["--method", "deal", "--mixed_precision", "bf16"], processes=1),
            dict(name="int8_deal", profile="a100_fp16",
                 args=["--method", "deal", "--load_in_8bit", "true", "--optim", "adamw_8bit",
                       "--mixed_precision", "fp16" if cuda else "no"]),
            dict(name="nf4_deal", profile="a100_fp16",
                 args=["--method", "deal", "--load_in_4bit", "true", "--model_dtype", "bfloat16",
                       "--mixed_precision", "bf16", "--gradient_checkpointing", "true"])]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_check(check: dict, root: pathlib.Path, cuda: bool) -> dict:
    """Launch one check; returns its result entry (without the comparison)."""
    out = root / "runs" / check["name"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"accelerate_configs/{check['profile']}.yaml", "--main_process_port", str(_free_port())]
    if "processes" in check:
        cmd += ["--num_processes", str(check["processes"])]
    cmd += ["-m", "deal_train", *BASE_ARGS, *check["args"], "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    with open(root / "logs" / f"{check['name']}.log", "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    return {"name": check["name"], "command": " ".join(cmd), "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - start, 1), "output_dir": str(out)}


def inspect_run(result: dict, reference: dict[str, dict] | None, method: str) -> list[str]:
    """Problems with a finished run's outputs (empty list when it is complete)."""
    import torch
    from safetensors.torch import load_file

    out = pathlib.Path(result["output_dir"])
    problems = []
    if result["returncode"] != 0:
        return [f"exit code {result['returncode']}"]
    metrics = json.loads((out / "metrics.json").read_text())
    if not metrics.get("finished"):
        problems.append("metrics.json: not finished")
    result["average_accuracy"] = metrics.get("average_accuracy")
    for task in TASKS:
        path = out / "adapters" / task / "adapter_model.safetensors"
        if not path.is_file():
            problems.append(f"{task}: no adapter")
            continue
        state = load_file(str(path))
        empty = [k for k, v in state.items() if v.numel() == 0]
        low = [k for k, v in state.items() if v.dtype != torch.float32]
        if empty:
            problems.append(f"{task}: empty tensors {empty[:2]}")
        if low:
            problems.append(f"{task}: not float32 {low[:2]}")
        if reference is not None:
            want = reference[task]
            if state.keys() != want.keys():
                problems.append(f"{task}: keys differ from the reference")
                continue
            for k, v in state.items():
                shape = list(want[k].shape)
                if method == "o_lora" and task == TASKS[1]:
                    shape = [2 * shape[0], shape[1]] if "lora_A" in k else [shape[0], 2 * shape[1]]
                if list(v.shape) != shape:
                    problems.append(f"{task}: {k} has shape {list(v.shape)}, expected {shape}")
                    break
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="Checks run at the same time (default 4).")
    parser.add_argument("--only", default="", help="Comma-separated check names to run (default: all).")
    args = parser.parse_args(argv)
    root = pathlib.Path(os.environ.get("GPU_CHECK_OUT", "")).resolve()
    if not os.environ.get("GPU_CHECK_OUT"):
        parser.error("set GPU_CHECK_OUT to the directory for the results")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    import torch
    from safetensors.torch import load_file

    cuda = torch.cuda.is_available()
    todo = checks(cuda)
    if args.only:
        wanted = set(args.only.split(",")) | {"ref_fp32"}
        todo = [c for c in todo if c["name"] in wanted]
    started = time.perf_counter()
    results = {}
    # the reference first (others compare with its adapters), then the rest in parallel
    results["ref_fp32"] = run_check(todo[0], root, cuda)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_check, c, root, cuda): c for c in todo[1:]}
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]["name"]] = fut.result()
    ref_dir = pathlib.Path(results["ref_fp32"]["output_dir"])
    reference = None
    if results["ref_fp32"]["returncode"] == 0:
        reference = {t: load_file(str(ref_dir / "adapters" / t / "adapter_model.safetensors")) for t in TASKS}
    entries = []
    for check in todo:
        result = results[check["name"]]
        method = check["args"][check["args"].index("--method") + 1]
        result["problems"] = inspect_run(result, reference, method)
        if check.get("compare") and reference is not None and not result["problems"]:
            out = pathlib.Path(result["output_dir"])
            diff = max(float((load_file(str(out / "adapters" / t / "adapter_model.safetensors"))[k]
                              - reference[t][k]).abs().max()) for t in TASKS for k in reference[t])
            result["max_abs_diff_to_reference"] = diff
            if diff > COMPARE_TOL:
                result["problems"].append(f"adapters differ from ref_fp32 by {diff:.2e} > {COMPARE_TOL:g}")
        result["passed"] = not result["problems"]
        entries.append(result)
    summary = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "seconds": round(time.perf_counter() - started, 1), "passed": all(e["passed"] for e in entries),
               "checks": entries}
    (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"{'PASS' if e['passed'] else 'FAIL'} {e['name']:<26} {e['seconds']:>6.1f}s "
             + ("; ".join(e["problems"]) if e["problems"] else
                f"diff {e['max_abs_diff_to_reference']:.1e}" if "max_abs_diff_to_reference" in e else "")
             for e in entries]
    (root / "summary.txt").write_text("\n".join(lines) + f"\ntotal {summary['seconds']}s\n")
    print("\n".join(lines))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
