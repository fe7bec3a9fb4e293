"""With a bfloat16 or float16 base model, every trainable and adapter tensor stays float32 on every path that creates
or loads one: ``wrap``; ``before_task`` of tasks 1 and 2 (per_task / o_lora add adapters, lwf adds its teacher,
DEAL installs its parametrization); ``after_task`` (DEAL's fold, EWC's Fisher); a resumed run loading the saved
adapters with ``load_adapter_weights`` and going on to its next task; and a whole run under Accelerate's bf16 autocast."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from deal_train.config import TrainConfig
from deal_train.data import collate_train
from deal_train.train.loop import run, save_task_outputs
from deal_train.methods import METHODS, get_method
from deal_train.model.precision import DTYPES, adapter_parameters, load_base_model, low_precision_trainables

from conftest import TINY_RUN


def _check(model, dtype, where):
    bad = low_precision_trainables(model)
    assert not bad, f"{where}: not float32: {bad[:5]}"
    adapters = adapter_parameters(model)
    assert adapters, where
    base = [p for n, p in model.named_parameters()
            if "lora_" not in n and "parametrizations" not in n and "osf_svd_params" not in n]
    assert base and all(p.dtype == dtype for p in base), f"{where}: the base model is not {dtype}"


CASES = [(name, "bfloat16") for name in sorted(METHODS)] + [("deal", "float16")]


def test_every_method_is_walked():
    assert {name for name, _dtype in CASES} == set(METHODS)


@pytest.mark.parametrize("name,dtype_name", CASES)
def test_adapters_stay_float32_on_a_half_precision_base(name, dtype_name, tokenizer, tiny_method, tmp_path):
    dtype = DTYPES[dtype_name]
    cfg, datas, method, _fp32 = tiny_method(name, model_dtype=dtype_name)
    model = method.wrap(load_base_model(cfg, tokenizer, torch.device("cpu")))
    _check(model, dtype, "wrap")
    batches = [collate_train([datas[0].train_features[i] for i in range(4)], tokenizer.pad_token_id)]
    paths = []
    for t in range(2):
        method.before_task(model, t, datas[t].train_rows)
        _check(model, dtype, f"before_task {t}")
        if name == "deal" and t == 1:
            factors = method.factors
            assert factors and all(b.dtype == torch.float32 for f in factors for b in f.buffers())
            with torch.no_grad():  # a step's worth of change, so that the fold writes new values
                for p in method.deal_parameters():
                    p.add_(0.01)
        method.after_task(model, t, batches)
        _check(model, dtype, f"after_task {t}")
        paths.append(str(tmp_path / f"task{t}"))
        save_task_outputs(method, model, paths[-1])
        saved = load_file(f"{paths[-1]}/adapter_model.safetensors")
        assert saved and all(v.dtype == torch.float32 for v in saved.values())

    # resume: a fresh model loads tasks 1-2's adapters, then prepares task 3
    resumed_method = get_method(cfg)
    resumed = resumed_method.wrap(load_base_model(cfg, tokenizer, torch.device("cpu")))
    resumed_method.load_adapter_weights(resumed, paths)
    state = f"{paths[-1]}/method_state.safetensors"
    resumed_method.load_state_dict(load_file(state) if os.path.isfile(state) else {})
    _check(resumed, dtype, "load_adapter_weights")
    resumed_method.before_task(resumed, 2, datas[1].train_rows)
    _check(resumed, dtype, "before_task after resume")


def test_bf16_autocast_run_keeps_float32_adapters(tmp_path):
    """A whole DEAL run: bfloat16 base, Accelerate's bf16 autocast (on the CPU), float32 adapters saved."""
    small = {**TINY_RUN, "max_train_samples": 4, "max_test_samples": 2, "max_new_tokens": 2}
    cfg = TrainConfig(method="deal", model_dtype="bfloat16", mixed_precision="bf16", output_dir=str(tmp_path / "bf16"),
                      **small)
    # Accelerate keeps one process-wide state; the other tests made it without mixed precision
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        metrics = run(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert metrics["finished"] and all(p["final_loss"] is not None for p in metrics["per_task"])
    first = load_file(tmp_path / "bf16" / "adapters" / "1-dbpedia" / "adapter_model.safetensors")
    second = load_file(tmp_path / "bf16" / "adapters" / "2-amazon" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in second.values())
    assert any(not torch.equal(first[k], second[k]) for k in first)
