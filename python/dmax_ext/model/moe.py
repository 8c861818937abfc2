"""The MoE feed-forward: sigmoid router with group-limited selection, stacked experts, shared expert.

Experts are stored stacked ([E, H, 2I] gate|up and [E, I, H] down) so that all of them run as a
few batched matmuls; state_dict() and load_state_dict() still speak the checkpoint's per-expert
names (`experts.E.gate_proj.weight` ...) through hooks, so state_dict keys == checkpoint keys.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn_matmul
from .config import LLaDA2Config
from .modules import GatedMLP, Linear
from .native import (CpuVariant, derived_copy, has_amx_bf16, native_op, native_ops,
                     packs_expert_weights, runs_hooks)

# Tensors that stay float32 whatever the model dtype (loaders and random init consult this).
FLOAT32_TENSORS = ("expert_bias",)
MOE_IMPLS = ("auto", "padded", "grouped", "reference")


def select_experts(biased: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """Group-limited top-k on biased scores [N, E] -> expert ids [N, top_k].

    A group scores the sum of its two best experts; the best `topk_group` groups stay. The other
    experts get -inf, not 0: biased scores can be negative, and 0 could then outrank a kept one."""
    n = biased.shape[0]
    grouped = biased.view(n, n_group, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    kept = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)
    return masked.topk(top_k, dim=-1).indices


def route(logits: torch.Tensor, expert_bias: torch.Tensor, n_group: int, topk_group: int,
          top_k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its GEMM, in torch ops: float32 logits [N, E] -> (expert ids [N, top_k]
    int64, weights [N, top_k] float32). sigmoid scores; the bias steers the selection only
    (select_experts); the weights are the unbiased scores, normalized when top_k > 1, scaled."""
    scores = torch.sigmoid(logits)
    ids = select_experts(scores + expert_bias, n_group, topk_group, top_k)
    weights = scores.gather(1, ids)
    if top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


