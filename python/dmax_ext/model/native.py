"""The native kernels the model runs on the CPU (dmax_ext.ops: moe_experts, skinny_linear) for a
decoding block's few rows without gradients. Imported lazily: the model itself does not need the
native library, and runs its torch formulations wherever a kernel does not apply."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _ops():
    try:
        from .. import ops
    except ImportError:
        return None
    return ops


def native_op(name: str, x: torch.Tensor, weight: torch.Tensor, max_rows: int | None = None):
    """dmax_ext.ops.<name> when it may serve x [..., H] with the parameter `weight`: on the CPU,
    at most max_rows rows (None: any), no gradient wanted (the native ops have no autograd), and
    the loaded library has the op; else None."""
    if x.device.type != "cpu" or (max_rows is not None and x.numel() > max_rows * x.shape[-1]):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    ops = _ops()
    return getattr(ops, name) if ops is not None and ops.has_op(name) else None
