"""One denoising step of a block on static shapes: the hot path (SPEC section 3).

`BlockState` holds every tensor a step reads and writes, preallocated per running batch and
updated in place, so the same step runs eagerly (the CPU) or is captured once and replayed as a
CUDA graph (cuda_graph.py), a block's first step as well as its later ones. A step never syncs
with the host: the engine reads `state.done` once per step to decide whether the block goes on,
and for which rows (`BlockState.select`: converged rows leave the eager steps).

A step = the block's forward (`forward_block`, later steps; `forward_first`, a block's first step)
followed by `apply_step`: logits_stats -> promote -> spd_update -> hybrid_embed (SPD), or
logits_stats -> promote(prefix=False) -> commit the promoted ids (the threshold baseline); on the
CPU's own path each as one op (dmax.spd_step, dmax.threshold_step).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .params import DecodeConfig


@dataclass
class BlockState:
    """The running batch's current block. Row i is a running sequence; column l is position l of
    its block. Filled in place at each block start (`start_block`) so the buffers keep their
    addresses for CUDA-graph replay."""
    ids: torch.Tensor         # [B, L] int64: the block's ids (prompt tail, masks, decoded ids)
    prev_ids: torch.Tensor    # [B, L] int64: the previous block's final ids (its K/V are
                              # committed by this block's first step)
    active: torch.Tensor      # [B, L] bool: masked when the block started (SPEC section 3)
    embeds: torch.Tensor      # [B, L, H] model dtype: next step's input (SPD; unused by threshold)
    positions: torch.Tensor   # [B, L] int64: absolute position ids of the block
    valid_from: torch.Tensor  # [B] int64: first cache slot of each sequence
    done: torch.Tensor        # [B] bool: the row's block has converged; its ids stay as they are
    seeds: torch.Tensor       # [B] int64: row seed of the block's step 0 (sampling only)
    step: torch.Tensor        # [] int64: step index within the block

    @classmethod
    def allocate(cls, batch: int, block_length: int, hidden: int, dtype, device) -> "BlockState":
        def ints(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)
        return cls(ids=ints(batch, block_length), prev_ids=ints(batch, block_length),
                   active=torch.zeros(batch, block_length, dtype=torch.bool, device=device),
                   embeds=torch.zeros(batch, block_length, hidden, dtype=dtype, device=device),
                   positions=ints(batch, block_length), valid_from=ints(batch),
                   done=torch.zeros(batch, dtype=torch.bool, device=device),
                   seeds=ints(batch), step=ints())

    def select(self, index: torch.Tensor) -> "BlockState":
        """A new state holding the rows `index` (int64 [B'], on the state's device) of this one,
        mid-block included: the rows go on from where they are."""
        rows = {f.name: getattr(self, f.name).index_select(0, index) for f in fields(self)
                if f.name != "step"}
        return BlockState(**rows, step=self.step.clone())

    # Sequences admitted mid-decode by the rolling schedule join a running state, as new rows
    # (joined) or in finished rows' places (put_rows). The step counter stays the running one's;
    # the joining rows' seeds are rebased on it, so seeds + step stays each row's block start +
    # its own step index.

    @classmethod
    def joined(cls, running: "BlockState", joining: "BlockState") -> "BlockState":
        """A new state: running's rows, then joining's."""
        rows = {f.name: torch.cat([getattr(running, f.name), getattr(joining, f.name)])
                for f in fields(cls) if f.name not in ("step", "seeds")}
        seeds = torch.cat([running.seeds, joining._seeds_on(running.step)])
        return cls(**rows, seeds=seeds, step=running.step.clone())

    def put_rows(self, index: torch.Tensor, joining: "BlockState") -> None:
        """In place: rows `index` (int64 [B'] on the device) take joining's B' rows."""
        for f in fields(self):
            if f.name not in ("step", "seeds"):
                getattr(self, f.name).index_copy_(0, index, getattr(joining, f.name))
        self.seeds.index_copy_(0, index, joining._seeds_on(self.step))

    def _seeds_on(self, step: torch.Tensor) -> torch.Tensor:
        return self.seeds + self.step - step

    def start_block(self, model, ids: torch.Tensor, block_starts: torch.Tensor,
                    config: DecodeConfig) -> None:
        """ids [B, L] (any device): the block's initial ids; block_starts [B]: the absolute
        position of each row's block. The ids the last block ended with become prev_ids."""
        device = self.ids.device
        self.prev_ids.copy_(self.ids)
        self.ids.copy_(ids)
        self.active.copy_(self.ids == config.mask_id)
        starts = block_starts.to(device)
        self.positions.copy_(starts[:, None] + torch.arange(self.ids.shape[1], device=device))
        self.done.zero_()
        self.step.zero_()
        self.seeds.copy_(row_seed_base(config.seed) + starts)
        if config.mode == "spd":
            self.embeds.copy_(model.embed(self.ids))

    def next_block(self, model, index: torch.Tensor, block_starts: torch.Tensor,
                   valid_from: torch.Tensor, config: DecodeConfig) -> None:
        """The rolling schedule (rolling.py): the rows `index` (int64 [B'] on the state's
        device) move on to their next block, all masks, at absolute positions block_starts [B']
        and first slots valid_from [B'], while the other rows stay mid-block. Their ids become
        prev_ids. `step` runs on over every forward there, so a row's seeds are based on its
        value now: seeds + step is still the row's block start + its own step index."""
        device, L = self.ids.device, self.ids.shape[1]
        masks = torch.full((index.numel(), L), config.mask_id, dtype=torch.int64, device=device)
        starts = block_starts.to(device)
        self.prev_ids.index_copy_(0, index, self.ids.index_select(0, index))
        self.ids.index_copy_(0, index, masks)
        self.active.index_fill_(0, index, True)
        self.positions.index_copy_(0, index, starts[:, None] + torch.arange(L, device=device))
        self.valid_from.index_copy_(0, index, valid_from.to(device))
        self.done.index_fill_(0, index, False)
        self.seeds.index_copy_(0, index, row_seed_base(config.seed) + starts - self.step)
        if config.mode == "spd":
            self.embeds.index_copy_(0, index, model.embed(masks))


def row_seed_base(seed: int | None) -> int:
    # Row seed at step s = base + (absolute block start + s): unique per (seed, block, step)
    # because s < block_length (the step cap), and independent of the row's batch index, so a
    # sampled sequence decodes the same alone or in any batch. The user seed goes in the high
    # 32 bits (mod 2^31, keeping the int64 positive); positions stay far below 2^32.
    return 0 if seed is None else (seed % 2**31) << 32


def forward_first(model, cache, state: BlockState, write_slot: int | torch.Tensor,
                  block_length: int, with_prev: bool, span: int | None = None) -> torch.Tensor:
    """A block's first step, from ids. with_prev: the previous block (state.prev_ids) and this
    one are fed, 2L tokens at write_slot - L, so this forward also commits the previous block's
    K/V (SPEC section 2). The first generated block has no previous block to commit: its
    predecessors are the prompt's full blocks, committed by the prefill (or there are none), so
    it is fed alone. write_slot and span as in forward_block (a device slot tensor: the form a
    CUDA graph is captured in). Returns the current block's logits [B, L, V]."""
    ids, positions, slot = state.ids, state.positions, write_slot
    if with_prev:
        ids = torch.cat([state.prev_ids, ids], dim=1)
        positions = torch.cat([positions - block_length, positions], dim=1)
        slot = write_slot - block_length  # a new tensor: the runner's slot tensor stays as filled
    # Logits of the current block only: the previous block's would be discarded.
    return model.forward_cached(cache, input_ids=ids, position_ids=positions, write_slot=slot,
                                valid_from=state.valid_from, block_length=block_length,
                                n_logits=block_length, span=span)


def forward_block(model, cache, state: BlockState, write_slot: int | torch.Tensor,
                  config: DecodeConfig, span: int | None = None):
    """A later step: only the current block, from the hybrid embeddings (SPD) or ids.
    write_slot: an int, or a one-element int64 tensor on the device with the key span `span`
    (model.forward_cached): the form a CUDA graph is captured in, replayable at any slot."""
    inputs = ({"inputs_embeds": state.embeds} if config.mode == "spd" else {"input_ids": state.ids})
    return model.forward_cached(cache, **inputs, position_ids=state.positions,
                                write_slot=write_slot, valid_from=state.valid_from,
                                block_length=config.block_length, span=span)


def forward_rolling(model, cache, state: BlockState, write_slot: int | torch.Tensor,
                    config: DecodeConfig, span: int | None = None) -> torch.Tensor:
    """A step of the rolling schedule (rolling.py), whichever step of its block each row is
    at: every row's previous block from its ids (committing, or re-committing, its K/V: the
    same bits each time) and its current block, 2L tokens at write_slot - L. The current block
    comes from its embeddings (SPD: a row at its block's first step holds the embeddings of its
    ids, start_block / next_block) or its ids (threshold). A row with no previous block (its
    prompt has no full block) feeds pad ids at position 0 there, before its first slot, so no
    query attends to them. Returns the current blocks' logits [B, L, V]."""
    L = config.block_length
    positions = torch.cat([(state.positions - L).clamp_min(0), state.positions], dim=1)
    if config.mode == "spd":
        inputs = {"inputs_embeds": torch.cat([model.embed(state.prev_ids), state.embeds], dim=1)}
    else:
        inputs = {"input_ids": torch.cat([state.prev_ids, state.ids], dim=1)}
    return model.forward_cached(cache, **inputs, position_ids=positions,
                                write_slot=write_slot - L, valid_from=state.valid_from,
                                block_length=L, n_logits=L, span=span)


def apply_step(ops, model, state: BlockState, logits: torch.Tensor, config: DecodeConfig,
               all_live: bool = False) -> None:
    """SPEC section 3 steps 2-6 (or the threshold baseline) for every row still running; rows
    whose block has converged (state.done) keep their ids and embeddings. In place, no sync.
    all_live: no row of `state` has converged (a block's first step, and the eager steps, which
    converged rows leave), so the masks that keep converged rows as they are are skipped: four
    small ops of a step's ~15, ~40 us of a bf16 step of llada2-small after its forward has
    pushed the dispatcher out of the caches (docs/PERFORMANCE.md).
    On the CPU's own path the step is one op, dmax.spd_step or dmax.threshold_step (the same
    ops from C++: ~56 us less a bf16 SPD step of llada2-small); CUDA (and the CPU standing for
    it) runs them one by one."""
    seeds = state.seeds if config.sampling else None
    # The CPU's own path: CPU logits, and the model's CPU variants on (model/native.py; a model
    # without them, like the tests' stubs, has only that path).
    own_cpu_path = logits.is_cpu and getattr(model, "cpu_variant", True)
    if config.mode == "spd":
        fused = getattr(ops, "spd_step", None) if own_cpu_path else None
        run = fused or (lambda *args: spd_step_composed(ops, *args, all_live=all_live))
        run(logits, state.ids, state.embeds, state.done, state.step, state.active,
            model.embedding_weight, seeds, config.top_k, config.temperature, config.threshold,
            config.accept_threshold, config.mask_id)
    else:
        fused = getattr(ops, "threshold_step", None) if own_cpu_path else None
        run = fused or (lambda *args: threshold_step_composed(ops, *args, all_live=all_live))
        run(logits, state.ids, state.done, state.step, state.active, seeds, config.top_k,
            config.temperature, config.threshold, config.mask_id)


def spd_step_composed(ops, logits, ids, embeds, done, step, active, weight, seeds, k: int,
                      temperature: float, threshold: float, accept_threshold: float,
                      mask_id: int, *, all_live: bool = False) -> None:
    """One SPD step from the backend's ops, one by one, in place (the semantics of
    dmax.spd_step; dmax_ext.reference.spd_step_reference runs it on the reference ops).
    seeds: the block's row seeds (sampling; this step's are seeds + step) or None."""
    pred, conf, topk_ids, topk_probs = ops.logits_stats(
        logits, k, temperature, None if seeds is None else seeds + step)
    promoted = ops.promote(ids, conf, pred, threshold, mask_id, True)
    new_ids, changed, converged = ops.spd_update(ids, active, promoted, pred, conf,
                                                 accept_threshold, mask_id)
    live = None if all_live else ~done[:, None]
    # A row that converged at this step may get new embeddings: they are never fed.
    ops.hybrid_embed(embeds, weight, new_ids, active if all_live else active & live,
                     changed if all_live else changed & live, topk_ids, topk_probs, mask_id)
    ids.copy_(new_ids if all_live else torch.where(live, new_ids, ids))
    done.logical_or_(converged)
    step.add_(1)


def threshold_step_composed(ops, logits, ids, done, step, active, seeds, k: int,
                            temperature: float, threshold: float, mask_id: int, *,
                            all_live: bool = False) -> None:
    """The hard-threshold baseline's step from the backend's ops, in place (the semantics of
    dmax.threshold_step; dmax_ext.reference.threshold_step_reference runs it on the reference
    ops): promote anywhere, commit the promoted ids, converged when no mask is left."""
    pred, conf, _, _ = ops.logits_stats(logits, k, temperature,
                                        None if seeds is None else seeds + step)
    promoted = ops.promote(ids, conf, pred, threshold, mask_id, False)
    new_ids = torch.where(promoted, pred, ids)
    converged = ~(new_ids == mask_id).logical_and_(active).any(dim=1)
    ids.copy_(new_ids if all_live else torch.where(~done[:, None], new_ids, ids))
    done.logical_or_(converged)
    step.add_(1)
