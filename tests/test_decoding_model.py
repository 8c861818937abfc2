"""Decoding a real (tiny, random, float32) LLaDA2-MoE model: the cached engine equals an uncached
decoder written straight from SPEC sections 2-3 (no cache, none of the decoder's code, the whole
sequence recomputed each step); a batch equals its sequences one by one, with rows leaving a
block's forwards when they converge or waiting in them; temperature 0 and seeded sampling are
deterministic; eos stops a sequence."""
import pytest
import torch
from decoding_fixtures import eos_case, record_forwards

from dmax_ext.decoding import DEFAULT_ACCEPT_THRESHOLD, DEFAULT_THRESHOLD, decode
from dmax_ext.decoding.cuda_graph import EagerStep
from dmax_ext.model import random_model

L = 4
TAU, TAU_ACC = DEFAULT_THRESHOLD, DEFAULT_ACCEPT_THRESHOLD
PROMPTS = [[5, 9, 33], [7] * 9, list(range(40, 48)), [300, 2, 17, 17, 101, 64]]


@pytest.fixture(scope="module")
def model():
    # A large lm_head gain gives peaked predictions, so blocks converge as with a trained model.
    return random_model("tiny", dtype=torch.float32, lm_head_gain=200.0, seed=1)


def spec_step(model, logits, ids, active, embeds, mode, mask):
    """SPEC section 3, one step of one block, written out position by position (plain torch,
    none of the decoder's code). Returns (new ids, next embeddings, converged)."""
    p = torch.softmax(logits.float(), dim=-1)
    conf, pred = (t.tolist() for t in p.max(dim=-1))
    L = len(ids)
    masked = [t == mask for t in ids]
    if mode == "threshold":
        eligible = [l for l in range(L) if masked[l] and pred[l] != mask]
        chosen = [l for l in eligible if conf[l] >= TAU]
        if not chosen and eligible:
            best = max(conf[l] for l in eligible)
            chosen = [l for l in eligible if conf[l] >= best - 1e-5]
        new = [pred[l] if l in chosen else ids[l] for l in range(L)]
        return new, None, not any(t == mask and a for t, a in zip(new, active))
    promoted = []
    for l in range(L):
        if masked[l]:
            if conf[l] < TAU:
                break
            promoted.append(l)
    if not promoted and any(masked):
        promoted = [masked.index(True)]
    if any(masked):
        update = [l in promoted or (active[l] and not masked[l]) for l in range(L)]
    else:
        update = list(active)
    new = [pred[l] if update[l] else ids[l] for l in range(L)]
    changed = [new[l] != ids[l] for l in range(L)]
    converged = all(conf[l] >= TAU_ACC for l in range(L) if active[l]) or not any(changed)
    E = model.embedding_weight.float()
    embeds = embeds.clone()
    for l in range(L):
        if active[l] and new[l] != mask:
            h = conf[l] * E[pred[l]] + (1 - conf[l]) * E[mask]
            target = conf[l] * E[pred[l]].norm() + (1 - conf[l]) * E[mask].norm()
            h = h * target / (h.norm() + 1e-6)
            embeds[l] = h.to(embeds.dtype)
        elif changed[l]:
            embeds[l] = E[new[l]].to(embeds.dtype)
    return new, embeds, converged


def uncached_decode(model, prompt, gen_length, mode):
    """SPEC sections 2-3 without a cache: every step runs the whole sequence up to the current
    block with the block-causal mask. Batch 1, greedy. Returns (tokens, steps of each block)."""
    mask, eos = model.config.mask_token_id, model.config.eos_token_id
    P = len(prompt)
    n_blocks = -(-(P + gen_length) // L)
    seq = prompt + [mask] * (n_blocks * L - P)
    tokens, block_steps = [], []
    for j in range(P // L, n_blocks):
        ids = seq[j * L:(j + 1) * L]
        active = [t == mask for t in ids]
        embeds = model.embed(torch.tensor(ids))
        before = torch.tensor(seq[:j * L], dtype=torch.int64)
        for step in range(L):
            if step == 0 or mode == "threshold":
                logits = model(input_ids=torch.cat([before, torch.tensor(ids)])[None],
                               block_length=L)
            else:
                logits = model(inputs_embeds=torch.cat([model.embed(before), embeds])[None],
                               block_length=L)
            ids, embeds, converged = spec_step(model, logits[0, -L:], ids, active, embeds,
                                               mode, mask)
            if converged:
                break
        block_steps.append(step + 1)
        seq[j * L:(j + 1) * L] = ids
        new = seq[max(P, j * L):(j + 1) * L]
        if eos in new:
            return tokens + new[:new.index(eos) + 1], block_steps
        tokens += new
    return tokens, block_steps


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1]], ids=["short", "prefilled"])
@pytest.mark.parametrize("gain", [200.0, 3.0], ids=["peaked", "flat"])
def test_cached_equals_uncached(mode, prompt, gain):
    # Flat predictions make SPD promote one position at a time and revise, up to the step cap.
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=gain, seed=1)
    with torch.inference_mode():
        expected, steps = uncached_decode(model, prompt, 10, mode)
    out = decode(model, [prompt], gen_length=10, block_length=L, mode=mode)
    assert out.tokens == [expected]
    assert out.block_steps == [steps]
    assert out.nfe == sum(steps) + (len(prompt) >= L)  # + the prefill


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}],
                         ids=["greedy", "seeded"])
