"""dmax.block_attention (CPU), a decoding block's attention over the KV cache: against a float64
computation of the same softmax attention within 2x the error of SDPA in the same dtype; GQA
groups, every tail of S and D, strided cache slices, per-sequence and shared masks, rows that
may attend nothing; what Attention picks with and without gradients; opcheck; argument errors."""
import pytest
import torch
import torch.nn.functional as F

from dmax_ext import ops
from dmax_ext.model import PRESETS
from dmax_ext.model.attention import Attention, cached_attention_mask
from dmax_ext.model.modules import rotary_cos_sin, rotary_inv_freq
from dmax_ext.reference import block_attention_reference
from cpu_flags import HAS_BF16_DOT, OTHER_CAPABILITIES, run_on_capability
from dmax_calls import dmax_calls
from tolerances import assert_within_naive_error

pytestmark = pytest.mark.skipif(not ops.has_op("block_attention"),
                                reason="the native library predates block_attention: rebuild")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(dtype, batch=2, heads=8, kv_heads=2, length=32, slots=100, dim=64, max_slots=None,
          shared_mask=False, seed=0):
    """q [B, heads, T, D] and a KV cache slice [B, kv, S, D] of a longer cache (strided, as the
    model reads it), with a decoding mask (cached_attention_mask: per-sequence first slots)."""
    gen = torch.Generator().manual_seed(seed)
    max_slots = max_slots or slots + 7
    q = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    cache = torch.randn(2, batch, kv_heads, max_slots, dim, generator=gen).to(dtype)
    keys, values = cache[0][:, :, :slots], cache[1][:, :, :slots]
    valid_from = torch.randint(0, max(1, slots - length), (1 if shared_mask else batch,),
                               generator=gen)
    fed = torch.arange(slots - length, slots)
    mask = cached_attention_mask(valid_from, fed, slots, max(1, length))
    return q, keys, values, mask, dim ** -0.5


def _exact(case):
    """The reference on float64 copies of a case's tensors: the tests' exact values."""
    return block_attention_reference(*(t.double() if torch.is_tensor(t) and t.is_floating_point()
                                       else t for t in case))


def _sdpa(q, keys, values, mask, scale):
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [dict(), dict(slots=33), dict(slots=320, batch=1),
                                  dict(dim=24, slots=17, length=9), dict(heads=3, kv_heads=3),
                                  dict(heads=6, kv_heads=1, length=1, slots=1),
                                  dict(dim=128, heads=4, shared_mask=True)])
