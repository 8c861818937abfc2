"""Sparse attention masks in tiles (attention.tile_mask, MaskTiles), logits of chosen rows
(forward's logits_rows) and the last layer on those rows only (DecoderLayer.forward_rows): what
makes a training forward compute only what its loss reads. Tiled attention against a float64 computation of the dense masked softmax, within 2x the
error of dense SDPA in the same dtype, outputs and gradients; the masks that stay dense; a
model forward and its gradients with and without tiles; logits_rows against the whole logits."""
import pytest
import torch
import torch.nn.functional as F

from dmax_ext.model import PRESETS, random_model
from dmax_ext.model import llada2
from dmax_ext.model.attention import Attention, MaskTiles, block_causal_mask, tile_mask
from dmax_ext.training.oput import two_half_attention_mask, two_half_position_ids
from dmax_ext.training.parallel import apply_activation_checkpointing
from dmax_calls import dmax_calls
from tolerances import assert_within_naive_error

DTYPES = [torch.float32, torch.bfloat16]


def _scattered_mask(length: int, tile: int, seed: int) -> torch.Tensor:
    """A mask whose query tiles see scattered (non-contiguous) key tiles, with random holes
    inside the tiles they see, and every row seeing at least one key."""
    gen = torch.Generator().manual_seed(seed)
    n = -(-length // tile)
    tiles = torch.rand(n, n, generator=gen) < 0.35
    tiles |= torch.eye(n, dtype=torch.bool)
    dense = tiles.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:length, :length]
    mask = dense & (torch.rand(length, length, generator=gen) < 0.7)
    mask |= torch.eye(length, dtype=torch.bool)
    return mask[None, None]


MASKS = {
    "two-half": lambda: two_half_attention_mask(80, 8),           # training's: 160 tokens
    "block-causal": lambda: block_causal_mask(150, 16),           # a ragged last tile
    "scattered": lambda: _scattered_mask(144, 16, seed=3),
}


TINY = PRESETS["tiny"]  # 4 query heads, 2 key-value heads of dim 16


def _qkv(length, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, length, TINY.head_dim, generator=gen).to(dtype).requires_grad_()
            for n in (TINY.num_attention_heads, TINY.num_key_value_heads, TINY.num_key_value_heads)]


def _exact(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d) masked) v as [B, T, heads * d], GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(MASKS))
def test_tiled_attention_matches_dense_outputs_and_gradients(name, dtype):
    mask = MASKS[name]()
    length = mask.shape[-1]
    tiles = tile_mask(mask, tile=16)
    assert isinstance(tiles, MaskTiles)
    pairs = sum((end - first) * sub.shape[-1] for first, end, _, sub in tiles.tiles)
    assert pairs < 0.75 * length * length  # the point: fewer pairs than the dense mask
    # Block-causal tiles see a prefix of the keys (views); the others gather scattered tiles.
    assert all(isinstance(cols, slice) for _, _, cols, _ in tiles.tiles) == (name == "block-causal")
    q, k, v = _qkv(length, dtype, seed=len(name))
    grad = torch.randn(2, length, q.shape[1] * q.shape[-1],
                       generator=torch.Generator().manual_seed(9)).to(dtype)
    attention, results = Attention(TINY), {}
    for form, m in (("tiled", tiles), ("dense", mask)):
        out = attention._attend(q, k, v, m)  # with gradients: SDPA, per tile or dense
        q_grad, k_grad, v_grad = torch.autograd.grad(out, (q, k, v), grad)
        results[form] = (out, q_grad, k_grad, v_grad)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out = _exact(*exact_inputs, mask)
    exact = (exact_out, *torch.autograd.grad(exact_out, exact_inputs, grad.double()))
    for what, tiled, dense, want in zip(("out", "dq", "dk", "dv"), results["tiled"],
                                        results["dense"], exact):
        assert torch.isfinite(tiled).all(), what
        assert_within_naive_error(tiled, want, dense, f"{name} {dtype} {what}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_attention_without_gradients_takes_the_native_path_per_tile(dtype):
    """No gradients on the CPU: each tile is a dmax.block_attention call where it applies."""
    mask = MASKS["two-half"]()
    q, k, v = (t.detach() for t in _qkv(mask.shape[-1], dtype, seed=5))
    attention, tiles = Attention(TINY), tile_mask(mask, tile=16)  # CPU variant on (default)
    with torch.no_grad(), dmax_calls() as calls:
        tiled = attention._attend(q, k, v, tiles)
        dense = attention._attend(q, k, v, mask)
    assert [name for name, _ in calls] == ["block_attention"] * (len(tiles.tiles) + 1)
    assert_within_naive_error(tiled, _exact(q, k, v, mask), dense, f"{dtype}")


def test_masks_that_stay_dense():
    two_half = two_half_attention_mask(80, 8)
    per_sequence = two_half.expand(2, -1, -1, -1)
    assert tile_mask(per_sequence, tile=16) is per_sequence          # one mask per sequence
    assert tile_mask(two_half, tile=160) is two_half                  # a single tile
    full = torch.ones(1, 1, 96, 96, dtype=torch.bool)
    assert tile_mask(full, tile=16) is full                            # nothing to skip
    blind = two_half.clone()
    blind[..., 16:32, :] = False                                       # a tile that sees no key
    assert tile_mask(blind, tile=16) is blind
    assert tile_mask(None) is None
    elsewhere = two_half.to("meta")                                    # off the CPU
    assert tile_mask(elsewhere, tile=16) is elsewhere


@pytest.fixture(scope="module")
def small():
    return random_model("tiny", dtype=torch.float32, seed=4)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "activation-checkpointing"])
