"""Distributed profiles really run on the CPU, each with 2 processes over gloo: DDP through ``accelerate launch
--config_file accelerate_configs/multi_cpu.yaml``, DeepSpeed ZeRO-2 and ZeRO-3 through their profiles with
``--num_processes 2`` (``DS_ACCELERATOR=cpu``), all on DEAL (task 1 LoRA, task 2 DEAL's parametrization and fold),
compared with one in-process run with the same global batch (2 processes x 2 rows = 1 process x 4 rows).

Tolerance: the adapters after each task agree within 1e-6 (float32; measured differences 0 to 3e-7). The processes'
gradients are averaged by all-reduce (DDP) or reduce-scatter (ZeRO), each the sum over its rows divided by the
global answer-token count, so the sums run in another order than one process summing all rows; AdamW's first step
moves every entry by about lr = 5e-3 whatever the gradient size, so a sign flip of a vanishing gradient entry would
show as a 1e-2 jump, and 1e-6 is far above float32 rounding and far below any such difference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deal_train.config import TrainConfig
from deal_train.train.loop import run

from conftest import REPO, TINY_RUN

TOL = 1e-6
ARGS = ["--model", "tiny-random-llama", "--method", "deal", "--tasks", "dbpedia,amazon", "--max_train_samples", "8",
        "--max_test_samples", "4", "--max_source_length", "128", "--max_new_tokens", "3",
        "--per_device_eval_batch_size", "4", "--learning_rate", "5e-3", "--lora_rank", "4"]
TASKS = ["1-dbpedia", "2-amazon"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(profile: str, out, *extra: str, script: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/<profile>.yaml`` of the CLI (or of ``script``). The
    multi-CPU profile's processes are started by torchrun, one ``accelerate launch`` each (Accelerate itself
    starts multi-CPU processes only through mpirun; see accelerate_configs/multi_cpu.yaml)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    target = [script] if script else ["-m", "deal_train"]
    port = str(_free_port())
    starter = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port] \
        if profile == "multi_cpu" else [sys.executable]
    processes = [] if profile == "multi_cpu" else ["--num_processes", "2"]  # DeepSpeed: accelerate starts both
    cmd = [*starter, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / f"{profile}.yaml"), "--main_process_port", port, *processes,
           *target, *ARGS, "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # the CLI keeps bitsandbytes' CPU import warnings (PEFT imports it) off the console
    assert "bitsandbytes" not in proc.stderr and "gemm_4bit" not in proc.stderr, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4 (the global batch of every launched run), fp32, today's full forward pass: the launched
    runs take the shared-prefix fast path (the default), so they also check it against the full pass."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = TrainConfig(method="deal", output_dir=str(out), shared_prefix=False, **TINY_RUN)
    assert cfg.per_device_train_batch_size == 4 and cfg.max_train_samples == 8
    return out, run(cfg)


NEW_B_TOL = 1e-5
"""Tolerance on the lora_B of the adapter a task adds (``deal_grow_adapter``), whose entries (~1e-2) start at zero
and take two Adam steps: an entry whose two gradients nearly cancel carries the relative differences of task 1
(~1e-7 between layouts) into its normalised step many times enlarged. Measured on the tiny run: layer 1 q_proj,
entry (13, 5): 4e-7 between batch 4 and 2 x 2 accumulation in one process, 2e-6 under ZeRO-3 (task-1 differences
2.8e-7); every other entry stays within TOL."""


def _adapters(out) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / "adapters" / t / "adapter_model.safetensors") for t in TASKS]


def _assert_same_adapters(out, ref_out):
    """The same adapters within TOL. A concatenated adapter (``deal_grow_adapter``; rank above ``lora_rank``) stores
    each block of lora_A times its task adapter's scale s = lora_alpha / lora_rank, so there lora_A is compared
    within s · TOL (the same tolerance on the trained A_i), and the lora_B columns of the task's new adapter within
    NEW_B_TOL."""
    config = json.loads((ref_out / "metrics.json").read_text())["config"]
    r, scale = config["lora_rank"], config["lora_alpha"] / config["lora_rank"]
    for task, got, want in zip(TASKS, _adapters(out), _adapters(ref_out)):
        assert got.keys() == want.keys(), task
        concatenated = json.loads((ref_out / "adapters" / task / "adapter_config.json").read_text())["r"] > r
        for k in want:
            assert got[k].shape == want[k].shape and got[k].numel() > 0, (task, k)
            if concatenated and "lora_B" in k:
                torch.testing.assert_close(got[k][:, -r:], want[k][:, -r:], atol=NEW_B_TOL, rtol=0, msg=f"{task} {k}")
                got[k], want[k] = got[k][:, :-r], want[k][:, :-r]
            atol = TOL * scale if concatenated and "lora_A" in k else TOL
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=f"{task} {k}")
    first, second = _adapters(ref_out)
    if all(first[k].shape == second[k].shape for k in first):
        assert any((first[k] - second[k]).abs().max() > 100 * TOL for k in first), "DEAL's task 2 changed nothing"
    else:  # deal_grow_adapter: task 2's adapter is the rank-2r concatenation of both task adapters
        assert all(second[k].numel() == 2 * first[k].numel() for k in first)


def test_ddp_two_processes_equal_one_process(reference, tmp_path):
    ref_out, ref_metrics = reference
    proc = _launch("multi_cpu", tmp_path / "ddp", "--per_device_train_batch_size", "2")
    assert proc.stdout.count("Average accuracy") == 1  # printed by the main process only
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["finished"]
    assert [p["train_samples"] for p in metrics["per_task"]] == [p["train_samples"] for p in ref_metrics["per_task"]]
    for key in ("final_loss", "mean_loss"):  # the logged loss is the global one, not rank 0's share
        assert [p[key] for p in metrics["per_task"]] == pytest.approx([p[key] for p in ref_metrics["per_task"]],
                                                                       rel=1e-5), key
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
    _assert_same_adapters(tmp_path / "ddp", ref_out)


def _assert_two_processes(out, ref_metrics):
    """The run trained as 2 processes of one job (not two lone runs): the same samples and global losses as the
    one-process reference, and its metrics written once."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"]
    assert [p["train_samples"] for p in metrics["per_task"]] == [p["train_samples"] for p in ref_metrics["per_task"]]
    assert [p["optimizer_steps"] for p in metrics["per_task"]] == [2, 2]  # 8 rows / (2 processes x 2 rows)
    for key in ("final_loss", "mean_loss"):
        assert [p[key] for p in metrics["per_task"]] == pytest.approx([p[key] for p in ref_metrics["per_task"]],
                                                                       rel=1e-5), key


