"""Tensor parallelism: a transformation of a built LLaDA2MoeModel (gpt-fast's tp.py idea).

Every rank of a process group keeps a slice of each large weight, computes on it, and partial
results are summed by one all_reduce per attention block and one per MLP / MoE block
(docs/TENSOR_PARALLEL.md says why this split):
- attention, by heads: rank r holds query heads [r nh/W, (r+1) nh/W) and key/value heads
  [r nkv/W, (r+1) nkv/W) (a GQA group never straddles ranks): those rows of query_key_value,
  those columns of dense. The KV cache holds this rank's kv heads only.
- SwiGLU (dense MLP, shared expert, and *each routed expert*), by intermediate columns: gate/up
  rows, down columns. The router is replicated, so every rank routes alike and runs all the
  chosen experts on its columns.
- embeddings, by vocabulary: a contiguous vocab slice per rank; ids outside it give zero rows,
  then all_reduce. lm_head, by vocabulary and NOT gathered: forward() returns this rank's logits
  slice [B, T, V_r]; decoding merges statistics instead (decoding/tensor_parallel_ops.py).
Inference only: the all_reduces are invisible to autograd.

A sharded model's state_dict() speaks the checkpoint's names with this rank's shapes, so one
plan (`TensorParallelPlan.slices`) serves both shard_model (slicing a full model) and
load_sharded_model (reading only the slices from the safetensors files).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import LLaDA2Config
from .loading import _checkpoint_files, _empty_model, _fill_from_checkpoint
from .modules import GatedMLP
from .moe import MoeBlock

MAX_TOP_K = 8  # the ops' largest k: every vocab slice must hold at least this many ids
_SWIGLU = re.compile(r"\.mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight$")


def split_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share [start, stop) of n items; shares differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


def check_tensor_parallel_size(config: LLaDA2Config, world: int) -> None:
    """A clear error if `config` cannot be split over `world` ranks."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor parallel size must be a positive int, got {world!r}")
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    if nh % world or nkv % world:
        raise ValueError(f"tensor parallel size {world} must divide num_attention_heads ({nh}) "
                         f"and num_key_value_heads ({nkv})")
    if config.vocab_size < world * MAX_TOP_K:
        raise ValueError(f"tensor parallel size {world}: vocab_size ({config.vocab_size}) must "
                         f"give every rank at least {MAX_TOP_K} ids")
    for name in ("intermediate_size", "moe_intermediate_size"):
        if getattr(config, name) < world:
            raise ValueError(f"tensor parallel size {world} exceeds {name} ({getattr(config, name)})")


