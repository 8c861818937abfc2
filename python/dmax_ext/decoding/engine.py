"""decode(): block-diffusion decoding of a batch with the static KV cache (SPEC sections 2, 3, 5).

The loop, per slot block (layout.py): start the block (prompt tail + masks, or all masks), run
its first step from ids for every running row (committing the previous block's K/V,
step.forward_first), then later steps until every row has converged or the step cap is hit
(cuda_graph.py: each step eager or replayed). A row whose block has converged leaves the later
steps of that block: they run on the rows still decoding (BlockState.select, KVCache.select),
and it rejoins at the next block's first step. Block step counts are heavy-tailed (1 to 32
within a batch), so a row waiting in the forwards would cost most of a batched forward's compute
for nothing (docs/PERFORMANCE.md, issue 9). This lockstep schedule does not start a row's next
block early: the batch shares one write slot (layout.py), so each block takes as many forwards
as its slowest row. rolling.py's schedule does (decode's `scheduler`). With CUDA graphs (static
buffers) a converged row stays in the batch instead, unchanged and uncounted.
Then the block's ids go to the host once: a row whose block holds eos, or that finished its last
block, is done and compacted out of the running batch.

Counting (SPEC section 5), per sequence and for the batch:
- `seq_nfe[b]`: the forwards sequence b took part in: the prefill if its prompt has a full
  block, then every step up to and including the one where its block converged. A converged row
  takes no further part in its block (or waits uncounted, with CUDA graphs), so seq_nfe equals
  decoding b alone.
- `nfe`: the forwards the batch actually ran, whatever their number of rows (what wall time pays
  for); = seq_nfe[0] at batch 1.
- `seq_tpf[b]` = len(tokens[b]) / seq_nfe[b];  `tpf` = total tokens / nfe (tokens per batched
  forward).
A prompt shorter than one block has no full block: no prefill forward is run or counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from .backends import resolve_ops
from .cuda_graph import CudaGraphStep, EagerStep, StepTimer
from .layout import BatchLayout, first_block_ids, plan_layout, prefill_inputs
from .params import (DEFAULT_ACCEPT_THRESHOLD, DEFAULT_BLOCK_LENGTH, DEFAULT_GEN_LENGTH,
                     DEFAULT_THRESHOLD, DEFAULT_TOP_K, ROLLING_MAX_BATCH, SCHEDULERS,
                     DecodeConfig, check_positions, make_config, prompts_as_lists,
                     resolve_max_batch)
from .step import BlockState


@dataclass
class DecodeResult:
    tokens: list[list[int]]        # per sequence: generated ids after the prompt, up to and
                                   # including eos, nothing after (whole blocks: up to
                                   # block_length - 1 ids past gen_length, SPEC section 5)
    nfe: int                       # model forwards run for the batch, prefill included
    tpf: float                     # all sequences' tokens / nfe
    seq_nfe: list[int]             # forwards each sequence took part in (= decoding it alone)
    seq_tpf: list[float]
    block_steps: list[list[int]]   # per sequence: steps of each generated block
    capped_blocks: list[int]       # per sequence: blocks ended by the step cap, not convergence
    wall_s: float
    forward_s: float | None = None  # with timing=True: time in model forwards
    ops_s: float | None = None      # with timing=True: time in the SPD / threshold ops


def decode(model, input_ids, gen_length: int = DEFAULT_GEN_LENGTH,
           block_length: int = DEFAULT_BLOCK_LENGTH, threshold: float = DEFAULT_THRESHOLD,
           accept_threshold: float = DEFAULT_ACCEPT_THRESHOLD, top_k: int = DEFAULT_TOP_K,
           temperature: float = 0.0, mode: str = "spd", eos_id: int | None = None,
           mask_id: int | None = None, seed: int | None = None, *, ops="native",
           cuda_graphs: bool | None = None, timing: bool = False,
           scheduler: str = "auto", max_batch: int | None = None) -> DecodeResult:
    """Decodes gen_length tokens (rounded up to whole blocks) after each prompt.

    input_ids: tensor [batch, prompt] / [prompt], a list of id lists (or 1-D tensors) of any
    lengths, or one flat list of ids. mode "spd": soft parallel decoding; "threshold": the
    hard-threshold baseline. eos_id and mask_id default to model.config's. temperature > 0
    samples (Gumbel-max) with per-row seeds derived from (seed, absolute position, step), so
    every sequence decodes the same alone or in a batch; seed None then draws one from torch's
    global generator.
    ops: "native" (torch.ops.dmax) or "reference" (the pure-PyTorch spec). cuda_graphs: replay
    the later steps as CUDA graphs (default: on for a CUDA model; never with timing=True).
    A tensor-parallel model (model/tensor_parallel.py) decodes through vocab-parallel ops
    (tensor_parallel_ops.py): call decode on every rank with the same arguments.
    scheduler: "lockstep" (the batch moves from block to block together), "rolling" (each
    sequence moves on when its block converges: fewer batched forwards, those where a row starts
    a block feeding 2L tokens a row; rolling.py) or "auto": rolling for a CUDA batch of 2 to
    params.ROLLING_MAX_BATCH sequences, else lockstep.
    max_batch: the most sequences decoded at once (default: all). Rolling admits a waiting
    prompt as soon as a running sequence finishes; lockstep decodes the prompts in groups of
    max_batch, one after the other. Results are in prompt order either way.

    A block ends when every sequence has converged or after block_length steps (the step cap,
    SPEC section 3: "up to B steps"); a capped block keeps its ids as they are (mask ids
    included) and counts in capped_blocks."""
    device = model.embedding_weight.device
    config = make_config(model.config, mode=mode, gen_length=gen_length,
                         block_length=block_length, threshold=threshold,
                         accept_threshold=accept_threshold, top_k=top_k, temperature=temperature,
                         eos_id=eos_id, mask_id=mask_id, seed=seed)
    prompts = prompts_as_lists(input_ids, model.config.vocab_size, device)
    check_positions(prompts, config.gen_length, config.block_length,
                    getattr(model.config, "max_position_embeddings", None))
    max_batch = resolve_max_batch(max_batch, len(prompts))
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if scheduler == "auto":
        batch = min(len(prompts), max_batch)
        scheduler = ("rolling" if device.type == "cuda" and 1 < batch <= ROLLING_MAX_BATCH
                     else "lockstep")
    backend = resolve_ops(ops)
    tp_group = getattr(model, "tp_group", None)
    if tp_group is not None:  # a tensor-parallel shard (model/tensor_parallel.py)
        from .tensor_parallel_ops import TensorParallelOps
        backend = TensorParallelOps(backend, model)
    if config.sampling and config.seed is None:
        seed = int(torch.randint(2**31, ()))
        if tp_group is not None:  # every rank must sample alike: rank 0's draw
            from ..distributed import broadcast_int
            seed = broadcast_int(seed, tp_group)
        config = replace(config, seed=seed)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and not timing
    if cuda_graphs and (device.type != "cuda" or timing):
        raise ValueError(f"cuda_graphs=True needs a CUDA model and timing=False "
                         f"(model on {device}, timing={timing})")
    timer = StepTimer(timing, device)
    # On CUDA the eager steps read the graphs' key spans, so they run the graphs' kernels on
    # the same inputs (cuda_graph.py); the CPU reads the exact spans.
    runner = (CudaGraphStep() if cuda_graphs
              else EagerStep(timer, bucket_spans=device.type == "cuda"))
    with torch.inference_mode(), model.frozen():  # the layers' op arguments packed once
        if scheduler == "rolling":
            from .rolling import RollingDecoder  # it builds on _Decoder (below)
            result = RollingDecoder(model, backend, config, runner, timer,
                                    max_batch).run(prompts)
        else:
            result = _Decoder(model, backend, config, runner, timer).run_groups(prompts,
                                                                               max_batch)
    if timing:
        result.forward_s, result.ops_s = timer.seconds["forward"], timer.seconds["ops"]
    return result


class _Decoder:
    def __init__(self, model, ops, config: DecodeConfig, runner, timer: StepTimer):
        self.model, self.ops, self.config = model, ops, config
        self.runner, self.timer = runner, timer
        self.device = model.embedding_weight.device

    def run_groups(self, prompts: list[list[int]], max_batch: int) -> DecodeResult:
        """The prompts decoded in groups of max_batch, one group after the other (run), as one
        result in prompt order."""
        if len(prompts) <= max_batch:
            return self.run(prompts)
        start, parts = time.perf_counter(), []
        for first in range(0, len(prompts), max_batch):
            self.runner.reset()  # each group has buffers of its own
            parts.append(self.run(prompts[first:first + max_batch]))
        n_tokens = sum(len(t) for part in parts for t in part.tokens)
        nfe = sum(part.nfe for part in parts)
        return DecodeResult(
            tokens=[t for part in parts for t in part.tokens], nfe=nfe, tpf=n_tokens / nfe,
            **{name: [x for part in parts for x in getattr(part, name)]
               for name in ("seq_nfe", "seq_tpf", "block_steps", "capped_blocks")},
            wall_s=time.perf_counter() - start)

    def run(self, prompts: list[list[int]]) -> DecodeResult:
        """The lockstep schedule: the batch moves from slot block to slot block together."""
        start = time.perf_counter()
        model, config, L = self.model, self.config, self.config.block_length
        layout = self._begin(prompts)
        batch = layout.batch_size
        rows = list(range(batch))  # running row i decodes sequence rows[i]
        cache = model.new_cache(batch, layout.max_slots)
        valid_from = torch.tensor([layout.valid_from(b) for b in rows], device=self.device)
        if layout.first_slot_block > 0:
            self._prefill(layout, prompts, cache, valid_from)
        state = self._new_state(valid_from)
        for slot_block in range(layout.first_slot_block, layout.end_slot_block):
            if slot_block == layout.first_slot_block:
                ids = first_block_ids(layout, prompts, config.mask_id)
            else:
                ids = torch.full((len(rows), L), config.mask_id, dtype=torch.int64)
            starts = [layout.absolute_block(b, slot_block) * L for b in rows]
            with self.timer("ops"):
                state.start_block(model, ids, torch.tensor(starts), config)
            # The first generated block has no previous block to commit (step.forward_first).
            self._run_block(cache, state, slot_block > layout.first_slot_block,
                            slot_block * L, rows)
            last = [layout.is_last_block(b, slot_block) for b in rows]
            keep = self._collect(rows, starts, last, state.ids.tolist())
            if not keep:
                break
            if len(keep) < len(rows):  # compaction: finished sequences stop costing compute
                index = torch.tensor(keep, device=self.device)
                cache, state = cache.select(index), state.select(index)
                rows = [rows[i] for i in keep]
                self.runner.reset()
        return self._result(start)

    def _begin(self, prompts: list[list[int]]) -> BatchLayout:
        """The batch's layout, with every count and token list empty."""
        self.layout = layout = plan_layout([len(p) for p in prompts], self.config.gen_length,
                                           self.config.block_length)
        batch = layout.batch_size
        self.nfe, self.seq_nfe, self.capped = 0, [0] * batch, [0] * batch
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.block_steps: list[list[int]] = [[] for _ in range(batch)]
        return layout

    def _result(self, start: float) -> DecodeResult:
        n_tokens = [len(t) for t in self.tokens]
        return DecodeResult(
            tokens=self.tokens, nfe=self.nfe, tpf=sum(n_tokens) / self.nfe,
            seq_nfe=self.seq_nfe, seq_tpf=[n / f for n, f in zip(n_tokens, self.seq_nfe)],
            block_steps=self.block_steps, capped_blocks=self.capped,
            wall_s=time.perf_counter() - start)

    def _collect(self, rows: list[int], starts: list[int], last: list[bool],
                 block_ids: list[list[int]]) -> list[int]:
        """Appends each row's new tokens (up to and including eos), the block of row i starting
        at absolute position starts[i] and being its sequence's last if last[i]; returns the
        rows that go on. Only generated positions count: an eos id in the prompt's tail does
        not stop."""
        eos, keep = self.config.eos_id, []
        for i, b in enumerate(rows):
            new = block_ids[i][max(0, self.layout.prompt_lengths[b] - starts[i]):]
            if eos in new:
                self.tokens[b] += new[:new.index(eos) + 1]
                continue
            self.tokens[b] += new
            if not last[i]:
                keep.append(i)
        return keep

    def _prefill(self, layout: BatchLayout, prompts, cache, valid_from,
                 write_slot: int = 0, seqs: list[int] | None = None) -> None:
        """One forward of the prompts' full blocks into the cache (no logits computed), at
        slots [write_slot, write_slot + F L). seqs: the decode's sequences the prompts are
        (default: all, in order)."""
        ids, positions = prefill_inputs(layout, prompts, self.config.eos_id, self.device)
        with self.timer("forward"):
            self.model.forward_cached(cache, input_ids=ids, position_ids=positions,
                                      write_slot=write_slot,
                                      valid_from=valid_from, block_length=self.config.block_length,
                                      n_logits=0)
        self.nfe += 1
        for b, seq in enumerate(range(layout.batch_size) if seqs is None else seqs):
            self.seq_nfe[seq] += layout.first_blocks[b] > 0

    def _new_state(self, valid_from: torch.Tensor) -> BlockState:
        model = self.model
        state = BlockState.allocate(valid_from.shape[0], self.config.block_length,
                                    model.config.hidden_size, model.embedding_weight.dtype,
                                    self.device)
        state.valid_from.copy_(valid_from)
        return state

    def _run_block(self, cache, state: BlockState, with_prev: bool, write_slot: int,
                   rows: list[int]) -> None:
        """Steps the block until every row converged or the cap; leaves its final ids in
        state.ids. Reads the done flags once per step: the only host sync of a step.

        The later steps run on `running`, holding the rows `members` of state (indices; all of
        them at first). When rows converge they leave it (`_leave_block`), unless the runner
        replays on static buffers: then they stay in `state`, which keeps their ids as they are."""
        running, running_cache, members = state, cache, list(range(len(rows)))
        live = members  # rows of state whose block has not converged
        steps = [0] * len(rows)
        for step in range(self.config.max_steps_per_block):
            if step == 0:
                self.runner.first(self.ops, self.model, cache, state, write_slot, self.config,
                                  with_prev)
            else:
                self.runner(self.ops, self.model, running_cache, running, write_slot, self.config)
            self.nfe += 1
            for i in live:
                self.seq_nfe[rows[i]] += 1
                steps[i] += 1
            done = running.done.tolist()
            live = [i for i, d in zip(members, done) if not d]
            if not live:
                break
            if len(live) < len(members) and not self.runner.static_shapes:
                running, running_cache = self._leave_block(state, running, running_cache,
                                                           members, done)
                members = live
        self._write_back(state, running, members)
        for i, b in enumerate(rows):
            self.block_steps[b].append(steps[i])
        for i in live:
            self.capped[rows[i]] += 1

    def _leave_block(self, state: BlockState, running: BlockState, running_cache,
                     members: list[int], done: list[bool]):
        """The running batch without its converged rows, whose final ids go to state. The cache
        rows are copied whole: the block reads their committed slots; its own slots are scratch
        (rewritten by every step, committed from state.ids by the next block's first step)."""
        self._write_back(state, running, members)
        index = torch.tensor([k for k, d in enumerate(done) if not d], device=self.device)
        return running.select(index), running_cache.select(index)

    def _write_back(self, state: BlockState, running: BlockState, members: list[int]) -> None:
        # Only the ids: after the block, the engine reads nothing else of state.
        if running is not state:
            state.ids.index_copy_(0, torch.tensor(members, device=self.device), running.ids)
