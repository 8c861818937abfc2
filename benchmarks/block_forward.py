"""One block forward of a real decode, timed and set against its roofline floor.

The later SPD steps of a decode (one block of L tokens fed as hybrid embeddings: the forward that
dominates decoding) are captured with their inputs, replayed on a fresh cache of the same size,
timed, and given the floor of roofline.py: bytes counted with the experts their routing actually
selected (roofline.RoutingRecorder, on one untimed replay) and the machine measured in the same
run at the same thread count (roofline.measure_machine).
"""
from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent / "python") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "python"))

import roofline  # noqa: E402


@dataclass(frozen=True)
class BlockStep:
    """The inputs of one block forward: model.forward_cached on one block of L tokens, fed as
    embeddings (SPD's later steps) or ids (the threshold baseline)."""
    inputs: torch.Tensor          # [B, L, H] embeddings or [B, L] ids
    position_ids: torch.Tensor    # [B, L]
    valid_from: torch.Tensor      # [B]
    write_slot: int
    block_length: int

    @property
    def batch(self) -> int:
        return self.inputs.shape[0]

    @property
    def fed_embeddings(self) -> bool:
        return self.inputs.dim() == 3


@dataclass(frozen=True)
class ForwardShape:
    """What one model.forward_cached call of a decode computed: rows, tokens fed per row, cache
    slots before them (the write slot), logits per row (the prefill computes none)."""
    batch: int
    n_tokens: int
    cache_slots: int
    n_logits: int


def as_in_decode(model):
    """The context decode() runs its forwards in, for timing them as decoding runs them:
    model.frozen() (a build that predates it: nothing). Its state lasts as long as the block:
    enter it around a run of forwards, not each one."""
    frozen = getattr(model, "frozen", None)
    return frozen() if frozen is not None else nullcontext()


@contextmanager
def recording_forwards(model, on_forward):
    """Inside the block, every model.forward_cached(cache, **kwargs) call first runs
    on_forward(kwargs) (an int write slot: the eager CPU path)."""
    forward = model.forward_cached

    def recording(cache, **kwargs):
        on_forward(kwargs)
        return forward(cache, **kwargs)
    model.forward_cached = recording
    try:
        yield
    finally:
        del model.forward_cached


def _fed(kwargs) -> torch.Tensor:
    fed = kwargs.get("inputs_embeds")
    return kwargs.get("input_ids") if fed is None else fed


def record_forward_shapes(model, prompts, **decode_kwargs):
    """Decodes `prompts` as one batch; returns (its DecodeResult, the ForwardShape of every
    forward it ran, prefill included)."""
    from dmax_ext.decoding import decode
    shapes = []

    def on_forward(kwargs):
        fed = _fed(kwargs)
        n_logits = kwargs.get("n_logits")
        shapes.append(ForwardShape(fed.shape[0], fed.shape[1], int(kwargs["write_slot"]),
                                   fed.shape[1] if n_logits is None else n_logits))
    with recording_forwards(model, on_forward):
        out = decode(model, prompts, **decode_kwargs)
    return out, shapes


def decoded_as_alone(out, tokens: list[list[int]], seq_nfe: list[int]) -> int:
    """How many sequences of the batched DecodeResult `out` got the tokens and the forward
    count they get alone (tokens[b], seq_nfe[b]): decode()'s batch invariance, checked."""
    return sum(t == alone_t and n == alone_n
               for t, n, alone_t, alone_n in zip(out.tokens, out.seq_nfe, tokens, seq_nfe))


def capture_block_steps(model, prompts, **decode_kwargs) -> list[BlockStep]:
    """Decodes `prompts` (one batch) and returns the inputs of every forward of one block (the
    later steps; not the prefill nor the first steps that also commit the previous block). A
    batch's later steps feed only the rows still decoding their block (engine.py)."""
    from dmax_ext.decoding import decode
    steps = []

    def on_forward(kwargs):
        fed = _fed(kwargs)
        if fed.shape[1] == kwargs["block_length"] and kwargs.get("n_logits") != 0:
            steps.append(BlockStep(fed.clone(), kwargs["position_ids"].clone(),
                                   kwargs["valid_from"].clone(), kwargs["write_slot"],
                                   kwargs["block_length"]))
    with recording_forwards(model, on_forward):
        decode(model, prompts, **decode_kwargs)
    return steps


