"""dmax.swiglu (CPU), a gated MLP's silu(gate) * up over rows [gate | up]: against a float64
computation of the formula within 2x the error of the torch formulation (F.silu(gate) * up) in
the same dtype, and bitwise that formulation where torch runs it on whole vectors; strided
inputs; every capability copy; what GatedMLP and the layer op pick (its gate and up as one
product); opcheck; argument errors."""
import pytest
import torch
import torch.nn.functional as F

from dmax_ext import ops
from dmax_ext.model import PRESETS, random_model
from dmax_ext.model.modules import GatedMLP
from dmax_ext.reference import swiglu_reference
from cpu_flags import OTHER_CAPABILITIES, run_on_capability
from dmax_calls import dmax_calls
from tolerances import assert_within_naive_error

pytestmark = pytest.mark.skipif(not ops.has_op("swiglu"),
                                reason="the native library predates swiglu: rebuild")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Widths with whole vectors, pairs of vectors and a partial last vector (16 float32 lanes on
# AVX512, 8 on AVX2): 1, 17, 20, 64 and llada2-small's 128 and 1408.
SHAPES = [(32, 256), (3, 7, 40), (5, 2), (1, 34), (2, 128), (32, 2816)]


def _case(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    return (4 * torch.randn(shape, generator=gen)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_formula_within_naive_error(dtype, shape):
    gate_up = _case(shape, dtype)
    got = ops.swiglu(gate_up)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    assert got.is_contiguous()
    assert_within_naive_error(got, swiglu_reference(gate_up.double()), swiglu_reference(gate_up),
                              f"{dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 256), (4, 128), (16, 2816)])
def test_bitwise_the_torch_formulation_on_whole_vectors(dtype, shape):
    """Contiguous halves whose size is a multiple of 64 (torch's CPU silu and mul run them on
    whole vectors, the same exp): the same roundings give the same bits, which is what keeps
    the layer op and the module path (both on this op) equal to the older silu-then-mul path."""
    gate_up = _case(shape, dtype, seed=1)
    gate, up = (half.contiguous() for half in gate_up.chunk(2, dim=-1))
    assert torch.equal(ops.swiglu(gate_up), F.silu(gate) * up)


def test_reads_strided_inputs_as_their_values():
    gate_up = _case((6, 9, 48), torch.bfloat16)[:, ::2]  # a row stride that is not the width
    assert torch.equal(ops.swiglu(gate_up), ops.swiglu(gate_up.contiguous()))
    wide = _case((5, 100), torch.float32)[:, 10:90]  # rows of 80 inside rows of 100
    assert torch.equal(ops.swiglu(wide), ops.swiglu(wide.contiguous()))


_CAPABILITY_SCRIPT = """
import torch
from test_model_swiglu import SHAPES, _case
from dmax_ext.reference import swiglu_reference
from tolerances import assert_within_naive_error
print(torch.backends.cpu.get_cpu_capability())
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in SHAPES:
        gate_up = _case(shape, dtype)
        assert_within_naive_error(torch.ops.dmax.swiglu(gate_up),
                                  swiglu_reference(gate_up.double()), swiglu_reference(gate_up),
                                  f"{dtype} {shape}")
"""


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_other_cpu_capabilities(capability):
    run_on_capability(capability, _CAPABILITY_SCRIPT)


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = PRESETS["tiny"]
    mlp = GatedMLP(config.hidden_size, 3 * config.hidden_size // 2).to(dtype)
    return mlp, torch.randn(2, 5, config.hidden_size).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_fuses_gate_and_up_without_grad_and_runs_torch_with_grad(dtype):
    mlp, x = _mlp(dtype)
    with torch.no_grad(), dmax_calls() as calls:
        fast = mlp(x)
    assert [name for name, _ in calls] == ["skinny_linear", "swiglu", "skinny_linear"]
    gate_up_weight = calls[0][1][1]
    assert torch.equal(gate_up_weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    with dmax_calls() as calls:
        slow = mlp(x)  # the parameters want gradients: the torch formulation
    assert calls == [] and slow.grad_fn is not None
    exact = mlp.down_proj.weight.double() @ swiglu_reference(torch.cat(
        [x.double() @ mlp.gate_proj.weight.double().t(),
         x.double() @ mlp.up_proj.weight.double().t()], -1))[..., None]
    assert_within_naive_error(fast, exact[..., 0], slow.detach(), f"GatedMLP {dtype}")


def test_gated_mlp_keeps_its_projections_for_hooks_and_off_variants():
    mlp, x = _mlp()
    seen = []
    handle = mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), dmax_calls() as calls:
        hooked = mlp(x)
    handle.remove()
    assert seen == [(2, 5, mlp.up_proj.out_features)]
    assert [name for name, _ in calls] == ["skinny_linear"] * 3  # each projection, then torch silu
    mlp.cpu_variant = False
    with torch.no_grad(), dmax_calls() as calls:
        off = mlp(x)
    assert [name for name, _ in calls] == ["skinny_linear"] * 3
    mlp.cpu_variant = True
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), hooked, rtol=0, atol=0)
        torch.testing.assert_close(off, hooked, rtol=0, atol=0)


def test_gated_mlp_stacked_weights_follow_the_parameters():
    """The stacked gate|up copy is remade when a parameter changes (an optimizer step, a load)."""
    mlp, x = _mlp()

    def fresh(state):  # the same weights in a module that never made a copy
        other = _mlp(seed=2)[0]
        other.load_state_dict(state)
        return other(x)

    with torch.no_grad():
        before = mlp(x)
        mlp.up_proj.weight.mul_(2.0)  # in place: the version counter moves
        after = mlp(x)
        assert torch.equal(after, fresh(mlp.state_dict())) and not torch.equal(after, before)
        new_state = _mlp(seed=1)[0].state_dict()
        mlp.load_state_dict(new_state)
        assert torch.equal(mlp(x), fresh(new_state))


def test_the_layer_op_gets_the_stacked_weights():
    model = random_model("tiny", dtype=torch.float32, seed=3)
    dense, shared = model.model.layers[0].mlp, model.model.layers[1].mlp.shared_experts
    cache = model.new_cache(1, 16)
    ids = torch.randint(0, model.config.vocab_size - 2, (1, 8))
    with torch.inference_mode(), dmax_calls() as calls:
        model.forward_cached(cache, input_ids=ids, position_ids=torch.arange(8)[None],
                             write_slot=0, valid_from=torch.tensor([0]), block_length=8)
    layer_weights = [args[8] for name, args in calls if name == "decoder_layer"]
    assert len(layer_weights) == model.config.num_hidden_layers
    for weights, mlp in ((layer_weights[0], dense), (layer_weights[1], shared)):
        assert torch.equal(weights[-2], mlp.gate_up_weight())
        assert torch.equal(weights[-1], mlp.down_proj.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.dmax.swiglu.default, (_case((3, 4, 32), dtype),))


def test_argument_errors():
    with pytest.raises(ValueError, match=r"gate_up must be \[\.\.\., 2I\]"):
        ops.swiglu(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"gate_up must be \[\.\.\., 2I\]"):
        ops.swiglu(torch.tensor(1.0))
    with pytest.raises(TypeError, match="gate_up must have dtype"):
        ops.swiglu(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"swiglu: gate_up must be \[\.\.\., 2I\]"):
        torch.ops.dmax.swiglu(torch.randn(3, 7))
    with pytest.raises(RuntimeError, match="swiglu: gate_up must be float32"):
        torch.ops.dmax.swiglu(torch.ones(3, 8, dtype=torch.int64))
