"""The rolling schedule: each sequence of a batch moves on to its next block as soon as its block
converges, without waiting for the others (engine.py's lockstep schedule waits for the slowest).

Why: a block's step count is heavy-tailed (1 to 32 steps within one batch), so in lockstep every
block costs its slowest row's steps in batched forwards. On a GPU a batched forward of a few rows
costs about what one row's does (it streams the same expert weights: docs/PERFORMANCE.md, "GPU
projections"), so the forwards a decode runs are its time, and rolling runs fewer: the longest
sequence's own count (plus the prefill), where lockstep runs the sum over blocks of the slowest
row's steps. On a CPU, where a block's forward is bound by arithmetic, it gains nothing and feeds
twice the tokens (below): decode's scheduler "auto" takes it on CUDA only, up to
params.ROLLING_MAX_BATCH sequences.

How, with the model's forward unchanged:
- Every row's current block sits at the same slots, [s, s + L) with s = layout.rolling_slot,
  whichever of its blocks it is on; its earlier blocks lie before, right-aligned. A row moving on
  rolls its cache rows left by L (KVCache.roll_rows) and its first slot valid_from with them.
- Every forward feeds each row's previous block from its final ids and its current block (2L
  tokens, step.forward_rolling): the previous block's K/V are committed by the row's first step
  in the new block, as in lockstep, and re-committed with the same bits by its later steps. So
  rows at a block's first step and rows at a later step share one forward, one kind of step (one
  CUDA graph per running batch).
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

from .engine import _Decoder
from .layout import block_before_ids, first_block_ids


class RollingDecoder(_Decoder):
    def run(self, prompts: list[list[int]]):
        start = time.perf_counter()
        model, config, L = self.model, self.config, self.config.block_length
        layout = self._begin(prompts)
        slot = layout.rolling_slot
        rows = list(range(layout.batch_size))  # running row i decodes sequence rows[i]
        blocks = [0] * len(rows)  # the generated block row i is on
        steps = [0] * len(rows)   # its steps in that block
        cache = model.new_cache(len(rows), slot + L)
        valid_from = torch.tensor([layout.rolling_valid_from(b, 0) for b in rows],
                                  device=self.device)
        if layout.first_slot_block > 0:
            self._prefill(layout, prompts, cache, valid_from,
                          slot - layout.first_slot_block * L)
        state = self._new_state(valid_from)
        with self.timer("ops"):
            state.ids.copy_(block_before_ids(layout, prompts, config.eos_id))  # -> prev_ids
            state.start_block(model, first_block_ids(layout, prompts, config.mask_id),
                              torch.tensor([f * L for f in layout.first_blocks]), config)
        while rows:
            self.runner.rolling(self.ops, model, cache, state, slot, config)
            self.nfe += 1
            for i, b in enumerate(rows):
                self.seq_nfe[b] += 1
                steps[i] += 1
            done = state.done.tolist()
            ended = [i for i, d in enumerate(done)
                     if d or steps[i] == config.max_steps_per_block]
            if not ended:
                continue
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
                    self._next_block(layout, cache, state, rows, blocks, going)
                for i in going:
                    blocks[i] += 1
                    steps[i] = 0
            if len(going) < len(ended):  # compaction: finished sequences stop costing compute
                keep = [i for i in range(len(rows)) if i not in set(ended) - set(going)]
                if keep:
                    index = torch.tensor(keep, device=self.device)
                    cache, state = cache.select(index), state.select(index)
                rows, blocks, steps = ([xs[i] for i in keep] for xs in (rows, blocks, steps))
                self.runner.reset()
        return self._result(start)

    def _next_block(self, layout, cache, state, rows, blocks, going: list[int]) -> None:
        """Rows `going` (running-row indices) move on to their next generated block."""
        L = self.config.block_length
        index = torch.tensor(going, device=self.device)
        cache.roll_rows(index, L)
        starts = torch.tensor([(layout.first_blocks[rows[i]] + blocks[i] + 1) * L
                               for i in going])
        valid_from = torch.tensor([layout.rolling_valid_from(rows[i], blocks[i] + 1)
                                   for i in going])
        state.next_block(self.model, index, starts, valid_from, self.config)