def spread(steps: list[BlockStep], n: int) -> list[BlockStep]:
    """n steps evenly spread over the decode (early and late blocks: short and long caches)."""
    if len(steps) <= n:
        return list(steps)
    return [steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)] if n > 1 \
        else [steps[len(steps) // 2]]


def replay(model, step: BlockStep, cache=None):
    """One forward of `step` on `cache` (default: a fresh cache ending at the block)."""
    if cache is None:
        cache = model.new_cache(step.batch, step.write_slot + step.block_length)
    fed = {"inputs_embeds" if step.fed_embeddings else "input_ids": step.inputs}
    return model.forward_cached(cache, **fed, position_ids=step.position_ids,
                                write_slot=step.write_slot, valid_from=step.valid_from,
                                block_length=step.block_length)


def time_block_step_ms(model, step: BlockStep, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times (ms) of `repeats` forwards of `step`, on one cache allocated beforehand."""
    cache = model.new_cache(step.batch, step.write_slot + step.block_length)
    samples = []
    with torch.inference_mode(), as_in_decode(model):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            replay(model, step, cache)
            if i >= warmup:
                samples.append(1e3 * (time.perf_counter() - start))
    return samples


def block_step_cost(model, step: BlockStep) -> roofline.ForwardCost:
    """What `step`'s forward must move and compute, with the experts its routing selected."""
    with torch.inference_mode(), roofline.RoutingRecorder(model) as recorder:
        replay(model, step)
    return roofline.block_forward_cost(
        model.config, step.block_length, step.write_slot, recorder.per_forward()[0],
        batch=step.batch, weight_bytes=model.dtype.itemsize,
        embedding_rows=0 if step.fed_embeddings else None)


def floor_ms(cost: roofline.ForwardCost, machine: roofline.MachineRoofline, dtype) -> float:
    """The forward's floor at the fastest matmul throughput measured (roofline's docstring)."""
    return roofline.floor_ms(cost.total_bytes, cost.total_flops, machine.bytes_per_s,
                             machine.flops_per_s(dtype))


@dataclass
class BlockForwardReport:
    steps: int
    measured_ms: float      # median over steps of each step's median time
    floor_ms: float         # median over steps of each step's floor
    bytes_mb: float
    gflop: float
    distinct_experts: float  # mean per MoE layer over the steps

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.floor_ms

    def line(self) -> str:
        return (f"block forward: measured {self.measured_ms:.1f} ms, floor {self.floor_ms:.1f} ms "
                f"({self.ratio:.2f}x; {self.bytes_mb:.0f} MB, {self.gflop:.2f} GFLOP, "
                f"{self.distinct_experts:.1f} experts per MoE layer; median of {self.steps} "
                f"later steps)")


def block_forward_report(model, steps: list[BlockStep], machine: roofline.MachineRoofline,
                         repeats: int = 5) -> BlockForwardReport:
    costs = [block_step_cost(model, s) for s in steps]
    times = [statistics.median(time_block_step_ms(model, s, repeats)) for s in steps]
    floors = [floor_ms(c, machine, model.dtype) for c in costs]
    n_moe = roofline.moe_layer_count(model.config)
    per_expert = 3 * model.config.hidden_size * model.config.moe_intermediate_size
    experts = [c.bytes["experts"] / (model.dtype.itemsize * per_expert * n_moe) for c in costs]
    return BlockForwardReport(
        steps=len(steps), measured_ms=statistics.median(times),
        floor_ms=statistics.median(floors),
        bytes_mb=statistics.median(c.total_bytes for c in costs) / 1e6,
        gflop=statistics.median(c.total_flops for c in costs) / 1e9,
        distinct_experts=statistics.fmean(experts))
