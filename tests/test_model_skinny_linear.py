"""dmax.skinny_linear (CPU), the model's projections for a decoding block's rows: against a float64
x @ weight^T within 2x the error of F.linear in the same dtype, at widths with every tail (rows
not whole vectors, columns not whole tiles, K not whole sum blocks); the bfloat16 kernel with
AVX512-BF16 dot products (DMAX_CPU_BF16_DOT) against float64 and exactly on exact sums; what
Linear picks; opcheck; argument errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dmax_ext import ops
from dmax_ext.model import PRESETS, random_model
from dmax_ext.model.modules import Linear
from dmax_ext.model.native import KERNEL_OPS
from dmax_ext.reference import skinny_linear_reference
from cpu_flags import (BF16_DOT_BY_DEFAULT, FLAGS, HAS_BF16_DOT, OTHER_CAPABILITIES,
                       needs_bf16_dot, run_on_capability)
from dmax_calls import dmax_calls
from tolerances import assert_within_naive_error

pytestmark = pytest.mark.skipif(not ops.has_op("skinny_linear"),
                                reason="the native library predates skinny_linear: rebuild")


def _case(m, n, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).to(dtype),
            (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(32, 768, 512), (32, 512, 1408), (1, 12, 16), (5, 33, 40),
                                   (17, 100, 130), (64, 24, 256), (100, 37, 7),
                                   (128, 70, 512), (2048, 20, 64)])
def test_matches_the_formula_within_naive_error(dtype, m, n, k):
    x, w = _case(m, n, k, dtype, seed=m + n + k)
    got = ops.skinny_linear(x, w)
    assert got.dtype == dtype and got.shape == (m, n) and got.is_contiguous()
    assert_within_naive_error(got, F.linear(x.double(), w.double()),
                              skinny_linear_reference(x, w), f"{dtype} {m}x{n}x{k}")


@pytest.mark.parametrize("m,n", [(32, 100), (64, 40), (7, 33), (96, 17)])
def test_16bit_is_the_library_product_transposed_exactly(m, n, monkeypatch):
    # bf16 / fp16: weight @ x^T by the library GEMM, then the kernel's transpose (16 x 32 blocks
    # in registers when M is a multiple of 32, element by element otherwise and for the tail).
    # bf16 only with the dot-product kernel off (its sums are in another order).
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", "off")
    for dtype in (torch.bfloat16, torch.float16):
        x, w = _case(m, n, 64, dtype, seed=m)
        assert torch.equal(ops.skinny_linear(x, w), (w @ x.t()).t())


def _assert_same_values(got, want):
    """Bitwise equal, NaNs aside (a NaN in the same place, whatever its payload: torch's own
    bf16 conversions store 0xFFFF in vectors and 0x7FC0 in scalar code)."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _residual(m, n, dtype, seed):
    # Values around the products' size, and every special one: a sum that overflows bf16 / fp16,
    # infinities, a NaN (stored as the NaN torch stores).
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(m, n, generator=gen).to(dtype)
    r.view(-1)[::7] = torch.finfo(dtype).max
    r.view(-1)[3::11] = float("inf")
    r.view(-1)[5::13] = float("-inf")
    r.view(-1)[2::17] = float("nan")
    return r


@pytest.mark.parametrize("dtype,switch", [(torch.float32, "auto"), (torch.float16, "auto"),
                                          (torch.bfloat16, "off"), (torch.bfloat16, "on")])
@pytest.mark.parametrize("m,n,k", [(32, 512, 512), (1, 12, 16), (5, 33, 40), (17, 100, 131),
                                   (33, 13, 64), (64, 24, 256), (100, 37, 7), (8, 20, 0)])
def test_residual_is_bitwise_torchs_add_of_the_product(dtype, switch, m, n, k, monkeypatch):
    # x + proj of a residual stream: the product rounded to the dtype, then the add rounded.
    if switch == "on" and not HAS_BF16_DOT:
        pytest.skip("the bf16 dot-product form needs AVX512-BF16")
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", switch)
    x, w = _case(m, n, k, dtype, seed=m + n + k)
    r = _residual(m, n, dtype, seed=k)
    want = r + ops.skinny_linear(x, w)
    got = ops.skinny_linear(x, w, r)
    assert got.dtype == dtype and got.shape == (m, n) and got.is_contiguous()
    _assert_same_values(got, want)
    strided = torch.zeros(m, 2 * n, dtype=dtype)[:, ::2]  # a view: read as its values
    strided.copy_(r)
    _assert_same_values(ops.skinny_linear(x, w, strided), want)


