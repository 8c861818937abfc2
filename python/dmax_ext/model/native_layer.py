"""A decoder layer as one native op on the CPU (dmax.decoder_layer, csrc/cpu/decoder_layer.cpp).

The op runs the kernels each module of the layer runs on its CPU native form, in the same order,
so it gives bitwise the module path's output; it applies only where every module would take that
form (the conditions below restate the modules' own, from the same helpers), and a layer whose
modules carry hooks (tensor parallelism's all_reduce, a profiler's timers) keeps its modules.

The layer's parts are read through nn.Module's own dicts (_modules, _parameters, _buffers), not
attribute access: Module.__getattr__ costs ~0.4 us a lookup, and packing a layer takes ~40 of
them (37 us a layer, ~3% of a bf16 block forward of llada2-small, before this).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .modules import GatedMLP, Linear
from .moe import MoeBlock, native_experts_max_tokens, resolve_impl
from .native import CpuVariant, native_op, runs_hooks

_DTYPES = (torch.float32, torch.bfloat16)


class _LayerParts(NamedTuple):
    """A DecoderLayer's modules as the op needs them, read once per call."""
    norm_in: nn.Module
    attention: nn.Module
    q_norm: nn.Module
    k_norm: nn.Module
    norm_post: nn.Module
    mlp: nn.Module
    router: nn.Module | None       # a MoE block's
    experts: nn.Module | None      # a MoE block's routed experts
    gated: nn.Module | None        # the GatedMLP (dense MLP or shared expert), last in weights
    modules: list                  # every module of the layer (hooks, CPU variants)
    weights: list[torch.Tensor]    # the parameters in the op's order, each GatedMLP's gate, up
                                   # and down (layer_plan gives the op its stacked gate_up)
    experts_at: int                # where the routed experts' gate_up, down sit in weights


def _gated_mlp_parts(mlp) -> tuple[list, list[torch.Tensor]]:
    linears = [mlp._modules[name] for name in ("gate_proj", "up_proj", "down_proj")]
    return linears, [m._parameters["weight"] for m in linears]


def _layer_parts(layer) -> _LayerParts:
    children = layer._modules
    attention, mlp = children["attention"], children["mlp"]
    parts = attention._modules
    norm_in, norm_post = children["input_layernorm"], children["post_attention_layernorm"]
    qkv, q_norm, k_norm, dense = (parts["query_key_value"], parts["query_layernorm"],
                                  parts["key_layernorm"], parts["dense"])
    modules = [layer, norm_in, attention, qkv, q_norm, k_norm, dense, norm_post, mlp]
    weights = [m._parameters["weight"] for m in (norm_in, qkv, q_norm, k_norm, dense, norm_post)]
    router = experts = None
    experts_at = -1
    gated = mlp
    if isinstance(mlp, MoeBlock):
        router, experts = mlp._modules["gate"], mlp._modules["experts"]
        modules += [router, experts]
        weights += [router._parameters["weight"], router._buffers["expert_bias"]]
        experts_at = len(weights)
        weights += [experts._parameters["gate_up_proj"], experts._parameters["down_proj"]]
        gated = mlp._modules["shared_experts"]
        if gated is not None:
            modules.append(gated)
    if gated is not None:
        linears, gated_weights = _gated_mlp_parts(gated)
        modules += linears
        weights += gated_weights
    return _LayerParts(norm_in, attention, q_norm, k_norm, norm_post, mlp, router, experts,
                       gated, modules, weights, experts_at)


def _rows_fit(mlp: nn.Module, dtype: torch.dtype, rows: int) -> bool:
    """Whether a layer input of `rows` rows (B T) is within its modules' row caps (None: any):
    Linear's, and a MoE block's router (float32) and experts' token cap."""
    caps = [Linear.native_max_rows(dtype)]
    if isinstance(mlp, MoeBlock):
        caps += [Linear.native_max_rows(torch.float32), native_experts_max_tokens(dtype)]
    return all(cap is None or rows <= cap for cap in caps)


def _natives_apply(x: torch.Tensor, parts: _LayerParts) -> bool:
    """Whether each module would take its CPU native form for an input like x ([B, T, H], on a
    cached forward), its row count aside (_rows_fit): RMSNorm and the q/k norms (the model
    dtype), the experts (impl "auto"), a dense MLP or shared expert a GatedMLP (its gate and up
    fused); no hooks anywhere (nor global ones), every CPU variant on."""
    norms = (parts.norm_in, parts.q_norm, parts.k_norm, parts.norm_post)
    if any(n._parameters["weight"].dtype != x.dtype for n in norms) \
            or parts.q_norm.eps != parts.k_norm.eps:
        return False
    mlp = parts.mlp
    if isinstance(mlp, MoeBlock):
        if resolve_impl(mlp.impl, x.device) != "cpu":
            return False
    elif not isinstance(mlp, GatedMLP):
        return False
    for m in parts.modules:
        if runs_hooks(m) or (isinstance(m, CpuVariant) and not m.cpu_variant):
            return False
    return True


