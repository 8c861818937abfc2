"""dmax.moe_experts (CPU): against a float64 computation of the same formula within 2x the error of
the torch formulation (model/moe.py, impl "reference"); at any routing skew and width (vector
tails); bfloat16 in both GEMM forms (DMAX_CPU_BF16_DOT: float32 FMAs, AVX512-BF16 dot products),
from plain or packed weights (ops.pack_moe_weights: bitwise the same); what the model's MoE picks;
opcheck; argument errors."""

import pytest
import torch

from dmax_ext import ops
from dmax_ext.model import PRESETS
from dmax_ext.model.moe import MoeBlock, StackedExperts
from cpu_flags import HAS_BF16_DOT, OTHER_CAPABILITIES, run_on_capability
from dmax_calls import dmax_calls
from tolerances import assert_within_naive_error

pytestmark = pytest.mark.skipif(not ops.has_op("moe_experts"),
                                reason="the native library predates moe_experts: rebuild")


@pytest.fixture(params=["off", "on"])
def bf16_dot(request, monkeypatch):
    """DMAX_CPU_BF16_DOT for the bfloat16 cases: off (float32 FMAs) and on (dot products)."""
    if request.param == "on" and not HAS_BF16_DOT:
        pytest.skip("AVX512-BF16 dot products need the AVX512 capability and a CPU with avx512_bf16")
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", request.param)
    return request.param


