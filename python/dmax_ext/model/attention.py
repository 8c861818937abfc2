"""Attention (fused qkv, per-head q/k RMSNorm, partial rotary, GQA via SDPA) and its masks."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLaDA2Config
from .modules import Linear, RMSNorm, apply_rotary, rms_normalize
from .native import CpuVariant, runs_hooks

# = kAttnMaxHeadDim of csrc/kernels/block_attention.cuh, the largest head dim the CUDA kernel of
# dmax.block_attention takes (its shared-memory tiles; tests/test_block_attention_kernel.py
# checks the two agree); past it the model runs SDPA on CUDA.
BLOCK_ATTENTION_MAX_HEAD_DIM = 128


def block_causal_mask(length: int, block_length: int, device=None) -> torch.Tensor:
    """[1, 1, T, T] bool, True = may attend: a token sees its own block and every earlier one.
    Blocks are counted from index 0 of the sequence."""
    blocks = torch.arange(length, device=device) // block_length
    return (blocks[None, :] <= blocks[:, None])[None, None]


def cached_attention_mask(valid_from: torch.Tensor, fed_slots: torch.Tensor, span: int,
                          block_length: int) -> torch.Tensor:
    """[B, 1, T, span] bool for T tokens fed at the consecutive cache slots fed_slots (int64 [T],
    from a multiple of block_length; a tensor, so the write slot may be a device value).

    Query i (slot fed_slots[i]) sees slot s iff s >= valid_from[b] (the sequence's first slot:
    earlier slots are another sequence's padding), block(s) <= block(fed_slots[i]), and s is not
    past the fed tokens: a span longer than write_slot + T (bucketed for CUDA-graph replay) reads
    slots of later blocks, whose contents are stale."""
    key_slots = torch.arange(span, device=fed_slots.device)
    block_end = (fed_slots // block_length + 1) * block_length
    visible_end = torch.minimum(block_end, fed_slots[-1:] + 1)                       # [T]
    causal = key_slots[None, :] < visible_end[:, None]                               # [T, S]
    valid = key_slots[None, :] >= valid_from[:, None]                                # [B, S]
    return (causal[None] & valid[:, None])[:, None]


class MaskTiles(NamedTuple):
    """A batch-shared attention mask cut into tiles of query rows, each with only the keys its
    rows may see: SDPA's CPU kernels compute every query-key pair an explicit mask has, so
    sparse masks pay for the pairs they mask out. Training's two-half mask (training/oput.py)
    lets 27% of the pairs through; attention forward + backward at 1,024 tokens of llada2-small
    took 78 ms dense and 30 ms in tiles of 64 (float32; bfloat16 57 -> 36 ms; docs/PERFORMANCE.md,
    2026-12-06 16:55). Made by tile_mask; Attention._attend runs one attention per tile."""
    mask: torch.Tensor   # [1, 1, T, S] bool: the whole mask
    tiles: tuple         # (first query, end query, keys: a slice or int64 indices, mask [1, 1, rows, keys])


MASK_TILE = 64  # query rows and key columns a tile; 32 was as fast, 128 10% slower (the same A/B)


def tile_mask(mask: torch.Tensor | None, tile: int = MASK_TILE):
    """mask ([B or 1, 1, T, S] bool, or None) as MaskTiles where the tiles skip at least a
    quarter of the pairs, else mask itself: a mask per sequence (B > 1), short sequences, a
    query tile that sees no key at all (its rows' outputs are whatever the dense kernel makes
    of a fully masked row), under torch.compile (the plan reads the mask's values), and off
    the CPU: the tile size is the CPU's, and CUDA's attention kernels (their own tiling, a
    launch per tile here) have not been measured with it."""
    if (mask is None or mask.shape[0] != 1 or mask.device.type != "cpu"
            or torch.compiler.is_compiling()):
        return mask
    rows, keys = mask.shape[2], mask.shape[3]
    if rows <= tile or keys <= tile:
        return mask
    n_key_tiles = -(-keys // tile)
    padded = F.pad(mask[0, 0], (0, n_key_tiles * tile - keys))
    tiles, pairs = [], 0
    for first in range(0, rows, tile):
        end = min(first + tile, rows)
        seen = padded[first:end].view(end - first, n_key_tiles, tile).any(-1).any(0)
        key_tiles = seen.nonzero().flatten().tolist()
        if not key_tiles:
            return mask
        if key_tiles[-1] - key_tiles[0] + 1 == len(key_tiles):  # contiguous: a view, no copy
            cols = slice(key_tiles[0] * tile, min((key_tiles[-1] + 1) * tile, keys))
            width = cols.stop - cols.start
        else:
            cols = torch.cat([torch.arange(j * tile, min((j + 1) * tile, keys), device=mask.device)
                              for j in key_tiles])
            width = cols.numel()
        sub = mask[:, :, first:end]
        tiles.append((first, end, cols, sub[..., cols] if isinstance(cols, slice)
                      else sub.index_select(3, cols)))
        pairs += (end - first) * width
    return MaskTiles(mask, tuple(tiles)) if pairs <= 0.75 * rows * keys else mask


class CacheSlots(NamedTuple):
    """What a cached forward does in every layer's KV cache: the fed tokens' keys/values are
    written at `fed`, and the queries read slots [0, span). `fed` is slice(write_slot,
    write_slot + T) for an int write slot (the eager path: a strided copy), or the int64 slots
    [T] on the device for a device write slot (an index_put_, as gpt-fast's KV cache does: a
    captured CUDA graph then writes wherever the slot tensor says at replay)."""
    fed: slice | torch.Tensor
    span: int


class Attention(CpuVariant, nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5  # of q . k (also dmax.decoder_layer's, native_layer.py)
        n_rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        # Rows: all query heads, then all key heads, then all value heads (the checkpoint order).
        self.query_key_value = Linear(config.hidden_size, n_rows)
        self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = Linear(self.n_heads * self.head_dim, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                slots: CacheSlots | None = None, out_rows: int | None = None) -> torch.Tensor:
        """x [B, T, H]; mask bool [B or 1, 1, T, S] or None (full attention).

        With cache_kv = (keys, values) [B, n_kv, slots, hd], this call's keys/values are written at
        slots.fed and the queries attend to slots [0, slots.span) (S = span). out_rows: only the
        last out_rows tokens' outputs ([B, out_rows, H]; every token's keys/values written)."""
        q = (self._project_into_cache(x, cos, sin, cache_kv, slots) if cache_kv is not None
             else None)
        if q is None:
            q, k, v = self._project(x, cos, sin)
            if cache_kv is not None:
                self._write(cache_kv, slots, k, v)
        if cache_kv is not None:
            keys, values = cache_kv
            k, v = keys[:, :, :slots.span], values[:, :, :slots.span]
        if out_rows is not None:
            first = q.shape[2] - out_rows
            q, mask = q[:, :, first:], None if mask is None else mask[:, :, first:]
        return self.dense(self._attend(q, k, v, mask))

    def forward_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask,
                     rows: torch.Tensor) -> torch.Tensor:
        """forward(x, cos, sin, mask) (no cache) at the flattened tokens `rows` (int64 [N] into
        B x T): [N, H]. Every token's keys and values; the queries of those rows only, sequence
        by sequence, against their mask rows (in tiles where tile_mask finds them sparse)."""
        q, k, v = self._project(x, cos, sin)
        length = x.shape[1]
        whole = mask.mask if isinstance(mask, MaskTiles) else mask
        sequence, position = rows // length, rows % length
        picks, outs = [], []
        for b in range(x.shape[0]):
            picked = (sequence == b).nonzero().flatten()  # where in `rows`
            if picked.numel() == 0:
                continue
            t = position.index_select(0, picked)
            sub = None
            if whole is not None:
                row_mask = whole[b:b + 1] if whole.shape[0] > 1 else whole
                sub = tile_mask(row_mask.index_select(2, t))
            picks.append(picked)
            outs.append(self._attend(q[b:b + 1].index_select(2, t), k[b:b + 1], v[b:b + 1],
                                     sub)[0])
        order = torch.cat(picks)  # (rows is not empty: DecoderLayer.forward_rows)
        return self.dense(torch.cat(outs).index_select(0, torch.argsort(order)))

    def write_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache_kv: tuple[torch.Tensor, torch.Tensor], slots: CacheSlots) -> None:
        """Only what forward writes into the cache (this call's keys/values), without the
        attention: a prefill's last layer, whose output nobody reads."""
        _, k, v = self._project(x, cos, sin)
        self._write(cache_kv, slots, k, v)

    def _project(self, x, cos, sin):
        """q [B, heads, T, hd] and k, v [B, kv heads, T, hd] of x [B, T, H], q and k normalized
        and rotated."""
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, -1, self.head_dim)  # [B, T, heads, hd]
        n_qk = self.n_heads + self.n_kv_heads
        qk = self._qk_norm_rotary(qkv[:, :, :n_qk], cos, sin)
        return qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, :, n_qk:].transpose(1, 2)

    def _project_into_cache(self, x, cos, sin, cache_kv, slots: CacheSlots):
        """The queries [B, heads, T, hd], with this call's keys and values written into the
        cache by the same op (dmax.qk_norm_rotary_write_kv: one launch where _project and
        _write are three), where that applies: no gradients, no hooks on the norms, on CUDA (or
        the CPU standing for it, its variants off; the CPU's own decode runs whole layers as
        dmax.decoder_layer); else None."""
        q_norm, k_norm = self.query_layernorm, self.key_layernorm
        if not self.runs_cuda_path(x) or q_norm.eps != k_norm.eps or runs_hooks(q_norm) \
                or runs_hooks(k_norm) or x.dtype != q_norm.weight.dtype:
            return None
        op = self.native("qk_norm_rotary_write_kv", x, q_norm.weight)
        if op is None:
            return None
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, -1, self.head_dim)
        fed = slots.fed
        fed = (torch.arange(fed.start, fed.stop, device=x.device) if isinstance(fed, slice)
               else fed)
        return op(qkv, q_norm.weight, k_norm.weight, cos, sin, self.n_heads, q_norm.eps,
                  *cache_kv, fed)

    @staticmethod
    def _write(cache_kv, slots: CacheSlots, k, v):
        keys, values = cache_kv
        keys[:, :, slots.fed] = k
        values[:, :, slots.fed] = v
        return keys, values

    def _attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(hd) + mask) v as [B, T, heads * hd]. Without gradients one op,
        dmax.block_attention, its output already in this layout: on the CPU float32 softmax,
        20-30% faster than SDPA's CPU kernels at a block's 32 queries; on CUDA (head dims up to
        BLOCK_ATTENTION_MAX_HEAD_DIM) one or two launches where SDPA, given a bool mask and
        grouped heads, falls back to its math path (csrc/kernels/block_attention.cuh). Else
        SDPA, which keeps the softmax in float32 for bf16 inputs, and whose enable_gqa maps
        query head j to kv head j // (n_heads / n_kv_heads) without materializing repeated keys.
        mask: a bool tensor, None (full attention), or MaskTiles (one attention per query tile,
        on its keys)."""
        if isinstance(mask, MaskTiles):
            return torch.cat([self._attend(q[:, :, first:end], *_keys(k, v, cols), sub)
                              for first, end, cols, sub in mask.tiles], dim=1)
        if mask is not None and (q.shape[-1] <= BLOCK_ATTENTION_MAX_HEAD_DIM
                                 or not self.runs_cuda_path(q)):
            native = self.native("block_attention", q, q)
            if native is not None:
                return native(q, k, v, mask, self.scale)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _qk_norm_rotary(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The q and k heads of qkv ([B, T, heads, hd]) normalized by query_layernorm /
        key_layernorm and rotated, as one tensor [B, heads, T, hd]: per-op overhead is a
        block's cost, so without gradients on the CPU one op (dmax.qk_norm_rotary), else the
        two norms as one normalization and one rotary."""
        q_norm, k_norm = self.query_layernorm, self.key_layernorm
        if q_norm.eps == k_norm.eps and qk.dtype == q_norm.weight.dtype:
            native = self.native("qk_norm_rotary", qk, q_norm.weight)
            if native is not None:
                return native(qk, q_norm.weight, k_norm.weight, cos, sin, self.n_heads,
                              q_norm.eps)
        return apply_rotary(self._qk_norm(qk.transpose(1, 2)), cos, sin)

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """RMSNorm.forward of query_layernorm on the first n_heads heads of qk [B, heads, T, hd]
        and of key_layernorm on the others: one normalization, one per-head weight."""
        q_norm, k_norm = self.query_layernorm, self.key_layernorm
        if q_norm.eps != k_norm.eps:
            return torch.cat((q_norm(qk[:, :self.n_heads]), k_norm(qk[:, self.n_heads:])), dim=1)
        weight = torch.cat((q_norm.weight.expand(self.n_heads, -1),
                            k_norm.weight.expand(qk.shape[1] - self.n_heads, -1)))[:, None]
        return rms_normalize(qk, q_norm.eps, weight)


def _keys(k: torch.Tensor, v: torch.Tensor, cols):
    """k, v [B, kv heads, S, hd] at the key columns `cols` (a slice: views; else indices)."""
    if isinstance(cols, slice):
        return k[:, :, cols], v[:, :, cols]
    return k.index_select(2, cols), v.index_select(2, cols)