_CAPABILITY_SCRIPT = """
import torch
from test_model_skinny_linear import _assert_same_values, _case, _residual
from dmax_ext.reference import skinny_linear_reference
print(torch.backends.cpu.get_cpu_capability())
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for m, n, k in ((32, 512, 512), (5, 33, 40), (17, 100, 131)):
        x, w = _case(m, n, k, dtype, seed=m)
        r = _residual(m, n, dtype, seed=k)
        got = torch.ops.dmax.skinny_linear(x, w, r)
        _assert_same_values(got, r + torch.ops.dmax.skinny_linear(x, w))
        torch.testing.assert_close(got, skinny_linear_reference(x.double(), w.double(),
                                   r.double()).to(dtype), rtol=0.05, atol=0.05, equal_nan=True)
"""


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_other_cpu_capabilities(capability):
    """The kernels are compiled per capability; ATEN_CPU_CAPABILITY selects the copy."""
    run_on_capability(capability, _CAPABILITY_SCRIPT)


def _dot(x, w, monkeypatch, switch="on"):
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", switch)
    return ops.skinny_linear(x, w)


# Rows below, at and past the 16-lane vectors and the 32-row passes; K odd, not whole 32-element
# vectors (100, 130) and the model's widths; N not whole 12-row tiles.
DOT_ROWS = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 128)
DOT_COLUMNS = (1, 5, 12, 13, 25, 100)


@needs_bf16_dot
@pytest.mark.parametrize("k", [1, 2, 3, 31, 32, 33, 100, 130, 512, 1408])
def test_bf16_dot_is_within_the_library_error(k, monkeypatch):
    """Against float64: at most 2x the error of the library's bf16 product (oneDNN, float32
    sums rounded once) on the same inputs, plus one rounding of bf16."""
    for m in DOT_ROWS:
        for n in DOT_COLUMNS:
            x, w = _case(m, n, k, torch.bfloat16, seed=m * 1000 + n + k)
            got = _dot(x, w, monkeypatch)
            assert got.dtype == torch.bfloat16 and got.shape == (m, n) and got.is_contiguous()
            assert torch.isfinite(got).all(), f"{m}x{n}x{k}"
            assert_within_naive_error(got, F.linear(x.double(), w.double()),
                                      _dot(x, w, monkeypatch, "off"), f"bf16 dot {m}x{n}x{k}")


