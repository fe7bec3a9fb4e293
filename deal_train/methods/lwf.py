"""LwF: learning without forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017); docs/design.md section 4 and the paper's
Table 8 baseline. One LoRA adapter is trained on every task (as SeqLoRA); from the second task on, the loss adds
a distillation term from the model as it was before the task, on the new task's inputs:

    lwf_weight * mean_{answer tokens} KL( softmax(z_teacher / T) || softmax(z_student / T) )

over the positions that predict the answer tokens (the same positions as the CE), T = ``lwf_temperature``.
Its gradient equals that of LwF's soft-target cross-entropy (the teacher's entropy is a constant); there is
no T² factor, as in LwF (lambda_o = 1, T = 2 there).

The teacher costs no model copy: before the task the current adapter is copied into a second, frozen PEFT
adapter ``lwf_teacher`` (``get_peft_model_state_dict`` / ``set_peft_model_state_dict``); the teacher's logits
come from a forward pass with that adapter active, in eval mode, under ``torch.no_grad``. The teacher
adapter is deleted after the task, so the saved and evaluated model is plain LoRA.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from ..model.sharding import writing
from ..model.losses import answer_forward, answer_logits
from .adapters import activate, kept_adapter_state
from .base import ContinualMethod

TEACHER_ADAPTER = "lwf_teacher"
STUDENT_ADAPTER = "default"


class LwF(ContinualMethod):
    """SeqLoRA plus distillation from the previous model. Config keys: ``lwf_temperature``, ``lwf_weight``."""

    name = "lwf"
    label = "LwF"
    config_prefix = "lwf_"

    def before_task(self, model: PeftModel, task_index: int, train_rows=None) -> None:
        """From task 1 on: snapshot the adapter into the frozen teacher adapter."""
        super().before_task(model, task_index, train_rows)
        if task_index == 0:
            return
        if TEACHER_ADAPTER not in model.peft_config:
            model.add_adapter(TEACHER_ADAPTER, self.lora_config())  # inactive and frozen
        state = get_peft_model_state_dict(model, adapter_name=STUDENT_ADAPTER)
        teacher = [p for n, p in model.named_parameters() if f".{TEACHER_ADAPTER}." in n]
        with writing(teacher):  # under ZeRO-3 the teacher of an earlier task is partitioned
            set_peft_model_state_dict(model, state, adapter_name=TEACHER_ADAPTER)
        model.set_requires_grad(TEACHER_ADAPTER, requires_grad=False)

    def teacher_logits(self, model, batch: dict) -> torch.Tensor:
        """Logits of the model before the task on ``batch``: (batch, answer_window, vocab), no gradient.

        ``model`` may be wrapped for distributed training (``.module``); the teacher pass runs on the inner model.
        The active adapter, ``requires_grad`` flags and train/eval mode are restored afterwards.
        """
        inner = getattr(model, "module", model)
        was_training = inner.training
        with torch.no_grad(), kept_adapter_state(inner):
            inner.eval()
            activate(inner, [TEACHER_ADAPTER], inference_mode=True)
            try:
                return answer_forward(inner, batch).logits
            finally:
                inner.train(was_training)

    def distillation(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        """Mean over answer tokens of KL(teacher_T || student_T) (float32 scalar, nats)."""
        s, _ = answer_logits(student_logits, labels)
        t, _ = answer_logits(teacher_logits, labels)
        temp = self.cfg.lwf_temperature
        return torch.nn.functional.kl_div(torch.log_softmax(s.float() / temp, dim=-1),
                                          torch.log_softmax(t.float() / temp, dim=-1),
                                          log_target=True, reduction="batchmean")

    def extra_loss(self, model, batch, outputs):
        if self.task_index == 0:
            return None, {}
        kl = self.distillation(outputs.logits, self.teacher_logits(model, batch), batch["labels"])
        return self.cfg.lwf_weight * kl, {"lwf/kl": float(kl.detach())}

    def after_task(self, model: PeftModel, task_index: int, train_batches=None) -> None:
        """Delete the teacher adapter."""
        if TEACHER_ADAPTER in model.peft_config:
            model.delete_adapter(TEACHER_ADAPTER)