def test_deepspeed_zero2_two_processes_equal_one_process(reference, tmp_path):
    ref_out, ref_metrics = reference
    proc = _launch("deepspeed_zero2", tmp_path / "z2", "--per_device_train_batch_size", "2", "--mixed_precision", "no")
    assert proc.stdout.count("Average accuracy") == 1  # printed by the main process only
    _assert_two_processes(tmp_path / "z2", ref_metrics)
    _assert_same_adapters(tmp_path / "z2", ref_out)
    # DeepSpeed's CPU shared-memory op is neither compiled nor loaded (distributed.skip_cpu_shared_memory_op)
    assert "shm_comm" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


def test_deepspeed_zero3_deal_without_checkpointing_falls_back_on_its_own_tasks(reference, tmp_path):
    """ZeRO-3 without gradient checkpointing, shared_prefix on: task 1 (plain LoRA) takes the fast path, DEAL's task
    2 the full pass (its DEALFactor leaf modules would be reduced once per pass: DeepSpeed asserted), said once;
    the run equals the one-process full-pass reference."""
    ref_out, ref_metrics = reference
    proc = _launch("deepspeed_zero3", tmp_path / "z3", "--per_device_train_batch_size", "2", "--mixed_precision", "no")
    out = proc.stdout + proc.stderr
    assert out.count("training uses the full forward pass with method deal under ZeRO-3") == 1, out[-3000:]
    metrics = json.loads((tmp_path / "z3" / "metrics.json").read_text())
    saving = [p["shared_prefix_token_saving"] for p in metrics["per_task"]]
    assert saving[0] > 0 and saving[1] is None
    _assert_two_processes(tmp_path / "z3", ref_metrics)
    _assert_same_adapters(tmp_path / "z3", ref_out)


ROUND2 = {"deal_project_residual": "A", "deal_project_energy": 1.0, "deal_drift_weighting": "spectral",
          "deal_lambda_drift": 0.1, "deal_lambda_drift_history": 1.0, "deal_grow_adapter": True}
