"""A decoder layer as one native op on the CPU (dmax.decoder_layer, csrc/cpu/decoder_layer.cpp).

The op runs the kernels each module of the layer runs on its CPU native form, in the same order,
so it gives bitwise the module path's output; it applies only where every module would take that
form (the conditions below restate the modules' own, from the same helpers), and a layer whose
modules carry hooks (tensor parallelism's all_reduce, a profiler's timers) keeps its modules.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as nn_module

from .modules import GatedMLP, Linear
from .moe import MoeBlock, native_experts_max_tokens, resolve_impl
from .native import CpuVariant, native_op


def _natives_apply(layer, x: torch.Tensor, rows: int) -> bool:
    """Whether each module of `layer` would take its CPU native form for x ([B, T, H], rows =
    B T, on a cached forward): Linear (rows cap), RMSNorm and the q/k norms (the model dtype),
    the router (float32 rows cap), the experts (impl "auto", token cap)."""
    if rows > Linear.native_max_rows(x.dtype):
        return False
    attention, mlp = layer.attention, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm, attention.query_layernorm,
             attention.key_layernorm)
    if any(n.weight.dtype != x.dtype for n in norms) \
            or attention.query_layernorm.eps != attention.key_layernorm.eps:
        return False
    if isinstance(mlp, MoeBlock):
        return (rows <= Linear.native_max_rows(torch.float32)
                and rows <= native_experts_max_tokens(x.dtype)
                and resolve_impl(mlp.impl, x.device) == "cpu")
    return isinstance(mlp, GatedMLP)


def _plain(layer) -> bool:
    """No hooks anywhere in the layer (nor global ones), every CPU variant on."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    for m in layer.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, CpuVariant) and not m.cpu_variant:
            return False
    return True


def _grad_wanted(layer, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad
                                        or any(p.requires_grad for p in layer.parameters()))


def _mlp_weights(mlp) -> list[torch.Tensor]:
    if isinstance(mlp, GatedMLP):
        return [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    weights = [mlp.gate.weight, mlp.gate.expert_bias, mlp.experts.gate_up_proj,
               mlp.experts.down_proj]
    return weights + (_mlp_weights(mlp.shared_experts) if mlp.shared_experts is not None else [])


def decoder_layer_args(layer, x, cos, sin, mask, cache_kv, slots) -> tuple | None:
    """The arguments of dmax.decoder_layer for layer(x, cos, sin, mask, cache_kv, slots), or None
    where it does not apply (no cache or an on-device write slot, gradients, another device or
    dtype, a module off its native form, hooks, no such op in the loaded library)."""
    if cache_kv is None or mask is None or not isinstance(slots.fed, slice) \
            or x.dtype not in (torch.float32, torch.bfloat16) or _grad_wanted(layer, x):
        return None
    attention = layer.attention
    if native_op("decoder_layer", x, attention.query_key_value.weight) is None \
            or not _natives_apply(layer, x, x.shape[0] * x.shape[1]) or not _plain(layer):
        return None
    mlp = layer.mlp
    weights = [layer.input_layernorm.weight, attention.query_key_value.weight,
               attention.query_layernorm.weight, attention.key_layernorm.weight,
               attention.dense.weight, layer.post_attention_layernorm.weight, *_mlp_weights(mlp)]
    moe = isinstance(mlp, MoeBlock)
    dims = [attention.n_heads, attention.n_kv_heads, attention.head_dim,
            mlp.gate.n_group if moe else 0, mlp.gate.topk_group if moe else 0,
            mlp.gate.top_k if moe else 0]
    scalars = [layer.input_layernorm.eps, layer.post_attention_layernorm.eps,
               attention.query_layernorm.eps, attention.head_dim ** -0.5,
               mlp.gate.scaling if moe else 0.0]
    keys, values = cache_kv
    return (x, cos, sin, mask, keys, values, slots.fed.start, slots.span, weights, dims,
            [float(s) for s in scalars])


def native_layer_forward(layer, x, cos, sin, mask, cache_kv, slots) -> torch.Tensor | None:
    """layer(x, cos, sin, mask, cache_kv, slots) as dmax.decoder_layer, or None where it does not
    apply (decoder_layer_args): the caller then runs the modules."""
    args = decoder_layer_args(layer, x, cos, sin, mask, cache_kv, slots)
    return None if args is None else torch.ops.dmax.decoder_layer(*args)