def test_matches_float64_attention_within_sdpa_error(dtype, dims):
    case = _case(dtype, **dims)
    got = ops.block_attention(*case)
    q = case[0]
    assert got.dtype == dtype and got.shape == (q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
    assert_within_naive_error(got, _exact(case), _sdpa(*case), f"{dtype} {dims}")


_CAPABILITY_SCRIPT = """
import torch
from test_model_block_attention import _case, _exact, _sdpa
from tolerances import assert_within_naive_error
print(torch.backends.cpu.get_cpu_capability())
for dtype in (torch.float32, torch.bfloat16):
    for dims in (dict(), dict(slots=33), dict(dim=24, slots=17, length=9)):
        case = _case(dtype, **dims)
        got = torch.ops.dmax.block_attention(*case)
        assert_within_naive_error(got, _exact(case), _sdpa(*case), str(dtype) + str(dims))
"""


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_other_cpu_capabilities(capability):
    """The kernel is compiled per capability; ATEN_CPU_CAPABILITY selects the copy."""
    run_on_capability(capability, _CAPABILITY_SCRIPT)


def test_a_query_that_may_attend_nothing_gets_zeros_and_its_neighbours_are_unaffected():
    q, keys, values, mask, scale = _case(torch.float32, slots=40, length=8)
    mask = mask.clone()
    mask[1, 0, 3] = False
    got = ops.block_attention(q, keys, values, mask, scale)
    assert got[1, 3].eq(0).all() and got.isfinite().all()
    torch.testing.assert_close(got, block_attention_reference(q, keys, values, mask, scale),
                               rtol=1e-5, atol=1e-6)


def test_strided_slices_read_like_contiguous_copies():
    q, keys, values, mask, scale = _case(torch.float32, slots=50, length=16, max_slots=96)
    want = ops.block_attention(q.contiguous(), keys.contiguous(), values.contiguous(), mask, scale)
    torch.testing.assert_close(ops.block_attention(q, keys, values, mask, scale), want,
                               rtol=0, atol=0)


def test_attention_uses_it_without_grad_and_sdpa_with_grad():
    torch.manual_seed(0)
    config = PRESETS["tiny"]
    attention = Attention(config)
    x = torch.randn(2, 6, config.hidden_size)
    cos, sin = rotary_cos_sin(torch.arange(6).expand(2, 6),
                              rotary_inv_freq(config.rotary_dim, config.rope_theta), x.dtype)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    def ran(calls):
        return [name for name, _ in calls if name == "block_attention"]
    with torch.no_grad(), dmax_calls() as calls:
        fast = attention(x, cos, sin, mask)
        full = attention(x, cos, sin, None)  # no mask: SDPA's full attention
    assert len(ran(calls)) == 1
    with dmax_calls() as calls:
        slow = attention(x, cos, sin, mask)
    assert ran(calls) == [] and slow.grad_fn is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    assert full.shape == fast.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.dmax.block_attention.default,
                          _case(dtype, batch=2, slots=20, length=4, dim=16))


def test_argument_errors():
    q, keys, values, mask, scale = _case(torch.float32, slots=20, length=4, dim=16)
    with pytest.raises(TypeError, match="keys must have dtype"):
        ops.block_attention(q, keys.double(), values, mask, scale)
    with pytest.raises(ValueError, match=r"keys must have shape \(2, kv_heads, S, 16\)"):
        ops.block_attention(q, keys[..., :8], values, mask, scale)
    with pytest.raises(ValueError, match="values must have shape"):
        ops.block_attention(q, keys, values[:, :, :10], mask, scale)
    with pytest.raises(ValueError, match=r"must be a multiple of keys' kv_heads \(3\)"):
        k3 = torch.randn(2, 3, 20, 16)
        ops.block_attention(q, k3, k3.clone(), mask, scale)
    with pytest.raises(ValueError, match=r"mask must have shape \(2 or 1, 1, 4, 20\)"):
        ops.block_attention(q, keys, values, mask[..., :10], scale)
    with pytest.raises(TypeError, match="mask must have dtype"):
        ops.block_attention(q, keys, values, mask.float(), scale)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        ops.block_attention(q.transpose(2, 3), keys, values, mask, scale)
    with pytest.raises(RuntimeError, match="block_attention: mask must be bool"):
        torch.ops.dmax.block_attention(q, keys, values, mask[..., :10], scale)


@pytest.mark.parametrize("switch", ["off", "on"])
@pytest.mark.parametrize("dims", [dict(), dict(slots=33, length=5), dict(dim=128, heads=4),
                                  dict(slots=1, length=1, heads=2, kv_heads=1, dim=32)])
def test_bf16_float_and_dot_forms_within_sdpa_error(monkeypatch, switch, dims):
    """DMAX_CPU_BF16_DOT (cpu_features.h) picks the bf16 form: float32 FMAs, or AVX512-BF16
    dot products with p rounded to bf16 for p . v (as SDPA's bf16 kernel rounds it)."""
    if switch == "on" and not HAS_BF16_DOT:
        pytest.skip("this CPU (or torch's capability) has no AVX512-BF16: the dot form cannot run")
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", switch)
    case = _case(torch.bfloat16, **dims)
    assert_within_naive_error(ops.block_attention(*case), _exact(case), _sdpa(*case),
                              f"{switch} {dims}")

