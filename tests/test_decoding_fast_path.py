"""The fast path's later step: static buffers, a device write slot and bucketed key spans. On the
CPU, CudaGraphStep's own control flow runs with a stand-in for the graph (the step re-run on the
buffers it was recorded with); on a GPU, replay equals eager and captures once per key span."""
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from decoding_fixtures import eos_in_different_blocks
from torch.utils._python_dispatch import TorchDispatchMode

from dmax_ext.decoding import DEFAULT_ACCEPT_THRESHOLD, DEFAULT_THRESHOLD, DEFAULT_TOP_K, decode
from dmax_ext.decoding.backends import resolve_ops
from dmax_ext.decoding.cuda_graph import CudaGraphStep, EagerStep, StepTimer, key_span
from dmax_ext.decoding.engine import _Decoder
from dmax_ext.decoding.params import make_config
from dmax_ext.decoding.rolling import RollingDecoder
from dmax_ext.decoding.step import BlockState, apply_step, forward_block, forward_first
from dmax_ext.model import random_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import step_ops  # noqa: E402

PROMPTS = [[5, 9, 33], [7] * 9, [300, 2, 17, 17, 101, 64]]
L = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda_path(model):
    """The model running what a CUDA step runs, on the CPU: the grouped MoE path (the kernels'
    sort and weighted sum), no CPU-only variants (the device slot's step_tables among them)."""
    model.set_moe_impl("grouped")
    model.set_cpu_variants(False)
    return model


def run_decoder(model, runner, ops="native", *, mode="spd", gen_length=9, top_k=DEFAULT_TOP_K,
                temperature=0.0, seed=None, eos_id=None, decoder=_Decoder, prompts=PROMPTS):
    """decode() with a given step runner (what decode builds itself: eager or graphs) and
    schedule (decoder: engine._Decoder, lockstep, or rolling.RollingDecoder)."""
    config = make_config(model.config, mode=mode, gen_length=gen_length, block_length=L,
                         threshold=DEFAULT_THRESHOLD, accept_threshold=DEFAULT_ACCEPT_THRESHOLD,
                         top_k=top_k, temperature=temperature, eos_id=eos_id, mask_id=None,
                         seed=seed)
    timer = StepTimer(False, model.embedding_weight.device)
    with torch.inference_mode():
        return decoder(model, resolve_ops(ops), config, runner, timer).run(prompts)


class StaticShapeCheck(EagerStep):
    """Runs the eager steps and checks what a CUDA graph relies on: between two resets
    (compaction), every step (first or later), whatever its block, sees the same buffers (same
    storage, shapes, dtypes) and the same cache tensors: graphs are replayed across blocks. Like
    CudaGraphStep it declares static shapes, so converged rows wait in the batch."""

    static_shapes = True

    def __init__(self):
        super().__init__(StepTimer(False, torch.device("cpu")))
        self.fingerprint = None
        self.repeats = 0

    def first(self, ops, model, cache, state, write_slot, config, with_prev):
        if with_prev:  # a graphed first step (the first generated block's runs eagerly)
            self._check(state, cache)
        super().first(ops, model, cache, state, write_slot, config, with_prev)

    def __call__(self, ops, model, cache, state, write_slot, config):
        self._check(state, cache)
        super().__call__(ops, model, cache, state, write_slot, config)

    def rolling(self, ops, model, cache, state, write_slot, config):
        self._check(state, cache)
        super().rolling(ops, model, cache, state, write_slot, config)

    def _check(self, state, cache):
        fingerprint = tuple((t.data_ptr(), t.shape, t.dtype) for t in vars(state).values()) \
            + tuple(k.data_ptr() for k in cache.keys)
        if self.fingerprint is not None:
            assert self.fingerprint == fingerprint
            self.repeats += 1
        self.fingerprint = fingerprint

    def reset(self):
        self.fingerprint = None