def layer_plan(layer, x, rows_checked: bool = True) -> tuple | None:
    """The arguments of dmax.decoder_layer that depend on the layer and not on the call, for an
    input like x (its dtype, device, row count, gradient wanted): (weights, dims, scalars), or
    None where the op does not apply (gradients, another device or dtype, a module off its
    native form, hooks, no such op in the loaded library, too many rows). rows_checked=False:
    whatever x's row count (they do not change the arguments: the caller checks _rows_fit)."""
    if x.dtype not in _DTYPES:
        return None
    parts = _layer_parts(layer)
    weights = parts.weights
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return None
    if rows_checked and not _rows_fit(parts.mlp, x.dtype, x.shape[0] * x.shape[1]):
        return None
    if native_op("decoder_layer", x, weights[1]) is None or not _natives_apply(x, parts):
        return None
    attention, router = parts.attention, parts.router
    routing = ([router.n_group, router.topk_group, router.top_k] if router is not None
               else [0, 0, 0])
    dims = [attention.n_heads, attention.n_kv_heads, attention.head_dim, *routing]
    scalars = [float(parts.norm_in.eps), float(parts.norm_post.eps), float(parts.q_norm.eps),
               attention.scale, float(router.scaling) if router is not None else 0.0]
    # As the kernels read them (perhaps copies), past the checks.
    if parts.experts is not None:
        at = parts.experts_at
        weights = [*weights[:at - 2], router.float_weight(), weights[at - 1],
                   *parts.experts.kernel_weights(), *weights[at + 2:]]
    if parts.gated is not None:  # its gate and up as one product (GatedMLP)
        weights = [*weights[:-3], parts.gated.gate_up_weight(), weights[-1]]
    return weights, dims, scalars


def call_applies(cache_kv, mask, slots) -> bool:
    """Whether a call with these may run as dmax.decoder_layer: a cached forward with a mask and
    a host write slot (an on-device one is the CUDA graph's form)."""
    return cache_kv is not None and mask is not None and isinstance(slots.fed, slice)


def _op_args(plan: tuple, x, cos, sin, mask, cache_kv, slots, out_rows) -> tuple:
    keys, values = cache_kv
    return (x, cos, sin, mask, keys, values, slots.fed.start, slots.span, *plan,
            -1 if out_rows is None else out_rows)


def decoder_layer_args(layer, x, cos, sin, mask, cache_kv, slots,
                       out_rows: int | None = None) -> tuple | None:
    """The arguments of dmax.decoder_layer for layer(x, cos, sin, mask, cache_kv, slots,
    out_rows), or None where it does not apply (call_applies, layer_plan)."""
    if not call_applies(cache_kv, mask, slots):
        return None
    plan = layer_plan(layer, x)
    return None if plan is None else _op_args(plan, x, cos, sin, mask, cache_kv, slots, out_rows)


def native_layer_forward(layer, x, cos, sin, mask, cache_kv, slots,
                         out_rows: int | None = None) -> torch.Tensor | None:
    """layer(x, cos, sin, mask, cache_kv, slots, out_rows) as dmax.decoder_layer, or None where
    it does not apply (decoder_layer_args): the caller then runs the modules."""
    args = decoder_layer_args(layer, x, cos, sin, mask, cache_kv, slots, out_rows)
    return None if args is None else torch.ops.dmax.decoder_layer(*args)


_UNPLANNED = object()


def planned_layer_forward(plans: dict, index: int, layer, x, cos, sin, mask, cache_kv, slots,
                          out_rows: int | None = None):
    """native_layer_forward for layer `index` of a model that does not change between calls
    (LLaDA2MoeModel.frozen, whose _FrozenState says what this saves): its layer_plan is made
    once per (index, dtype, device), and whether it serves a row count decided once per
    count; both kept in `plans`. None where the op does not apply."""
    if not call_applies(cache_kv, mask, slots):
        return None
    rows = x.shape[0] * x.shape[1]
    key = (index, x.dtype, x.device, rows)
    plan = plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED:
        shape_free = plans.get(key[:3], _UNPLANNED)
        if shape_free is _UNPLANNED:
            shape_free = plans[key[:3]] = layer_plan(layer, x, rows_checked=False)
        fits = shape_free is not None and _rows_fit(layer._modules["mlp"], x.dtype, rows)
        plan = plans[key] = shape_free if fits else None
    if plan is None:
        return None
    return torch.ops.dmax.decoder_layer(*_op_args(plan, x, cos, sin, mask, cache_kv, slots,
                                                  out_rows))
