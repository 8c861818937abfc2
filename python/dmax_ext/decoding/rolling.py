"""The rolling schedule: each sequence of a batch moves on to its next block as soon as its block
converges, without waiting for the others (engine.py's lockstep schedule waits for the slowest).

Why: a block's step count is heavy-tailed (1 to 32 steps within one batch), so in lockstep every
block costs its slowest row's steps in batched forwards. On a GPU a batched forward of a few rows
costs about what one row's does (it streams the same expert weights: docs/PERFORMANCE.md, "GPU
projections"), so the forwards a decode runs are its time, and rolling runs fewer: the longest
sequence's own count (plus the prefill), where lockstep runs the sum over blocks of the slowest
row's steps. On a CPU, where a block's forward is bound by arithmetic, it gains nothing and
mostly feeds twice the tokens (below): decode's scheduler "auto" takes it on CUDA only, up to
params.ROLLING_MAX_BATCH sequences.

How, with the model's forward unchanged:
- Every row's current block sits at the same slots, [s, s + L) with s = layout.rolling_slot,
  whichever of its blocks it is on; its earlier blocks lie before, right-aligned. A row moving on
  rolls its cache rows left by L (KVCache.roll_rows) and its first slot valid_from with them.
- A forward where some row starts a block feeds each row's previous block from its final ids
  and its current block (2L tokens, step.forward_rolling): the previous block's K/V are
  committed by the row's first step in the new block, as in lockstep, and re-committed with the
  same bits by the other rows' later steps. So rows at a block's first step and rows at a later
  step share one forward. A forward where no row starts a block (every previous block
  committed: the tail of a decode, where one or two rows are left) is lockstep's later step, L
  tokens a row (step.forward_block). Two kinds of step at one slot: two CUDA graphs.
- The current block's logits are the same bits as in lockstep wherever the forward computes each
  row's tokens independently of the others and of the number fed (the CPU's own kernels:
  tests/test_batch_invariance.py): each sequence then decodes exactly as alone.
- A row's sampling seeds: state.step counts every forward here, and next_block bases the row's
  seeds on its value (BlockState.next_block).
Counting as in engine.py; nfe is the rolling forwards run (plus the prefill).
"""
from __future__ import annotations

import time

import torch

from ..model.cache import KVCache
from .engine import _Decoder
from .layout import block_before_ids, first_block_ids, plan_layout
from .step import BlockState