@needs_bf16_dot
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n", [(32, 3001), (17, 2600), (64, 1037)])
def test_bf16_dot_columns_split_over_threads_are_each_written_once(m, n, threads, monkeypatch):
    """Wide weights (the lm_head's shape) go to the threads in chunks of column tiles; a tile's
    stores may spill zeros into the next tile's columns, which that tile then writes: exact
    small-integer products catch a chunk's edge left with those zeros."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (m, 512), generator=gen).bfloat16()
    w = torch.randint(-8, 9, (n, 512), generator=gen).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _dot(x, w, monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, F.linear(x.double(), w.double()).bfloat16())


@needs_bf16_dot
@pytest.mark.parametrize("k", [1, 3, 33, 130, 512])
def test_bf16_dot_places_every_element_exactly(k, monkeypatch):
    """Small integers: every product and sum is exact in float32, so each output is the float64
    value rounded once to bf16, bit for bit; a misplaced row, column or pair of k, or garbage
    from a tail, shows as a mismatch."""
    gen = torch.Generator().manual_seed(k)
    for m in DOT_ROWS:
        for n in DOT_COLUMNS:
            x = torch.randint(-8, 9, (m, k), generator=gen).bfloat16()
            w = torch.randint(-8, 9, (n, k), generator=gen).bfloat16()
            expected = F.linear(x.double(), w.double()).bfloat16()
            assert torch.equal(_dot(x, w, monkeypatch), expected), f"{m}x{n}x{k}"


@needs_bf16_dot
def test_bf16_dot_reads_strided_inputs_as_their_values(monkeypatch):
    x, w = _case(33, 40, 130, torch.bfloat16)
    wide = torch.cat([w, torch.full_like(w, float("nan"))], dim=1)  # rows with stride 2K
    got = _dot(x.t().contiguous().t(), wide[:, :130], monkeypatch)
    assert torch.equal(got, _dot(x, w, monkeypatch))


@needs_bf16_dot
def test_bf16_dot_empty_sides(monkeypatch):
    x, w = _case(3, 5, 0, torch.bfloat16)
    assert torch.equal(_dot(x, w, monkeypatch), torch.zeros(3, 5, dtype=torch.bfloat16))
    assert _dot(*_case(0, 5, 4, torch.bfloat16), monkeypatch).shape == (0, 5)
    assert _dot(*_case(4, 0, 4, torch.bfloat16), monkeypatch).shape == (4, 0)


def test_bf16_dot_auto_is_on_exactly_without_amx(monkeypatch):
    """auto (the default) runs the dot products on a CPU with AVX512-BF16 and no AMX."""
    x, w = _case(32, 50, 100, torch.bfloat16)
    monkeypatch.delenv("DMAX_CPU_BF16_DOT", raising=False)
    default = ops.skinny_linear(x, w)
    assert torch.equal(_dot(x, w, monkeypatch, "auto"), default)
    wanted = HAS_BF16_DOT and "amx_bf16" not in FLAGS
    assert torch.equal(default, _dot(x, w, monkeypatch, "on" if wanted else "off"))


def test_bf16_dot_switch_rejects_a_bad_value(monkeypatch):
    with pytest.raises(RuntimeError, match="DMAX_CPU_BF16_DOT must be auto, on or off, got 'maybe'"):
        _dot(*_case(4, 8, 16, torch.bfloat16), monkeypatch, "maybe")


@pytest.mark.skipif("avx512_bf16" in FLAGS or not FLAGS,
                    reason="this CPU has AVX512-BF16 (or its flags are unknown): 'on' cannot fail")
def test_bf16_dot_on_without_the_instructions_is_an_error(monkeypatch):
    with pytest.raises(RuntimeError, match="no AVX512-BF16"):
        _dot(*_case(4, 8, 16, torch.bfloat16), monkeypatch)


def test_strided_inputs_are_read_as_their_values():
    x, w = _case(8, 40, 64, torch.float32)
    got = ops.skinny_linear(x.t().contiguous().t(), w[:, :].t().contiguous().t())
    torch.testing.assert_close(got, ops.skinny_linear(x, w), rtol=0, atol=0)


def test_empty_sides():
    x, w = _case(3, 5, 0, torch.float32)
    assert torch.equal(ops.skinny_linear(x, w), torch.zeros(3, 5))
    assert ops.skinny_linear(*_case(0, 5, 4, torch.float32)).shape == (0, 5)


def _shapes(calls, name="skinny_linear"):
    return [(tuple(args[0].shape), tuple(args[1].shape)) for op, args in calls if op == name]


@pytest.mark.parametrize("amx", [False, True])
def test_linear_uses_it_without_grad_at_any_row_count(monkeypatch, amx):
    """float32 and (without AMX) bfloat16 at every row count: a row's product must not depend on
    the batch (Linear.native_max_rows); bfloat16 with AMX only up to 64 rows (oneDNN's AMX GEMM
    past them); float16 and gradients never."""
    from dmax_ext.model import modules
    monkeypatch.setattr(modules, "has_amx_bf16", lambda: amx)
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(2, 16, 24)
    big_rows = 3000  # past every cap of before (2048 float32, 128 bfloat16)
    with torch.no_grad(), dmax_calls() as calls:
        fast = layer(x)                                  # 32 rows, float32: the native op
        big = layer(torch.randn(big_rows, 24))           # float32, many rows: native
        bf16 = copy.deepcopy(layer).bfloat16()
        bf16(torch.randn(64, 24).bfloat16())             # bfloat16, 64 rows: native
        bf16(torch.randn(big_rows, 24).bfloat16())       # native without AMX only
        half = copy.deepcopy(layer).half()(x.half())     # float16: F.linear
    want = [((32, 24), (40, 24)), ((big_rows, 24), (40, 24)), ((64, 24), (40, 24))]
    assert _shapes(calls) == want + ([] if amx else [((big_rows, 24), (40, 24))])
    torch.testing.assert_close(fast, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert big.shape == (big_rows, 40)
    assert half.dtype == torch.float16
    with dmax_calls() as calls:
        graded = layer(x)                                # gradients wanted: F.linear
    assert calls == [] and graded.grad_fn is not None


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(not BF16_DOT_BY_DEFAULT,
                                             reason="bf16 products are the library's here"))])
def test_a_row_is_the_same_bits_in_any_call(dtype):
    """Each output row depends on its own row of x alone, whatever the row count: calls of 1 to
    300 rows (several of the kernel's 128-row chunks) against the rows computed one call
    each, with and without a residual. decode()'s batch invariance rests on this."""
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(200, 72, generator=gen) * 0.1).to(dtype)
    for rows in (1, 17, 128, 129, 300):
        x = torch.randn(rows, 72, generator=gen).to(dtype)
        residual = torch.randn(rows, 200, generator=gen).to(dtype)
        whole = ops.skinny_linear(x, weight)
        whole_res = ops.skinny_linear(x, weight, residual)
        for m in {0, rows // 2, rows - 1}:
            assert torch.equal(whole[m], ops.skinny_linear(x[m:m + 1], weight)[0]), (rows, m)
            assert torch.equal(whole_res[m],
                               ops.skinny_linear(x[m:m + 1], weight, residual[m:m + 1])[0])


def test_row_caps_follow_the_cpu(monkeypatch):
    """No cap (None) but bf16 where oneDNN has AMX (its bf16 GEMM outruns ours past 64 rows)."""
    from dmax_ext.model import modules
    for amx, cap16 in ((False, None), (True, 64)):
        monkeypatch.setattr(modules, "has_amx_bf16", lambda amx=amx: amx)
        assert Linear.native_max_rows(torch.bfloat16) == cap16
        assert Linear.native_max_rows(torch.float32) is None
        assert Linear.native_max_rows(torch.float16) == 0


def test_set_cpu_variants_off_runs_what_cuda_runs():
    model = random_model("tiny", dtype=torch.float32)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (1, 8))
    with torch.no_grad():
        model.set_cpu_variants(False)
        model.set_moe_impl("grouped")  # CUDA's "auto"
        with dmax_calls() as calls:
            off = model(input_ids=ids)
        # only the ops CUDA runs too: the norms, the q|k prologue, the gated MLPs' activation,
        # the router's selection, the experts' sort and weighted sum (no KV cache to write; one
        # block of 8 tokens attends without a mask: SDPA, not block_attention)
        assert {name for name, _ in calls} == KERNEL_OPS - {"qk_norm_rotary_write_kv",
                                                            "step_tables", "block_attention"}
        model.set_cpu_variants(True)
        model.set_moe_impl("auto")
        with dmax_calls() as calls:
            on = model(input_ids=ids)
    n_moe = sum(map(model.config.is_moe_layer, range(model.config.num_hidden_layers)))
    # 3 layers: qkv, dense, gate|up (one product: GatedMLP), down (dense MLP or shared expert); a
    # router per MoE layer; then lm_head
    assert len(_shapes(calls)) == 3 * 4 + n_moe + 1
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


