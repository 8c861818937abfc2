"""dmax.decoder_layer (CPU): a cached decoder layer as one op gives bitwise the output and the KV
cache of the same layer run module by module on their native forms (its only claim: the same
kernels in the same order); when DecoderLayer takes it and when it keeps its modules; opcheck;
argument errors."""
import pytest
import torch

from dmax_ext import ops
from dmax_ext.model import random_model
from dmax_ext.model.attention import CacheSlots, cached_attention_mask
from dmax_ext.model.modules import Linear, rotary_cos_sin
from dmax_ext.model.native_layer import decoder_layer_args
from dmax_calls import dmax_calls

pytestmark = pytest.mark.skipif(not ops.has_op("decoder_layer"),
                                reason="the native library predates decoder_layer: rebuild")


def _model(preset, dtype):
    return random_model(preset, dtype=dtype, seed=3, lm_head_gain=4.0)


def _decode_forwards(model, fused: bool):
    """A prefill of two blocks, then a block fed as embeddings (a later SPD step), on two rows
    with different valid_from: the logits of both forwards and the cache."""
    for layer in model.model.layers:
        layer.cpu_variant = fused
    gen = torch.Generator().manual_seed(0)
    vocab, block = model.config.vocab_size, 16
    ids = torch.randint(0, vocab - 2, (2, 2 * block), generator=gen)
    embeds = model.embed(torch.randint(0, vocab - 2, (2, block), generator=gen))
    valid_from = torch.tensor([0, 5])
    cache = model.new_cache(2, 3 * block)
    with torch.inference_mode():
        first = model.forward_cached(cache, input_ids=ids,
                                     position_ids=torch.arange(2 * block).expand(2, -1),
                                     write_slot=0, valid_from=valid_from, block_length=block)
        later = model.forward_cached(cache, inputs_embeds=embeds,
                                     position_ids=torch.arange(2 * block, 3 * block).expand(2, -1),
                                     write_slot=2 * block, valid_from=valid_from,
                                     block_length=block)
    return first, later, cache