def test_batch_equals_one_by_one(model, mode, sampling):
    kwargs = dict(gen_length=9, block_length=L, mode=mode, ops="native", **sampling)
    out = decode(model, PROMPTS, **kwargs)
    solo = [decode(model, [p], **kwargs) for p in PROMPTS]
    assert out.tokens == [s.tokens[0] for s in solo]
    assert out.seq_nfe == [s.nfe for s in solo]
    assert out.block_steps == [s.block_steps[0] for s in solo]
    assert out.nfe <= sum(out.seq_nfe)
    assert out.tpf == pytest.approx(sum(map(len, out.tokens)) / out.nfe)


@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}],
                         ids=["greedy", "seeded"])
def test_converged_rows_leave_the_block_and_batch_equals_one_by_one(mode, sampling, monkeypatch):
    model, kwargs, solo = eos_case(PROMPTS, L, gen_length=12, mode=mode, **sampling)
    fed = record_forwards(model, monkeypatch)
    out = decode(model, PROMPTS, **kwargs)
    assert out.tokens == [s.tokens[0] for s in solo]
    assert out.seq_nfe == [s.nfe for s in solo]
    assert out.block_steps == [s.block_steps[0] for s in solo]
    assert out.capped_blocks == [s.capped_blocks[0] for s in solo]
    assert any(len({steps[j] for steps in out.block_steps if j < len(steps)}) > 1
               for j in range(max(map(len, out.block_steps))))  # the premise
    # Every decoding forward (the prefill computes no logits) fed exactly the rows whose block
    # was still decoding.
    rows = [n for n, n_logits in fed if n_logits != 0]
    assert sum(rows) == sum(map(sum, out.block_steps)) and len(rows) == out.nfe - 1
    # With a runner on static buffers (CUDA graphs) converged rows wait in the batch instead:
    # the same decode and counts, more rows fed.
    fed.clear()
    monkeypatch.setattr(EagerStep, "static_shapes", True)
    waiting = decode(model, PROMPTS, **kwargs)
    assert (waiting.tokens, waiting.nfe, waiting.seq_nfe, waiting.block_steps,
            waiting.capped_blocks) == (out.tokens, out.nfe, out.seq_nfe, out.block_steps,
                                       out.capped_blocks)
    assert sum(n for n, n_logits in fed if n_logits != 0) > sum(map(sum, out.block_steps))


def test_native_ops_equal_reference_ops(model):
    # The two may round a conf an ulp apart; with peaked predictions no threshold decision sits
    # that close, so the decodes agree (flat ones can diverge after many revisions).
    kwargs = dict(gen_length=9, block_length=L)
    assert decode(model, PROMPTS, ops="native", **kwargs).tokens == \
        decode(model, PROMPTS, ops="reference", **kwargs).tokens


def test_deterministic_and_seeded(model):
    greedy = [decode(model, PROMPTS[:2], gen_length=8, block_length=L).tokens for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {seed: decode(model, PROMPTS[:2], gen_length=8, block_length=L, temperature=1.5,
                            seed=seed).tokens for seed in (0, 0, 1)}
    again = decode(model, PROMPTS[:2], gen_length=8, block_length=L, temperature=1.5, seed=0)
    assert again.tokens == sampled[0]
    assert sampled[0] != sampled[1]


def test_tensor_input_and_lengths(model):
    prompt = torch.tensor([PROMPTS[2], list(range(8))])
    out = decode(model, prompt, gen_length=5, block_length=L)
    assert out.tokens == decode(model, prompt.tolist(), gen_length=5, block_length=L).tokens
    # 8 + 5 = 13 positions -> blocks 2 and 3 -> 8 new tokens (whole blocks, SPEC section 5).
    assert all(len(t) == 8 for t in out.tokens if model.config.eos_token_id not in t)
    assert out.tokens[0] == decode(model, PROMPTS[2], gen_length=5, block_length=L).tokens[0]


def test_eos_stops_the_sequence_and_the_rest_of_the_batch_goes_on(model):
    free = decode(model, PROMPTS, gen_length=12, block_length=L)
    # Make a token that sequence 0 produces in its second block the eos id: decoding is the
    # same up to its first occurrence, then sequence 0 stops; the others are unaffected unless
    # they produce it too.
    eos = free.tokens[0][L]
    stopped = decode(model, PROMPTS, gen_length=12, block_length=L, eos_id=eos)
    for before, after in zip(free.tokens, stopped.tokens):
        expected = before[:before.index(eos) + 1] if eos in before else before
        assert after == expected
    assert len(stopped.block_steps[0]) < len(free.block_steps[0])
    assert stopped.seq_nfe[0] < free.seq_nfe[0]