class CountingGraphStep(CudaGraphStep):
    """CudaGraphStep recording each call's (batch epoch, kind, key span, write slot); the epoch
    counts resets (compactions: a new batch of buffers). The first step of the first generated
    block, which runs eagerly, is recorded under "alone"."""

    def __init__(self):
        super().__init__()
        self.calls, self.epoch = [], 0

    def first(self, ops, model, cache, state, write_slot, config, with_prev):
        self._note("first" if with_prev else "alone", cache, write_slot, config)
        super().first(ops, model, cache, state, write_slot, config, with_prev)

    def __call__(self, ops, model, cache, state, write_slot, config):
        self._note("later", cache, write_slot, config)
        super().__call__(ops, model, cache, state, write_slot, config)

    def rolling(self, ops, model, cache, state, write_slot, config):
        self._note("rolling", cache, write_slot, config)
        super().rolling(ops, model, cache, state, write_slot, config)

    def _note(self, kind, cache, write_slot, config):
        span = key_span(write_slot, config.block_length, cache.max_slots)
        self.calls.append((self.epoch, kind, span, write_slot))

    def reset(self):
        super().reset()
        self.epoch += 1

    def graphs_wanted(self, kind=None) -> int:
        return len({(epoch, k, span) for epoch, k, span, _ in self.calls
                    if k != "alone" and kind in (None, k)})

    def blocks_stepped(self, kind=None) -> int:
        """(batch, block) pairs with a step of `kind` (any graphed one: None): what capturing
        per block would capture."""
        return len({(epoch, k, slot) for epoch, k, _, slot in self.calls
                    if k != "alone" and kind in (None, k)})


