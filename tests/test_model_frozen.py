"""LLaDA2MoeModel.frozen(): inside it, cached forwards reuse each layer's packed dmax.decoder_layer
arguments and the last forward's mask and rotary tables. Its claims: the same logits and KV cache
bit for bit as without it; the arguments packed once per layer and row count; the tables made
again whenever positions, valid_from or the slots change (by value: the engine rewrites its
buffers in place); hooks set before it honoured; re-entrant and gone at its end; decode() runs
in it."""
import pytest
import torch

from dmax_ext import ops
from dmax_ext.decoding import decode
from dmax_ext.model import llada2, native_layer, random_model
from dmax_calls import dmax_calls

pytestmark = pytest.mark.skipif(not ops.has_op("decoder_layer"),
                                reason="the native library predates decoder_layer: rebuild")

BLOCK = 16


def _model(preset="tiny", dtype=torch.float32):
    return random_model(preset, dtype=dtype, seed=5, lm_head_gain=4.0)


def _forwards(model, seed=0):
    """A decode's kinds of cached forward on two rows with different valid_from: a first step
    over two blocks (half of the logits) and the second block's next step, later steps at the
    same slots
    (embeddings as SPD feeds them), with positions rewritten in place between blocks, and a
    batch of one row. Returns every logits tensor and the caches."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    positions = torch.zeros(2, BLOCK, dtype=torch.long)  # one buffer, rewritten like the engine's
    valid_from = torch.tensor([0, 3])
    cache = model.new_cache(2, 4 * BLOCK)
    out = []
    with torch.inference_mode():
        ids = torch.randint(0, vocab - 2, (2, 2 * BLOCK), generator=gen)
        out.append(model.forward_cached(cache, input_ids=ids,
                                        position_ids=torch.arange(2 * BLOCK).expand(2, -1),
                                        write_slot=0, valid_from=valid_from, block_length=BLOCK,
                                        n_logits=BLOCK))
        # The block's second step: its own slots only, at the first step's span.
        embeds = model.embed(torch.randint(0, vocab - 2, (2, BLOCK), generator=gen))
        out.append(model.forward_cached(cache, inputs_embeds=embeds,
                                        position_ids=torch.arange(BLOCK, 2 * BLOCK).expand(2, -1),
                                        write_slot=BLOCK, valid_from=valid_from,
                                        block_length=BLOCK))
        for block in (2, 3):
            positions.copy_(torch.arange(block * BLOCK, (block + 1) * BLOCK).expand(2, -1))
            for _ in range(3):
                embeds = model.embed(torch.randint(0, vocab - 2, (2, BLOCK), generator=gen))
                out.append(model.forward_cached(cache, inputs_embeds=embeds,
                                                position_ids=positions,
                                                write_slot=block * BLOCK,
                                                valid_from=valid_from, block_length=BLOCK))
        single = model.new_cache(1, 2 * BLOCK)
        out.append(model.forward_cached(single, input_ids=ids[:1],
                                        position_ids=torch.arange(2 * BLOCK)[None],
                                        write_slot=0, valid_from=valid_from[:1],
                                        block_length=BLOCK))
    return out, [cache, single]


def _assert_same(a, b):
    (logits_a, caches_a), (logits_b, caches_b) = a, b
    assert len(logits_a) == len(logits_b)
    for x, y in zip(logits_a, logits_b):
        assert torch.equal(x, y)
    for ca, cb in zip(caches_a, caches_b):
        for x, y in zip(ca.keys + ca.values, cb.keys + cb.values):
            assert torch.equal(x, y)


@pytest.mark.parametrize("preset", ["tiny", "llada2-small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_the_forwards_without_it(preset, dtype):
    model = _model(preset, dtype)
    plain = _forwards(model)
    with model.frozen():
        frozen = _forwards(model)
        again = _forwards(model)  # everything kept from the first round
    _assert_same(plain, frozen)
    _assert_same(plain, again)


def test_arguments_packed_once_per_layer(monkeypatch):
    model = _model()
    plans = []
    layer_plan = native_layer.layer_plan
    monkeypatch.setattr(native_layer, "layer_plan",
                        lambda layer, x, **kw: plans.append(x.shape[0] * x.shape[1])
                        or layer_plan(layer, x, **kw))
    with model.frozen(), dmax_calls() as calls:
        _forwards(model)
        _forwards(model)
    n_layers = model.config.num_hidden_layers
    # Two row counts (2 x 32; 2 x 16 and 1 x 32), the arguments packed once per layer over both
    # rounds: they do not depend on the row count.
    assert len(plans) == n_layers
    assert [name for name, _ in calls].count("decoder_layer") == 2 * 9 * n_layers
    plans.clear()
    _forwards(model)  # outside: packed at every call again
    assert len(plans) == 9 * n_layers


def test_row_caps_decided_per_row_count(monkeypatch):
    """The packed arguments serve every row count, but a count past a module's row cap keeps the
    modules (here a projection cap of 40 rows: 2 x 16 and 1 x 32 fit, 2 x 32 do not)."""
    from dmax_ext.model.modules import Linear
    cap = Linear.native_max_rows
    monkeypatch.setattr(Linear, "native_max_rows",
                        staticmethod(lambda dtype: 40 if dtype == torch.float32 else cap(dtype)))
    model = _model()
    plain = _forwards(model)
    with model.frozen(), dmax_calls() as calls:
        frozen = _forwards(model)
    _assert_same(plain, frozen)
    fused_rows = [args[0].shape[0] * args[0].shape[1] for name, args in calls
                  if name == "decoder_layer"]
    # Every forward of 32 rows (2 x 16, and the single row's 1 x 32), not the first step's 64.
    assert set(fused_rows) == {32} and len(fused_rows) == 8 * model.config.num_hidden_layers


def test_mask_and_rotary_made_again_when_positions_or_slots_change(monkeypatch):
    model = _model()
    made = []
    mask = llada2.cached_attention_mask
    monkeypatch.setattr(llada2, "cached_attention_mask",
                        lambda valid_from, *a: made.append(valid_from.tolist()) or mask(valid_from, *a))
    with model.frozen():
        _forwards(model)
    # The first step over two blocks (the second block's next step takes its last rows), one
    # per later block (its three steps share them: the second block's positions were written
    # into the same tensor), the single row.
    assert len(made) == 4
    made.clear()
    with model.frozen():
        cache = model.new_cache(1, 2 * BLOCK)
        ids = torch.zeros(1, BLOCK, dtype=torch.long)
        with torch.inference_mode():
            for valid_from in ([0], [0], [1]):  # the same slots, valid_from changed by value
                model.forward_cached(cache, input_ids=ids, position_ids=torch.arange(BLOCK)[None],
                                     write_slot=0, valid_from=torch.tensor(valid_from),
                                     block_length=BLOCK)
            model.forward_cached(cache, input_ids=ids, position_ids=torch.arange(BLOCK)[None],
                                 write_slot=0, valid_from=torch.tensor([1]), block_length=BLOCK,
                                 span=2 * BLOCK)  # another span
    assert made == [[0], [1], [1]]


def test_hooks_set_before_it_are_honoured():
    model = _model()
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda *a: seen.append(1))
    plain = _forwards(model)
    count = len(seen)
    with model.frozen(), dmax_calls() as calls:
        frozen = _forwards(model)
    handle.remove()
    _assert_same(plain, frozen)
    assert len(seen) == 2 * count == 2 * 9  # the hooked layer ran as a module every time
    n_layers = model.config.num_hidden_layers
    assert [name for name, _ in calls].count("decoder_layer") == 9 * (n_layers - 1)


def test_final_norm_and_lm_head_called_directly_unless_hooked():
    """Inside it the final norm and lm_head run as their ops without the module calls; a hook on
    either keeps both modules, and runs."""
    model = _model()
    ran = []
    for module in (model.lm_head, model.model.norm):
        module.forward = lambda x, forward=module.forward: ran.append(1) or forward(x)
    _forwards(model)
    assert len(ran) == 2 * 9  # each of the 9 forwards gives logits
    ran.clear()
    with model.frozen(), dmax_calls() as calls:
        _forwards(model)
    names = [name for name, _ in calls]
    assert ran == [] and names.count("rms_norm") == names.count("skinny_linear") == 9
    for module in (model.lm_head, model.model.norm):
        seen = []
        handle = module.register_forward_hook(lambda *a: seen.append(1))
        plain = _forwards(model)
        with model.frozen():
            frozen = _forwards(model)
        handle.remove()
        _assert_same(plain, frozen)
        assert len(seen) == 2 * 9  # every forward gives logits: the module ran each time


def test_reentrant_and_gone_at_its_end():
    model = _model()
    with model.frozen():
        state = model._frozen
        with model.frozen():
            assert model._frozen is state
        assert model._frozen is state
    assert model._frozen is None
    with pytest.raises(RuntimeError, match="inside"):
        with model.frozen():
            raise RuntimeError("inside")
    assert model._frozen is None


def test_gradients_keep_the_modules():
    model = _model()
    cache = model.new_cache(1, BLOCK)
    with model.frozen(), dmax_calls() as calls:
        logits = model.forward_cached(cache, input_ids=torch.zeros(1, BLOCK, dtype=torch.long),
                                      position_ids=torch.arange(BLOCK)[None], write_slot=0,
                                      valid_from=torch.tensor([0]), block_length=BLOCK)
    assert logits.requires_grad and "decoder_layer" not in [name for name, _ in calls]


def test_decode_runs_inside_it(monkeypatch):
    model = _model()
    states = []
    forward_cached = model.forward_cached
    monkeypatch.setattr(model, "forward_cached",
                        lambda *a, **k: states.append(model._frozen) or forward_cached(*a, **k))
    decode(model, [[1, 2, 3]], gen_length=2 * BLOCK, block_length=BLOCK)
    assert states and all(s is not None and s is states[0] for s in states)
    assert model._frozen is None
