"""LLaDA2MoeModel: the LLaDA2-MoE transformer (SPEC section 1) with a static block KV cache.

Module names follow the Hugging Face checkpoint (model.word_embeddings, model.layers.N.attention
.query_key_value, ..., lm_head), so state_dict() keys are the checkpoint's tensor names.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .attention import (Attention, CacheSlots, block_causal_mask, cached_attention_mask,
                        tile_mask)
from .cache import KVCache
from .config import LLaDA2Config
from .modules import GatedMLP, Linear, RMSNorm, rotary_cos_sin, rotary_inv_freq
from .moe import MoeBlock, resolve_impl
from .native import CpuVariant, hooks_output, runs_hooks
from .native_layer import native_layer_forward, planned_layer_forward


class DecoderLayer(CpuVariant, nn.Module):
    """Its CPU variant: a cached forward with every module on its native form runs as one op
    (native_layer.py); cpu_variant False runs the modules one by one."""

    def __init__(self, config: LLaDA2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MoeBlock(config) if config.is_moe_layer(layer)
                    else GatedMLP(config.hidden_size, config.intermediate_size))

    def forward(self, x, cos, sin, mask, cache_kv=None, slots=None, out_rows=None):
        """out_rows: the output of the last out_rows tokens only (each row's is the same bits as
        in the whole output: every kernel computes a row alone), every token's keys/values
        written."""
        fused = native_layer_forward(self, x, cos, sin, mask, cache_kv, slots, out_rows)
        if fused is not None:
            return fused
        attended = self.attention(self.input_layernorm(x), cos, sin, mask, cache_kv, slots,
                                  out_rows)
        h, normed = self._residual_and_norm(
            x if out_rows is None else x[:, x.shape[1] - out_rows:], attended)
        if self._mlp_adds_residual():
            return self.mlp(normed, residual=h)
        return h + self.mlp(normed)

    def _mlp_adds_residual(self) -> bool:
        """Whether the MoE block takes the residual add (inside the experts' combine: on the
        kernel path one launch fewer a layer): not where a forward hook would see the sum in
        place of the block's output, nor where its forward was replaced (a wrapper or
        activation checkpointing expects the block's own arguments)."""
        return (isinstance(self.mlp, MoeBlock) and not hooks_output(self.mlp)
                and "forward" not in self.mlp.__dict__)

    def _residual_and_norm(self, x, attended):
        """(x + attended, post_attention_layernorm of it): one dmax.add_rms_norm where the
        torch formulation is an add and a norm, on CUDA (or the CPU standing for it, its variants
        off; the CPU's own decode runs whole layers as dmax.decoder_layer), without gradients
        or a hook on the norm; else the two."""
        norm = self.post_attention_layernorm
        fused = None
        if norm.runs_cuda_path(x) and not runs_hooks(norm) and x.dtype == norm.weight.dtype:
            fused = norm.native("add_rms_norm", x, norm.weight)
        if fused is not None:
            return fused(x, attended, norm.weight, norm.eps)
        h = x + attended
        return h, norm(h)

    def forward_rows(self, x, cos, sin, mask, rows: torch.Tensor) -> torch.Tensor | None:
        """forward(x, cos, sin, mask) at the flattened tokens `rows` only (int64 [N] into
        B x T; returns [N, H]): every token's keys and values, the queries, output projection
        and MLP on those rows. None, doing nothing, where a hook in the layer would then see
        other rows, or where its forward was replaced (activation checkpointing): the layer must
        run whole. For the last layer of a forward whose logits are read at a fraction of its
        rows (forward's logits_rows: a training loss's label rows, a rollout's masked ones)."""
        if (rows.numel() == 0 or "forward" in self.__dict__
                or any(runs_hooks(m) for m in self.modules())):
            return None
        attended = self.attention.forward_rows(self.input_layernorm(x), cos, sin, mask, rows)
        h = x.reshape(-1, x.shape[-1]).index_select(0, rows) + attended
        return h + self.mlp(self.post_attention_layernorm(h)[None])[0]

    def write_kv(self, x, cos, sin, cache_kv, slots) -> bool:
        """Writes only the keys/values forward would write into the cache (the same kernels on
        the same inputs), and returns True; False, doing nothing, where a hook on a module of
        the layer would then be skipped: the layer must run whole. For the last layer of a
        forward whose output nobody reads (a prefill): its attention and MoE (most experts busy
        at a prompt's rows) were 22% of a 96-token llada2-small prefill in bf16 and 36% in
        float32 (10.7 -> 8.4 ms, 24.4 -> 15.7 ms, 1 thread, 2026-12-06)."""
        if any(runs_hooks(m) for m in self.modules()):
            return False
        self.attention.write_kv(self.input_layernorm(x), cos, sin, cache_kv, slots)
        return True


