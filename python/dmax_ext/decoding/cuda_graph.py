"""How the steps of a block are run: eagerly, or as CUDA graphs captured once and replayed.

A block's first step (step.forward_first: from ids, with the previous block's commit) and its
later steps (step.forward_block: from the hybrid embeddings) are two static-shape functions, each
followed by step.apply_step, on the same preallocated BlockState buffers and KV cache. What a
graph bakes in is what the host passes to the kernels: buffer addresses (the state, the cache:
one batch of rows) and shapes. The key span is a shape (the attention reads slots [0, span)); the
write slot is not: the graph reads it from a one-element device tensor that the runner fills
when it changes (once per block, before its first replay), so the K/V writes, the attention
mask and the rotary positions (state.positions, already on the device) follow it.

So a graph is captured once per (running batch, kind of step, key-span bucket) and replayed
across blocks: `key_span` rounds the slots a block needs (write_slot + L) up to a power-of-two
multiple of L, capped at the cache's slots, and the keys past the block are masked out. A decode
of slots up to S therefore captures at most 2 (log2(S / L) + 1) graphs per batch (14 for 2048
slots at L = 32), where capturing per block captured one per block, each costing about as much
as several forwards while DMax converges a block in ~3-6 steps. The price: a step reads up to
twice the keys it needs, a small share of a step's bytes next to the routed experts (the "GPU
projections" of docs/PERFORMANCE.md give the figure). The first step of the first generated
block, which has no previous block to commit (other shapes, once per decode), runs eagerly.

The first step of a kind at a new span runs eagerly on a side stream (its real work; it also
warms up lazy initializations), is then captured (capture records without running), and every
later one at that span, in this block or a later one, is a replay. Compaction (a smaller batch,
new buffers) drops the graphs, so it happens at block boundaries only: `static_shapes` tells the
engine that rows whose block converged must stay in the batch for the rest of the block (the
eager step lets them leave it).

A longer key span changes the attention's reduction length, so its logits may differ from the
exact span's by float rounding. On CUDA the eager runner therefore reads the same bucketed spans
(`decode` passes bucket_spans): an eager step runs the graph's kernels on the same inputs, and
at batch 1 an eager decode equals a graphed one bitwise (in a batch the eager runner lets
converged rows leave, and other batch shapes may round a row differently). On the CPU, never
graphed, the eager runner reads exactly the slots it needs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from .step import BlockState, apply_step, forward_block, forward_first, forward_rolling


def key_span(write_slot: int, block_length: int, max_slots: int) -> int:
    """The slots a later step at write_slot reads when spans are bucketed: the smallest
    power-of-two multiple of block_length covering the block, capped at the cache's slots."""
    span = block_length
    while span < write_slot + block_length:
        span *= 2
    return min(span, max_slots)


class StepTimer:
    """Seconds spent per section ("forward", "ops"); syncs CUDA around each section so the split
    is real, which is why timing runs never use CUDA graphs. Disabled: no syncs, no cost."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.seconds = {"forward": 0.0, "ops": 0.0}

    @contextmanager
    def __call__(self, section: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[section] += time.perf_counter() - start


class EagerStep:
    static_shapes = False  # any batch at any step: converged rows leave the block

    def __init__(self, timer: StepTimer, bucket_spans: bool = False):
        self.timer = timer
        self.bucket_spans = bucket_spans  # read key_span's slots, as a graph would

    def first(self, ops, model, cache, state: BlockState, write_slot: int, config,
              with_prev: bool) -> None:
        """A block's first step (forward_first), every row running."""
        with self.timer("forward"):
            logits = forward_first(model, cache, state, write_slot, config.block_length,
                                   with_prev, self._span(write_slot, config, cache))
        with self.timer("ops"):  # no row has converged yet
            apply_step(ops, model, state, logits, config, all_live=True)

    def __call__(self, ops, model, cache, state: BlockState, write_slot: int, config) -> None:
        """A later step (forward_block) of the rows in `state`."""
        with self.timer("forward"):
            logits = forward_block(model, cache, state, write_slot, config,
                                   self._span(write_slot, config, cache))
        with self.timer("ops"):
            # Without static shapes the engine has taken converged rows out of the batch.
            apply_step(ops, model, state, logits, config, all_live=not self.static_shapes)

    def rolling(self, ops, model, cache, state: BlockState, write_slot: int, config) -> None:
        """A step of the rolling schedule (forward_rolling), every row running."""
        with self.timer("forward"):
            logits = forward_rolling(model, cache, state, write_slot, config,
                                     self._span(write_slot, config, cache))
        with self.timer("ops"):
            apply_step(ops, model, state, logits, config, all_live=True)

    def _span(self, write_slot: int, config, cache) -> int | None:
        return (key_span(write_slot, config.block_length, cache.max_slots)
                if self.bucket_spans else None)

    def reset(self) -> None:
        pass


