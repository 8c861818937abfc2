"""The routed experts' packed copy for the CPU kernel's bf16 dot products
(StackedExperts.kernel_weights, DMAX_CPU_PACKED_EXPERTS): made when the switch and the kernel's
form say so, reused while the parameters stay, made again when they change; a decode's logits and
cache are bitwise the same with and without it."""
import pytest
import torch

from dmax_ext import ops
from dmax_ext.model import PRESETS, random_model
from dmax_ext.model import native
from dmax_ext.model.moe import StackedExperts
from cpu_flags import needs_bf16_dot
from dmax_calls import dmax_calls

pytestmark = pytest.mark.skipif(not ops.has_op("cpu_bf16_dot"),
                                reason="the native library predates cpu_bf16_dot: rebuild")


def _experts(config=PRESETS["tiny"], dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    experts = StackedExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts.to(dtype)


def _routing(experts, n_tokens=11, k=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    n_experts, hidden = experts.gate_up_proj.shape[:2]
    x = torch.randn(n_tokens, hidden, generator=gen).to(experts.gate_up_proj.dtype)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(n_tokens)])
    return x, ids, torch.rand(n_tokens, k, generator=gen)


@needs_bf16_dot
def test_packed_once_kept_while_the_switch_is_off_and_reused(monkeypatch):
    experts = _experts()
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "on")
    gate_up, down = experts.kernel_weights()
    assert torch.equal(gate_up, ops.pack_moe_weights(experts.gate_up_proj))
    assert torch.equal(down, ops.pack_moe_weights(experts.down_proj))
    again = experts.kernel_weights()
    assert again[0] is gate_up and again[1] is down
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "off")
    plain = experts.kernel_weights()
    assert plain[0] is experts.gate_up_proj and plain[1] is experts.down_proj
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "auto")  # tiny's experts are under its bound
    assert experts.kernel_weights()[0] is gate_up
    monkeypatch.setattr(native, "PACKED_EXPERTS_AUTO_MAX_BYTES", 1000)  # now over it
    assert experts.kernel_weights()[0] is experts.gate_up_proj


@needs_bf16_dot
def test_a_changed_parameter_is_packed_again(monkeypatch):
    # An optimizer step or a load writes the parameters in place (their version counters move):
    # the kernel must read the new values, not the copy of the old ones.
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "on")
    experts = _experts()
    x, ids, weights = _routing(experts)
    with torch.no_grad():
        before = experts(x, ids, weights, "cpu")
        experts.down_proj.mul_(0.5)
        after = experts(x, ids, weights, "cpu")
        experts.load_state_dict(_experts(seed=7).state_dict())
        loaded = experts(x, ids, weights, "cpu")
        monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "off")
        loaded_plain = experts(x, ids, weights, "cpu")
    assert not torch.equal(after, before)
    assert torch.equal(loaded, loaded_plain)
    assert experts.kernel_weights()[0] is experts.gate_up_proj


def test_parameters_where_packing_does_not_apply(monkeypatch):
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "on")
    def assert_plain(experts):
        gate_up, down = experts.kernel_weights()
        assert gate_up is experts.gate_up_proj and down is experts.down_proj
    assert_plain(_experts(dtype=torch.float32))                       # not bf16
    assert_plain(_experts(PRESETS["tiny"].replace(hidden_size=40)))   # H not blocks of 32
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "off")                   # no dot products
    assert_plain(_experts())


def test_the_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "yes")
    with pytest.raises(ValueError, match="DMAX_CPU_PACKED_EXPERTS must be auto, on or off"):
        _experts().kernel_weights()


def _decode_forwards(model):
    """A prefill and a later block step fed as embeddings: their logits and the cache."""
    gen = torch.Generator().manual_seed(0)
    vocab, block = model.config.vocab_size, 16
    ids = torch.randint(0, vocab - 2, (2, block), generator=gen)
    embeds = model.embed(torch.randint(0, vocab - 2, (2, block), generator=gen))
    cache = model.new_cache(2, 2 * block)
    valid_from = torch.tensor([0, 3])
    with torch.inference_mode():
        first = model.forward_cached(cache, input_ids=ids,
                                     position_ids=torch.arange(block).expand(2, -1),
                                     write_slot=0, valid_from=valid_from, block_length=block)
        later = model.forward_cached(cache, inputs_embeds=embeds,
                                     position_ids=torch.arange(block, 2 * block).expand(2, -1),
                                     write_slot=block, valid_from=valid_from, block_length=block)
    return [first, later, *cache.keys, *cache.values]


@needs_bf16_dot
@pytest.mark.parametrize("layer_op", [True, False])
def test_a_decode_is_bitwise_the_same_packed_or_not(monkeypatch, layer_op):
    # Through dmax.decoder_layer (the layer as one op) and through the modules.
    model = random_model("tiny", dtype=torch.bfloat16, seed=3, lm_head_gain=4.0)
    for layer in model.model.layers:
        layer.cpu_variant = layer_op
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "off")
    plain = _decode_forwards(model)
    monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", "on")
    with dmax_calls() as calls:
        packed = _decode_forwards(model)
    op = "decoder_layer" if layer_op else "moe_experts"
    tensors = [a for name, args in calls if name == op for a in args
               for a in (a if isinstance(a, (list, tuple)) else [a])]
    assert any(isinstance(t, torch.Tensor) and t.dim() == 5 for t in tensors), \
        f"{op} got no packed weights"
    for a, b in zip(packed, plain):
        assert torch.equal(a, b)
