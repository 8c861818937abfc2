"""The rolling schedule (decoding/rolling.py): each sequence of a batch moves on to its next block
as soon as its own converges. On the CPU's own kernels (batch invariant: test_batch_invariance.py)
every sequence decodes exactly as it does alone, and the batch runs as many forwards as its
longest sequence alone (plus the prefill), fewer than the lockstep schedule."""
import pytest
import torch
from cpu_flags import BF16_DOT_BY_DEFAULT
from decoding_fixtures import eos_case, record_forwards

from dmax_ext.decoding import decode
from dmax_ext.decoding.layout import plan_layout
from dmax_ext.model import random_model

L = 4
# A prompt with no full block (its first step re-feeds pad ids before its first slot), ones with
# one and several full blocks, lengths on and off block boundaries.
PROMPTS = [[5, 9, 33], [7] * 9, list(range(40, 48)), [300, 2, 17, 17, 101, 64], [11] * 13]


def check_as_alone(out, solo, prompts, gen_length, block_length=L, all_at_once=True):
    assert out.tokens == [s.tokens[0] for s in solo]
    assert out.seq_nfe == [s.nfe for s in solo]
    assert out.block_steps == [s.block_steps[0] for s in solo]
    assert out.capped_blocks == [s.capped_blocks[0] for s in solo]
    if not all_at_once:
        return
    # No row waits: the batch runs the longest sequence's steps, plus the prefill if any prompt
    # has a full block.
    layout = plan_layout([len(p) for p in prompts], gen_length, block_length)
    prefill = any(f > 0 for f in layout.first_blocks)
    assert out.nfe == prefill + max(sum(steps) for steps in out.block_steps)


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}],
                         ids=["greedy", "seeded"])
def test_rolling_batch_decodes_each_sequence_as_alone(mode, sampling):
    # Blocks of 1 to L steps (some capped), differently per row; the eos id ends sequences at
    # different blocks (compactions mid-decode).
    model, kwargs, solo = eos_case(PROMPTS, L, gen_length=14, mode=mode, **sampling)
    out = decode(model, PROMPTS, scheduler="rolling", **kwargs)
    check_as_alone(out, solo, PROMPTS, kwargs["gen_length"])
    assert any(c > 0 for c in out.capped_blocks) or mode == "threshold"  # the premise: caps
    lockstep = decode(model, PROMPTS, scheduler="lockstep", **kwargs)
    assert lockstep.tokens == out.tokens
    assert out.nfe <= lockstep.nfe  # (equal when one sequence outlasts all the others)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(
        not BF16_DOT_BY_DEFAULT, reason="bf16 products are oneDNN's on this CPU: no batch "
                                        "invariance promised (test_batch_invariance.py)"))])
def test_rolling_batch_as_alone_on_the_cpu_preset_shapes(dtype):
    # llada2-small's block length and widths (the kernels' vector paths) with the benchmarks'
    # weights (blocks of 1 to 20 steps), a short decode: in bf16 a single differently rounded
    # bit flips SPD decisions, so this is the sharp check.
    model = random_model("llada2-small", dtype=dtype, lm_head_gain=25.0,
                         lm_head_from_embedding=True, seed=2)
    prompts = [list(range(100, 100 + n)) for n in (5, 40, 70)]
    kwargs = dict(gen_length=64, block_length=32)
    solo = [decode(model, [p], **kwargs) for p in prompts]
    out = decode(model, prompts, scheduler="rolling", **kwargs)
    check_as_alone(out, solo, prompts, kwargs["gen_length"], block_length=32)
    assert out.nfe < decode(model, prompts, scheduler="lockstep", **kwargs).nfe


def test_scheduler_choice():
    # Gain 200: blocks converge in 1 to 4 steps, differently per row, with no eos.
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=200.0, seed=1)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        decode(model, PROMPTS, gen_length=8, block_length=L, scheduler="eager")
    # "auto" is lockstep on the CPU (rolling feeds 2L tokens a row: no gain where a forward is
    # bound by arithmetic): the same forwards as lockstep, more than rolling's.
    auto, lockstep, rolling = (decode(model, PROMPTS, gen_length=24, block_length=L,
                                      scheduler=s) for s in ("auto", "lockstep", "rolling"))
    assert auto.nfe == lockstep.nfe > rolling.nfe
    assert auto.tokens == lockstep.tokens == rolling.tokens


@pytest.mark.parametrize("prompts, gen_length", [
    ([[5], [6, 7]], 2),             # one block each, no full prompt block: slot L is the first
    ([[5, 6, 7, 8]], 8),            # batch 1, a prompt of exactly one block
    ([[5] * 4, [1] * 12], 3),       # prompts of whole blocks, a different block count each
])
def test_rolling_edge_layouts(prompts, gen_length):
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=60.0, seed=1)
    kwargs = dict(gen_length=gen_length, block_length=L)
    solo = [decode(model, [p], **kwargs) for p in prompts]
    check_as_alone(decode(model, prompts, scheduler="rolling", **kwargs), solo, prompts,
                   gen_length)


MORE_PROMPTS = PROMPTS + [[21, 22], list(range(60, 71)), [9] * 5]


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}],
                         ids=["greedy", "seeded"])
def test_rolling_admits_waiting_prompts_as_sequences_finish(mode, sampling, monkeypatch):
    model, kwargs, solo = eos_case(MORE_PROMPTS, L, gen_length=14, mode=mode, **sampling)
    groups = decode(model, MORE_PROMPTS, scheduler="lockstep", max_batch=3, **kwargs)
    fed = record_forwards(model, monkeypatch)
    out = decode(model, MORE_PROMPTS, scheduler="rolling", max_batch=3, **kwargs)
    check_as_alone(out, solo, MORE_PROMPTS, kwargs["gen_length"], all_at_once=False)
    assert len(fed) == out.nfe and max(rows for rows, _ in fed) == 3
    prefills = [i for i, (_, n_logits) in enumerate(fed) if n_logits == 0]
    assert len(prefills) > 1 and prefills[-1] > 0  # prompts admitted mid-decode
    # the batch refilled: full again after an admission
    assert any(fed[i + 1][0] == 3 for i in prefills[1:] if i + 1 < len(fed))
    assert groups.tokens == out.tokens and out.nfe <= groups.nfe


def test_lockstep_max_batch_decodes_in_groups():
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=200.0, seed=1)
    kwargs = dict(gen_length=12, block_length=L, scheduler="lockstep")
    out = decode(model, MORE_PROMPTS, max_batch=3, **kwargs)
    parts = [decode(model, MORE_PROMPTS[i:i + 3], **kwargs) for i in range(0, 8, 3)]
    assert out.tokens == [t for p in parts for t in p.tokens]
    assert out.seq_nfe == [n for p in parts for n in p.seq_nfe]
    assert out.block_steps == [s for p in parts for s in p.block_steps]
    assert out.nfe == sum(p.nfe for p in parts)
    assert out.tpf == pytest.approx(sum(map(len, out.tokens)) / out.nfe)


def test_max_batch_errors():
    model = random_model("tiny", dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        decode(model, PROMPTS, gen_length=4, block_length=L, max_batch=0)
    with pytest.raises(TypeError, match="max_batch must be an int"):
        decode(model, PROMPTS, gen_length=4, block_length=L, max_batch=2.0)