class RollingDecoder(_Decoder):
    """max_batch: the most sequences running at once; a waiting prompt is admitted as soon as a
    running sequence finishes (its prompt prefilled in a forward of its own, then it joins the
    batch), so the batch stays full until the prompts run out."""

    def __init__(self, model, ops, config, runner, timer, max_batch: int | None = None):
        super().__init__(model, ops, config, runner, timer)
        self.max_batch = max_batch

    def run(self, prompts: list[list[int]]):
        start = time.perf_counter()
        layout = self._begin(prompts)
        self.prompts, self.slot = prompts, layout.rolling_slot
        waiting = list(range(layout.batch_size))
        limit = self.max_batch or len(waiting)
        # running row i decodes sequence rows[i] (None: an idle row, see below)
        rows, waiting = waiting[:limit], waiting[limit:]
        cache, state = self._new_rows(rows)
        blocks = [0] * len(rows)  # the generated block row i is on
        steps = [0] * len(rows)   # its steps in that block
        while any(b is not None for b in rows):
            if any(b is not None and steps[i] == 0 for i, b in enumerate(rows)):
                self.runner.rolling(self.ops, self.model, cache, state, self.slot, self.config)
            else:  # every previous block is committed: a later step of L tokens a row does
                self.runner(self.ops, self.model, cache, state, self.slot, self.config)
            self.nfe += 1
            for i, b in enumerate(rows):
                if b is not None:
                    self.seq_nfe[b] += 1
                    steps[i] += 1
            finished = self._end_blocks(cache, state, rows, blocks, steps)
            if not finished:
                continue
            joining, waiting = waiting[:len(finished)], waiting[len(finished):]
            if self.runner.static_shapes:
                # A graph replays on the buffers it was captured with: admitted sequences take
                # finished rows' places in them (no new capture), and rows left over stay in the
                # batch idle, computed and ignored (on a GPU a forward's bytes are the weights').
                free = sorted(finished)
                if joining:
                    new_cache, new_state = self._new_rows(joining)
                    index = torch.tensor(free[:len(joining)], device=self.device)
                    cache.put_rows(index, new_cache)
                    state.put_rows(index, new_state)
                for i, b in zip(free, joining + [None] * (len(free) - len(joining))):
                    rows[i], blocks[i], steps[i] = b, 0, 0
                continue
            # compaction: finished sequences stop costing compute; admitted ones join
            keep = [i for i in range(len(rows)) if i not in finished]
            index = torch.tensor(keep, dtype=torch.int64, device=self.device)
            cache, state = cache.select(index), state.select(index)
            rows, blocks, steps = ([xs[i] for i in keep] for xs in (rows, blocks, steps))
            if joining:
                new_cache, new_state = self._new_rows(joining)
                cache = KVCache.concat([cache, new_cache])
                state = BlockState.joined(state, new_state)
                rows, blocks, steps = (rows + joining, blocks + [0] * len(joining),
                                       steps + [0] * len(joining))
            self.runner.reset()  # new buffers
        return self._result(start)

    def _end_blocks(self, cache, state, rows, blocks, steps) -> set[int]:
        """After a step: the rows whose block converged or hit the step cap collect their
        tokens; those that go on move to their next block. Returns the rows (running-row
        indices) whose sequence finished."""
        done = state.done.tolist()
        ended = [i for i, d in enumerate(done) if rows[i] is not None
                 and (d or steps[i] == self.config.max_steps_per_block)]
        if not ended:
            return set()
        L, layout = self.config.block_length, self.layout
        ids = state.ids.tolist()  # a block ended: its ids to the host, as in lockstep
        for i in ended:
            self.block_steps[rows[i]].append(steps[i])
            self.capped[rows[i]] += not done[i]
        starts = [(layout.first_blocks[rows[i]] + blocks[i]) * L for i in ended]
        last = [blocks[i] == layout.n_blocks[rows[i]] - 1 for i in ended]
        going = [ended[j] for j in self._collect([rows[i] for i in ended], starts, last,
                                                 [ids[i] for i in ended])]
        if going:
            with self.timer("ops"):
                index = torch.tensor(going, device=self.device)
                cache.roll_rows(index, L)
                state.next_block(
                    self.model, index,
                    torch.tensor([(layout.first_blocks[rows[i]] + blocks[i] + 1) * L
                                  for i in going]),
                    torch.tensor([layout.rolling_valid_from(rows[i], blocks[i] + 1)
                                  for i in going]),
                    self.config)
            for i in going:
                blocks[i] += 1
                steps[i] = 0
        return set(ended) - set(going)

    def _new_rows(self, seqs: list[int]):
        """(cache, state) of sequences `seqs` at their first generated block, to join a running
        batch: their prompts' full blocks prefilled in a forward of their own, their previous
        block the prompt's last full one."""
        config, L = self.config, self.config.block_length
        prompts = [self.prompts[b] for b in seqs]
        layout = plan_layout([len(p) for p in prompts], config.gen_length, L)
        valid_from = torch.tensor([self.layout.rolling_valid_from(b, 0) for b in seqs],
                                  device=self.device)
        cache = self.model.new_cache(len(seqs), self.slot + L)
        if layout.first_slot_block > 0:
            self._prefill(layout, prompts, cache, valid_from,
                          self.slot - layout.first_slot_block * L, seqs)
        state = self._new_state(valid_from)
        with self.timer("ops"):
            state.ids.copy_(block_before_ids(layout, prompts, config.eos_id))  # -> prev_ids
            state.start_block(self.model, first_block_ids(layout, prompts, config.mask_id),
                              torch.tensor([f * L for f in layout.first_blocks]), config)
        return cache, state
