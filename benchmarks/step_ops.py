"""What one decoding step dispatches: the ops of a block forward (per layer and part) and of
apply_step, counted by tracing the real code (decoding/step.py, model/) under a TorchDispatchMode.

    python benchmarks/step_ops.py            # tiny preset, bf16, the CUDA MoE path ("grouped")

On CUDA each counted op launches at least one kernel (GEMMs, topk, argsort and SDPA may launch
more), so the counts are a lower bound of a step's kernel launches; they do not depend on the
model's widths, only on its code, so the tiny preset counts what llada2-mini would. Not counted:
views and no-op casts (no data moved) and allocations without a fill. Host syncs: reads of a tensor
value (aten._local_scalar_dense: int(t), t.item(), t.tolist()) and ops whose CUDA implementation
reads device data to the host (HOST_SYNC_ON_CUDA).
"""
from __future__ import annotations

import sys
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

STEP_OPS = ("logits_stats", "promote", "spd_update", "hybrid_embed")
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default"}
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default",
            "aten.is_nonzero.default"}
# PyTorch's CUDA bincount reads the input's min and max to the host to size its output
# (aten/src/ATen/native/cuda/SummaryOps.cu); nonzero and unique size theirs from the data.
HOST_SYNC_ON_CUDA = {"aten.bincount.default", "aten.nonzero.default", "aten._unique2.default",
                     "aten.unique_dim.default", "aten.masked_select.default"}


def is_host_sync(func, args, kwargs) -> bool:
    """Whether `func` on CUDA reads device data to the host: a value read, an op of
    HOST_SYNC_ON_CUDA, indexing with a bool mask (sized by a nonzero), or repeat_interleave
    without output_size (sized by a sum of the repeats)."""
    name = str(func)
    if name in SYNC_OPS or name in HOST_SYNC_ON_CUDA:
        return True
    if name in ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                "aten._index_put_impl_.default"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name == "aten.repeat_interleave.Tensor":  # what the other overloads decompose into
        return kwargs.get("output_size") is None
    return False


@dataclass
class OpCounts:
    config: object            # the traced model's LLaDA2Config
    kernels: Counter          # section -> ops that move data
    syncs: Counter            # section -> host syncs (on CUDA)
    ops_by_section: dict      # section -> Counter of op names (for the reader)