def _case(n_tokens, n_experts, hidden, inter, k, dtype, busy=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    busy = busy or n_experts
    pool = torch.randperm(n_experts, generator=gen)[:busy]
    ids = torch.stack([pool[torch.randperm(busy, generator=gen)[:k]] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, k, generator=gen)
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    gate_up = (torch.randn(n_experts, hidden, 2 * inter, generator=gen) / hidden ** 0.5).to(dtype)
    down = (torch.randn(n_experts, inter, hidden, generator=gen) / inter ** 0.5).to(dtype)
    return x, ids.reshape(n_tokens, k), weights, gate_up, down


def _torch_formulation(x, ids, weights, gate_up, down):
    experts = StackedExperts(PRESETS["tiny"].replace(
        num_experts=gate_up.shape[0], hidden_size=x.shape[1],
        moe_intermediate_size=down.shape[1], n_group=1, topk_group=1,
        num_experts_per_tok=ids.shape[1]))
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up.float())
        experts.down_proj.copy_(down.float())
        experts.to(x.dtype)
        return experts(x, ids, weights, "reference")


def _exact(x, ids, weights, gate_up, down):
    """The formula in float64, no intermediate rounding."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    out = torch.zeros_like(x)
    inter = down.shape[1]
    for n in range(x.shape[0]):
        for e, w in zip(ids[n].tolist(), weights[n].double()):
            gu = x[n] @ gate_up[e]
            out[n] += w * ((torch.nn.functional.silu(gu[:inter]) * gu[inter:]) @ down[e])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens,busy", [(1, None), (7, 5), (37, None), (64, 4)])
def test_matches_the_formula_within_naive_error(dtype, n_tokens, busy):
    case = _case(n_tokens, 16, 64, 32, 4, dtype, busy=busy, seed=n_tokens)
    got = ops.moe_experts(*case)
    assert got.dtype == dtype and got.shape == case[0].shape
    assert_within_naive_error(got, _exact(*case), _torch_formulation(*case),
                              f"{dtype} N={n_tokens}")


@pytest.mark.parametrize("n_tokens,busy", [(1, None), (7, 5), (37, None), (64, 4)])
def test_bf16_matches_the_formula_within_naive_error(bf16_dot, n_tokens, busy):
    case = _case(n_tokens, 16, 64, 32, 4, torch.bfloat16, busy=busy, seed=n_tokens)
    got = ops.moe_experts(*case)
    assert got.dtype == torch.bfloat16 and got.shape == case[0].shape
    assert_within_naive_error(got, _exact(*case), _torch_formulation(*case),
                              f"bf16 dot={bf16_dot} N={n_tokens}")


def test_widths_that_are_not_vector_multiples():
    case = _case(9, 5, 40, 12, 3, torch.float32, seed=3)  # H = 40, I = 12: every loop has a tail
    assert_within_naive_error(ops.moe_experts(*case), _exact(*case), _torch_formulation(*case),
                              "float32 tails")


# (H, I): every tail of the bf16 GEMMs. The dot products pair weight rows k, k + 1 and load 32
# columns at a time (tiles of 64): odd K is a last row paired with zeros, a width not a multiple
# of 32 a masked block; H = 517 and I = 40 make several panels (the last one odd).
@pytest.mark.parametrize("hidden,inter", [(40, 12), (41, 13), (100, 40), (96, 48), (517, 40)])
def test_bf16_widths_that_are_not_vector_multiples(bf16_dot, hidden, inter):
    case = _case(9, 5, hidden, inter, 3, torch.bfloat16, seed=hidden)
    assert_within_naive_error(ops.moe_experts(*case), _exact(*case), _torch_formulation(*case),
                              f"bf16 dot={bf16_dot} H={hidden} I={inter}")


def test_bf16_experts_with_none_one_or_many_rows(bf16_dot):
    # 17 tokens x 2 slots over 6 experts: expert 0 takes every token's first slot (17 rows: a full
    # row tile and a partial one), expert 1 one row, expert 5 none.
    x, _, weights, gate_up, down = _case(17, 6, 72, 24, 2, torch.bfloat16, seed=9)
    ids = torch.stack([torch.zeros(17, dtype=torch.long),
                       torch.tensor([1] + [2, 3, 4] * 5 + [2])], dim=1)
    case = (x, ids, weights, gate_up, down)
    assert_within_naive_error(ops.moe_experts(*case), _exact(*case), _torch_formulation(*case),
                              f"bf16 dot={bf16_dot} skewed")


def _skewed_case(n_tokens, n_experts, busy, dtype, seed):
    """k = 4 slots a token over `busy` of the experts, skewed as a decoding block's routing: a
    few experts take most rows (geometric weights), the rest one row or a few."""
    x, _, weights, gate_up, down = _case(n_tokens, n_experts, 64, 32, 4, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pool = torch.randperm(n_experts, generator=gen)[:busy]
    odds = 0.6 ** torch.arange(busy, dtype=torch.float64)
    ids = torch.stack([pool[torch.multinomial(odds, min(4, busy), generator=gen)]
                       for _ in range(n_tokens)])
    return x, ids, weights[:, :ids.shape[1]].contiguous(), gate_up, down


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("n_tokens,busy", [(1, 1), (3, 2), (40, 24), (40, 64)])
def test_threads_share_the_experts_each_once(bf16_dot, threads, n_tokens, busy):
    """The busy experts are split over the threads by estimated work, and a thread done with its
    share claims what the others have not started: whatever the thread count (more threads than
    busy experts too) and the skew, every expert runs exactly once, so the output is bitwise the
    one-thread output (the op's work buffer is not zero-filled: a skipped expert leaves garbage)."""
    case = _skewed_case(n_tokens, 64, busy, torch.bfloat16, seed=n_tokens + busy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.moe_experts(*case)
        torch.set_num_threads(threads)
        for _ in range(3):  # the claims race differently from run to run
            assert torch.equal(ops.moe_experts(*case), alone), f"{threads} threads"
    finally:
        torch.set_num_threads(before)
    assert_within_naive_error(alone, _exact(*case), _torch_formulation(*case),
                              f"bf16 dot={bf16_dot} skewed over {busy} experts")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(200, 100), (256, 128), (517, 72)])
def test_experts_of_one_or_two_rows_in_wide_strips(bf16_dot, dtype, hidden, inter):
    # Experts with at most 2 routed rows run strips of 128 columns; widths past them end in
    # 32-column blocks and a tail. 3 tokens x 3 slots over 8 experts: expert 0 takes tokens
    # 0 and 1, the others one row or none.
    if dtype != torch.bfloat16 and bf16_dot == "on":
        pytest.skip("the dot-product form is bf16's")
    x, _, weights, gate_up, down = _case(3, 8, hidden, inter, 3, dtype, seed=hidden)
    ids = torch.tensor([[0, 1, 2], [0, 3, 4], [5, 6, 7]])
    case = (x, ids, weights, gate_up, down)
    assert_within_naive_error(ops.moe_experts(*case), _exact(*case), _torch_formulation(*case),
                              f"{dtype} dot={bf16_dot} H={hidden} I={inter} wide strips")


def test_pack_moe_weights_lays_out_pairs_of_rows_in_32_column_blocks():
    w = torch.randn(3, 6, 64).bfloat16()
    packed = ops.pack_moe_weights(w)
    assert packed.shape == (3, 2, 3, 32, 2) and packed.is_contiguous()
    for e, k, j in ((0, 0, 0), (1, 5, 63), (2, 2, 33), (2, 3, 31)):
        assert packed[e, j // 32, k // 2, j % 32, k % 2] == w[e, k, j]
    assert torch.equal(ops.unpack_moe_weights(packed), w)
    assert ops.moe_weights_packable(w) and not ops.moe_weights_packable(w.float())
    assert not ops.moe_weights_packable(w[:, :5]) and not ops.moe_weights_packable(w[..., :48])


# (E, K, N): one block column and several, widths past the 16 (8) columns of a vector step,
# llada2-small's gate_up and down; every bit pattern (NaN, inf, denormals) moves as it is.
@pytest.mark.parametrize("shape", [(1, 2, 32), (3, 6, 64), (2, 10, 96), (4, 512, 256),
                                   (4, 128, 512)])
def test_pack_moe_weights_native_is_bitwise_the_reference(shape):
    from dmax_ext.reference import pack_moe_weights_reference
    gen = torch.Generator().manual_seed(shape[1])
    w = torch.randint(0, 2**16, shape, generator=gen, dtype=torch.int32).to(torch.uint16)
    w = w.view(torch.bfloat16)
    want = pack_moe_weights_reference(w)
    got = ops.pack_moe_weights(w)
    assert got.shape == want.shape and torch.equal(got.view(torch.int16), want.view(torch.int16))
    strided = torch.randn(shape[0], shape[2], shape[1]).bfloat16().transpose(1, 2)
    assert torch.equal(ops.pack_moe_weights(strided), pack_moe_weights_reference(strided))


def test_opcheck_pack_moe_weights():
    torch.library.opcheck(torch.ops.dmax.pack_moe_weights.default,
                          (torch.randn(2, 4, 64).bfloat16(),))


# (rows of the busiest expert, hidden, inter): one-row experts, a full 14-row tile and one row
# past it (passes of 8 + 7), 16 (8 + 8), two full tiles (28), 29 (10 + 10 + 9), 40 (14 + 13 + 13);
# hidden and 2 * inter multiples of 32 (packable), inter odd / 16.
@pytest.mark.parametrize("n_tokens,hidden,inter", [(1, 32, 16), (3, 64, 48), (14, 96, 16),
                                                   (15, 64, 32), (16, 64, 32), (28, 96, 48),
                                                   (29, 128, 64), (40, 512, 128)])
def test_packed_weights_give_bitwise_the_plain_results(bf16_dot, n_tokens, hidden, inter):
    # Packed weights feed the dot products the same pairs in the same order: equal bits. Without
    # the dot products the op reads them unpacked: equal bits again.
    x, ids, weights, gate_up, down = _case(n_tokens, 6, hidden, inter, 3, torch.bfloat16,
                                           seed=n_tokens)
    ids[:, 0] = 0  # expert 0 takes every token: n_tokens rows
    plain = ops.moe_experts(x, ids, weights, gate_up, down)
    packed = ops.moe_experts(x, ids, weights, ops.pack_moe_weights(gate_up),
                             ops.pack_moe_weights(down))
    assert torch.equal(packed, plain), f"dot={bf16_dot} N={n_tokens} H={hidden} I={inter}"
    assert_within_naive_error(packed, _exact(x, ids, weights, gate_up, down),
                              _torch_formulation(x, ids, weights, gate_up, down),
                              f"packed dot={bf16_dot} N={n_tokens}")


_CAPABILITY_SCRIPT = """
import torch
from dmax_ext import ops
from test_moe_experts import _case, _exact, _torch_formulation
from tolerances import assert_within_naive_error
print(torch.backends.cpu.get_cpu_capability())
wide = torch.tensor([[0, 1, 2], [0, 3, 4], [5, 6, 7]])  # experts of one and two rows
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n_tokens, n_experts, hidden, inter, k in ((37, 16, 64, 32, 4), (9, 5, 40, 12, 3),
                                                  (3, 8, 200, 100, 3)):
        case = _case(n_tokens, n_experts, hidden, inter, k, dtype, seed=n_tokens)
        if n_tokens == 3:
            case = (case[0], wide, *case[2:])
        assert_within_naive_error(torch.ops.dmax.moe_experts(*case), _exact(*case),
                                  _torch_formulation(*case), f"{dtype} N={n_tokens}")
from dmax_ext.reference import pack_moe_weights_reference
x, ids, weights, gate_up, down = _case(9, 5, 64, 32, 3, torch.bfloat16, seed=4)
for w in (gate_up, down, torch.randn(2, 6, 96).bfloat16()):  # the copy's packing kernel
    assert torch.equal(ops.pack_moe_weights(w), pack_moe_weights_reference(w))
packed = torch.ops.dmax.moe_experts(x, ids, weights, ops.pack_moe_weights(gate_up),
                                    ops.pack_moe_weights(down))  # read unpacked on this copy
assert torch.equal(packed, torch.ops.dmax.moe_experts(x, ids, weights, gate_up, down))
"""


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_other_cpu_capabilities(capability):
    """The kernel is compiled per capability (tiles of 4 rows x 2 vectors, strips of 4 vectors
    on AVX2); ATEN_CPU_CAPABILITY selects the copy."""
    run_on_capability(capability, _CAPABILITY_SCRIPT)


def test_bf16_dot_and_fma_forms_agree_to_a_rounding(monkeypatch):
    # Same roundings (GEMM outputs, silu, the hidden, in bf16), exact bf16 products: only the
    # float32 summation order differs, so the two forms differ by at most a bf16 rounding or two
    # of an output (one ulp flips where the float32 sums straddle a rounding boundary).
    if not HAS_BF16_DOT:
        pytest.skip("AVX512-BF16 dot products need the AVX512 capability and a CPU with avx512_bf16")
    case = _case(32, 64, 512, 128, 8, torch.bfloat16, busy=20, seed=5)
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "off")
    fma = ops.moe_experts(*case)
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "on")
    dot = ops.moe_experts(*case)
    torch.testing.assert_close(dot, fma, rtol=2 * 2.0**-8, atol=2 * 2.0**-8 * fma.abs().max().item())