class Router(CpuVariant, nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.top_k = config.num_experts_per_tok
        self.scaling = config.routed_scaling_factor

    def float_weight(self) -> torch.Tensor:
        """The weight in float32, as the projection reads it without gradients: the parameter
        itself when float32, else a copy kept until the parameter changes (derived_copy;
        converting a bf16 llada2-small router's weight took ~5 us a layer and call)."""
        weight = self._parameters["weight"]
        if weight.dtype == torch.float32:
            return weight
        return derived_copy(self, "_float_weight", (weight,), lambda w: w.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k] int64, weights [N, k] float32)."""
        # float32 even under autocast (mixed-precision training): selection compares scores
        # that differ in the 3rd decimal, which bf16 would turn into ties.
        with torch.autocast(x.device.type, enabled=False):
            wants_grad = torch.is_grad_enabled() and self.weight.requires_grad
            x32 = x.float()
            w32 = self.weight.float() if wants_grad else self.float_weight()
            # A block's rows on the CPU: the projections' kernel (MKL's [32, H] x [H, E] GEMM
            # cost ~50 us a call here, twice the kernel's).
            skinny = self.native("skinny_linear", x, self.weight,
                                 Linear.native_max_rows(torch.float32))
            if skinny is not None:
                logits = skinny(x32, w32)
            else:
                logits = onednn_matmul.linear(x32, w32) if self.cpu_variant else F.linear(x32, w32)
        # Without gradients: route's ~20 ops as one (dmax.moe_route, on the CPU and CUDA).
        native = self.native("moe_route", x, self.weight)
        return (route if native is None else native)(
            logits, self.expert_bias.float(), self.n_group, self.topk_group, self.top_k,
            self.scaling)


def expert_counts(flat_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows routed to each expert, int64 [n_experts], computed on the device. Not torch.bincount:
    its CUDA kernel reads the ids' min and max to the host (a sync per MoE layer, and an error
    under CUDA-graph capture)."""
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def dispatch(ids: torch.Tensor, n_experts: int):
    """The routed entries (ids [N, k]: entry i = token i // k, slot i % k) sorted by expert, in
    torch ops: (rows [N k]: the token of each entry in expert order (stable: entry order within
    an expert), inverse [N k]: each entry's place in that order, counts [n_experts]: entries per
    expert). No host sync (expert_counts)."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device))
    return order // ids.shape[1], inverse, expert_counts(flat, n_experts)


def combine(sorted_out: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor,
            addend: torch.Tensor | None = None, residual: torch.Tensor | None = None):
    """sorted_out [N k, H] (the experts' rows in dispatch order) back per token: out[n] =
    sum_j weights[n, j] sorted_out[inverse[n k + j]], in float32 (each product rounded, then
    summed: torch's reduction order), cast once to sorted_out's dtype (as the checkpoint's
    reference); plus addend [N, H] (the shared expert's output) if given, then plus residual
    [N, H] (the decoder layer's) if given: torch adds of rounded tensors (plus_terms)."""
    n, k = weights.shape
    rows = sorted_out.index_select(0, inverse).view(n, k, sorted_out.shape[-1])
    out = (rows.float() * weights[..., None]).sum(1).to(sorted_out.dtype)
    return plus_terms(out, addend, residual)


def plus_terms(out: torch.Tensor, *terms: torch.Tensor | None) -> torch.Tensor:
    """out + each term that is not None, in order: one rounded torch add each, the sums the
    routed experts' output takes (the shared expert's, then the layer's residual)."""
    for term in terms:
        if term is not None:
            out = out + term
    return out


# = kMaxDispatchEntries of csrc/kernels/moe_dispatch.cuh, the most routed entries (N k) the
# dmax.moe_dispatch kernel sorts in its one block (tests/test_layer_op_kernels.py checks the two
# agree); past it (a long prefill) the model runs dispatch()'s torch ops.
MOE_DISPATCH_MAX_ENTRIES = 4096


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _experts_reference(xs, counts, gate_up, down):
    """One matmul pair per expert: the plain formulation the batched ones must agree with."""
    outs = [_swiglu(chunk @ gate_up[e]) @ down[e]
            for e, chunk in enumerate(xs.split(counts.tolist())) if chunk.shape[0]]
    return torch.cat(outs) if outs else xs.new_zeros(0, down.shape[-1])


def _experts_padded(xs, counts, gate_up, down):
    """Each expert's rows padded to the busiest expert's count: two bmm over [E, C, *]. Reads
    every expert's weights once with no per-expert overhead: best in bf16 when most experts
    are busy (oneDNN's bf16 bmm costs about the same for any C up to ~32)."""
    n_experts = counts.numel()
    capacity = int(counts.max())
    expert_of = torch.repeat_interleave(torch.arange(n_experts, device=xs.device), counts)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(xs.shape[0], device=xs.device) - starts[expert_of]
    padded = xs.new_zeros(n_experts, capacity, xs.shape[-1])
    padded[expert_of, slot] = xs
    out = torch.bmm(_swiglu(torch.bmm(padded, gate_up)), down)
    return out[expert_of, slot]


def _experts_grouped(xs, counts, gate_up, down, onednn: bool = True, offsets=None):
    """torch._grouped_mm over the expert-sorted rows (no padding, only busy experts' weights);
    with `onednn` (a CPU variant: StackedExperts' own flag), on the CPU the same products
    through oneDNN (onednn_matmul: 1.5x MKL's _grouped_mm with gradients on AMD). offsets: the
    groups' int32 end rows, when given instead of counts (dmax.moe_dispatch's; not with
    onednn)."""
    def grouped(rows, w):
        out = onednn_matmul.grouped_mm(rows, w, counts) if onednn else None
        return out if out is not None else torch._grouped_mm(rows, w, offs=offsets)
    if offsets is None:
        offsets = counts.cumsum(0).to(torch.int32)
    gate_up_rows = grouped(xs, gate_up)
    swiglu = native_op("swiglu", gate_up_rows, gate_up)  # one launch where _swiglu is two
    return grouped(_swiglu(gate_up_rows) if swiglu is None else swiglu(gate_up_rows), down)


def _grouped_mm_supports(xs, gate_up, down) -> bool:
    # In 16-bit dtypes every row stride must be a multiple of 16 bytes ("strides should be
    # multiple of 16 bytes"): hidden and expert widths multiples of 8.
    return xs.element_size() >= 4 or all(d % 8 == 0 for d in down.shape[1:])


def _experts_cpu(xs, counts, gate_up, down, onednn: bool = True):
    """CPU "auto" without the native kernel (gradients, large calls, no native library), from
    measurements on llada2-small shapes (AVX512 + AMX, 32/64 tokens): fp32
    grouped_mm is the fastest at any routing skew; in bf16, grouped_mm pays ~0.1 ms per busy
    expert, so the padded bmm wins once at least half the experts are busy, unless the routing is
    skewed: real blocks route alike (a decoding block's masked positions share one embedding) and
    padding every expert to the busiest one's rows then multiplies the work (batch 8 of
    llada2-small: 64 x ~200 padded rows for 2048 routed ones, 1.4x slower than grouped_mm)."""
    if not _grouped_mm_supports(xs, gate_up, down):
        return _experts_padded(xs, counts, gate_up, down)
    if xs.element_size() < 4:
        busy, capacity = int((counts > 0).sum()), int(counts.max())
        if 2 * busy >= counts.numel() and counts.numel() * capacity <= 2 * xs.shape[0]:
            return _experts_padded(xs, counts, gate_up, down)
    return _experts_grouped(xs, counts, gate_up, down, onednn)


def native_experts_max_tokens(dtype: torch.dtype) -> int | None:
    """CPU "auto" runs the native fused kernel (dmax_ext.ops.moe_experts) up to this many tokens
    per call (None: any). A decoding block's few rows per expert make each expert a
    weight-streaming GEMM pair, where oneDNN pays ~0.1 ms of set-up per bf16 call and the torch
    formulations add ~15 gather / scatter / reduce ops per layer (and torch's CPU _grouped_mm is
    a loop of mm calls). On the AMD EPYC of docs/PERFORMANCE.md (2026-12-06, no AMX,
    llada2-small, 1 thread) the kernel was 1.7-3.2x faster than the torch path from 32 to 4096
    tokens (the largest measured) in float32 and 1.9-5x in bfloat16; it serves any count, so a
    token's output does not depend on the batch (Linear.native_max_rows: batch invariance).
    With AMX (the Xeon of the earlier entries) oneDNN's bf16 GEMMs serve calls past 64 tokens
    (prefill, batches) better than the kernel's float32 FMA form, and take them."""
    return 64 if dtype == torch.bfloat16 and has_amx_bf16() else None


_EXPERT_IMPLS = {"reference": _experts_reference, "padded": _experts_padded,
                 "grouped": _experts_grouped, "cpu": _experts_cpu}


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    if impl == "auto":
        # On CUDA grouped_mm needs no host sync (CUDA graphs); on CPU the choice is per call.
        return "grouped" if device.type == "cuda" else "cpu"
    return impl


class StackedExperts(CpuVariant, nn.Module):
    """All routed experts: gate_up_proj [E, H, 2I] (x @ it = [gate | up]), down_proj [E, I, H]."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        n, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(n, i, h))
        self._register_state_dict_hook(_per_expert_state_dict)
        self._register_load_state_dict_pre_hook(_stack_experts_on_load, with_module=True)

    def checkpoint_views(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Checkpoint name -> a view into the stacked parameters (same storage, HF shape)."""
        i = self.down_proj.shape[1]
        views = {}
        for e in range(self.gate_up_proj.shape[0]):
            views[f"{prefix}{e}.gate_proj.weight"] = self.gate_up_proj[e, :, :i].t()
            views[f"{prefix}{e}.up_proj.weight"] = self.gate_up_proj[e, :, i:].t()
            views[f"{prefix}{e}.down_proj.weight"] = self.down_proj[e].t()
        return views

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as the CPU kernel (dmax.moe_experts) should read them now: a copy
        packed for its bf16 dot products where packs_expert_weights says so (bitwise the same
        results, a faster block forward: docs/PERFORMANCE.md), else the parameters. The copy is
        made on first use and again whenever a parameter changes (an optimizer step, a load: its
        version counter or storage moves), and lives as long as the module (a switch turned off
        at run time leaves it); the parameters stay what training, the torch paths and
        checkpoints read. For callers that run the kernel (no gradients wanted)."""
        gate_up, down = self._parameters["gate_up_proj"], self._parameters["down_proj"]
        ops = native_ops()
        if ops is None or not (ops.moe_weights_packable(gate_up)
                               and ops.moe_weights_packable(down)):
            self.__dict__["_packed"] = None  # (a dtype change) the copy is not kept alive
            return gate_up, down
        if not packs_expert_weights(gate_up.nbytes + down.nbytes):
            return gate_up, down  # a copy made before is kept, for when the switch comes back
        return derived_copy(self, "_packed", (gate_up, down),
                            lambda *w: tuple(ops.pack_moe_weights(t) for t in w))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                impl: str, addend: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k] -> sum_k weights * expert_ids(x), [N, H] in x.dtype;
        plus addend [N, H] if given (MoeBlock's shared expert output), then plus residual
        [N, H] if given (the decoder layer's): added by moe_combine on the kernel path, else as
        torch adds of rounded tensors (the same bits)."""
        native = (self.native("moe_experts", x, self.gate_up_proj,
                              native_experts_max_tokens(x.dtype)) if impl == "cpu" else None)
        if native is not None:
            return plus_terms(native(x, ids, weights, *self.kernel_weights()), addend, residual)
        if impl == "grouped":
            out = self._grouped_on_kernels(x, ids, weights, addend, residual)
            if out is not None:
                return out
        rows, inverse, counts = dispatch(ids, self.gate_up_proj.shape[0])
        experts = _EXPERT_IMPLS[impl]
        if impl in ("grouped", "cpu"):
            experts = functools.partial(experts, onednn=self.cpu_variant)
        # index_select, not x[index]: a plain row gather (aten::index is ~10x slower on CPU).
        sorted_out = experts(x.index_select(0, rows), counts, self.gate_up_proj, self.down_proj)
        return combine(sorted_out, inverse, weights, addend, residual)

    def _grouped_on_kernels(self, x, ids, weights, addend, residual):
        """The "grouped" path with its sort and weighted sum as dmax.moe_dispatch and
        dmax.moe_combine: two launches where dispatch() and combine() are ~16 on CUDA
        (docs/PERFORMANCE.md, "GPU projections"); where they apply (no gradients, at most
        MOE_DISPATCH_MAX_ENTRIES entries; on CUDA, or on the CPU with the CPU variants off, which
        stands for it: the CPU's grouped products go through oneDNN, which wants counts), else
        None."""
        if not self.runs_cuda_path(x) or ids.numel() > MOE_DISPATCH_MAX_ENTRIES:
            return None
        sort = native_op("moe_dispatch", x, self.gate_up_proj)
        if sort is None:
            return None
        rows, inverse, offsets = sort(ids, self.gate_up_proj.shape[0])
        sorted_out = _experts_grouped(x.index_select(0, rows), None, self.gate_up_proj,
                                      self.down_proj, onednn=False, offsets=offsets)
        return torch.ops.dmax.moe_combine(sorted_out, inverse, weights, addend, residual)


def _per_expert_state_dict(module, state_dict, prefix, local_metadata):
    del state_dict[prefix + "gate_up_proj"], state_dict[prefix + "down_proj"]
    state_dict.update({name: view.detach() for name, view in module.checkpoint_views(prefix).items()})
    return state_dict


def _stack_experts_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs):
    names = module.checkpoint_views(prefix)
    if not all(name in state_dict for name in names):
        return  # load_state_dict reports the stacked names as missing
    n, h, two_i = module.gate_up_proj.shape
    i = two_i // 2
    gate_up = torch.empty(n, h, two_i, dtype=state_dict[next(iter(names))].dtype)
    down = torch.empty(n, i, h, dtype=gate_up.dtype)
    for e in range(n):
        gate_up[e, :, :i] = state_dict.pop(f"{prefix}{e}.gate_proj.weight").t()
        gate_up[e, :, i:] = state_dict.pop(f"{prefix}{e}.up_proj.weight").t()
        down[e] = state_dict.pop(f"{prefix}{e}.down_proj.weight").t()
    state_dict[prefix + "gate_up_proj"], state_dict[prefix + "down_proj"] = gate_up, down


class MoeBlock(nn.Module):
    """Router + routed experts + shared expert (names as the checkpoint: gate, experts, shared_experts)."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = StackedExperts(config)
        self.shared_experts = (GatedMLP(config.hidden_size,
                                        config.moe_intermediate_size * config.num_shared_experts)
                               if config.num_shared_experts else None)
        self.impl = "auto"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output for x [..., H]; with residual (x's shape) residual + that output,
        the decoder layer's sum, which the routed experts' weighted sum adds on the kernel path
        (dmax.moe_combine: one launch, where the layer's add was another). A forward hook on
        this module would get the sum: DecoderLayer passes residual only when none is set
        (tensor parallelism's all_reduce is one: the residual is added once, after it)."""
        flat = x.reshape(-1, x.shape[-1])
        flat_residual = None if residual is None else residual.reshape(flat.shape)
        ids, weights = self.gate(flat)
        impl = resolve_impl(self.impl, x.device)
        if self.shared_experts is None:
            return self.experts(flat, ids, weights, impl, None, flat_residual).view_as(x)
        shared = self.shared_experts(x)
        if runs_hooks(self.experts):  # a hook sees the routed experts' output alone
            return plus_terms(self.experts(flat, ids, weights, impl).view_as(x), shared, residual)
        # The experts add it (routed + shared, each rounded, as here): on the kernel path inside
        # dmax.moe_combine, one launch fewer.
        return self.experts(flat, ids, weights, impl, shared.view(-1, x.shape[-1]),
                            flat_residual).view_as(x)
