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
    """The dmax_ext.ops wrappers; while a CUDA graph is being captured, the ops themselves: a
    wrapper's value checks read tensor data (a host sync, illegal during capture), and the eager
    warm-up step just before the capture has run them on the same buffers."""

    def __init__(self):
        from .. import ops
        self._wrappers = {name: getattr(ops, name) for name in OP_NAMES}

    def _call(self, name: str, *args):
        op = getattr(torch.ops.dmax, name) if _capturing() else self._wrappers[name]
        return op(*args)

    def logits_stats(self, *args):
        return self._call("logits_stats", *args)

    def promote(self, *args):
        return self._call("promote", *args)

    def spd_update(self, *args):
        return self._call("spd_update", *args)

    def hybrid_embed(self, *args) -> None:
        self._call("hybrid_embed", *args)


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
