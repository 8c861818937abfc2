"""SPEC sections 2-3 step by step, on a scripted stub model (decoding_stub.py): promotion,
revision, convergence, the step cap, eos, the block layout and cache calls, rows leaving a
block's forwards (or waiting in them) and compaction. Every case is worked out by hand in its
comments."""
import pytest
import torch
from decoding_stub import EOS, MASK, StubModel, hybrid_row

from dmax_ext.decoding import decode
from dmax_ext.decoding.cuda_graph import EagerStep

M = MASK


@pytest.fixture(params=["native", "reference"])
def ops(request):
    return request.param


def run(script, prompts, L, ops, **kwargs):
    model = StubModel(script, L)
    kwargs.setdefault("threshold", 0.5)
    kwargs.setdefault("accept_threshold", 0.9)
    return model, decode(model, prompts, block_length=L, ops=ops, **kwargs)


def test_spd_promotes_a_prefix_revises_and_converges(ops):
    # prompt 1..5, L = 4: block 0 (1 2 3 4) is prefilled; block 1 = [5, M, M, M] is generated.
    steps = [
        [None, (7, .8), (8, .3), (9, .6)],    # promote 5 (8 at .3 breaks the run) -> 5 7 M M
        [None, (7, .95), (8, .2), (9, .7)],   # run empty: first masked alone -> 5 7 8 M
        [None, (7, .95), (10, .6), (9, .4)],  # first masked alone (9); 6 revised 8 -> 10
        [None, (7, .95), (10, .95), (9, .92)],  # nothing changes: converged
    ]
    model, out = run(lambda block, step: steps[step] if block == 1 else None,
                     [[1, 2, 3, 4, 5]], 4, ops, gen_length=3)
    assert out.tokens == [[7, 10, 9]]
    assert (out.nfe, out.seq_nfe, out.block_steps, out.capped_blocks) == (5, [5], [[4]], [0])
    assert out.tpf == pytest.approx(3 / 5)

    prefill, first, *later = model.calls
    assert (prefill.n_fed, prefill.write_slot) == (4, 0)
    assert prefill.input_ids.tolist() == [[1, 2, 3, 4]]
    assert prefill.positions.tolist() == [[0, 1, 2, 3]]
    assert (first.n_fed, first.write_slot) == (4, 4)  # the previous block was prefilled
    assert first.input_ids.tolist() == [[5, M, M, M]] and first.positions.tolist() == [[4, 5, 6, 7]]
    assert [c.input_ids for c in later] == [None] * 3
    assert all((c.n_fed, c.write_slot) == (4, 4) for c in later)

    E = model.embedding_weight
    expected = [  # inputs of steps 1..3: hard prompt tail, hybrid soft positions, mask embedding
        [E[5], hybrid_row(E, 7, .8), E[M], E[M]],
        [E[5], hybrid_row(E, 7, .95), hybrid_row(E, 8, .2), E[M]],
        [E[5], hybrid_row(E, 7, .95), hybrid_row(E, 10, .6), hybrid_row(E, 9, .4)],
    ]
    for call, rows in zip(later, expected):
        torch.testing.assert_close(call.inputs_embeds[0], torch.stack(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["spd", "threshold"])
def test_next_block_commits_the_previous_one_and_eos_stops(ops, mode):
    # prompt [1, 2], L = 4, 10 new tokens: blocks 0 (1 2 M M), 1 and 2. No full prompt block,
    # so no prefill. Block 1 holds eos: block 2 is never run.
    script = {
        (0, 0): [None, None, (3, .95), (4, .97)],               # both promoted, confident
        (1, 0): [(6, .9), (EOS, .6), (5, .3), (5, .3)],         # -> 6 EOS M M
        (1, 1): [(6, .99), (EOS, .99), (EOS, .95), (EOS, .95)],  # -> 6 EOS EOS EOS
    }
    model, out = run(lambda block, step: script.get((block, step)), [[1, 2]], 4, ops,
                     gen_length=10, mode=mode)
    assert out.tokens == [[3, 4, 6, EOS]]
    assert (out.nfe, out.block_steps, out.capped_blocks) == (3, [[1, 2]], [0])
    block0, block1_first, block1_second = model.calls
    assert (block0.n_fed, block0.write_slot) == (4, 0)
    assert block0.input_ids.tolist() == [[1, 2, M, M]]
    # The first step of block 1 feeds blocks 0 and 1 (2L tokens), committing block 0's K/V.
    assert (block1_first.n_fed, block1_first.write_slot) == (8, 0)
    assert block1_first.input_ids.tolist() == [[1, 2, 3, 4, M, M, M, M]]
    assert block1_first.positions.tolist() == [list(range(8))]
    assert (block1_second.n_fed, block1_second.write_slot) == (4, 4)
    if mode == "spd":
        assert block1_second.input_ids is None
    else:
        assert block1_second.input_ids.tolist() == [[6, EOS, M, M]]


def test_spd_never_converging_block_stops_at_the_step_cap(ops):
    # Every step flips all four predictions (5 <-> 6) at conf .6: promoted at once, then revised
    # forever. The cap (block_length steps) ends the block with the last ids.
    def script(block, step):
        return [((5, 6)[step % 2], .6)] * 4 if block == 1 else None
    _, out = run(script, [[1, 2, 3, 4]], 4, ops, gen_length=4)
    assert out.tokens == [[6, 6, 6, 6]]
    assert (out.nfe, out.block_steps, out.capped_blocks) == (5, [[4]], [1])


def test_threshold_promotes_anywhere_and_never_revises(ops):
    # prompt 1..5, L = 4, block 1 = [5, M, M, M]; tau = .5.
    steps = [
        [None, (7, .4), (8, .45), (M, .9)],       # none >= .5, M not eligible: best alone (8)
        [None, (7, .6), (9, .99), (M, .9)],       # 7 promoted; position 6 stays 8 (final)
        [None, (3, .99), (9, .99), (11, .3)],     # last mask takes 11: no mask left
    ]
    model, out = run(lambda block, step: steps[step] if block == 1 else None,
                     [[1, 2, 3, 4, 5]], 4, ops, gen_length=3, mode="threshold")
    assert out.tokens == [[7, 8, 11]]
    assert (out.nfe, out.block_steps, out.capped_blocks) == (4, [[3]], [0])
    assert [c.input_ids.tolist() for c in model.calls[1:]] == [
        [[5, M, M, M]], [[5, M, 8, M]], [[5, 7, 8, M]]]


def test_threshold_near_best_ties_and_the_loop_guard(ops):
    # Step 0: nothing reaches .5; 7 and 8 are within 1e-5 of the best: both promoted. Then the
    # last mask's prediction is the mask id forever: no progress, the cap ends the block.
    def script(block, step):
        if block != 1:
            return None
        if step == 0:
            return [None, (7, .3), (8, .300004), (9, .2)]
        return [None, (3, .99), (3, .99), (M, .9)]
    _, out = run(script, [[1, 2, 3, 4, 5]], 4, ops, gen_length=3, mode="threshold")
    assert out.tokens == [[7, 8, M]]
    assert (out.nfe, out.block_steps, out.capped_blocks) == (5, [[4]], [1])


@pytest.mark.parametrize("static_shapes", [False, True], ids=["leaves", "waits"])
def test_converged_row_leaves_the_block_compacts_and_equals_one_by_one(ops, static_shapes,
                                                                        monkeypatch):
    # A = 9 prompt ids (blocks 0, 1 prefilled; generates blocks 2, 3), B = [1, 2] (generates
    # blocks 0, 1). L = 4, 6 new tokens. Slot space: both first generated blocks at slot block 2;
    # B is right-aligned (valid_from 8). A's block 2 converges at step 1, B's block 0 needs a
    # third step: A leaves the block's forwards, or, with a runner on static buffers (CUDA
    # graphs), waits in them unchanged and uncounted. B then ends on eos and is compacted out.
    monkeypatch.setattr(EagerStep, "static_shapes", static_shapes)
    script = {
        (2, 0): [None, (5, .99), (6, .99), (7, .5)],
        (2, 1): [None, (5, .99), (6, .99), (7, .99)],
        (2, 2): [None, (9, .6), (9, .6), (9, .6)],    # only reached when waiting: must not apply
        (3, 0): [(8, .99), (8, .99), (EOS, .99), (8, .99)],
        (0, 0): [None, None, (3, .7), (4, .2)],
        (0, 1): [None, None, (3, .7), (4, .6)],
        (0, 2): [None, None, (3, .95), (EOS, .95)],
    }
    prompt_a, prompt_b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2]
    model, out = run(lambda block, step: script.get((block, step)), [prompt_a, prompt_b], 4, ops,
                     gen_length=6)
    solo = [run(lambda block, step: script.get((block, step)), [p], 4, ops, gen_length=6)[1]
            for p in (prompt_a, prompt_b)]
    assert out.tokens == [[5, 6, 7, 8, 8, EOS], [3, EOS]]
    assert out.tokens == [s.tokens[0] for s in solo]
    assert out.seq_nfe == [s.nfe for s in solo] == [1 + 2 + 1, 3]
    assert out.block_steps == [[2, 1], [3]]
    assert out.nfe == 1 + 3 + 1  # prefill, three batched steps, A alone
    prefill, first, second, third, last = model.calls
    assert prefill.input_ids.tolist() == [prompt_a[:8], [EOS] * 8]  # B's slots are padding
    assert first.valid_from.tolist() == [0, 8] and first.write_slot == 8
    assert first.positions.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert second.inputs_embeds.shape[0] == 2
    if static_shapes:
        assert model.caches[0].selects == [[0]]
        assert third.inputs_embeds.shape[0] == 2
    else:  # B alone (running row 1), then A alone (sequence 0) at the next block
        assert model.caches[0].selects == [[1], [0]]
        assert third.valid_from.tolist() == [8] and third.positions.tolist() == [[0, 1, 2, 3]]
        assert (third.write_slot, third.inputs_embeds.shape[0]) == (8, 1)
    # A alone: blocks 2 and 3 fed together, block 2 with the ids it converged to.
    assert last.input_ids.tolist() == [[9, 5, 6, 7, M, M, M, M]]
    assert last.valid_from.tolist() == [0]