class CudaGraphStep:
    """Replays a block's steps; `captures` counts the graphs captured. The capture itself is
    `_record` (tests replace it with a CPU stand-in that re-runs the step on the same buffers)."""

    static_shapes = True  # replays on the buffers it captured: converged rows wait in the batch

    def __init__(self):
        self._replays: dict[tuple[str, int], object] = {}  # (kind, key span) -> graph.replay
        self._write_slot: torch.Tensor | None = None  # what every graph reads the slot from
        self._filled: int | None = None  # the value last filled into it
        self._pool = None
        self.captures = 0

    def first(self, ops, model, cache, state: BlockState, write_slot: int, config,
              with_prev: bool) -> None:
        L = config.block_length

        def step(slot, span):
            logits = forward_first(model, cache, state, slot, L, with_prev, span)
            apply_step(ops, model, state, logits, config, all_live=True)
        if not with_prev:  # once per decode: a capture would cost more than it saves
            step(write_slot, key_span(write_slot, L, cache.max_slots))
            return
        self._replay("first", step, cache, state, write_slot, L)

    def __call__(self, ops, model, cache, state: BlockState, write_slot: int, config) -> None:
        def step(slot, span):
            logits = forward_block(model, cache, state, slot, config, span)
            apply_step(ops, model, state, logits, config)
        self._replay("later", step, cache, state, write_slot, config.block_length)

    def rolling(self, ops, model, cache, state: BlockState, write_slot: int, config) -> None:
        """A step of the rolling schedule where some row starts a block (its later steps where
        none does are __call__'s): one slot, so one graph per running batch."""
        def step(slot, span):
            logits = forward_rolling(model, cache, state, slot, config, span)
            apply_step(ops, model, state, logits, config, all_live=True)
        self._replay("rolling", step, cache, state, write_slot, config.block_length)

    def _replay(self, kind: str, step, cache, state: BlockState, write_slot: int,
                block_length: int) -> None:
        """Replays kind's graph at this write slot's span, capturing it first if new.
        step(slot, span): the step, reading the slot from the device tensor `slot`."""
        span = key_span(write_slot, block_length, cache.max_slots)
        if self._write_slot is None:
            self._write_slot = torch.zeros((), dtype=torch.int64, device=state.ids.device)
        if write_slot != self._filled:  # once per block: its steps share the slot
            self._write_slot.fill_(write_slot)  # on the stream, before the replay or capture
            self._filled = write_slot
        replay = self._replays.get((kind, span))
        if replay is not None:
            replay()
            return
        slot = self._write_slot  # everything the step reads that varies is on the device
        self._replays[(kind, span)] = self._record(lambda: step(slot, span))
        self.captures += 1

    def _record(self, step):
        """Runs `step` once (this call's work) and returns a function that replays it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # the real work (a capture records without running)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # One pool for every graph: a graph's memory holds only its step's temporaries (all
        # state lives in BlockState and the cache), so the graphs, replayed one at a time,
        # can share it.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        return graph.replay

    def reset(self) -> None:
        self._replays.clear()
