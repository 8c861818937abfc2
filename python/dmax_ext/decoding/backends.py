"""The ops a step calls, from either implementation: "native" (torch.ops.dmax through the
dmax_ext.ops wrappers) or "reference" (dmax_ext.reference, the pure-PyTorch spec). Both expose
the op schemas of docs/ARCHITECTURE.md ("Ops"), hybrid_embed writing in place."""
from __future__ import annotations

import torch

from .params import OPS_BACKENDS

OP_NAMES = ("logits_stats", "promote", "spd_update", "hybrid_embed")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class NativeOps:
    """The native ops. promote, spd_update and hybrid_embed run as torch.ops.dmax.* directly: a
    step passes them its own buffers, whose shapes, dtypes, devices and id ranges their C++
    checks (csrc/common/spd_checks.h) cover; the dmax_ext.ops wrappers' Python checks of the same
    cost ~15 us a step on the CPU (docs/PERFORMANCE.md). logits_stats keeps its wrapper, which
    turns a NaN row (the model's fault) into an error, except while a CUDA graph is being
    captured: its value check reads tensor data (a host sync, illegal during capture), and the
    eager warm-up step just before the capture has run it on the same buffers."""

    def __init__(self):
        from .. import ops
        self._logits_stats = ops.logits_stats

    def logits_stats(self, *args):
        op = torch.ops.dmax.logits_stats if _capturing() else self._logits_stats
        return op(*args)

    def promote(self, *args):
        return torch.ops.dmax.promote(*args)

    def spd_update(self, *args):
        return torch.ops.dmax.spd_update(*args)

    def hybrid_embed(self, *args) -> None:
        torch.ops.dmax.hybrid_embed(*args)


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