@pytest.mark.parametrize("preset", ["tiny", "llada2-small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_the_module_path(preset, dtype):
    model = _model(preset, dtype)
    with dmax_calls() as calls:
        fused = _decode_forwards(model, True)
    n_layers = model.config.num_hidden_layers
    assert [name for name, _ in calls].count("decoder_layer") == 2 * n_layers
    modules = _decode_forwards(model, False)
    assert torch.equal(fused[0], modules[0]) and torch.equal(fused[1], modules[1])
    for a, b in zip(fused[2].keys + fused[2].values, modules[2].keys + modules[2].values):
        assert torch.equal(a, b)


def _layer_call(model, layer_index=1, rows=2, length=8):
    """One cached call of a layer (a MoE layer by default), as the model makes it."""
    layer = model.model.layers[layer_index]
    x = model.embed(torch.randint(0, 100, (rows, length)))
    positions = torch.arange(length).expand(rows, -1)
    cos, sin = rotary_cos_sin(positions, model._inv_freq(x.device), x.dtype)
    mask = cached_attention_mask(torch.zeros(rows, dtype=torch.long), torch.arange(length), length,
                                 length)
    keys, values = model.new_cache(rows, length).layer(layer_index)
    return layer, (x, cos, sin, mask, (keys, values), CacheSlots(slice(0, length), length))


def _ran_fused(layer, args, grad=False) -> bool:
    with torch.set_grad_enabled(grad), dmax_calls() as calls:
        layer(*args)
    return any(name == "decoder_layer" for name, _ in calls)


def test_when_the_layer_takes_it_and_when_its_modules_run():
    model = _model("tiny", torch.float32)
    layer, args = _layer_call(model)
    assert _ran_fused(layer, args)
    assert not _ran_fused(layer, args, grad=True)  # gradients: the modules (torch forms)
    layer.cpu_variant = False
    assert not _ran_fused(layer, args)
    layer.cpu_variant = True
    layer.attention.dense.cpu_variant = False  # one module off its native form
    assert not _ran_fused(layer, args)
    layer.attention.dense.cpu_variant = True
    handle = layer.mlp.register_forward_hook(lambda *a: None)  # tensor parallelism, profilers
    assert not _ran_fused(layer, args)
    handle.remove()
    layer.mlp.impl = "reference"
    assert not _ran_fused(layer, args)
    layer.mlp.impl = "auto"
    x, cos, sin, mask, cache_kv, slots = args
    # No cache, or a device write slot (the CUDA-graph form): the modules.
    assert not _ran_fused(layer, (x, cos, sin, mask))
    assert not _ran_fused(layer, (*args[:5], CacheSlots(torch.arange(8), 8)))
    assert _ran_fused(layer, args)


def test_rows_past_the_projection_cap_keep_the_modules(monkeypatch):
    from dmax_ext.model import modules, moe
    for module in (modules, moe):  # the one cap left: bf16 with AMX
        monkeypatch.setattr(module, "has_amx_bf16", lambda: True)
    model = _model("tiny", torch.bfloat16)
    cap = Linear.native_max_rows(torch.bfloat16)
    layer, args = _layer_call(model, rows=1, length=cap)
    assert _ran_fused(layer, args)
    layer, args = _layer_call(model, rows=1, length=cap + 16)
    assert not _ran_fused(layer, args)


@pytest.mark.parametrize("preset", ["tiny", "llada2-small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_a_first_step_trims_the_last_layer_to_the_rows_it_returns(preset, dtype, fused):
    """A block's first step feeds the previous block too, for its keys and values only: with
    n_logits, the last layer computes its attention and MLP on the last n_logits rows alone
    (out_rows), the op and the modules alike. Every kernel computes a row alone, so the logits
    are bitwise the untrimmed forward's rows and the cache the same."""
    model = _model(preset, dtype)
    for layer in model.model.layers:
        layer.cpu_variant = fused
    block, vocab = 16, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        ids = torch.randint(0, vocab - 2, (batch, 3 * block), generator=gen)
        kwargs = dict(position_ids=torch.arange(block, 3 * block).expand(batch, -1),
                      write_slot=block, valid_from=torch.tensor([0, 5][:batch]),
                      block_length=block)
        caches = [model.new_cache(batch, 3 * block) for _ in range(2)]
        with torch.inference_mode():
            for cache in caches:  # the same committed first block in both
                model.forward_cached(cache, input_ids=ids[:, :block], write_slot=0,
                                     position_ids=torch.arange(block).expand(batch, -1),
                                     valid_from=kwargs["valid_from"], block_length=block,
                                     n_logits=0)
            whole = model.forward_cached(caches[0], input_ids=ids[:, block:], **kwargs)
            with dmax_calls() as calls:
                trimmed = model.forward_cached(caches[1], input_ids=ids[:, block:], **kwargs,
                                               n_logits=block)
        assert torch.equal(trimmed, whole[:, block:])
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            assert torch.equal(a, b)
        # (The dispatcher leaves out a trailing argument at its default, out_rows = -1.)
        out_rows = [args[11] if len(args) > 11 else -1 for name, args in calls
                    if name == "decoder_layer"]
        n_layers = model.config.num_hidden_layers
        assert out_rows == ([-1] * (n_layers - 1) + [block] if fused else [])


def test_float16_keeps_the_modules():
    model = _model("tiny", torch.float16)
    layer, args = _layer_call(model)
    assert not _ran_fused(layer, args)


def test_opcheck():
    model = _model("tiny", torch.float32)
    layer, args = _layer_call(model, layer_index=2)
    with torch.no_grad():
        op_args = list(decoder_layer_args(layer, *args))
    op_args = [a.detach() if torch.is_tensor(a) else a for a in op_args]  # plain tensors
    op_args[8] = [w.detach() for w in op_args[8]]
    torch.library.opcheck(torch.ops.dmax.decoder_layer.default, op_args)
    op_args[-1] = 3  # out_rows: the last 3 rows' outputs
    torch.library.opcheck(torch.ops.dmax.decoder_layer.default, op_args)


def test_argument_errors():
    model = _model("tiny", torch.float32)
    layer, (x, cos, sin, mask, (keys, values), _) = _layer_call(model)
    weights = [p for p in layer.parameters()]
    with pytest.raises(RuntimeError, match="dims must hold 6 ints and scalars 5 floats"):
        torch.ops.dmax.decoder_layer(x, cos, sin, mask, keys, values, 0, 8, weights[:9], [4, 2],
                                     [1e-6] * 5)
    with pytest.raises(RuntimeError, match="weights must be the attention's 6"):
        torch.ops.dmax.decoder_layer(x, cos, sin, mask, keys, values, 0, 8, weights[:9],
                                     [4, 2, 16, 4, 2, 4], [1e-6] * 5)
    with pytest.raises(RuntimeError, match=r"the fed slots \[4, 12\) and the span 12 must lie"):
        torch.ops.dmax.decoder_layer(x, cos, sin, mask, keys, values, 4, 12, weights[:8],
                                     [4, 2, 16, 4, 2, 4], [1e-6] * 5)
    for out_rows in (0, 9, -2):
        with pytest.raises(RuntimeError, match=r"out_rows must be -1 \(every fed token\) or in "
                                               r"\[1, 8\]"):
            torch.ops.dmax.decoder_layer(x, cos, sin, mask, keys, values, 0, 8, weights[:8],
                                         [4, 2, 16, 4, 2, 4], [1e-6] * 5, out_rows)