class Backbone(nn.Module):
    """The checkpoint's `model.*` part: embeddings, layers, final norm."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoeModel(CpuVariant, nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        # The largest matmul of a block forward (Linear: dmax.skinny_linear for a block's rows).
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tokenizer = None
        self._frozen: _FrozenState | None = None  # inside frozen()

    # -- embeddings ----------------------------------------------------------------------------
    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.word_embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding_weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(ids)

    def set_moe_impl(self, impl: str) -> None:
        """"auto" (default), "padded", "grouped" or "reference" (one matmul pair per expert)."""
        resolve_impl(impl, self.device)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoeBlock):
                layer.mlp.impl = impl

    def set_cpu_variants(self, enabled: bool) -> None:
        """The CPU-only native forms (model/native.py CpuVariant: projections, norms, q/k norm +
        rotary, router, experts, whole decoder layers) on (the default) or off; off, the CPU
        dispatches what CUDA runs (op traces that stand for a GPU step)."""
        for module in self.modules():
            if isinstance(module, CpuVariant):
                module.cpu_variant = enabled

    @contextlib.contextmanager
    def frozen(self):
        """Inside, the caller promises that the model does not change: no parameter replaced or
        updated, no hook added or removed, no CPU variant, MoE impl or DMAX_CPU_* switch
        flipped. Cached forwards then reuse what depends only on the model and the call's
        shape (_FrozenState): each layer's dmax.decoder_layer arguments, packed once per dtype
        and device (its row caps checked once per row count), the final norm and lm_head called
        as their ops, and the last forward's mask and rotary tables when its positions and
        slots come again (a block's later steps, or their tail: a block's second step after
        its first). decode() runs inside one; re-entrant."""
        if self._frozen is not None:
            yield self
            return
        self._frozen = _FrozenState()
        try:
            yield self
        finally:
            self._frozen = None

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, block_length: int | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (logit i predicts token i). Attention: `attention_mask` (bool
        [B or 1, 1, T, T], True = may attend) if given, else block-causal with `block_length`
        (blocks counted from index 0), else full. position_ids default to 0..T-1.
        logits_rows: int64 [N] indices into the flattened B x T tokens (b * T + t): the logits
        of those tokens only, [N, V]. The lm_head is the largest matmul of a forward, and a
        training loss reads a fraction of the rows (training/oput.py: the noisy half's labels)."""
        x = self._inputs(input_ids, inputs_embeds)
        batch, length, _ = x.shape
        if logits_rows is not None:
            _check_rows(logits_rows, batch * length, x.device)
        if position_ids is None:
            self._check_positions(length - 1)
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        else:
            self._check_positions(int(position_ids.max()) if position_ids.numel() else 0)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 \
                    or attention_mask.shape[1:] != (1, length, length):
                raise ValueError(f"attention_mask: expected bool [B or 1, 1, {length}, {length}], "
                                 f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
            mask = attention_mask
        elif block_length is not None:
            mask = block_causal_mask(length, _positive(block_length), x.device)
        else:
            mask = None
        cos, sin = self._rotary(position_ids, x)
        return self._run(x, cos, sin, tile_mask(mask), logits_rows=logits_rows)

    def new_cache(self, batch_size: int, max_slots: int) -> KVCache:
        # A token's position is at most its slot, so this bound keeps every position in range.
        if max_slots > self.config.max_position_embeddings:
            raise ValueError(f"max_slots ({max_slots}) exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        c = self.config
        # The heads this process holds: fewer than the config's under tensor parallelism.
        n_kv_heads = self.model.layers[0].attention.n_kv_heads
        return KVCache.allocate(c.num_hidden_layers, batch_size, n_kv_heads, max_slots,
                                c.head_dim, self.dtype, self.device)

    def forward_cached(self, cache: KVCache, *, input_ids: torch.Tensor | None = None,
                       inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor,
                       write_slot: int | torch.Tensor, valid_from: torch.Tensor,
                       block_length: int, n_logits: int | None = None,
                       span: int | None = None) -> torch.Tensor | None:
        """Feeds T tokens at cache slots [write_slot, write_slot + T) and returns their logits.

        Their keys/values are written to those slots; queries see slots [valid_from[b], write_slot)
        and the fed tokens block-causally (blocks counted in slots). write_slot must be a multiple
        of block_length; valid_from[b] (int64 [B]) is sequence b's first slot.
        n_logits: logits of the last n_logits fed tokens only ([B, n_logits, V]; default all T);
        0 returns None (a prefill: only the cache is wanted). The final norm and lm_head are the
        largest matmul of a block forward, so rows nobody reads are not computed.
        span: the attention reads slots [0, span), the ones past write_slot + T masked out
        (default write_slot + T). A longer span changes the attention's reduction length, so
        the logits may differ from the default's by float rounding.
        write_slot may be an int64 tensor of one element on the model's device (span then
        required): the forward then reads it on the device only, so a CUDA graph captured once
        replays at any write slot the tensor holds (decoding/cuda_graph.py). Its value is not
        checked (that would be a host sync): the caller keeps it a multiple of block_length with
        write_slot + T <= span."""
        x = self._inputs(input_ids, inputs_embeds)
        batch, length, _ = x.shape
        block_length = _positive(block_length)
        write_slot, span = _write_slot_and_span(write_slot, span, x.device, length, block_length)
        if batch != cache.batch_size or span > cache.max_slots:
            raise ValueError(f"cache holds batch {cache.batch_size} x {cache.max_slots} slots; "
                             f"got batch {batch}, {length} tokens at slot {write_slot} "
                             f"reading {span} slots")
        if tuple(position_ids.shape) != (batch, length):
            raise ValueError(f"position_ids: expected shape ({batch}, {length}), got {tuple(position_ids.shape)}")
        if tuple(valid_from.shape) != (batch,):
            raise ValueError(f"valid_from: expected shape ({batch},), got {tuple(valid_from.shape)}")
        if n_logits is None:
            n_logits = length
        if isinstance(n_logits, bool) or not isinstance(n_logits, int) \
                or not 0 <= n_logits <= length:
            raise ValueError(f"n_logits must be an int in [0, {length}] (the fed tokens), "
                             f"got {n_logits!r}")
        tables = self._step_tables(x, position_ids, valid_from, write_slot, span, block_length)
        if tables is not None:
            fed, cos, sin, mask = tables
        else:
            fed = (write_slot + torch.arange(length, device=x.device)
                   if isinstance(write_slot, torch.Tensor)
                   else slice(write_slot, write_slot + length))
            cos, sin, mask = self._step_inputs(x, position_ids, valid_from, fed, span,
                                               block_length)
        return self._run(x, cos, sin, mask, cache, CacheSlots(fed, span), n_logits)

    def _step_tables(self, x, position_ids, valid_from, write_slot, span: int,
                     block_length: int):
        """(fed, cos, sin, mask) of a cached forward as one dmax.step_tables, where the torch
        formulation is ~16 small kernels: on CUDA, or the CPU standing for it (its variants
        off); else None. An int write slot goes to the device too (a fill, no sync), so an
        eager step computes the tables a replayed graph does: the op's cos and sin may differ
        from torch's by an ulp."""
        op = self.native("step_tables", x, self.embedding_weight)
        if op is None or not self.runs_cuda_path(x):
            return None
        if not isinstance(write_slot, torch.Tensor):
            write_slot = torch.full((), write_slot, dtype=torch.int64, device=x.device)
        return op(position_ids.to(x.device), self._inv_freq(x.device), valid_from.to(x.device),
                  write_slot, span, block_length, x.dtype)

    # -- internals -----------------------------------------------------------------------------
    def _inputs(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
            return self.embed(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds: expected [B, T, {self.config.hidden_size}], "
                             f"got shape {tuple(inputs_embeds.shape)}")
        return inputs_embeds.to(self.dtype)

    def _check_positions(self, largest: int) -> None:
        if largest >= self.config.max_position_embeddings:
            raise ValueError(f"position {largest} is beyond max_position_embeddings "
                             f"({self.config.max_position_embeddings}): the prompt plus generation "
                             "is longer than the model supports")

    def _step_inputs(self, x, position_ids, valid_from, fed, span: int, block_length: int):
        """(cos, sin, mask) of a cached forward feeding x at the slots `fed` (a slice, or the
        device's slot tensor); inside frozen() with a host write slot, the last forward's when
        it had the same positions and slots (on the CPU only: comparing device tensors would
        wait for the device)."""
        frozen = self._frozen if isinstance(fed, slice) and x.device.type == "cpu" else None
        if frozen is not None:
            key = (fed.start, fed.stop, span, block_length, x.dtype, x.device)
            kept = frozen.step_inputs(key, position_ids, valid_from)
            if kept is not None:
                return kept
        fed_slots = (torch.arange(fed.start, fed.stop, device=x.device)
                     if isinstance(fed, slice) else fed)
        inputs = (*self._rotary(position_ids, x),
                  cached_attention_mask(valid_from.to(x.device), fed_slots, span, block_length))
        if frozen is not None:
            frozen.keep_step_inputs(key, position_ids, valid_from, inputs)
        return inputs

    def _rotary(self, position_ids: torch.Tensor, x: torch.Tensor):
        return rotary_cos_sin(position_ids.to(x.device), self._inv_freq(x.device), x.dtype)

    def _run(self, x, cos, sin, mask, cache: KVCache | None = None,
             slots: CacheSlots | None = None, n_logits: int | None = None,
             logits_rows: torch.Tensor | None = None):
        plans = (self._frozen.layer_plans
                 if self._frozen is not None and cache is not None
                 and not torch.is_grad_enabled() else None)
        last = len(self.model.layers) - 1
        # Rows whose logits nobody reads need only their keys and values from the last layer:
        # a prefill's (write_kv), the previous block's in a block's first step (out_rows).
        trimmed = n_logits is not None and 0 < n_logits < x.shape[1] and cache is not None
        for i, layer in enumerate(self.model.layers):
            cache_kv = cache.layer(i) if cache is not None else None
            if i == last and n_logits == 0 and cache_kv is not None \
                    and layer.write_kv(x, cos, sin, cache_kv, slots):
                return None  # a prefill: the last layer's keys and values are all it needs
            if i == last and logits_rows is not None and cache_kv is None:
                picked = layer.forward_rows(x, cos, sin, mask, logits_rows)
                if picked is not None:  # the last layer on the rows whose logits are read
                    x, logits_rows = picked, None
                    continue
            out_rows = n_logits if trimmed and i == last else None
            planned = (None if plans is None else
                       planned_layer_forward(plans, i, layer, x, cos, sin, mask, cache_kv, slots,
                                             out_rows))
            x = (layer(x, cos, sin, mask, cache_kv, slots, out_rows) if planned is None
                 else planned)
        if n_logits is not None and n_logits < x.shape[1]:
            if n_logits == 0:
                return None
            x = x[:, -n_logits:]
        if logits_rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_rows)
        if plans is not None:
            logits = self._planned_head(x)
            if logits is not None:
                return logits
        return self.lm_head(self.model.norm(x))

    def _planned_head(self, x: torch.Tensor) -> torch.Tensor | None:
        """lm_head(norm(x)) for a frozen model's cached forward: their native forms called
        directly (dmax.rms_norm, dmax.skinny_linear) where both modules would take them, decided
        once per dtype, device and row count; None elsewhere. The two module calls around the
        ops cost ~40 us of a bf16 forward of llada2-small (2026-12-06)."""
        key = (x.dtype, x.device, x.shape[0] * x.shape[1])
        plans = self._frozen.head_plans
        if key not in plans:
            norm, lm_head = self.model.norm, self.lm_head
            native = (not runs_hooks(norm) and not runs_hooks(lm_head)
                      and norm.native_form(x) is not None and lm_head.native_form(x) is not None)
            plans[key] = ((norm._parameters["weight"], float(norm.eps),
                           lm_head._parameters["weight"]) if native else None)
        plan = plans[key]
        if plan is None:
            return None
        norm_weight, eps, head_weight = plan
        normed = torch.ops.dmax.rms_norm(x, norm_weight, eps)
        rows = normed.view(-1, normed.shape[-1])
        return torch.ops.dmax.skinny_linear(rows, head_weight).view(*x.shape[:-1], -1)

    def _inv_freq(self, device) -> torch.Tensor:
        # Computed once per device (not a buffer: the model is built on meta, then allocated).
        cached = self.__dict__.setdefault("_inv_freq_by_device", {})
        if device not in cached:
            cached[device] = rotary_inv_freq(self.config.rotary_dim, self.config.rope_theta, device)
        return cached[device]


class _FrozenState:
    """What a frozen model (LLaDA2MoeModel.frozen) keeps between cached forwards. In a decoding
    forward of llada2-small, its code and data cold after the previous kernels, packing a
    layer's arguments took 28-49 us (~12 us in a loop of calls alone) and the mask and rotary
    tables ~100 us (docs/PERFORMANCE.md, 13:55 entry), ~120 us a forward that makes them again
    (2026-12-06, 15:00), which a block's second step did before it took the first step's rows.
    """

    def __init__(self):
        self.layer_plans: dict = {}  # native_layer.planned_layer_forward's
        self.head_plans: dict = {}   # LLaDA2MoeModel._planned_head's
        self._step = None            # (key, position_ids, valid_from, (cos, sin, mask))

    def step_inputs(self, key: tuple, position_ids, valid_from):
        """The (cos, sin, mask) of a forward with this key (first and end fed slot, span, block
        length, dtype, device), positions and valid_from, from the last forward's, else None.
        The same key, positions and valid_from: its tables. The same but for a later first
        slot (a block's second step after its first, which fed the previous block too): their
        last rows, kept in turn. A fed slot's mask row depends only on the slot, the last fed
        slot, the span and valid_from, and its rotary row only on its position, so both are the
        rows the forward would make. The tensors are compared by value: the engine rewrites
        its buffers in place."""
        step = self._step
        if step is None or step[0][1:] != key[1:] or key[0] < step[0][0] \
                or not torch.equal(step[2], valid_from):
            return None
        offset = key[0] - step[0][0]
        if not torch.equal(step[1][:, offset:], position_ids):
            return None
        if offset == 0:
            return step[3]
        cos, sin, mask = step[3]
        tail = (cos[:, offset:].contiguous(), sin[:, offset:].contiguous(),
                mask[:, :, offset:].contiguous())
        self.keep_step_inputs(key, position_ids, valid_from, tail)
        return tail

    def keep_step_inputs(self, key: tuple, position_ids, valid_from, inputs: tuple) -> None:
        self._step = (key, position_ids.clone(), valid_from.clone(), inputs)


def _check_rows(rows, n_tokens: int, device) -> None:
    """forward's logits_rows: int64 [N] on the model's device, each in [0, n_tokens)."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1:
        raise ValueError("logits_rows: expected an int64 tensor [N] of flattened token indices, "
                         f"got {rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__}"
                         f" {tuple(rows.shape) if isinstance(rows, torch.Tensor) else ''}")
    if rows.device != device:
        raise ValueError(f"logits_rows must be on {device} (the model's device), got {rows.device}")
    if rows.numel() and not torch.compiler.is_compiling():
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= n_tokens:
            raise ValueError(f"logits_rows must index the {n_tokens} tokens (B x T) of the input, "
                             f"got {low if low < 0 else high}")


def _positive(block_length) -> int:
    if not isinstance(block_length, int) or block_length <= 0:
        raise ValueError(f"block_length must be a positive int, got {block_length!r}")
    return block_length


def _write_slot_and_span(write_slot, span, device, length: int, block_length: int):
    """forward_cached's write_slot (an int, or a 0-d view of a one-element int64 tensor on the
    model's device) and span, checked as far as the host can without reading the device."""
    if isinstance(write_slot, torch.Tensor):
        if write_slot.dtype != torch.int64 or write_slot.numel() != 1 \
                or write_slot.device != device or span is None:
            raise ValueError(f"write_slot: a tensor write slot must be int64 with one element on "
                             f"{device}, with span given; got {write_slot.dtype} "
                             f"{tuple(write_slot.shape)} on {write_slot.device}, span {span!r}")
        write_slot, end = write_slot.reshape(()), length  # end at least: the value stays put
    elif isinstance(write_slot, bool) or not isinstance(write_slot, int) \
            or write_slot < 0 or write_slot % block_length:
        raise ValueError(f"write_slot ({write_slot!r}) must be a multiple of block_length "
                         f"({block_length})")
    else:
        end = write_slot + length
    if span is None:
        span = end
    if isinstance(span, bool) or not isinstance(span, int) or span < end:
        raise ValueError(f"span must be an int >= {end} (the end of the fed tokens), got {span!r}")
    return write_slot, span
