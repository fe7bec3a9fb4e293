"""ZeRO-3 parameter access for code that reads or writes adapter tensors outside the forward pass (the methods'
loss terms, DEAL's fold, the saves). Every helper does nothing for ordinary tensors, so the methods call them
unconditionally; why each is needed is explained in ``deal_train.train.distributed``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def is_zero3(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DeepSpeed ZeRO-3 parameter (it carries ``ds_id``)."""
    return hasattr(p, "ds_id")


def gather(params: Iterable[torch.nn.Parameter]) -> None:
    """Make the ZeRO-3 parameters among ``params`` whole on this rank where ZeRO-3 has released them; they stay
    whole until ZeRO-3 releases them again. Ordinary tensors are left alone. Collective under ZeRO-3 (every process
    calls it with the same parameters)."""
    todo = [p for p in params if is_zero3(p) and p.ds_status.name == "NOT_AVAILABLE"]
    if todo:
        todo[0].all_gather(param_list=todo)


def gather_adapters(model: torch.nn.Module) -> None:
    """``gather`` for every adapter tensor of ``model`` (a no-op unless they are ZeRO-3 parameters)."""
    from .precision import adapter_parameters

    gather([p for _n, p in adapter_parameters(model)])


def live(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors to build a loss term from outside the forward pass: ``params`` themselves, except that ZeRO-3
    parameters are gathered and replaced by copies (``clone``: the gradient flows back to the parameter, while the
    data the backward pass needs no longer depends on ZeRO-3 keeping the parameter whole). Collective under
    ZeRO-3."""
    params = list(params)
    if not any(is_zero3(p) for p in params):
        return params
    gather(params)
    return [p.clone() if is_zero3(p) else p for p in params]


def live_named(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``live`` for the parameters of ``module`` by name, for ``torch.func.functional_call``; None when none is a
    ZeRO-3 parameter (then call the module as it is)."""
    named = dict(module.named_parameters())
    if not any(is_zero3(p) for p in named.values()):
        return None
    return dict(zip(named, live(named.values())))


@contextlib.contextmanager
def writing(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Context for changing parameters outside the optimizer. For ZeRO-3 parameters: gathered on entry, the new
    values (those of rank 0; every rank computes the same) written into their partitions on exit, and gathered
    whole again; for ordinary tensors it does nothing. Run no forward pass inside (ZeRO-3 may release the
    parameters after one, and a released parameter's new value would be lost). Collective under ZeRO-3."""
    zero = [p for p in params if is_zero3(p)]
    if not zero:
        yield
        return
    import deepspeed

    gather(zero)

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=0):
        yield
    zero[0].all_gather(param_list=zero)
