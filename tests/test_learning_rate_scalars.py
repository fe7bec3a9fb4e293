"""The TensorBoard learning-rate scalars name every parameter group: DEAL trains its filter and MLP at
``deal_learning_rate`` and its residuals at ``learning_rate`` after task 1, and both must be logged as such."""

from __future__ import annotations

from deal_train.config import TrainConfig
from deal_train.methods import DEAL, SeqLoRA
from deal_train.model.precision import build_optimizer
from deal_train.train.task import learning_rate_scalars


def _scalars(method, model):
    groups = [g for g in method.param_groups(model) if g["params"]]
    return learning_rate_scalars(build_optimizer(method.cfg, groups))


def test_deal_logs_each_group_by_name(tiny_model):
    cfg = TrainConfig(method="deal", model="tiny-random-llama", lora_rank=4, learning_rate=3e-4,
                      deal_learning_rate=1e-3, deal_mlp_hidden=8, deal_residual_update=True)
    method = DEAL(cfg)
    model = method.wrap(tiny_model)
    method.before_task(model, 0)
    assert _scalars(method, model) == {"train/learning_rate/lora": 3e-4}
    method.after_task(model, 0)
    method.before_task(model, 1)
    assert _scalars(method, model) == {"train/learning_rate/deal": 1e-3, "train/learning_rate/residual": 3e-4}


def test_one_group_methods_log_lora(tiny_model):
    method = SeqLoRA(TrainConfig(method="seq_lora", model="tiny-random-llama", lora_rank=4, learning_rate=5e-4))
    model = method.wrap(tiny_model)
    method.before_task(model, 1)
    assert _scalars(method, model) == {"train/learning_rate/lora": 5e-4}