def test_set_cpu_variants_off_reaches_only_the_kernel_ops(monkeypatch):
    """Off means every CPU-only form (router, experts, projections, attention, whole layers),
    not only the projections: step_ops' traces must show what CUDA runs. The ops with a CUDA
    kernel (KERNEL_OPS: norms, q/k norm + rotary, swiglu, the attention, ...) stay."""
    from dmax_ext.model import native
    real = native.native_op

    def only_kernel_ops(name, *args, **kwargs):
        assert name in KERNEL_OPS, f"native op {name} reached with the CPU variants off"
        return real(name, *args, **kwargs)
    monkeypatch.setattr(native, "native_op", only_kernel_ops)
    model = random_model("tiny", dtype=torch.float32)
    model.set_moe_impl("auto")  # on the CPU: the "cpu" experts path, whose native form is off
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (1, 8))
    model.set_cpu_variants(False)
    with torch.no_grad():
        assert model(input_ids=ids).shape == (1, 8, PRESETS["tiny"].vocab_size)


@pytest.mark.parametrize("dtype,switch", [(torch.float32, "auto"), (torch.bfloat16, "off"),
                                          (torch.bfloat16, "auto")])
def test_opcheck(dtype, switch, monkeypatch):
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", switch)
    torch.library.opcheck(torch.ops.dmax.skinny_linear.default, _case(6, 20, 24, dtype))
    torch.library.opcheck(torch.ops.dmax.skinny_linear.default,
                          (*_case(6, 20, 24, dtype), torch.randn(6, 20).to(dtype)))


def test_argument_errors():
    x, w = _case(4, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.skinny_linear(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 16\)"):
        ops.skinny_linear(x, w[:, :8])
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        ops.skinny_linear(x[None], w)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.skinny_linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match="skinny_linear: weight must be"):
        torch.ops.dmax.skinny_linear(x, w[:, :8])
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 8\)"):
        ops.skinny_linear(x, w, torch.zeros(4, 7))
    with pytest.raises(TypeError, match="residual must have dtype"):
        ops.skinny_linear(x, w, torch.zeros(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"skinny_linear: residual must be Float \[4, 8\]"):
        torch.ops.dmax.skinny_linear(x, w, torch.zeros(8, 4))