def test_model_forward_and_gradients_with_and_without_tiles(checkpointed, monkeypatch):
    """Training's two-half forward (long enough for several tiles of the default size) against
    the same forward with tiling off: logits and every parameter's gradient agree to float32
    rounding; also with the layers recomputed in backward (the tiles pass through
    torch.utils.checkpoint)."""
    model = random_model("tiny", dtype=torch.float32, seed=4)
    if checkpointed:
        apply_activation_checkpointing(model)
    seq_len = 128  # 256 tokens: 4 query tiles of 64, half the pairs
    ids = torch.randint(0, model.config.vocab_size - 8, (1, 2 * seq_len),
                        generator=torch.Generator().manual_seed(2))
    mask = two_half_attention_mask(seq_len, 8)
    assert isinstance(tile_mask(mask), MaskTiles)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask, position_ids=two_half_position_ids(1, seq_len))
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                 if p.grad is not None}

    tiled_logits, tiled_grads = run()
    monkeypatch.setattr(llada2, "tile_mask", lambda m: m)
    dense_logits, dense_grads = run()
    torch.testing.assert_close(tiled_logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert tiled_grads.keys() == dense_grads.keys() and len(tiled_grads) > 10
    for name in tiled_grads:
        torch.testing.assert_close(tiled_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_logits_rows_are_the_rows_of_the_whole_logits(small):
    ids = torch.randint(0, small.config.vocab_size - 8, (3, 20),
                        generator=torch.Generator().manual_seed(6))
    rows = torch.tensor([59, 0, 21, 21, 40, 7])  # any order, repeats allowed
    with torch.no_grad():
        whole = small(ids, block_length=4)
        chosen = small(ids, block_length=4, logits_rows=rows)
        none = small(ids, block_length=4, logits_rows=rows[:0])
    assert chosen.shape == (6, small.config.vocab_size) and none.shape == (0, small.config.vocab_size)
    torch.testing.assert_close(chosen, whole.reshape(-1, whole.shape[-1])[rows],
                               rtol=1e-5, atol=1e-6)


def test_logits_rows_errors(small):
    ids = torch.zeros(2, 5, dtype=torch.long)
    for bad, match in ((torch.tensor([0.0]), "int64"), (torch.zeros(1, 2, dtype=torch.long), r"\[N\]"),
                       (torch.tensor([10]), "index the 10 tokens"), (torch.tensor([-1]), "got -1"),
                       ([0, 1], "int64")):
        with pytest.raises(ValueError, match=match):
            small(ids, logits_rows=bad)


def _trim_case(model, batch=2, seq_len=96):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size - 8, (batch, 2 * seq_len), generator=gen)
    rows = torch.randperm(batch * 2 * seq_len, generator=gen)[:150]
    rows = torch.cat([rows, rows[:5]])  # any order, repeats
    kwargs = dict(attention_mask=two_half_attention_mask(seq_len, 8),
                  position_ids=two_half_position_ids(batch, seq_len), logits_rows=rows)
    return ids, kwargs


def _logits_and_grads(model, ids, kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kwargs)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def test_last_layer_on_the_read_rows_matches_the_whole_layer(monkeypatch):
    """The last layer's queries, output projection and MLP on the logits' rows only: logits and
    every parameter's gradient as with the whole layer (float32 rounding), rows of both
    sequences in any order with repeats; with and without gradients."""
    model = random_model("tiny", dtype=torch.float32, seed=5)
    ids, kwargs = _trim_case(model)
    calls = []
    real = Attention.forward_rows
    monkeypatch.setattr(Attention, "forward_rows",
                        lambda self, *a: calls.append(1) or real(self, *a))
    trimmed, trimmed_grads = _logits_and_grads(model, ids, kwargs)
    with torch.no_grad():
        trimmed_no_grad = model(ids, **kwargs)
    assert len(calls) == 2  # the last layer only, both times
    monkeypatch.setattr(llada2.DecoderLayer, "forward_rows", lambda *a: None)
    whole, whole_grads = _logits_and_grads(model, ids, kwargs)
    with torch.no_grad():
        whole_no_grad = model(ids, **kwargs)
    torch.testing.assert_close(trimmed, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed_no_grad, whole_no_grad, rtol=1e-5, atol=1e-5)
    assert trimmed_grads.keys() == whole_grads.keys()
    for name in whole_grads:
        torch.testing.assert_close(trimmed_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_last_layer_runs_whole_where_a_hook_or_checkpointing_would_see_it():
    """A hook in the last layer (the expert balancer's router hook) sees every token, as
    without trimming; activation checkpointing (a replaced forward) keeps the whole layer."""
    model = random_model("tiny", dtype=torch.float32, seed=5)
    ids, kwargs = _trim_case(model)
    seen = []
    handle = model.model.layers[-1].mlp.gate.register_forward_hook(
        lambda module, inputs, output: seen.append(output[0].shape[0]))
    model(ids, **kwargs)
    assert seen == [ids.numel()]
    handle.remove()
    apply_activation_checkpointing(model)
    x = torch.randn(2, 10, model.config.hidden_size)
    assert model.model.layers[-1].forward_rows(x, None, None, None, torch.tensor([0])) is None
