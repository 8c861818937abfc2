"""The ops a step calls, from either implementation: "native" (torch.ops.dmax, see NativeOps)
or "reference" (dmax_ext.reference, the pure-PyTorch spec). Both expose the op schemas of
docs/ARCHITECTURE.md ("Ops"), hybrid_embed writing in place."""
from __future__ import annotations

import torch

from .params import OPS_BACKENDS

OP_NAMES = ("logits_stats", "promote", "spd_update", "hybrid_embed")


class NativeOps:
    """The native ops, as torch.ops.dmax.* directly: a step passes them its own buffers, whose
    shapes, dtypes, devices and id ranges their C++ checks (csrc/common/spd_checks.h,
    sampling_checks.h) cover; the dmax_ext.ops wrappers' Python checks of the same cost ~15 us
    a step on the CPU for promote, spd_update and hybrid_embed, and ~30 us for logits_stats'
    (docs/PERFORMANCE.md). logits_stats keeps the wrapper's one check of values on the CPU
    (ops.check_softmax_defined: a NaN row, the model's fault, becomes an error); on CUDA, as
    the wrapper, none (it would wait for the device, and a CUDA graph capture forbids it)."""

    def __init__(self):
        from .. import ops
        self._check_softmax_defined = ops.check_softmax_defined

    def logits_stats(self, logits, *args):
        if not logits.is_contiguous():  # a model may return a view (the op reads rows in place)
            logits = logits.contiguous()
        out = torch.ops.dmax.logits_stats(logits, *args)
        if not logits.is_cuda:
            self._check_softmax_defined(out[1])
        return out

    def promote(self, *args):
        return torch.ops.dmax.promote(*args)

    def spd_update(self, *args):
        return torch.ops.dmax.spd_update(*args)

    def hybrid_embed(self, *args) -> None:
        torch.ops.dmax.hybrid_embed(*args)

    def spd_step(self, *args) -> None:
        """A whole SPD step in one dispatch (CPU tensors; step.apply_step picks it)."""
        torch.ops.dmax.spd_step(*args)

    def threshold_step(self, *args) -> None:
        """A whole threshold-baseline step in one dispatch (CPU tensors)."""
        torch.ops.dmax.threshold_step(*args)


class ReferenceOps:
    def __init__(self):
        from .. import reference
        self.logits_stats = reference.logits_stats_reference
        self.promote = reference.promote_reference
        self.spd_update = reference.spd_update_reference
        self._hybrid_embed = reference.hybrid_embed_reference

    def hybrid_embed(self, embeds, *args) -> None:
        embeds.copy_(self._hybrid_embed(embeds, *args))  # the reference returns a new tensor


def resolve_ops(ops):
    """"native", "reference", or an object with the four functions (tests: a scripted stand-in)."""
    if ops == "native":
        return NativeOps()
    if ops == "reference":
        return ReferenceOps()
    if isinstance(ops, str) or not all(callable(getattr(ops, n, None)) for n in OP_NAMES):
        raise ValueError(f"ops must be one of {list(OPS_BACKENDS)} or an object with "
                         f"{', '.join(OP_NAMES)}; got {ops!r}")
    return ops