"""DEAL's round-2 switches on (docs/design.md 3.1-3.4): the projection, the spectral drift, split drift weights
(λ_h = 1, λ_r = deal_lambda_drift), the growing orthogonal adapter (its basis off the whole span as well). The
projection is taken on lora_A off the whole span of its history (energy 1)
because a projector moves by about δ / (s_k − s_(k+1)) when the history moves by δ: task 1's cross-process
differences (δ up to 4e-7) and the cut k = 3 of energy 0.8 inside a pair s_3 ≈ s_4 (0.458, 0.441) once gave 2.4e-6
(DDP), over TOL, from conditioning alone (without the projection: 3.4e-7). Off the whole span of A (s_min ≥ 0.44)
the amplification is about 1; the code path (buffers, functional drift under ZeRO-3) is the same for A and B."""


@pytest.fixture(scope="module")
def reference_round2(tmp_path_factory):
    """As ``reference``, with the round-2 switches on."""
    out = tmp_path_factory.mktemp("ref_round2") / "run"
    cfg = TrainConfig(method="deal", output_dir=str(out), shared_prefix=False, **TINY_RUN, **ROUND2)
    return out, run(cfg)


@pytest.mark.parametrize("profile", ["multi_cpu", "deepspeed_zero3"])
def test_round2_switches_two_processes_equal_one_process(reference_round2, tmp_path, profile):
    """2-process DDP and ZeRO-3 with the projection, the spectral drift and the split drift weights on: the same
    adapters (1e-6) and global losses as one process. Under ZeRO-3 the split drift runs on gathered parameter copies
    (``live_named``) through ``DEALFactor.drift_parts``, and the projection's basis is a buffer ZeRO-3 leaves whole.
    ZeRO-3 runs with gradient checkpointing, as ``test_deepspeed_zero3_keeps_deal_history_and_saves_complete_adapters``
    does (without it DEAL's tasks take the full pass under ZeRO-3, see
    ``test_deepspeed_zero3_deal_without_checkpointing_falls_back_on_its_own_tasks``)."""
    ref_out, ref_metrics = reference_round2
    out = tmp_path / profile
    extra = [arg for key, value in ROUND2.items() for arg in (f"--{key}", str(value))]
    if profile == "deepspeed_zero3":
        extra += ["--gradient_checkpointing", "true"]
    _launch(profile, out, "--per_device_train_batch_size", "2", "--mixed_precision", "no", *extra)
    _assert_two_processes(out, ref_metrics)
    for cfg in (json.loads((out / "metrics.json").read_text())["config"], ref_metrics["config"]):
        assert {k: cfg[k] for k in ROUND2} == ROUND2
    _assert_same_adapters(out, ref_out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs the op is left alone")
def test_skip_cpu_shared_memory_op_for_deepspeed_on_cpu(monkeypatch):
    import deepspeed.ops

    from deal_train.train.distributed import skip_cpu_shared_memory_op

    table = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(table, "deepspeed_shm_comm", True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert skip_cpu_shared_memory_op() is False and table["deepspeed_shm_comm"] is True  # no DeepSpeed profile
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert skip_cpu_shared_memory_op() is True and table["deepspeed_shm_comm"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_accelerator_kwargs_name_gloo_for_deepspeed_on_cpus_with_several_processes(monkeypatch):
    from deal_train.train.distributed import accelerator_kwargs

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerator_kwargs() == {}  # DDP: Accelerate picks gloo itself
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert accelerator_kwargs() == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    (handler,) = accelerator_kwargs()["kwargs_handlers"]
    assert handler.backend == "gloo"


ZERO3_PROBE = '''
"""Runs the CLI under ZeRO-3 and records, right after each task's accelerator.prepare, what ZeRO-3 did to the
adapter tensors and to DEAL's buffers, and (once) the profile refusals with the live DeepSpeed state."""
import json, sys
from deal_train import cli
cli.quiet_libraries()  # before anything imports PEFT (and with it bitsandbytes), as cli.main does
from safetensors.torch import save_file
from accelerate import Accelerator
from deal_train.train import distributed
from deal_train.config import ConfigError, TrainConfig
from deal_train.deal import DEALFactor
from deal_train.model.precision import adapter_parameters

record = {"tasks": []}
buffers = {}
check = distributed.check_persistent

def probe(model):
    check(model)
    factors = [(n, m) for n, m in model.named_modules() if isinstance(m, DEALFactor)]
    adapters = adapter_parameters(model)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    record["tasks"].append({
        "factors": len(factors),
        "residuals": sum(m.residual is not None for _n, m in factors),
        "leaf": all(getattr(m, "_z3_leaf", False) for _n, m in factors),
        "adapters_zero_persistent": all(hasattr(p, "ds_id") and p.ds_persist for _n, p in adapters),
        "base_zero_sharded": sum(hasattr(p, "ds_id") and not p.ds_persist for p in base),
        "zero_buffers": sum(hasattr(b, "ds_id") for _n, m in factors for b in m.buffers()),
    })
    for n, m in factors:
        for b, t in m.named_buffers():
            buffers[f"{n}.{b}"] = t.detach().clone().contiguous()
    if "stage" not in record:  # while the run's process group and DeepSpeed state are live
        acc = Accelerator()
        record["stage"] = distributed.zero_stage(acc)
        record["world_size"] = acc.num_processes
        record["main"] = acc.is_main_process
        for key, value in (("load_in_8bit", True), ("eval_zero_shot", True)):
            try:
                distributed.check_profile(TrainConfig(**{key: value}), acc)
                record[key] = None
            except ConfigError as err:
                record[key] = str(err)

distributed.check_persistent = probe
code = cli.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--output_dir") + 1]
if record["main"]:
    save_file(buffers, out + "/zero3_buffers.safetensors")
    with open(out + "/zero3_probe.json", "w") as fh:
        json.dump(record, fh)
sys.exit(code)
'''


def test_deepspeed_zero3_keeps_deal_history_and_saves_complete_adapters(reference, tmp_path):
    """ZeRO-3 with gradient checkpointing (reentrant under ZeRO-3), against the one-process run without it; DEAL
    with its defaults, the residual R and the drift penalty on (both once broke ZeRO-3's reduction of DEALFactor's
    gradients, see ``distributed.mark_leaf_modules``)."""
    ref_out, ref_metrics = reference
    script = tmp_path / "zero3_probe.py"
    script.write_text(ZERO3_PROBE)
    out = tmp_path / "z3"
    proc = _launch("deepspeed_zero3", out, "--per_device_train_batch_size", "2", "--mixed_precision", "no",
                   "--gradient_checkpointing", "true", script=str(script))
    assert proc.stdout.count("Average accuracy") == 1
    _assert_two_processes(out, ref_metrics)
    probe = json.loads((out / "zero3_probe.json").read_text())
    assert probe["stage"] == 3 and probe["world_size"] == 2
    for cfg in (json.loads((out / "metrics.json").read_text())["config"], ref_metrics["config"]):
        assert cfg["deal_residual_update"] is True and cfg["deal_lambda_drift"] > 0
    first, second = probe["tasks"]
    assert first["factors"] == 0 and second["factors"] == 8 == second["residuals"]  # 2 layers x q,v x A,B
    for task in probe["tasks"]:
        assert task["adapters_zero_persistent"] and task["base_zero_sharded"] > 0 and task["zero_buffers"] == 0
    assert second["leaf"]
    # DEAL's buffers are whole and hold task 1's adapter (Y = A^T or B) and its exact thin SVD
    task1 = load_file(out / "adapters" / "1-dbpedia" / "adapter_model.safetensors")
    buffers = load_file(out / "zero3_buffers.safetensors")
    histories = {k: v for k, v in buffers.items() if k.endswith(".history")}
    assert len(histories) == 8
    for name, history in histories.items():
        module = name.split(".default.parametrizations")[0]  # ...q_proj.lora_A
        saved = task1[f"{module}.weight"]
        assert torch.equal(history, saved.t() if module.endswith("lora_A") else saved), name
        prefix = name[: -len("history")] + "retention.layers.0."
        u, s, vh = (buffers[prefix + b] for b in ("U", "s", "Vh"))
        torch.testing.assert_close(u @ torch.diag(s) @ vh, history, atol=1e-6, rtol=1e-5)
    # the adapters saved under ZeRO-3 are complete and equal the one-process run's
    _assert_same_adapters(out, ref_out)
    assert "ZeRO-3" in probe["load_in_8bit"] and "eval_zero_shot" in probe["eval_zero_shot"]


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("kernel,layers", [("heat", 1), ("heat", 2), ("haar", 1)])
def test_zero3_leaf_hook_fires_after_all_deal_gradients(monkeypatch, kernel, layers, checkpointed):
    """The contract ZeRO-3's leaf-module gradient reduction relies on: when a ``DEALFactor``'s full backward hook
    (where ZeRO-3 reduces a leaf module's gradients) fires, every parameter's gradient is complete, including the
    residual's and the parts that arrive through gathered copies (the regulariser and the drift, as ``live`` gives
    them under ZeRO-3); with reentrant gradient checkpointing too. Without ``mark_leaf_modules``'s input hook the
    hook fires before any gradient exists (the factor's input, the frozen weight, does not require grad)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from torch.utils.checkpoint import checkpoint

    from deal_train.deal import DEALFactor, attach, regulariser
    from deal_train.train.distributed import mark_leaf_modules

    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 8, bias=False)  # a lora_B: weight 8 x 4 (n x r)
    factor = DEALFactor(linear.weight, transpose=False, num_scales=3, hidden=4, activation="gelu", kernel=kernel,
                        layers=layers, residual=True)
    attach(linear, "weight", factor)
    with torch.no_grad():  # move off the identity start, so that every parameter gets a non-zero gradient
        for p in factor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mark_leaf_modules(linear)
    assert factor._z3_leaf
    seen = []
    factor.register_full_backward_hook(lambda *_: seen.append(
        {n: None if p.grad is None else p.grad.clone() for n, p in factor.named_parameters()}))
    x = torch.randn(3, 4, requires_grad=checkpointed)  # reentrant checkpointing needs an input that requires grad
    out = checkpoint(linear, x, use_reentrant=True) if checkpointed else linear(x)
    copies = {n: p.clone() for n, p in factor.named_parameters()}  # what distributed.live_named gives under ZeRO-3
    theta = [copies[n] for n, _p in factor.named_parameters() if not n.startswith("residual")]
    loss = out.pow(2).sum() + 0.1 * regulariser(theta, None, 2.0, "norm") + 0.1 * factor.drift(copies)
    loss.backward()
    assert len(seen) == 1
    for name, p in factor.named_parameters():
        assert seen[0][name] is not None, f"{name}: no gradient yet when the leaf hook fired"
        assert p.grad.abs().sum() > 0, name
        # bit equality on purpose: the same tensor read twice in one process; any later accumulation, however
        # small, is what the test must catch
        torch.testing.assert_close(seen[0][name], p.grad, atol=0, rtol=0, msg=f"{name} grew after the leaf hook")


def test_profiles_parse_and_name_their_deepspeed_configs():
    """Every accelerate_configs/*.yaml loads with Accelerate's own config reader; the DeepSpeed ones name an existing
    ds_configs/*.json whose run-dependent values are "auto" (filled by Accelerate and deal_train) and set no
    mixed_precision (Accelerate refuses one next to a DeepSpeed config file)."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"a100_fp16": ("NO", "fp16", 1), "multi_gpu_bf16": ("MULTI_GPU", "bf16", 2), "cpu": ("NO", "no", 1),
                "multi_cpu": ("MULTI_CPU", "no", 2), "deepspeed_zero2": ("DEEPSPEED", "none", 1),
                "deepspeed_zero3": ("DEEPSPEED", "none", 1), "deepspeed_zero2_offload": ("DEEPSPEED", "none", 1)}
    found = {p.stem for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert found == set(expected)
    for name, (dist, precision, procs) in expected.items():
        cfg = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
        assert (str(cfg.distributed_type).split(".")[-1], str(cfg.mixed_precision).split(".")[-1].lower(),
                cfg.num_processes) == (dist, precision, procs), name
        if dist == "DEEPSPEED":
            path = REPO / cfg.deepspeed_config["deepspeed_config_file"]
            ds = json.loads(path.read_text())
            stage = {"deepspeed_zero2": 2, "deepspeed_zero2_offload": 2, "deepspeed_zero3": 3}[name]
            assert ds["zero_optimization"]["stage"] == stage
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
                assert ds[key] == "auto", (name, key)
            assert ds["fp16"]["enabled"] == "auto" and ds["bf16"]["enabled"] == "auto"
            assert "optimizer" not in ds and "scheduler" not in ds
            offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device")
            assert (offload == "cpu") == name.endswith("offload")
            if stage == 3:
                assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == "auto"
