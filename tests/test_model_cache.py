"""forward_cached: block steps on the static KV cache equal a full block-causal recompute."""
import copy

import pytest
import torch

from checkpoints import write_tiny_checkpoint
from dmax_ext.model import load_model

BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt"),
                      dtype=torch.float32)


def _recompute(model, slot_ids, valid_from, end, fed_embeds=None):
    """Logits of each sequence over slots [valid_from[b], end): the sequence alone, no cache,
    positions from 0, block-causal; the last fed_embeds.shape[1] inputs replaced by fed_embeds."""
    out = []
    for b in range(slot_ids.shape[0]):
        embeds = model.embed(slot_ids[b, int(valid_from[b]):end])
        if fed_embeds is not None:
            embeds[-fed_embeds.shape[1]:] = fed_embeds[b]
        out.append(model(inputs_embeds=embeds[None], block_length=BLOCK)[0])
    return out


def _check(got, want_per_seq, n_last):
    for b, want in enumerate(want_per_seq):
        torch.testing.assert_close(got[b, -n_last:], want[-n_last:], atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_block_decoding_matches_full_recompute(tiny):
    """Two prompts (5 and 13 tokens) right-aligned on blocks in slot space: prefill the full
    prompt blocks, then per block: a combined previous+current forward (commits the previous
    block), a soft-embedding step and an ids step; then compaction to one sequence."""
    vocab, mask_id = tiny.config.vocab_size, tiny.config.mask_token_id
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 500, (n,), generator=gen) for n in (5, 13)]
    n_blocks = [-(-len(p) // BLOCK) for p in prompts]
    first_gen_block = max(n_blocks) - 1                       # holds the longest prompt's tail
    valid_from = torch.tensor([(max(n_blocks) - n) * BLOCK for n in n_blocks])
    n_slots = (first_gen_block + 3) * BLOCK
    slot_ids = torch.full((2, n_slots), mask_id)
    for b, p in enumerate(prompts):
        slot_ids[b, :valid_from[b]] = tiny.config.eos_token_id   # other sequences' padding
        slot_ids[b, valid_from[b]:valid_from[b] + len(p)] = p
    positions = (torch.arange(n_slots) - valid_from[:, None]).clamp(min=0)
    cache = tiny.new_cache(2, n_slots)

    prefill = first_gen_block * BLOCK
    logits = tiny.forward_cached(cache, input_ids=slot_ids[:, :prefill], write_slot=0,
                                 position_ids=positions[:, :prefill], valid_from=valid_from,
                                 block_length=BLOCK)
    want = _recompute(tiny, slot_ids, valid_from, prefill)
    for b in range(2):
        torch.testing.assert_close(logits[b, valid_from[b]:], want[b], atol=2e-4, rtol=1e-4)

    for block in range(first_gen_block, first_gen_block + 3):
        start, end = block * BLOCK, (block + 1) * BLOCK
        # Step 1: ids; from the second generated block on, the previous block rides along.
        fed_from = start - BLOCK if block > first_gen_block else start
        logits = tiny.forward_cached(cache, input_ids=slot_ids[:, fed_from:end], write_slot=fed_from,
                                     position_ids=positions[:, fed_from:end], valid_from=valid_from,
                                     block_length=BLOCK)
        _check(logits, _recompute(tiny, slot_ids, valid_from, end), end - fed_from)
        # Step 2: soft embeddings for the block (the SPD path).
        soft = tiny.embed(slot_ids[:, start:end]) + 0.1 * torch.randn(2, BLOCK, 64, generator=gen)
        logits = tiny.forward_cached(cache, inputs_embeds=soft, write_slot=start,
                                     position_ids=positions[:, start:end], valid_from=valid_from,
                                     block_length=BLOCK)
        _check(logits, _recompute(tiny, slot_ids, valid_from, end, soft), BLOCK)
        # The block is decided: its final ids get committed by the next block's first step.
        masked = slot_ids[:, start:end] == mask_id
        slot_ids[:, start:end][masked] = torch.randint(0, vocab - 2, (int(masked.sum()),), generator=gen)

    # Compaction: sequence 0 finished; sequence 1 goes on alone in the selected cache.
    alone = cache.select(torch.tensor([1]))
    assert alone.batch_size == 1 and alone.max_slots == n_slots
    assert torch.equal(cache.select(torch.tensor([False, True])).keys[2], alone.keys[2])
    start = (first_gen_block + 2) * BLOCK
    logits = tiny.forward_cached(alone, input_ids=slot_ids[1:, start - BLOCK:],
                                 position_ids=positions[1:, start - BLOCK:], write_slot=start - BLOCK,
                                 valid_from=valid_from[1:], block_length=BLOCK)
    _check(logits, _recompute(tiny, slot_ids[1:], valid_from[1:], n_slots), 2 * BLOCK)


def test_forward_cached_argument_errors(tiny):
    cache = tiny.new_cache(1, 16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    kwargs = dict(position_ids=torch.arange(4)[None], valid_from=torch.zeros(1, dtype=torch.long),
                  block_length=4)
    with pytest.raises(ValueError, match="multiple of block_length"):
        tiny.forward_cached(cache, input_ids=ids, write_slot=2, **kwargs)
    with pytest.raises(ValueError, match="slots"):
        tiny.forward_cached(cache, input_ids=ids, write_slot=16, **kwargs)
    with pytest.raises(ValueError, match="position_ids"):
        tiny.forward_cached(cache, input_ids=ids, write_slot=0,
                            **{**kwargs, "position_ids": torch.arange(3)[None]})
    with pytest.raises(ValueError, match="batch_index"):
        cache.select(torch.tensor([True, False]))


@torch.no_grad()
def test_n_logits_returns_the_last_rows_and_zero_only_fills_the_cache(tiny):
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 500, (2, 3 * BLOCK), generator=gen)
    positions = torch.arange(3 * BLOCK).expand(2, -1)
    kwargs = dict(input_ids=ids, position_ids=positions, write_slot=0,
                  valid_from=torch.zeros(2, dtype=torch.int64), block_length=BLOCK)
    full_cache, cache = tiny.new_cache(2, 3 * BLOCK), tiny.new_cache(2, 3 * BLOCK)
    full = tiny.forward_cached(full_cache, **kwargs)
    last = tiny.forward_cached(cache, **kwargs, n_logits=BLOCK)
    assert last.shape == (2, BLOCK, tiny.config.vocab_size)
    torch.testing.assert_close(last, full[:, -BLOCK:], atol=1e-5, rtol=1e-5)
    fresh = tiny.new_cache(2, 3 * BLOCK)
    assert tiny.forward_cached(fresh, **kwargs, n_logits=0) is None
    for got, want in zip(fresh.keys + fresh.values, full_cache.keys + full_cache.values):
        assert torch.equal(got, want)
    for bad in (-1, 3 * BLOCK + 1, 2.0, True):
        with pytest.raises(ValueError, match="n_logits"):
            tiny.forward_cached(fresh, **kwargs, n_logits=bad)


def test_lm_head_cpu_variant_equals_the_linear(tiny):
    h = torch.randn(2, 16, tiny.config.hidden_size, generator=torch.Generator().manual_seed(2))
    want = torch.nn.functional.linear(h, tiny.lm_head.weight)
    with torch.no_grad():  # 32 rows: dmax.skinny_linear (float32 kernel; bf16 library GEMM)
        torch.testing.assert_close(tiny.lm_head(h), want, atol=1e-5, rtol=1e-5)
        head16 = copy.deepcopy(tiny.lm_head).bfloat16()
        torch.testing.assert_close(head16(h.bfloat16()),
                                   torch.nn.functional.linear(h.bfloat16(), head16.weight),
                                   atol=1e-2, rtol=2 ** -7)
    got = tiny.lm_head(h.requires_grad_())  # gradients wanted: the plain linear
    assert got.grad_fn is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_device_write_slot_and_longer_span(tiny):
    """A write slot given as a device tensor (what a CUDA graph replays) with a longer key span:
    the same logits as the int write slot at that span, bitwise, whatever the stale values past
    the fed tokens (masked out, also within the last fed block: 6 tokens from slot 8 end mid
    block); the exact span's logits to float rounding."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 500, (2, 14), generator=gen)
    positions = torch.arange(14).expand(2, -1)
    valid_from = torch.tensor([0, 4])
    caches = []
    for _ in range(2):
        cache = tiny.new_cache(2, 24)
        for t in cache.keys + cache.values:
            t.normal_(generator=gen)  # stale values, different per cache
        tiny.forward_cached(cache, input_ids=ids[:, :8], position_ids=positions[:, :8],
                            write_slot=0, valid_from=valid_from, block_length=BLOCK, n_logits=0)
        caches.append(cache)
    kwargs = dict(input_ids=ids[:, 8:], position_ids=positions[:, 8:], valid_from=valid_from,
                  block_length=BLOCK)
    exact = tiny.forward_cached(caches[0], write_slot=8, **kwargs)
    by_int = tiny.forward_cached(caches[0], write_slot=8, span=20, **kwargs)
    by_tensor = tiny.forward_cached(caches[1], write_slot=torch.tensor([8]), span=20, **kwargs)
    assert torch.equal(by_tensor, by_int)
    torch.testing.assert_close(by_int, exact, rtol=0, atol=1e-5 * exact.abs().max().item())
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        assert torch.equal(a[:, :, :14], b[:, :, :14])


def test_write_slot_and_span_errors(tiny):
    cache = tiny.new_cache(1, 16)
    kwargs = dict(input_ids=torch.zeros(1, 4, dtype=torch.long),
                  position_ids=torch.arange(4)[None], valid_from=torch.zeros(1, dtype=torch.long),
                  block_length=4)
    slot = torch.tensor(4)
    for bad in (dict(write_slot=slot), dict(write_slot=slot.float(), span=8),
                dict(write_slot=torch.tensor([4, 8]), span=8), dict(write_slot=True)):
        with pytest.raises(ValueError, match="write_slot"):
            tiny.forward_cached(cache, **bad, **kwargs)
    for span in (7, 8.0, True):
        with pytest.raises(ValueError, match="span"):
            tiny.forward_cached(cache, write_slot=4, span=span, **kwargs)
    with pytest.raises(ValueError, match="slots"):
        tiny.forward_cached(cache, write_slot=slot, span=17, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_runs_only_the_last_layers_key_value_projection(dtype):
    """n_logits=0: nobody reads the last layer's output, so it only writes its keys and values
    (its attention and MLP skipped), the same bits as the whole layer writes; a hook on any of
    its modules keeps the layer whole, and runs."""
    from dmax_ext.model import random_model
    from dmax_calls import dmax_calls
    model = random_model("tiny", dtype=dtype, seed=4)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 500, (2, 3 * BLOCK), generator=gen)
    kwargs = dict(input_ids=ids, position_ids=torch.arange(3 * BLOCK).expand(2, -1),
                  write_slot=0, valid_from=torch.tensor([0, 2]), block_length=BLOCK)
    last = model.model.layers[-1]
    ran = []
    last.mlp.forward = lambda x, forward=last.mlp.forward: ran.append(1) or forward(x)
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        whole = model.new_cache(2, 3 * BLOCK)
        with dmax_calls() as calls:
            model.forward_cached(whole, **kwargs, n_logits=1)
        assert [name for name, _ in calls].count("decoder_layer") == layers  # every layer whole
        for hooked in (None, last.attention.dense, last.mlp):
            ran.clear()
            handle = hooked.register_forward_hook(lambda *a: None) if hooked else None
            cache = model.new_cache(2, 3 * BLOCK)
            with dmax_calls() as calls:
                assert model.forward_cached(cache, **kwargs, n_logits=0) is None
            if handle:
                handle.remove()
            # The other layers as the op; the last one's MLP only when a hook keeps it whole.
            assert [name for name, _ in calls].count("decoder_layer") == layers - 1
            assert ran == ([] if hooked is None else [1])
            for got, want in zip(cache.keys + cache.values, whole.keys + whole.values):
                assert torch.equal(got, want)


def test_roll_rows_moves_the_chosen_rows_left():
    from dmax_ext.model.cache import KVCache
    cache = KVCache.allocate(2, 3, 2, 12, 4, torch.float32, "cpu")
    for t in cache.keys + cache.values:
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in cache.keys + cache.values]
    cache.roll_rows(torch.tensor([0, 2]), 4)
    for old, new in zip(before, cache.keys + cache.values):
        for b in (0, 2):
            assert torch.equal(new[b, :, :8], old[b, :, 4:])  # slot t <- slot t + 4
            assert torch.equal(new[b, :, 8:], old[b, :, :4])  # the last slots: rewritten later
        assert torch.equal(new[1], old[1])
    with pytest.raises(ValueError, match="shift must be in"):
        cache.roll_rows(torch.tensor([0]), 0)