def test_float32_equals_the_torch_formulation_closely():
    # Same roundings (none in float32); only the GEMMs' summation order differs.
    case = _case(32, 64, 512, 128, 8, torch.float32, busy=20, seed=5)
    torch.testing.assert_close(ops.moe_experts(*case), _torch_formulation(*case),
                               rtol=1e-4, atol=1e-5)


def test_model_moe_uses_it_without_grad_and_torch_with_grad():
    torch.manual_seed(0)
    block = MoeBlock(PRESETS["tiny"])
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 11, 64)

    def experts(calls):
        return [tuple(args[0].shape) for name, args in calls if name == "moe_experts"]
    with torch.no_grad():
        with dmax_calls() as calls:
            fast = block(x)
        block.impl = "reference"
        want = block(x)
        block.impl = "auto"
    assert experts(calls) == [(22, 64)]
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-6)
    with dmax_calls() as calls:
        graded = block(x)  # gradients wanted: the torch formulation
    assert experts(calls) == [] and graded.grad_fn is not None


def test_token_cap_follows_the_cpu(monkeypatch):
    """bf16 calls past 64 tokens go to the library where oneDNN has AMX; else any count (None:
    a token's output must not depend on the batch, Linear.native_max_rows)."""
    from dmax_ext.model import moe
    for amx, cap16 in ((False, None), (True, 64)):
        monkeypatch.setattr(moe, "has_amx_bf16", lambda amx=amx: amx)
        assert moe.native_experts_max_tokens(torch.bfloat16) == cap16
        assert moe.native_experts_max_tokens(torch.float32) is None