class GraphStandIn(CountingGraphStep):
    """CudaGraphStep's control flow on the CPU with the graph replaced by the step itself: the
    "capture" runs it once (as the eager run before a real capture does) and the "replay" re-runs
    the same closure, on the buffers and the slot tensor it was recorded with, as a graph would.
    So anything the step took by value (an int write slot) or from buffers the engine has since
    replaced would replay wrong here too. sync_check: count host syncs in the recorded step."""

    def __init__(self, sync_check: bool = False):
        super().__init__()
        self.sync_check, self.syncs, self.traced_ops = sync_check, 0, 0

    def _replay(self, kind, step, cache, state, write_slot, block_length):
        super()._replay(kind, step, cache, state, write_slot, block_length)
        # the runner fills the slot tensor only when the slot changes: it must hold this one
        assert int(self._write_slot) == write_slot

    def _record(self, step):
        if not self.sync_check:
            step()
            return step
        runner = self

        class Detector(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                runner.traced_ops += 1
                runner.syncs += step_ops.is_host_sync(func, args, kwargs or {})
                return func(*args, **(kwargs or {}))
        with Detector():
            step()
        return step


class EagerBucketedWaiting(EagerStep):
    """The eager step reading the graphs' key spans, converged rows waiting in the batch: what
    decode(cuda_graphs=False) runs on CUDA, with the graph path's batch composition."""

    static_shapes = True

    def __init__(self):
        super().__init__(StepTimer(False, torch.device("cpu")), bucket_spans=True)


def test_key_span_buckets():
    assert [key_span(s, 4, 64) for s in (0, 4, 8, 12, 16, 28, 32, 60)] == \
        [4, 8, 16, 16, 32, 32, 64, 64]
    assert key_span(44, 4, 60) == 60  # capped at the cache's slots
    assert key_span(96, 32, 2048) == 128


@pytest.mark.parametrize("mode", ["spd", "threshold"])
def test_step_runs_on_static_buffers(mode):
    # Flat predictions (gain 1): blocks take many steps.
    model = random_model("tiny", dtype=torch.float32, seed=1)
    checker = StaticShapeCheck()
    out = run_decoder(model, checker, mode=mode, top_k=2)
    assert checker.repeats > 0  # some batch took two or more later steps
    assert out.tokens == decode(model, PROMPTS, gen_length=9, block_length=L, mode=mode,
                                top_k=2).tokens


def _filled_cache(model, batch: int, max_slots: int, valid_from: torch.Tensor, stale_seed: int):
    """A cache whose slots [0, 16) hold the prefill of the same random prompts (right-aligned:
    row b's starts at valid_from[b]) and whose later slots hold stale values from stale_seed
    (finite, not zero), as slots that a bucketed span reads past the block may."""
    cache = model.new_cache(batch, max_slots)
    stale = torch.Generator().manual_seed(stale_seed)
    for t in cache.keys + cache.values:
        t.copy_(torch.randn(t.shape, generator=stale))
    ids = torch.randint(0, 500, (batch, 16), generator=torch.Generator().manual_seed(0))
    positions = (torch.arange(16) - valid_from[:, None]).clamp(min=0)
    model.forward_cached(cache, input_ids=ids, position_ids=positions, write_slot=0,
                         valid_from=valid_from, block_length=L, n_logits=0)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("cuda_path", [False, True], ids=["cpu_path", "cuda_path"])
def test_device_write_slot_step_is_bitwise_the_int_step(dtype, batch, mode, cuda_path):
    """forward_block + apply_step with the write slot as a device tensor (the captured form)
    equals the int write slot at the same key span bitwise (logits, state, cache) over
    consecutive blocks at several spans (the cap included), prompts right-aligned on padding
    rows, and different stale values past the block: they are masked out. Against the exact
    span (the CPU's eager step) float32 logits agree to rounding: only the attention's
    reduction length differs (bf16 rounding, amplified by the layers, is not bounded here).
    cuda_path: the ops a CUDA step runs (as in the first step's test below)."""
    model = random_model("tiny", dtype=dtype, seed=1)
    if cuda_path:
        on_cuda_path(model)
    config = make_config(model.config, mode=mode, gen_length=32, block_length=L, threshold=0.5,
                         accept_threshold=0.9, top_k=2, temperature=0.0, eos_id=None,
                         mask_id=None, seed=None)
    ops, max_slots = resolve_ops("native"), 60
    valid_from = torch.tensor([0, 8, 4][:batch])
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        by_int, by_tensor, exact = (_filled_cache(model, batch, max_slots, valid_from, seed)
                                    for seed in (3, 4, 5))
        slot = torch.zeros((), dtype=torch.int64)  # reused across blocks, as the runner does
        for write_slot in range(16, 36, L):  # spans 32, 32, 32, 32, 60 (64 capped)
            span = key_span(write_slot, L, max_slots)
            slot.fill_(write_slot)
            ids = torch.randint(0, 500, (batch, L), generator=generator)
            ids[:, 1:] = config.mask_id
            states = []
            for _ in range(2):
                state = BlockState.allocate(batch, L, model.config.hidden_size, dtype, "cpu")
                state.valid_from.copy_(valid_from)
                state.start_block(model, ids, write_slot - valid_from, config)
                states.append(state)
            for _ in range(3):
                logits = forward_block(model, by_int, states[0], write_slot, config, span)
                assert torch.equal(forward_block(model, by_tensor, states[1], slot, config, span),
                                   logits)
                if dtype == torch.float32:
                    rounded = forward_block(model, exact, states[0], write_slot, config)
                    torch.testing.assert_close(rounded, logits, rtol=0,
                                               atol=1e-5 * logits.abs().max().item())
                for state in states:
                    apply_step(ops, model, state, logits, config)
                for f in fields(BlockState):
                    assert torch.equal(getattr(states[0], f.name), getattr(states[1], f.name))
        for a, b in zip(by_int.keys + by_int.values, by_tensor.keys + by_tensor.values):
            assert torch.equal(a[:, :, :36], b[:, :, :36])  # the slots written, prefill included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cuda_path", [False, True], ids=["cpu_path", "cuda_path"])
def test_device_write_slot_first_step_is_bitwise_the_int_step(dtype, batch, cuda_path):
    """forward_first with the previous block (2L tokens at write_slot - L) and the write slot as
    a device tensor (the captured form) equals the int write slot at the same key span bitwise:
    logits, and the cache slots it commits (the previous block's) and writes (this block's);
    the slot tensor keeps the value the runner filled. float32 logits agree with the exact
    span's to rounding. cuda_path: the ops a CUDA step runs (grouped MoE, no CPU variants: the
    device slot then goes through dmax.step_tables)."""
    model = random_model("tiny", dtype=dtype, seed=1)
    if cuda_path:
        on_cuda_path(model)
    max_slots = 60
    valid_from = torch.tensor([0, 8, 4][:batch])
    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        by_int, by_tensor, exact = (_filled_cache(model, batch, max_slots, valid_from, seed)
                                    for seed in (3, 4, 5))
        slot = torch.zeros((), dtype=torch.int64)
        state = BlockState.allocate(batch, L, model.config.hidden_size, dtype, "cpu")
        state.valid_from.copy_(valid_from)
        for write_slot in range(20, 40, L):  # spans 32, 32, 32, 60 (64 capped), 60
            span = key_span(write_slot, L, max_slots)
            state.prev_ids.copy_(torch.randint(0, 500, (batch, L), generator=generator))
            state.ids.copy_(torch.randint(0, 500, (batch, L), generator=generator))
            state.positions.copy_(write_slot - valid_from[:, None] + torch.arange(L))
            slot.fill_(write_slot)
            logits = forward_first(model, by_int, state, write_slot, L, True, span)
            assert logits.shape == (batch, L, model.config.vocab_size)
            assert torch.equal(forward_first(model, by_tensor, state, slot, L, True, span),
                               logits)
            assert slot.item() == write_slot
            if dtype == torch.float32:
                rounded = forward_first(model, exact, state, write_slot, L, True)
                torch.testing.assert_close(rounded, logits, rtol=0,
                                           atol=1e-5 * logits.abs().max().item())
            for a, b in zip(by_int.keys + by_int.values, by_tensor.keys + by_tensor.values):
                assert torch.equal(a[:, :, :write_slot + L], b[:, :, :write_slot + L])


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_graph_runner_captures_once_per_span_and_decodes_as_eager(mode, sampling):
    # Blocks converge after 1 to L steps; the eos id ends one sequence blocks before another,
    # so a compaction starts a new batch of buffers (and of graphs) mid-decode.
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=60.0, seed=1)
    kwargs = dict(mode=mode, gen_length=24, top_k=2, **sampling)
    kwargs["eos_id"] = eos_in_different_blocks(
        decode(model, PROMPTS, block_length=L, **kwargs).tokens, PROMPTS, L)
    runner = GraphStandIn()
    graphed = run_decoder(model, runner, **kwargs)
    assert runner.epoch > 0
    # One capture per (batch, kind, span); fewer than the blocks: some graph of each kind
    # served several blocks. The first generated block's first step ran eagerly, once.
    assert runner.captures == runner.graphs_wanted() < runner.blocks_stepped()
    for kind in ("first", "later"):
        assert 0 < runner.graphs_wanted(kind) < runner.blocks_stepped(kind)
    assert [k for _, k, _, _ in runner.calls].count("alone") == 1
    eager = run_decoder(model, EagerBucketedWaiting(), **kwargs)
    assert (graphed.tokens, graphed.nfe, graphed.seq_nfe, graphed.block_steps,
            graphed.capped_blocks) == (eager.tokens, eager.nfe, eager.seq_nfe,
                                       eager.block_steps, eager.capped_blocks)
    # The CPU's decode (exact spans, converged rows leaving) rounds the attention differently:
    # the same tokens here (a flip needs a decision within rounding of its threshold).
    plain = decode(model, PROMPTS, block_length=L, **kwargs)
    assert (plain.tokens, plain.seq_nfe) == (graphed.tokens, graphed.seq_nfe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decoder", [_Decoder, RollingDecoder], ids=["lockstep", "rolling"])
def test_captured_step_dispatches_no_host_sync(dtype, decoder):
    # What a capture records: the raw ops (backends.NativeOps while capturing) and the CUDA
    # model path (grouped MoE, projections without their CPU-only forms).
    model = on_cuda_path(random_model("tiny", dtype=dtype, lm_head_gain=25.0,
                                      lm_head_from_embedding=True, seed=1))
    runner = GraphStandIn(sync_check=True)
    run_decoder(model, runner, step_ops.raw_ops(), gen_length=24, top_k=2, decoder=decoder)
    assert runner.captures > 0 and runner.traced_ops > 80  # (one tiny step: ~90 ops)
    assert runner.syncs == 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_cuda_graph_equals_eager_and_captures_once_per_span(mode, sampling):
    model = random_model("tiny", device="cuda", dtype=torch.float32, lm_head_gain=60.0, seed=1)
    kwargs = dict(gen_length=24, mode=mode, top_k=2, **sampling)
    runner = CountingGraphStep()
    graphed = run_decoder(model, runner, **kwargs)
    assert runner.captures == runner.graphs_wanted() < runner.blocks_stepped()
    # The eager steps on the same spans and the same rows: the same kernels on the same inputs.
    # (decode(cuda_graphs=False) lets converged rows leave: other batch shapes, whose GEMMs may
    # round a row differently.)
    eager = run_decoder(model, EagerBucketedWaiting(), **kwargs)
    assert (graphed.tokens, graphed.nfe, graphed.seq_nfe, graphed.block_steps,
            graphed.capped_blocks) == (eager.tokens, eager.nfe, eager.seq_nfe,
                                       eager.block_steps, eager.capped_blocks)
    assert decode(model, PROMPTS, block_length=L, cuda_graphs=True, **kwargs).tokens == \
        graphed.tokens


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "seed": 5}],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("cuda_path", [False, True], ids=["cpu_path", "cuda_path"])
def test_rolling_schedule_captures_once_and_decodes_as_eager(mode, sampling, cuda_path):
    # The rolling schedule has two kinds of step (some row starting a block: 2L tokens a row;
    # none: a later step) at one slot, and on static buffers a finished sequence's row stays in
    # the batch (idle): one graph of each kind for the whole decode, replayed by every step of
    # every block, though eos ends sequences at different blocks. Its steps see the same
    # buffers throughout (StaticShapeCheck). With the CUDA path's ops the slot is a device
    # tensor in the graph (step_tables).
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=60.0, seed=1)
    kwargs = dict(mode=mode, gen_length=24, top_k=2, decoder=RollingDecoder, **sampling)
    kwargs["eos_id"] = eos_in_different_blocks(
        decode(model, PROMPTS, block_length=L, mode=mode, gen_length=24, top_k=2,
               **sampling).tokens, PROMPTS, L)
    if cuda_path:
        on_cuda_path(model)
    runner = GraphStandIn()
    graphed = run_decoder(model, runner, **kwargs)
    assert {k for _, k, _, _ in runner.calls} == {"rolling", "later"}
    assert runner.captures == 2 and runner.epoch == 0
    assert len(runner.calls) == graphed.nfe - 1  # every forward but the prefill, replayed
    assert min(map(len, graphed.tokens)) < max(map(len, graphed.tokens))  # the premise: eos
    check = StaticShapeCheck()
    check.bucket_spans = True  # the graphs' key spans: the same kernels on the same inputs
    eager = run_decoder(model, check, **kwargs)
    assert check.repeats > 0
    assert (graphed.tokens, graphed.nfe, graphed.seq_nfe, graphed.block_steps,
            graphed.capped_blocks) == (eager.tokens, eager.nfe, eager.seq_nfe,
                                       eager.block_steps, eager.capped_blocks)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.5, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_rolling_admissions_under_the_graph_stand_in(sampling):
    # Sequences admitted mid-decode (max_batch 2 of 4 prompts; the last ones with 2 and 3 full
    # blocks, so their prefilled cache rows matter beyond the block each step re-commits) take
    # finished rows' places in the graph's buffers: one capture of each kind of step for the
    # whole decode. The eager
    # decode (compaction, new rows joined) gives each sequence the same tokens and forwards.
    # Gain 20: flatter predictions, where a sample follows its seed.
    import functools
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=20.0, seed=1)
    prompts = [PROMPTS[0], PROMPTS[2], [7] * 9, [11] * 13]
    kwargs = dict(gen_length=12, top_k=2, prompts=prompts,
                  decoder=functools.partial(RollingDecoder, max_batch=2), **sampling)
    runner = GraphStandIn()
    graphed = run_decoder(model, runner, **kwargs)
    assert runner.captures == 2 and runner.epoch == 0
    # prefills: the first rows', then the admitted ones' (one forward if they join together)
    assert graphed.nfe - len(runner.calls) in (2, 3)
    solo = [run_decoder(model, EagerStep(StepTimer(False, torch.device("cpu"))),
                        **{**kwargs, "prompts": [p]}) for p in prompts]
    assert graphed.tokens == [s.tokens[0] for s in solo]
    assert graphed.seq_nfe == [s.nfe for s in solo]
    eager = run_decoder(model, EagerStep(StepTimer(False, torch.device("cpu")),
                                         bucket_spans=True), **kwargs)
    assert (graphed.tokens, graphed.nfe, graphed.seq_nfe, graphed.block_steps) == \
        (eager.tokens, eager.nfe, eager.seq_nfe, eager.block_steps)