class _Tracer(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.section = ["other"]
        self.kernels, self.syncs, self.names = Counter(), Counter(), {}

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name, where = str(func), self.section[-1]
        if is_host_sync(func, args, kwargs or {}):
            self.syncs[where] += 1
        if name in NO_KERNEL or name in SYNC_OPS or _aliases_input(func, args, out):
            return out
        self.kernels[where] += 1
        self.names.setdefault(where, Counter())[name.removeprefix("aten.")] += 1
        return out


def _aliases_input(func, args, out) -> bool:
    """Every output is (a view of) an input and nothing is written: a view, a reshape or split
    without a copy, a cast that returned its input. No data moved."""
    if func._schema.is_mutable:
        return False
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        return False
    ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return all(o.untyped_storage().data_ptr() in ptrs for o in outs)


def _hook_sections(model, tracer: _Tracer) -> list:
    from dmax_ext.model.moe import MoeBlock

    def enter(name):
        return lambda module, inputs: tracer.section.append(name)

    def leave(module, inputs, output):
        tracer.section.pop()

    def leave_layer(module, inputs, output):
        # The MLP's section, entered by a pre-hook, ends with its layer.
        while tracer.section.pop() != "residual_norms":
            pass
    modules = [("embedding", model.model.word_embeddings), ("final_norm", model.model.norm),
               ("lm_head", model.lm_head)]
    # Hooks that would change what the model runs are left out, so the trace counts the step
    # the model does run: a layer's norms are not hooked (a hook on post_attention_layernorm
    # keeps the layer from fusing it with the residual add before it: their ops count in the
    # layer's section), and an MLP gets a pre-hook only (a forward hook on a MoE block keeps the
    # layer from folding its residual add into the block's combine): its section runs to the
    # end of the layer, the residual add after a dense MLP included.
    handles = []
    for layer in model.model.layers:
        mlp = "moe" if isinstance(layer.mlp, MoeBlock) else "dense_mlp"
        modules += [("attention", layer.attention)]
        handles += [layer.register_forward_pre_hook(enter("residual_norms")),
                    layer.register_forward_hook(leave_layer),
                    layer.mlp.register_forward_pre_hook(enter(mlp))]
    for name, module in modules:
        handles += [module.register_forward_pre_hook(enter(name)),
                    module.register_forward_hook(leave)]
    return handles


def raw_ops():
    """torch.ops.dmax.* without the wrappers' value checks: what a captured step calls
    (decoding/backends.py, NativeOps while capturing)."""
    return types.SimpleNamespace(**{n: getattr(torch.ops.dmax, n) for n in STEP_OPS})


def count_step_ops(preset: str = "tiny", dtype: torch.dtype = torch.bfloat16,
                   moe_impl: str = "grouped", first_step: bool = False,
                   captured: bool = True, ops=None) -> OpCounts:
    """Traces one step of a block: a later step (forward_block + apply_step) or, with
    first_step, the block's first step (forward_first on the previous and current block +
    apply_step), as decoding/cuda_graph.py runs them on CUDA: captured (the write slot a device
    tensor; raw ops) or, captured=False, eagerly (an int write slot; the ops wrappers), both at
    the bucketed key span. ops: the step ops (default: raw_ops() captured, "native" eager)."""
    import dmax_ext
    from dmax_ext.decoding.backends import resolve_ops
    from dmax_ext.decoding.cuda_graph import key_span
    from dmax_ext.decoding.params import make_config
    from dmax_ext.decoding.step import BlockState, apply_step, forward_block, forward_first

    model = dmax_ext.random_model(preset, dtype=dtype)
    model.set_moe_impl(moe_impl)
    model.set_cpu_variants(False)  # the CUDA path: the projections' CPU-only forms off
    c = model.config
    config = make_config(c, mode="spd", gen_length=32, block_length=32, threshold=0.5,
                         accept_threshold=0.9, top_k=1, temperature=0.0, eos_id=None,
                         mask_id=None, seed=None)
    length, write_slot = config.block_length, 2 * config.block_length
    cache = model.new_cache(1, write_slot + length)
    span = key_span(write_slot, length, cache.max_slots)
    state = BlockState.allocate(1, length, c.hidden_size, dtype, "cpu")
    if ops is None:
        ops = raw_ops() if captured else "native"
    step_ops = resolve_ops(ops)
    tracer = _Tracer()
    with torch.inference_mode():
        # A forward before the trace makes what a decode's first step leaves for the others
        # (the gated MLPs' stacked gate|up weights: model/native.py derived_copy).
        model(input_ids=torch.zeros(1, 1, dtype=torch.int64))
        state.start_block(model, torch.full((1, length), c.mask_token_id),
                          torch.tensor([write_slot]), config)
        # captured: the device tensor the runner fills (cuda_graph.CudaGraphStep)
        slot = torch.tensor(write_slot) if captured else write_slot
        handles = _hook_sections(model, tracer)
        try:
            with tracer:
                logits = (forward_first(model, cache, state, slot, length, True, span)
                          if first_step else forward_block(model, cache, state, slot, config, span))
                tracer.section.append("apply_step")
                # the first step's rows are all live; a graphed later step keeps converged
                # rows in the batch
                apply_step(step_ops, model, state, logits, config,
                           all_live=first_step or not captured)
        finally:
            for h in handles:
                h.remove()
    return OpCounts(config=c, kernels=tracer.kernels, syncs=tracer.syncs,
                    ops_by_section=tracer.names)


def section_units(config) -> dict:
    """How many times a section runs per forward: per layer (attention; the residual adds and
    the two RMSNorms of DecoderLayer.forward, q/k norms being in attention), per dense / MoE
    layer; else 1 (the final norm, the lm_head, ...)."""
    n_layers = config.num_hidden_layers
    n_moe = sum(config.is_moe_layer(i) for i in range(n_layers))
    return {"attention": n_layers, "residual_norms": n_layers, "moe": n_moe,
            "dense_mlp": n_layers - n_moe}


def per_unit_counts(counts: OpCounts) -> dict:
    units = section_units(counts.config)
    return {k: v / units.get(k, 1) for k, v in counts.kernels.items()}


def scaled_counts(counts: OpCounts, config) -> dict:
    """Section -> ops per step for a model of `config`'s layer counts (same code paths)."""
    units = section_units(config)
    return {k: round(v * units.get(k, 1)) for k, v in per_unit_counts(counts).items()}


def main() -> int:
    from dmax_ext.model.presets import preset_config
    config = preset_config("tiny")
    for label, kwargs in (("later step (captured; raw ops)", {}),
                          ("first step (captured; raw ops)", {"first_step": True}),
                          ("first step (eager; native wrappers)", {"first_step": True,
                                                                   "captured": False})):
        counts = count_step_ops(**kwargs)
        print(f"{label}: {sum(counts.kernels.values())} data-moving ops on "
              f"{config.num_hidden_layers} layers; host syncs on CUDA {dict(counts.syncs)}")
        per = per_unit_counts(counts)
        for section, n in sorted(counts.kernels.items()):
            names = ", ".join(f"{k} x{v}"
                              for k, v in sorted(counts.ops_by_section[section].items()))
            print(f"  {section:<10} {n:4d} ({per[section]:.0f} per unit)  {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
