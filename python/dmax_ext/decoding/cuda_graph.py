"""How a later step of a block is run: eagerly, or captured once as a CUDA graph and replayed.

Both run the same static-shape function, step.forward_block + step.apply_step, on the same
preallocated BlockState buffers and KV cache. The graph depends on write_slot (the attention spans
slots [0, write_slot + L)), so one graph is captured per block: the block's second step runs
eagerly on a side stream (warming up lazy initializations), is then captured, and every later step
of that block is a replay. Blocks that converge in two steps never replay; a model whose
forward_cached took the write slot as a device tensor would need one graph per batch size only.
Compaction (a smaller batch, new buffers) drops the graphs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from .step import BlockState, apply_step, forward_block


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
    def __init__(self, timer: StepTimer):
        self.timer = timer

    def __call__(self, ops, model, cache, state: BlockState, write_slot: int, config) -> None:
        with self.timer("forward"):
            logits = forward_block(model, cache, state, write_slot, config)
        with self.timer("ops"):
            apply_step(ops, model, state, logits, config)

    def reset(self) -> None:
        pass


class CudaGraphStep:
    def __init__(self):
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, ops, model, cache, state: BlockState, write_slot: int, config) -> None:
        graph = self._graphs.get(write_slot)
        if graph is not None:
            graph.replay()
            return

        def step():
            apply_step(ops, model, state, forward_block(model, cache, state, write_slot, config),
                       config)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # this step's real work (capture below records without running)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        # Only the current block's graph can be replayed again: drop the earlier ones.
        self._graphs = {write_slot: graph}

    def reset(self) -> None:
        self._graphs.clear()
