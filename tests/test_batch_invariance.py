"""Batch invariance of the CPU forward: a sequence's logits and cache entries do not depend on
the batch it runs in. decode() promises that each sequence of a batch decodes exactly as it
would alone; a forward whose roundings change with the batch breaks that promise in bf16 (a
one-ulp difference in a hidden state flips an SPD decision now and then), so the property is
checked bitwise, on forwards, in both dtypes:

- the prefill and a block forward of B right-aligned prompts (different lengths, so rows start
  at different cache slots) against each prompt alone at its own slots;
- batches whose projections take more rows than any single row's (the kernels' row caps of the
  past made the library's GEMM take over there, with other roundings);
- cache placements whose first valid slot is not a multiple of a vector (block length 4): the
  attention's sums must not depend on where in its vectors a sequence starts.

The promise covers float32 on any CPU and bfloat16 where the bf16 products are our kernels'
(AVX512-BF16 without AMX: cpu_flags.BF16_DOT_BY_DEFAULT); oneDNN's (AMX, AVX2-only CPUs) pick
their blocking by shape. On CUDA no such promise holds either (the GEMM libraries pick kernels
by shape), so this is CPU-only."""
import pytest
import torch

from cpu_flags import BF16_DOT_BY_DEFAULT
from dmax_ext.decoding.layout import plan_layout, prefill_inputs
from dmax_ext.model import random_model

DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not BF16_DOT_BY_DEFAULT, reason="bf16 products are oneDNN's on this CPU (no invariance "
                                    "promised): AMX, or no AVX512-BF16"))]


def _prefill_and_block(model, prompts, block_length, block_embeds):
    """Prefills the prompts' full blocks and runs one block forward (their first generated
    block, from block_embeds [B, L, H]) where decode() places them (decoding/layout.py).
    Returns (logits [B, L, V], each sequence's cache entries from its first slot on:
    [layers, keys | values, kv heads, slots, head dim])."""
    L = block_length
    layout = plan_layout([len(p) for p in prompts], L, L)
    valid_from = torch.tensor([layout.valid_from(b) for b in range(len(prompts))])
    write_slot = layout.first_slot_block * L
    cache = model.new_cache(len(prompts), write_slot + L)
    if write_slot:
        ids, positions = prefill_inputs(layout, prompts, model.config.eos_token_id, "cpu")
        model.forward_cached(cache, input_ids=ids, position_ids=positions, write_slot=0,
                             valid_from=valid_from, block_length=L, n_logits=0)
    starts = torch.tensor([layout.first_blocks[b] * L for b in range(len(prompts))])
    logits = model.forward_cached(cache, inputs_embeds=block_embeds,
                                  position_ids=starts[:, None] + torch.arange(L),
                                  write_slot=write_slot, valid_from=valid_from, block_length=L)
    entries = [torch.stack([torch.stack((k[b, :, first:], v[b, :, first:]))
                            for k, v in zip(cache.keys, cache.values)])
               for b, first in enumerate(valid_from.tolist())]
    return logits, entries


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_length, lengths", [
    # first slots 60, 32, 16, 0, 44 (alone: 0): the sequences start at other vector offsets
    (4, [3, 29, 46, 61, 17]),
    # a prefill of 6 x 96 rows and a block of 6 x 32: past every row cap of before
    (32, [40, 70, 33, 100, 64, 90]),
])
def test_a_sequence_computes_the_same_in_any_batch(dtype, block_length, lengths):
    model = random_model("llada2-small", dtype=dtype, lm_head_gain=20.0, seed=2)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size - 8, (n,), generator=gen).tolist()
               for n in lengths]
    block_embeds = (torch.randn(len(prompts), block_length, model.config.hidden_size,
                                generator=gen) * 0.02).to(dtype)
    with torch.inference_mode():
        batched, batched_entries = _prefill_and_block(model, prompts, block_length,
                                                      block_embeds)
        for b, prompt in enumerate(prompts):
            alone, alone_entries = _prefill_and_block(model, [prompt], block_length,
                                                      block_embeds[b:b + 1])
            assert torch.equal(batched[b], alone[0]), f"row {b} (prompt of {lengths[b]}): logits"
            assert torch.equal(batched_entries[b], alone_entries[0]), \
                f"row {b} (prompt of {lengths[b]}): keys and values"