@dataclass(frozen=True)
class TensorParallelPlan:
    """Which part of every checkpoint tensor rank `rank` of `world` holds."""
    config: LLaDA2Config
    rank: int
    world: int

    def __post_init__(self):
        check_tensor_parallel_size(self.config, self.world)

    @classmethod
    def for_group(cls, config: LLaDA2Config, group) -> "TensorParallelPlan":
        return cls(config, dist.get_rank(group), dist.get_world_size(group))

    def _share(self, n: int) -> tuple[int, int]:
        return split_range(n, self.rank, self.world)

    @property
    def heads(self) -> tuple[int, int]:
        return self._share(self.config.num_attention_heads)

    @property
    def kv_heads(self) -> tuple[int, int]:
        return self._share(self.config.num_key_value_heads)

    @property
    def vocab(self) -> tuple[int, int]:
        return self._share(self.config.vocab_size)

    def intermediate(self, size: int) -> tuple[int, int]:
        return self._share(size)

    def slices(self, name: str) -> tuple[int, list[tuple[int, int]]] | None:
        """(dim, [(start, stop), ...]): this rank's part of checkpoint tensor `name` is those
        ranges along dim, concatenated. None: replicated (norms, the router)."""
        c, hd = self.config, self.config.head_dim
        if name in ("model.word_embeddings.weight", "lm_head.weight"):
            return 0, [self.vocab]
        if name.endswith("attention.query_key_value.weight"):
            (h0, h1), (k0, k1) = self.heads, self.kv_heads
            nh, nkv = c.num_attention_heads, c.num_key_value_heads
            return 0, [(h0 * hd, h1 * hd), ((nh + k0) * hd, (nh + k1) * hd),
                       ((nh + nkv + k0) * hd, (nh + nkv + k1) * hd)]
        if name.endswith("attention.dense.weight"):
            h0, h1 = self.heads
            return 1, [(h0 * hd, h1 * hd)]
        match = _SWIGLU.search(name)
        if match:
            kind, proj = match.groups()
            size = (c.intermediate_size if kind is None else c.moe_intermediate_size
                    * (c.num_shared_experts if kind == "shared_experts." else 1))
            return (1 if proj == "down_proj" else 0), [self.intermediate(size)]
        return None

    def take(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full` (the whole checkpoint tensor `name`)."""
        plan = self.slices(name)
        if plan is None:
            return full
        dim, ranges = plan
        return torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim)

    def read(self, name: str, handle) -> torch.Tensor:
        """This rank's part of tensor `name`, read from a safetensors slice handle: only those
        bytes are read."""
        plan = self.slices(name)
        if plan is None:
            return handle[:]
        dim, ranges = plan
        lead = (slice(None),) * dim
        return torch.cat([handle[lead + (slice(a, b),)] for a, b in ranges], dim)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_stop) of the embedding table; the full lookup is the all_reduce
    of every rank's (ids outside the slice give zero rows)."""

    def __init__(self, vocab: tuple[int, int], hidden_size: int, group, device, dtype):
        super().__init__()
        self.vocab_start, self.vocab_stop = vocab
        self.weight = nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, hidden_size,
                                               device=device, dtype=dtype), requires_grad=False)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[..., None], 0)
        dist.all_reduce(out, group=self.group)
        return out


class _SumOverRanks:
    """Forward hook: the module's output is this rank's partial sum; all_reduce makes it whole."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module, args, output):
        dist.all_reduce(output, group=self.group)
        return output


def _resize(module: nn.Module, name: str, *shape: int) -> None:
    """Replaces parameter `name` by an uninitialized one of `shape` (filled by the caller)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(shape, device=old.device, dtype=old.dtype),
                                       requires_grad=False))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape


def _width(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def _split_swiglu(mlp: GatedMLP, inter: int, hidden: int) -> None:
    _resize(mlp.gate_proj, "weight", inter, hidden)
    _resize(mlp.up_proj, "weight", inter, hidden)
    _resize(mlp.down_proj, "weight", hidden, inter)


def _restructure(model, plan: TensorParallelPlan, group) -> None:
    """Gives every module this rank's shapes (uninitialized) and the all_reduce hooks."""
    c, hidden = plan.config, plan.config.hidden_size
    n_heads, n_kv = _width(plan.heads), _width(plan.kv_heads)
    for layer in model.model.layers:
        attn = layer.attention
        attn.n_heads, attn.n_kv_heads = n_heads, n_kv
        _resize(attn.query_key_value, "weight", (n_heads + 2 * n_kv) * c.head_dim, hidden)
        _resize(attn.dense, "weight", hidden, n_heads * c.head_dim)
        attn.register_forward_hook(_SumOverRanks(group))
        mlp = layer.mlp
        if isinstance(mlp, MoeBlock):
            inter = _width(plan.intermediate(c.moe_intermediate_size))
            _resize(mlp.experts, "gate_up_proj", c.num_experts, hidden, 2 * inter)
            _resize(mlp.experts, "down_proj", c.num_experts, inter, hidden)
            if mlp.shared_experts is not None:
                shared = c.moe_intermediate_size * c.num_shared_experts
                _split_swiglu(mlp.shared_experts, _width(plan.intermediate(shared)), hidden)
        else:
            _split_swiglu(mlp, _width(plan.intermediate(c.intermediate_size)), hidden)
        # One all_reduce for the whole block: experts' and shared expert's partial sums together.
        mlp.register_forward_hook(_SumOverRanks(group))
    old = model.model.word_embeddings.weight
    model.model.word_embeddings = VocabParallelEmbedding(plan.vocab, hidden, group, old.device,
                                                         old.dtype)
    _resize(model.lm_head, "weight", _width(plan.vocab), hidden)
    model.tp_group, model.tp_plan = group, plan


def _check_unsharded(model) -> None:
    if getattr(model, "tp_group", None) is not None:
        raise ValueError("the model is already tensor-parallel sharded")


@torch.no_grad()
def shard_model(model, group):
    """Shards a built (full) model in place over `group` and returns it; each rank keeps its
    slices (ARCHITECTURE.md's model API still holds, except that logits are this rank's vocab
    slice). Every rank must hold the same full model."""
    _check_unsharded(model)
    plan = TensorParallelPlan.for_group(model.config, group)
    full = model.state_dict()
    _restructure(model, plan, group)
    for name, target in model.state_dict().items():
        target.copy_(plan.take(name, full[name]))
    return model


def load_sharded_model(path: str | Path, group, device="cpu", dtype: torch.dtype = torch.bfloat16):
    """load_model for one rank of `group`: builds the model with this rank's shapes and reads
    only this rank's slices of each tensor from the safetensors files (no rank ever holds the
    full model). Same checks and errors as load_model."""
    path = Path(path)
    config = LLaDA2Config.from_json(path)
    plan = TensorParallelPlan.for_group(config, group)
    files = _checkpoint_files(path)
    model = _empty_model(config, "meta", dtype)
    full_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _restructure(model, plan, group)
    model.to_empty(device=device)
    _fill_from_checkpoint(model, path, files, full_shapes, plan.read)
    return model


def tensor_parallel_rank(model) -> int:
    """This process's rank in the model's tensor-parallel group (0 for an unsharded model)."""
    group = getattr(model, "tp_group", None)
    return 0 if group is None else dist.get_rank(group)