def test_opcheck_float32():
    case = _case(6, 8, 32, 16, 2, torch.float32, seed=1)
    torch.library.opcheck(torch.ops.dmax.moe_experts.default, case)


def test_opcheck_bf16(bf16_dot):
    case = _case(6, 8, 32, 16, 2, torch.bfloat16, seed=1)
    torch.library.opcheck(torch.ops.dmax.moe_experts.default, case)


def test_opcheck_packed(bf16_dot):
    x, ids, weights, gate_up, down = _case(6, 8, 32, 16, 2, torch.bfloat16, seed=1)
    torch.library.opcheck(torch.ops.dmax.moe_experts.default,
                          (x, ids, weights, ops.pack_moe_weights(gate_up),
                           ops.pack_moe_weights(down)))


def test_bf16_dot_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "yes")
    case = _case(4, 8, 32, 16, 2, torch.bfloat16)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the switch is read only where the AVX512 copy runs")
    with pytest.raises(RuntimeError, match="DMAX_CPU_BF16_DOT must be auto, on or off"):
        ops.moe_experts(*case)


def test_argument_errors():
    x, ids, weights, gate_up, down = _case(4, 8, 32, 16, 2, torch.float32)
    with pytest.raises(TypeError, match="gate_up must have dtype"):
        ops.moe_experts(x, ids, weights, gate_up.bfloat16(), down)
    with pytest.raises(ValueError, match="expert_ids must have shape"):
        ops.moe_experts(x, ids[:3], weights, gate_up, down)
    with pytest.raises(ValueError, match="down must have shape"):
        ops.moe_experts(x, ids, weights, gate_up, down[:, :8])
    x16, gate_up16, down16 = x.bfloat16(), gate_up.bfloat16(), down.bfloat16()
    packed_gate_up, packed_down = ops.pack_moe_weights(gate_up16), ops.pack_moe_weights(down16)
    with pytest.raises(TypeError, match="gate_up, packed, must be bfloat16"):
        ops.moe_experts(x, ids, weights, packed_gate_up.float(), packed_down.float())
    with pytest.raises(ValueError, match="down must have 5 dimensions"):
        ops.moe_experts(x16, ids, weights, packed_gate_up, down16)
    with pytest.raises(ValueError, match=r"down must have shape \(8, 16, 32\) packed"):
        ops.moe_experts(x16, ids, weights, packed_gate_up, packed_down[:, :, :4])
    with pytest.raises(ValueError, match=r"gate_up, packed, must be \[E, N / 32, K / 2, 32, 2\]"):
        ops.moe_experts(x16, ids, weights, packed_gate_up.reshape(8, 1, 8, 64, 2), packed_down)
    with pytest.raises(ValueError, match=r"w must be \[E, K, N\] with K even and N a multiple"):
        ops.pack_moe_weights(gate_up16[..., :16])
    # The ops themselves (no wrapper) check them too: a packed gate_up with a plain down.
    with pytest.raises(RuntimeError, match="with a packed gate_up, down must be packed"):
        torch.ops.dmax.moe_experts(x16, ids, weights, packed_gate_up, down16)
    with pytest.raises(RuntimeError, match="K even and N a multiple of 32"):
        torch.ops.dmax.pack_moe_weights(gate_up16[:, :5])
    with pytest.raises(RuntimeError, match="w must be bfloat16"):
        torch.ops.dmax.pack_moe_weights(gate_up)
    bad = ids.clone()
    bad[2, 1] = 8
    with pytest.raises(RuntimeError, match=r"expert_ids\[2, 1\] = 8 is outside \[0, 8\)"):
        ops.moe_experts(x, bad, weights, gate_up, down)


def test_bf16_dot_products_treat_denormal_weights_as_zero(monkeypatch):
    # The one documented difference of the dot form (vdpbf16ps ignores MXCSR: denormal inputs
    # count as zero); here it also shows that "on" runs that form. A down weight of 2^-130 (a bf16
    # denormal) times a hidden value of ~1 sums to a float32 denormal the FMA form keeps.
    if not HAS_BF16_DOT:
        pytest.skip("AVX512-BF16 dot products need the AVX512 capability and a CPU with avx512_bf16")
    x, ids, weights, gate_up, _ = _case(4, 2, 32, 16, 1, torch.bfloat16, seed=2)
    down = torch.full((2, 16, 32), 2.0**-130).bfloat16()
    case = (x.abs() + 1, ids, torch.ones_like(weights), gate_up.abs(), down)
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "off")
    assert (ops.moe_experts(*case) != 0).all()
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "on")
    assert (ops.moe_experts(*case) == 0).all()
