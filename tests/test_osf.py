"""OSF (PEFT's Orthogonal Subspace Fine-tuning) on the tiny random LLaMA with real rows: a two-task run end to end,
its adapters rebuilt by stock PEFT (merge adapter 1, load adapter 2) with the run's predictions and logits, the
preserved rank growing per task, exact resume after task 1, the dry run's count, and the refused profiles."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from peft import PeftModel

from deal_train.config import ConfigError, TrainConfig
from deal_train.data import collate_train
from deal_train.methods import get_method
from deal_train.methods.osf import OSF, osf_layers, preserved_fraction
from deal_train.model.loading import load_model
from deal_train.train import loop

from conftest import forget_last_task, saved_predictions, predictions_on_test_rows

# tiny LLaMA: q_proj 64 -> 64 (m = 64), v_proj 64 -> 32 (m = 32), 2 layers; task 1 preserves 0.3, task 2 0.7
# k = m - int(m * f); trainable per matrix k * (out + in + 1)
TASK1 = 2 * ((64 - 19) * (64 + 64 + 1) + (32 - 9) * (32 + 64 + 1))
TASK2 = 2 * ((64 - 44) * (64 + 64 + 1) + (32 - 22) * (32 + 64 + 1))


def _stock_model(tokenizer, cfg, adapters: list[pathlib.Path]):
    """The model after the last of ``adapters`` rebuilt with stock PEFT only: each earlier adapter loaded and
    merged (``merge_and_unload``), the last one loaded."""
    model = load_model(cfg.model, tokenizer)
    for path in adapters[:-1]:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(adapters[-1])).eval()


def test_two_task_run_stock_peft_reproduces_predictions(finished_run, tokenizer):
    cfg, metrics, _ = finished_run("osf")
    out = pathlib.Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished"] and saved["config"]["method"] == "osf"
    assert all(isinstance(saved["accuracy_matrix"][i][1], float) for i in range(2))
    assert [p["trainable_parameters"] for p in saved["per_task"]] == [TASK1, TASK2]
    a1, a2 = out / "adapters" / "1-dbpedia", out / "adapters" / "2-amazon"
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in (a1, a2)]
    assert [c["peft_type"] for c in configs] == ["OSF", "OSF"]
    assert [c["effective_rank"] for c in configs] == [pytest.approx(0.3), pytest.approx(0.7)]
    assert sorted(configs[0]["target_modules"]) == ["q_proj", "v_proj"]  # LoRA's defaults: the same layers
    stock1 = _stock_model(tokenizer, cfg, [a1])
    assert predictions_on_test_rows(stock1, tokenizer, cfg, 0) == saved_predictions(out, "after_1-dbpedia", "1-dbpedia.jsonl")
    stock2 = _stock_model(tokenizer, cfg, [a1, a2])
    for i, task_file in enumerate(["1-dbpedia.jsonl", "2-amazon.jsonl"]):
        assert predictions_on_test_rows(stock2, tokenizer, cfg, i) == saved_predictions(out, "after_2-amazon", task_file)


def test_stock_peft_logits_equal_the_methods_rebuilt_model(finished_run, tokenizer, tiny_method):
    cfg, _, _ = finished_run("osf")
    out = pathlib.Path(cfg.output_dir)
    adapters = [out / "adapters" / "1-dbpedia", out / "adapters" / "2-amazon"]
    _, datas, method, model = tiny_method("osf", model=cfg.model, tasks=cfg.tasks)
    method.load_adapter_weights(model, [str(a) for a in adapters])
    batch = collate_train([datas[1].train_features[i] for i in range(4)], tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = model.eval()(**inputs).logits
        stock = _stock_model(tokenizer, cfg, adapters)(**inputs).logits
        base = load_model(cfg.model, tokenizer)(**inputs).logits
        only_last = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), str(adapters[1])).eval()(**inputs).logits
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)  # training moved the model
    assert not torch.allclose(ours, only_last, atol=1e-4)  # adapter 2 alone is not the model after task 2


def test_preserved_rank_grows_and_update_is_orthogonal(tiny_method):
    cfg, datas, method, model = tiny_method("osf", osf_preserved_first=0.25, osf_preserved_last=0.75)
    assert preserved_fraction(cfg, 0, 2) == 0.25 and preserved_fraction(cfg, 1, 2) == 0.75
    method.before_task(model, 0)
    first = method.preserved_ranks(model)
    assert sorted(set(first.values())) == [8, 16]  # int(32 * 0.25), int(64 * 0.25)
    assert all(p.dtype == torch.float32 for _n, layer in osf_layers(model) for p in layer.osf_svd_params.parameters())
    # give task 1 an update, then grow: the update is merged into the base and the frozen rank grows
    _n, layer = osf_layers(model)[0]
    with torch.no_grad():
        layer.osf_svd_params["default"]["S_low"].mul_(3.0)
    delta = layer.get_delta_weight("default").clone()
    w0 = layer.get_base_layer().weight.detach().clone()
    method.before_task(model, 1)
    second = method.preserved_ranks(model)
    assert sorted(set(second.values())) == [24, 48] and all(second[n] > first[n] for n in first)
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + delta)
    assert float(layer.get_delta_weight("default").detach().abs().max()) == 0.0  # fresh decomposition: no update yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("osf_svd_params" in n for n in trainable)
    # PEFT's hook projects U_low's gradient orthogonal to the preserved directions
    u = layer.osf_svd_params["default"]["U_low"]
    (u.sum() * 1.0).backward()
    u_high = torch.linalg.svd(layer.get_base_layer().weight.float(), full_matrices=False)[0][:, :second[_n]]
    assert float((u_high.T @ u.grad).abs().max()) < 1e-4 and float(u.grad.abs().max()) > 1e-3


def test_resume_after_task_1_gives_identical_results(finished_run, tmp_path):
    cfg, metrics, _ = finished_run("osf")
    out = tmp_path / "osf"
    shutil.copytree(cfg.output_dir, out)
    final = forget_last_task(out)
    resumed = loop.run(TrainConfig(**{**cfg.to_dict(), "output_dir": str(out)}))
    assert (out / "adapters" / "2-amazon" / "adapter_model.safetensors").read_bytes() == final
    assert resumed["accuracy_matrix"] == metrics["accuracy_matrix"]


def test_plan_trainable_counts_the_residual_subspace():
    cfg = TrainConfig(method="osf", tasks=["dbpedia", "amazon"])
    factors = [((4, 64), (64, 4)), ((4, 64), (32, 4))] * 2  # LoRA A/B shapes of the tiny LLaMA
    assert OSF.plan_trainable(0, factors, cfg) == (TASK1, TASK2)


@pytest.mark.parametrize("key", ["load_in_8bit", "load_in_4bit"])
def test_quantised_base_is_refused(key):
    with pytest.raises(ConfigError, match=f"method osf cannot run with {key} true.*Set {key} false"):
        get_method(TrainConfig(method="osf", **{key: True}))


@pytest.mark.parametrize("first,last", [(0.0, 0.5), (0.6, 0.4), (0.3, 1.0)])
def test_bad_preserved_fractions_are_refused(first, last):
    with pytest.raises(ConfigError, match="osf_preserved_first .* must satisfy 0 < first <= last < 1"):
        get_method(TrainConfig(method="osf", osf_preserved_first=first, osf_preserved_last=last))


def test_tiny_t5_two_task_run_and_stock_peft(finished_t5_run, tokenizer):
    """OSF wraps T5's q and v (64 x 64, 12 matrices) and its task-2 adapter, loaded by stock PEFT over the merged
    task-1 adapter, reproduces the run's task-2 answers."""
    cfg, metrics, _ = finished_t5_run("osf")
    out = pathlib.Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished"] and saved["config"]["target_modules"] == ["q", "v"]
    assert [p["trainable_parameters"] for p in saved["per_task"]] == [12 * (64 - 19) * 129, 12 * (64 - 44) * 129]
    adapters = [out / "adapters" / "1-dbpedia", out / "adapters" / "2-amazon"]
    assert json.loads((adapters[1] / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    assert predictions_on_test_rows(_stock_model(tokenizer, cfg, adapters), tokenizer, cfg, 1) == \
        saved_predictions(out, "after_2-amazon", "2-amazon.jsonl")


# --- distributed profiles (2 CPU processes over gloo, as tests/test_distributed.py) --------------------------------

DIST_TOL = 1e-5  # float32 adapters; task 2's factors come from an SVD of the merged task-1 weights


def _osf_launch(profile: str, out, *extra: str):
    from test_distributed import _launch

    return _launch(profile, out, "--method", "osf", "--per_device_train_batch_size", "2", *extra)


@pytest.mark.parametrize("profile,extra", [("multi_cpu", ()), ("deepspeed_zero2", ("--mixed_precision", "no"))])
def test_ddp_and_zero2_two_processes_equal_one_process(profile, extra, finished_run, tokenizer, tmp_path):
    """2 processes x 2 rows give the one-process run with 4 rows (``finished_run``): task 1's adapter tensor by
    tensor, the model after task 2 by its logits."""
    from safetensors.torch import load_file

    cfg, ref_metrics, _ = finished_run("osf")
    _osf_launch(profile, tmp_path / profile, *extra)
    metrics = json.loads((tmp_path / profile / "metrics.json").read_text())
    assert metrics["finished"] and [p["optimizer_steps"] for p in metrics["per_task"]] == [2, 2]
    got = load_file(tmp_path / profile / "adapters" / "1-dbpedia" / "adapter_model.safetensors")
    want = load_file(pathlib.Path(cfg.output_dir) / "adapters" / "1-dbpedia" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and any("S_low" in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=DIST_TOL, rtol=0, msg=f"{profile} 1-dbpedia {k}")
    # task 2's factors come from an SVD of the merged weights, whose basis is not unique under ~1e-7 changes
    # (measured: V_low differs); the model they define must agree
    runs = [tmp_path / profile, pathlib.Path(cfg.output_dir)]
    models = [_stock_model(tokenizer, cfg, [r / "adapters" / "1-dbpedia", r / "adapters" / "2-amazon"]) for r in runs]
    ids = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in models]
    torch.testing.assert_close(logits[0], logits[1], atol=DIST_TOL, rtol=0)


def test_zero3_is_refused_with_the_profiles_to_use(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO
    from test_distributed import ARGS, _free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"), "--main_process_port", port,
                           "--num_processes", "2", "-m", "deal_train", *ARGS, "--method", "osf",
                           "--per_device_train_batch_size", "2", "--mixed_precision", "no",
                           "--output_dir", str(tmp_path / "z3")],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode != 0
    assert "method osf cannot run under DeepSpeed ZeRO-3" in proc.stdout + proc.stderr
    assert "deepspeed_zero2.yaml" in proc.stdout + proc.stderr
    assert not (tmp_path / "z3" / "adapters" / "1-dbpedia").exists()
