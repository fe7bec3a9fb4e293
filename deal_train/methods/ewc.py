"""EWC: elastic weight consolidation (Kirkpatrick et al., PNAS 2017) on the LoRA parameters; docs/design.md
section 4 and the paper's Table 8 baseline. One LoRA adapter is trained on every task (as SeqLoRA) with

    loss = CE(answer tokens) + ewc_lambda * sum_j F_j (theta_j - theta*_j)^2

where theta are the LoRA matrices, theta* their values after the previous task, and F the diagonal Fisher
information summed over all earlier tasks (one anchor and a running Fisher sum: the "online EWC" form of
Schwarz et al. 2018 with decay 1, which needs one copy of theta* instead of one per task).

Fisher of a finished task: the empirical Fisher from mini-batch gradients (one backward pass per batch; the
per-example Fisher would need one per row), ``F_j = mean_b (d CE_b / d theta_j)^2`` over the first
``ewc_fisher_batches`` micro batches of the task's own training rows, CE_b the mean answer-token cross-entropy
of batch b (nats per token), taken in eval mode (no dropout) at theta*. Units: nats² per parameter unit².
Batch gradients average out part of the per-example noise, so this is smaller than the per-example Fisher (by
up to the batch size). Under data parallelism every process estimates the same Fisher from the same micro batches
of ``per_device_train_batch_size`` rows, so it depends on the per-device batch, not on the global one: EWC with 2
processes x batch b matches one process x batch 2b only up to this estimate (other methods match exactly).

Default ``ewc_lambda = 1000``. Measured on the tiny test model (rank 8, lr 3e-4, batch 8, 12 steps per task):
the Fisher after one task sums to about 0.5 over its 3,584 LoRA entries (median 7e-8, max 8e-3), and 12 steps
into the next task sum F (theta - theta*)^2 is about 3e-6. Under Adam the drift grows about linearly with the
steps, so the penalty grows about quadratically; extrapolated to the 125 steps of a 1,000-row task, lambda = 1e3
gives about 0.3 nats, the size of a learned task's answer cross-entropy (0.1 to 1 nats): a real brake that does
not pin the adapter from the first steps. Other models and budgets scale the Fisher differently; watch
``ewc/penalty`` in TensorBoard and tune.

State for resume (``state_dict``): ``fisher/<param name>`` and ``anchor/<param name>`` (float32).
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from peft import PeftModel

from ..model.sharding import live
from ..model.losses import answer_forward, token_cross_entropy_sum
from .base import ContinualMethod


def diagonal_fisher(model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]], batches: Iterable[dict],
                    num_batches: int) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of ``params``: mean over up to ``num_batches`` micro batches of the squared
    gradient of the batch's mean answer-token cross-entropy.

    Args:
        params: (name, parameter) pairs, all with ``requires_grad``.
        batches: collated training micro batches (``collate_train``); moved to the model's device here.
    Returns:
        name -> float32 tensor of the parameter's shape (nats² per unit²). Gradients are cleared afterwards.
    Raises:
        ValueError: ``batches`` is empty, or a parameter got no gradient.
    """
    device = params[0][1].device
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    count = 0
    model.zero_grad(set_to_none=True)
    for batch in itertools.islice(batches, num_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = answer_forward(model, batch)
        ce_sum, n_tokens = token_cross_entropy_sum(outputs.logits, batch["labels"])
        # autograd.grad, not backward: the gradients never reach .grad, so the gradient hooks of DDP and DeepSpeed
        # (still registered after the task's last step) neither reduce nor take them
        grads = torch.autograd.grad(ce_sum / max(n_tokens, 1), [p for _n, p in params], allow_unused=True)
        for (n, _p), g in zip(params, grads):
            if g is None:
                raise ValueError(f"EWC Fisher: parameter {n} got no gradient.")
            sums[n] += g.float() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("EWC Fisher: no training batches.")
    return {n: s / count for n, s in sums.items()}


class EWC(ContinualMethod):
    """SeqLoRA plus the EWC penalty. Config keys: ``ewc_lambda``, ``ewc_fisher_batches``."""

    name = "ewc"
    label = "EWC"
    config_prefix = "ewc_"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fisher: dict[str, torch.Tensor] = {}  # name -> summed Fisher of earlier tasks (float32)
        self.anchor: dict[str, torch.Tensor] = {}  # name -> value after the last finished task (float32)
        self._terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def before_task(self, model: PeftModel, task_index: int, train_rows=None) -> None:
        """Bind the stored Fisher and anchors to the model's parameters.

        Raises:
            RuntimeError: a stored parameter name is not in the model.
        """
        super().before_task(model, task_index, train_rows)
        params = dict(model.named_parameters())
        missing = sorted(set(self.fisher) - set(params))
        if missing:
            raise RuntimeError(f"EWC: the model lacks parameters {missing[:3]} of the stored Fisher.")
        self._terms = [(params[n], self.fisher[n].to(params[n].device), self.anchor[n].to(params[n].device))
                       for n in sorted(self.fisher)]

    def penalty(self) -> torch.Tensor:
        """sum F (theta - theta*)^2 over the bound parameters (float32 scalar; 0 before the second task)."""
        if not self._terms:
            return torch.zeros(())
        params = live(p for p, _f, _a in self._terms)  # gathered copies under ZeRO-3
        return torch.stack([(f * (p.float() - a) ** 2).sum() for p, (_p, f, a) in zip(params, self._terms)]).sum()

    def extra_loss(self, model, batch, outputs):
        if not self._terms:
            return None, {}
        pen = self.penalty()
        return self.cfg.ewc_lambda * pen, {"ewc/penalty": float(pen.detach())}

    def after_task(self, model: PeftModel, task_index: int, train_batches: Iterable[dict] | None = None) -> None:
        """Add this task's Fisher (of the trainable parameters) to the sum and move the anchor here.

        Raises:
            ValueError: ``train_batches`` is None or empty.
        """
        if train_batches is None:
            raise ValueError("EWC needs the finished task's training batches to estimate the Fisher.")
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fisher = diagonal_fisher(model, params, train_batches, self.cfg.ewc_fisher_batches)
        for (n, _p), value in zip(params, live(p for _n, p in params)):
            self.fisher[n] = self.fisher[n] + fisher[n] if n in self.fisher else fisher[n]
            self.anchor[n] = value.detach().float().clone()
        self._terms = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"fisher/{n}": f for n, f in self.fisher.items()}
        state.update({f"anchor/{n}": a for n, a in self.anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Raises:
            ValueError: ``state`` is empty (EWC resumed after a task always has a Fisher), has keys other than
                ``fisher/...`` and ``anchor/...``, or the two sets of names differ.
        """
        fisher = {k[len("fisher/"):]: v.float() for k, v in state.items() if k.startswith("fisher/")}
        anchor = {k[len("anchor/"):]: v.float() for k, v in state.items() if k.startswith("anchor/")}
        if not fisher or len(fisher) + len(anchor) != len(state) or fisher.keys() != anchor.keys():
            raise ValueError("EWC state must hold fisher/<name> and anchor/<name> for the same, non-empty set of "
                             f"parameters; got keys {sorted(state)[:4]}.")
        self.fisher, self.anchor = fisher, anchor
