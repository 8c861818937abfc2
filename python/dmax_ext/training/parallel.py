"""The trainer's model transformations: activation checkpointing, FSDP2 sharding and the state
gathering it needs, the frozen padding row, and aux-loss-free expert balancing."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def apply_activation_checkpointing(model) -> None:
    """Recomputes each decoder layer in backward instead of keeping its activations. The layer's
    forward is replaced on the instance, so module names (and checkpoint keys) do not change."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        def forward(*args, _inner=layer.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)
        layer.forward = forward


def shard_with_fsdp(model, autocast_dtype):
    """FSDP2: every decoder layer and then the root are `fully_shard`ed (parameters split over
    ranks on dim 0, gathered per layer in forward/backward)."""
    from torch.distributed.fsdp import fully_shard

    del autocast_dtype  # bf16 compute comes from autocast in the step, the params stay fp32
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _is_sharded(t) -> bool:
    return hasattr(t, "full_tensor")


def full_state_dict(wrapped, model, fsdp: bool):
    """The model to hand to save_model on rank 0 (None on other ranks). Without FSDP that is the
    model itself; with FSDP every rank gathers each parameter and rank 0 assembles an unsharded
    CPU copy."""
    if not fsdp:
        return model
    from ..model import LLaDA2MoeModel

    full = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        full[name] = (t.full_tensor() if _is_sharded(t) else t).cpu()
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        copy = LLaDA2MoeModel(model.config)
    copy.load_state_dict(full, assign=True)
    copy.tokenizer = getattr(model, "tokenizer", None)
    return copy.eval()


def optimizer_state_for_save(wrapped, optimizer, fsdp: bool):
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(wrapped, optimizer, state, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def zero_row_grad(weight, row: int, world: int, rank: int) -> None:
    """Zeroes the gradient of one embedding row (the padding index: it gets no gradient). With
    FSDP2 the gradient is this rank's dim-0 shard (torch.chunk split: ceil(V / world) rows)."""
    grad = weight.grad
    if grad is None:
        return
    if _is_sharded(grad):
        local = grad.to_local()
        start = rank * math.ceil(weight.shape[0] / world)
        if start <= row < start + local.shape[0]:
            local[row - start].zero_()
        return
    grad[row].zero_()


class ExpertLoadBalancer:
    """Aux-loss-free balancing (the rule LLaDA2/DeepSeek-V3 train with): after each optimizer
    step, every router's expert_bias moves by `rate` towards equal load:
    bias_e += rate * sign(mean load - load_e), loads counted over the step's training forwards
    (summed over ranks). rate 0 leaves expert_bias untouched (fine-tuning a trained model)."""

    def __init__(self, model, rate: float, group=None):
        from ..model.moe import Router

        self.rate, self.group = rate, group
        self.counts: dict = {}
        if rate <= 0:
            return
        for module in model.modules():
            if isinstance(module, Router):
                self.counts[module] = torch.zeros(module.expert_bias.numel(), dtype=torch.float32,
                                                  device=module.expert_bias.device)
                module.register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():  # training forwards only, not the no-grad rollout
            ids = output[0].flatten()
            self.counts[module] += torch.bincount(ids, minlength=self.counts[module].numel()).float()

    @torch.no_grad()
    def update(self) -> None:
        for router, counts in self.counts.items():
            if self.group is not None:
                dist.all_reduce(counts, group=self.group)
            if counts.sum() > 0:
                router.expert_bias += self.rate * torch.sign(counts.mean() - counts)
            counts.zero_()
