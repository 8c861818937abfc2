"""rms_norm, add_rms_norm, qk_norm_rotary(_write_kv), swiglu, moe_route, moe_dispatch and
moe_combine on every backend: the CPU ops, the CUDA kernels (csrc/kernels/norms.cuh, swiglu.cuh,
moe_route.cuh, moe_dispatch.cuh) on the simt emulation under three schedules and, with a GPU, on
CUDA. Against the references (dmax_ext.reference) on random shapes and strided inputs, within
tests/tolerances.py's rule (2x the naive computation's error, or 2x the a-priori bound of the
float32 sums where a differently ordered naive sum happens to be exact); the emulated outputs
start poisoned (NaN, in the bindings); the sizes of LLaDA2.0-mini; opcheck; argument errors on
the kernel path; the model's GPU path on the emulated kernels."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spd_step_cases import BACKENDS, BACKENDS_ONE_SCHEDULE, Backend, example_count
from tolerances import assert_within_naive_error

from dmax_ext.model.modules import rotary_cos_sin, rotary_inv_freq
from dmax_ext.model.native import KERNEL_OPS, has_device_kernel
from dmax_ext.reference import (add_rms_norm_reference, moe_combine_reference, moe_dispatch_reference, moe_route_reference,
                                qk_norm_rotary_reference, qk_norm_rotary_write_kv_reference,
                                rms_norm_reference, step_tables_reference, swiglu_reference)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = 2.0**-24  # float32, the kernels' arithmetic


def sum_error(n: int) -> float:
    """A-priori relative error of a float32 RMS scale over n terms and of the products after it:
    each lane (of 32 CUDA lanes, or 8 or 16 CPU vector lanes) sums ~n/8 terms, then the lanes
    are summed; half of that passes through the square root; a few roundings follow."""
    return (math.ceil(n / 8) + 12) * UNIT_ROUNDOFF


def _check_case(backend: Backend, got: torch.Tensor, exact, naive, what: str, rel_error: float):
    got = got.cpu()
    assert not got.isnan().any(), f"{backend} {what}: an output left unwritten (NaN poison)"
    assert_within_naive_error(got, exact, naive, f"{backend} {what}", rel_error=rel_error)


def _leading(draw_dims, gen, dtype, H, layout):
    """x of shape [*draw_dims, H]: contiguous, rows sliced out of a wider buffer (one row
    stride), or leading dims transposed (no single row stride: the bindings copy)."""
    base = 3 * torch.randn(*draw_dims, H + 5, generator=gen)
    if layout == "padded":
        return base.to(dtype)[..., :H]
    x = base[..., :H].contiguous().to(dtype)
    if layout == "transposed" and x.dim() >= 3:
        return x.transpose(0, 1)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_the_reference(backend, dtype):
    b = Backend(backend)
    simt = backend.startswith("simt")

    @settings(max_examples=example_count(30, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(dims=st.lists(st.integers(1, 5), min_size=0, max_size=3),
           H=st.sampled_from([1, 7, 32, 33, 70, 128, 512, 2048]),
           layout=st.sampled_from(["contiguous", "padded", "transposed"]),
           seed=st.integers(0, 2**31))
    def check(dims, H, layout, seed):
        if simt and H >= 512:
            dims = dims[:1]  # emulated threads are slow: keep the rows few
        gen = torch.Generator().manual_seed(seed)
        x = _leading(dims, gen, dtype, H, layout)
        w = torch.randn(H, generator=gen).to(dtype)
        got = b.op("rms_norm")(*b.to(x, w), 1e-6)
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        _check_case(b, got, rms_norm_reference(x.double(), w.double(), 1e-6),
                    rms_norm_reference(x, w, 1e-6), f"{dtype} {tuple(x.shape)} {layout}",
                    sum_error(H))

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_the_reference(backend, dtype):
    """The sum bit for bit torch's add; the norm of that sum within the rms_norm bound."""
    b = Backend(backend)
    simt = backend.startswith("simt")

    @settings(max_examples=example_count(25, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(dims=st.lists(st.integers(1, 5), min_size=0, max_size=3),
           H=st.sampled_from([1, 7, 33, 128, 512, 2048]),
           layout=st.sampled_from(["contiguous", "padded", "transposed"]),
           seed=st.integers(0, 2**31))
    def check(dims, H, layout, seed):
        if simt and H >= 512:
            dims = dims[:1]
        gen = torch.Generator().manual_seed(seed)
        x = _leading(dims, gen, dtype, H, layout)
        update = (3 * torch.randn(x.shape, generator=gen)).to(dtype)
        w = torch.randn(H, generator=gen).to(dtype)
        total, normed = (t.cpu() for t in b.op("add_rms_norm")(*b.to(x, update, w), 1e-6))
        want_total, want = add_rms_norm_reference(x, update, w, 1e-6)
        what = f"{dtype} {tuple(x.shape)} {layout}"
        assert total.is_contiguous() and normed.is_contiguous() and normed.shape == x.shape, what
        assert torch.equal(total, want_total), f"{b} {what}: the sum"
        _check_case(b, normed, rms_norm_reference(want_total.double(), w.double(), 1e-6), want,
                    what, sum_error(H))

    check()


def _qk_case(gen, dtype, batch, length, heads, n_q, dim, rotary, extra_heads):
    """The q|k heads of a fused qkv [B, L, heads + extra, D] (a strided view, as the model
    passes them), per-head weights, and the rotary tables of random positions."""
    qkv = (2 * torch.randn(batch, length, heads + extra_heads, dim, generator=gen)).to(dtype)
    positions = torch.randint(0, 4000, (batch, length), generator=gen)
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(rotary, 10000.0), dtype)
    q_w, k_w = ((1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype) for _ in range(2))
    return qkv[:, :, :heads], q_w, k_w, cos, sin, n_q, 1e-6


def _check_qk(b, case, what):
    qk = case[0]
    got = b.op("qk_norm_rotary")(*b.to(*case[:5]), *case[5:])
    assert got.shape == (qk.shape[0], qk.shape[2], qk.shape[1], qk.shape[3])
    assert got.dtype == qk.dtype and got.is_contiguous()
    exact = qk_norm_rotary_reference(*(t.double() if torch.is_tensor(t) else t for t in case))
    _check_case(b, got, exact, qk_norm_rotary_reference(*case), what, sum_error(qk.shape[3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rotary_matches_the_reference(backend, dtype):
    b = Backend(backend)

    @settings(max_examples=example_count(30, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.integers(1, 3), length=st.integers(1, 9), heads=st.integers(1, 8),
           dim=st.sampled_from([2, 8, 24, 32, 40, 64, 128]), data=st.data(),
           seed=st.integers(0, 2**31))
    def check(batch, length, heads, dim, data, seed):
        n_q = data.draw(st.integers(0, heads), label="n_q_heads")
        rotary = data.draw(st.sampled_from(sorted({2, dim // 2 // 2 * 2 or 2, dim})),
                           label="rotary")
        extra = data.draw(st.integers(0, 2), label="value heads after q|k")
        case = _qk_case(torch.Generator().manual_seed(seed), dtype, batch, length, heads, n_q,
                        dim, rotary, extra)
        _check_qk(b, case, f"{dtype} B{batch} L{length} heads {heads}/{n_q} D{dim} R{rotary}")

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_the_reference(backend, dtype):
    b = Backend(backend)

    @settings(max_examples=example_count(30, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(dims=st.lists(st.integers(1, 6), min_size=0, max_size=2),
           inter=st.sampled_from([1, 17, 64, 128, 700]), padded=st.booleans(),
           seed=st.integers(0, 2**31))
    def check(dims, inter, padded, seed):
        gen = torch.Generator().manual_seed(seed)
        wide = (4 * torch.randn(*dims, 2 * inter + 3, generator=gen)).to(dtype)
        gate_up = wide[..., :2 * inter] if padded else wide[..., :2 * inter].contiguous()
        got = b.op("swiglu")(b.to(gate_up))
        assert got.shape == (*dims, inter) and got.dtype == dtype and got.is_contiguous()
        _check_case(b, got, swiglu_reference(gate_up.double()), swiglu_reference(gate_up),
                    f"{dtype} {tuple(gate_up.shape)}", 8 * UNIT_ROUNDOFF)

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_llada2_mini_sizes(backend, dtype):
    """A decoding block of LLaDA2.0-mini: 32 tokens of hidden 2048, 16 query + 4 key heads of 128
    with a rotary of 64, the dense MLP's 5120 (the shared expert's 512 on the emulation)."""
    b = Backend(backend)
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(1, 32, 2048, generator=gen)).to(dtype)
    w = torch.randn(2048, generator=gen).to(dtype)
    _check_case(b, b.op("rms_norm")(*b.to(x, w), 1e-6),
                rms_norm_reference(x.double(), w.double(), 1e-6), rms_norm_reference(x, w, 1e-6),
                "mini hidden", sum_error(2048))
    _check_qk(b, _qk_case(gen, dtype, 1, 32, 20, 16, 128, 64, 4), "mini q|k heads")
    inter = 512 if backend.startswith("simt") else 5120
    gate_up = (4 * torch.randn(32, 2 * inter, generator=gen)).to(dtype)
    _check_case(b, b.op("swiglu")(b.to(gate_up)), swiglu_reference(gate_up.double()),
                swiglu_reference(gate_up), "mini MLP", 8 * UNIT_ROUNDOFF)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_same_bits_from_strided_and_contiguous_inputs(backend):
    """A view is read as its values: the kernel path's one-row-stride and copied inputs give the
    contiguous input's bits (a row's arithmetic does not depend on where it lives)."""
    b = Backend(backend)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, 48, generator=gen)
    w = torch.randn(40, generator=gen)
    for view in (x[:, ::2, :40], x[:, :, 3:43].transpose(0, 1)):
        assert torch.equal(b.op("rms_norm")(*b.to(view, w), 1e-5).cpu(),
                           b.op("rms_norm")(*b.to(view.contiguous(), w), 1e-5).cpu())
    case = _qk_case(gen, torch.bfloat16, 2, 5, 6, 4, 32, 16, 2)
    contiguous = (case[0].contiguous(), *case[1:])
    assert torch.equal(b.op("qk_norm_rotary")(*b.to(*case[:5]), *case[5:]).cpu(),
                       b.op("qk_norm_rotary")(*b.to(*contiguous[:5]), *contiguous[5:]).cpu())
    gate_up = torch.randn(5, 100, generator=gen)[:, 10:90]
    assert torch.equal(b.op("swiglu")(b.to(gate_up)).cpu(),
                       b.op("swiglu")(b.to(gate_up.contiguous())).cpu())


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_opcheck(backend):
    b = Backend(backend)
    gen = torch.Generator().manual_seed(2)
    x = b.to(torch.randn(3, 4, 32, generator=gen).bfloat16())
    w = b.to(torch.randn(32, generator=gen).bfloat16())
    torch.library.opcheck(b.namespace.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(b.namespace.add_rms_norm.default, (x, x * 0.5, w, 1e-6))
    case = _qk_case(gen, torch.bfloat16, 2, 3, 5, 3, 16, 8, 1)
    torch.library.opcheck(b.namespace.qk_norm_rotary.default, (*b.to(*case[:5]), *case[5:]))
    torch.library.opcheck(b.namespace.swiglu.default, (b.to(torch.randn(4, 10).bfloat16()),))
    torch.library.opcheck(b.namespace.moe_route.default,
                          (*b.to(torch.randn(5, 64), torch.randn(64)), 8, 4, 8, 2.5))
    ids = b.to(torch.rand(5, 64).argsort(dim=-1)[:, :8])
    torch.library.opcheck(b.namespace.moe_dispatch.default, (ids, 64))
    case = b.to(*_write_kv_case(gen, torch.bfloat16, 2, 3, 4, 2, 16, 8, 7, True))
    torch.library.opcheck(b.namespace.qk_norm_rotary_write_kv.default, case)
    torch.library.opcheck(b.namespace.moe_combine.default,
                          (*b.to(torch.randn(40, 16), torch.randperm(40), torch.rand(5, 8)),))
    torch.library.opcheck(b.namespace.moe_combine.default,
                          b.to(torch.randn(40, 16), torch.randperm(40), torch.rand(5, 8),
                               torch.randn(5, 16)))
    torch.library.opcheck(b.namespace.moe_combine.default,
                          b.to(torch.randn(40, 16), torch.randperm(40), torch.rand(5, 8),
                               torch.randn(5, 16), torch.randn(5, 16)))


@pytest.mark.parametrize("backend", [name for name in BACKENDS_ONE_SCHEDULE if name != "cpu"])
def test_kernel_path_argument_errors(backend):
    """The kernel bindings check what the kernels rely on (the Python wrappers check first;
    these calls skip them)."""
    b = Backend(backend)
    x, w = b.to(torch.randn(3, 8), torch.randn(8))
    with pytest.raises(RuntimeError, match="rms_norm: weight must be"):
        b.op("rms_norm")(x, w[:4], 1e-6)
    with pytest.raises(RuntimeError, match="rms_norm: x must have a contiguous"):
        b.op("rms_norm")(x.t(), w[:3], 1e-6)
    with pytest.raises(RuntimeError, match="rms_norm: x must be float32"):
        b.op("rms_norm")(x.long(), w.long(), 1e-6)
    with pytest.raises(RuntimeError, match="add_rms_norm: update must be"):
        b.op("add_rms_norm")(x, x[:2], w, 1e-6)
    case = _qk_case(torch.Generator().manual_seed(0), torch.float32, 2, 3, 5, 3, 16, 8, 0)
    qk, q_w, k_w, cos, sin, n_q, eps = b.to(*case)
    with pytest.raises(RuntimeError, match="qk_norm_rotary: n_q_heads must be in"):
        b.op("qk_norm_rotary")(qk, q_w, k_w, cos, sin, 6, eps)
    with pytest.raises(RuntimeError, match="qk_norm_rotary: cos must be"):
        b.op("qk_norm_rotary")(qk, q_w, k_w, cos[..., :3], sin[..., :3], n_q, eps)
    with pytest.raises(RuntimeError, match="qk_norm_rotary: k_weight must be"):
        b.op("qk_norm_rotary")(qk, q_w, k_w.half(), cos, sin, n_q, eps)
    with pytest.raises(RuntimeError, match=r"swiglu: gate_up must be \[..., 2I\]"):
        b.op("swiglu")(b.to(torch.randn(4, 7)))
    logits, bias = b.to(torch.randn(3, 16), torch.randn(16))
    with pytest.raises(RuntimeError, match="moe_route: logits must be float32"):
        b.op("moe_route")(logits.double(), bias, 4, 2, 4, 1.0)
    with pytest.raises(RuntimeError, match="moe_route: expert_bias must be float32"):
        b.op("moe_route")(logits, bias[:8], 4, 2, 4, 1.0)
    with pytest.raises(RuntimeError, match="moe_route: n_group must divide"):
        b.op("moe_route")(logits, bias, 16, 2, 4, 1.0)
    with pytest.raises(RuntimeError, match="moe_route: top_k must be in"):
        b.op("moe_route")(logits, bias, 4, 2, 9, 1.0)



@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounded_where_torch_rounds(backend, dtype):
    """In 16-bit dtypes the ops round their intermediates where the torch formulation stores
    them (T(x * inv_rms), then the weight; the residual sum before its norm; each rotary
    product; silu before the product): their
    outputs are then the reference's bits but where a float32 sum order or exp moves a rounding,
    rarely (none in these draws on the CPU and the emulation). A kernel that skipped one of
    those roundings differs on ~25% of the elements; 1% allows a GPU's expf."""
    b = Backend(backend)
    gen = torch.Generator().manual_seed(4)

    def assert_mostly_equal(got, want, what):
        same = (got.cpu() == want).float().mean().item()
        assert same >= 0.99, f"{b} {dtype} {what}: only {same:.1%} of the reference's bits"

    x = (3 * torch.randn(64, 512, generator=gen)).to(dtype)
    w = torch.randn(512, generator=gen).to(dtype)
    assert_mostly_equal(b.op("rms_norm")(*b.to(x, w), 1e-6), rms_norm_reference(x, w, 1e-6),
                        "rms_norm")
    update = (3 * torch.randn(64, 512, generator=gen)).to(dtype)
    assert_mostly_equal(b.op("add_rms_norm")(*b.to(x, update, w), 1e-6)[1],
                        add_rms_norm_reference(x, update, w, 1e-6)[1], "add_rms_norm")
    case = _qk_case(gen, dtype, 2, 16, 10, 8, 64, 32, 2)
    assert_mostly_equal(b.op("qk_norm_rotary")(*b.to(*case[:5]), *case[5:]),
                        qk_norm_rotary_reference(*case), "qk_norm_rotary")
    gate_up = (4 * torch.randn(64, 1400, generator=gen)).to(dtype)
    assert_mostly_equal(b.op("swiglu")(b.to(gate_up)), swiglu_reference(gate_up), "swiglu")


def test_the_library_binds_the_kernels_where_it_was_built_with_cuda():
    """native_op serves a CUDA tensor only with an op that has a CUDA kernel in this build
    (model/native.py KERNEL_OPS); every kernel op is bound on CUDA when the build has CUDA."""
    from dmax_ext import _build_info
    for name in KERNEL_OPS:
        assert has_device_kernel(name, "cpu")
        assert has_device_kernel(name, "cuda") == _build_info.BUILT_CUDA
    assert not has_device_kernel("skinny_linear", "cuda")  # a CPU variant
    assert not has_device_kernel("rms_norm", "meta")  # no "META" key: the torch formulation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_modules_run_the_kernels_on_cuda():
    """A tiny model on CUDA without gradients: norms, the q|k prologue and the gated MLPs'
    activation as the kernel ops, and the logits close to the torch formulation's."""
    from dmax_calls import dmax_calls
    from dmax_ext.model import PRESETS, random_model
    model = random_model("tiny", dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 16), device="cuda")
    with torch.no_grad(), dmax_calls() as calls:
        fast = model(input_ids=ids)
    assert {name for name, _ in calls} == KERNEL_OPS
    with torch.enable_grad():
        slow = model(input_ids=ids)  # parameters want gradients: torch's formulation
    torch.testing.assert_close(fast.float(), slow.detach().float(), rtol=0.05, atol=0.05)


# ---- moe_route ------------------------------------------------------------------------------------
ROUTE_TOL = 1e-5  # a few float32 roundings of a score near 1: the kernels' exp may differ by ulps


def _route_margins(logits: torch.Tensor, bias: torch.Tensor, n_group, topk_group, top_k):
    """Per row, in float64: the smallest gap between a kept group's sum and a dropped one's, and
    between consecutive picks (and the last pick and the best unpicked kept expert). A row whose
    margins exceed ROUTE_TOL has one right answer whatever ulps the exp moves."""
    biased = torch.sigmoid(logits.double()) + bias.double()
    n = biased.shape[0]
    groups = biased.view(n, n_group, -1).topk(2, dim=-1).values.sum(-1)
    group_sorted = groups.sort(dim=-1, descending=True).values
    group_gap = (group_sorted[:, topk_group - 1] - group_sorted[:, topk_group]
                 if topk_group < n_group else torch.full((n,), float("inf"), dtype=torch.float64))
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        1, groups.topk(topk_group, dim=-1).indices, True)
    masked = biased.view(n, n_group, -1).masked_fill(~kept[..., None], float("-inf")).view(n, -1)
    ranked = masked.sort(dim=-1, descending=True).values[:, :top_k + 1]
    gaps = ranked[:, :-1] - ranked[:, 1:]
    return torch.minimum(group_gap, gaps.nan_to_num(float("inf")).min(dim=-1).values)


def _check_route(b: Backend, logits, bias, n_group, topk_group, top_k, scaling, what):
    ids, weights = b.op("moe_route")(*b.to(logits, bias), n_group, topk_group, top_k, scaling)
    ids, weights = ids.cpu(), weights.cpu()
    assert ids.shape == weights.shape == (logits.shape[0], top_k), what
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32, what
    assert not weights.isnan().any() and (ids >= 0).all(), f"{b} {what}: unwritten outputs"
    want_ids, _ = moe_route_reference(logits, bias, n_group, topk_group, top_k, scaling)
    clear = _route_margins(logits, bias, n_group, topk_group, top_k) > ROUTE_TOL
    assert torch.equal(ids[clear], want_ids[clear]), f"{b} {what}: other experts than the reference"
    # Rows within ROUTE_TOL of a tie: a selection that is right up to that tolerance.
    biased = torch.sigmoid(logits.double()) + bias.double()
    for r in (~clear).nonzero().flatten().tolist():
        picked = biased[r, ids[r]]
        assert ids[r].unique().numel() == top_k, f"{b} {what}: row {r} repeats an expert"
        assert (picked[:-1] >= picked[1:] - ROUTE_TOL).all(), f"{b} {what}: row {r} order"
        want = biased[r, want_ids[r]]
        assert (picked - want).abs().max() <= ROUTE_TOL, f"{b} {what}: row {r} not a near-tie"
    # The weights of the kernel's own picks, in float64.
    scores = torch.sigmoid(logits.double()).gather(1, ids)
    exact = scores / (scores.sum(-1, keepdim=True) + 1e-20) if top_k > 1 else scores
    torch.testing.assert_close(weights.double(), exact * scaling, rtol=16 * UNIT_ROUNDOFF,
                               atol=1e-30, msg=lambda m: f"{b} {what}: weights: {m}")


ROUTER_SHAPES = [(64, 8, 4, 8), (256, 8, 4, 8), (16, 4, 2, 4), (6, 3, 1, 1), (64, 1, 1, 2),
                 (128, 64, 64, 32), (40, 20, 3, 5)]  # (E, n_group, topk_group, top_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_route_matches_the_reference(backend):
    """Presets' shapes (llada2-small's 64 experts, LLaDA2.0-mini's 256, tiny's 16) and odd ones:
    one group, more groups than lanes, every group kept, top_k past a warp's 32."""
    b = Backend(backend)

    @settings(max_examples=example_count(30, 12, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(shape=st.sampled_from(ROUTER_SHAPES), rows=st.integers(1, 40),
           spread=st.sampled_from([0.05, 1.0, 8.0]), seed=st.integers(0, 2**31))
    def check(shape, rows, spread, seed):
        experts, n_group, topk_group, top_k = shape
        gen = torch.Generator().manual_seed(seed)
        logits = spread * torch.randn(rows, experts, generator=gen)
        bias = 0.05 * torch.randn(experts, generator=gen)
        _check_route(b, logits, bias, n_group, topk_group, top_k, 2.5,
                     f"E{experts} groups {topk_group}/{n_group} top {top_k} rows {rows}")

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_moe_route_ties_take_the_lower_id(backend):
    """Equal logits everywhere: groups and experts in id order (the CPU kernel's and torch's
    order); negative biased scores: dropped groups are not selected as zeros would be."""
    b = Backend(backend)
    ids, _ = b.op("moe_route")(*b.to(torch.zeros(3, 16), torch.zeros(16)), 4, 2, 4, 1.0)
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 3
    logits = torch.logit(torch.tensor([[0.9, 0.01, 0.5, 0.5, 0.5, 0.45, 0.1, 0.1]]))
    ids, weights = b.op("moe_route")(*b.to(logits, torch.full((8,), -1.0)), 4, 2, 3, 2.5)
    assert ids.cpu()[0].tolist() == [2, 3, 4]
    s = torch.sigmoid(logits[0, [2, 3, 4]])
    torch.testing.assert_close(weights.cpu()[0], 2.5 * s / (s.sum() + 1e-20))


# ---- moe_dispatch / moe_combine ---------------------------------------------------------------------
def _routed_ids(gen, tokens, k, experts, skew):
    """Distinct experts per token (as the router picks them), uniform or all from a few."""
    pool = experts if skew == "uniform" else min(experts, max(k, 3))
    picks = torch.rand(tokens, pool, generator=gen).argsort(dim=-1)[:, :k]
    offset = 0 if skew == "uniform" else int(torch.randint(0, experts - pool + 1, (1,),
                                                           generator=gen))
    return picks + offset


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_dispatch_matches_the_reference(backend):
    b = Backend(backend)

    @settings(max_examples=example_count(30, 12, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    # Past 1024 entries (a batch's step) each kernel thread sorts several entries.
    @given(tokens=st.one_of(st.integers(0, 64), st.integers(129, 512)), k=st.integers(1, 8),
           experts=st.sampled_from([8, 16, 64, 256, 2048]),
           skew=st.sampled_from(["uniform", "few"]), seed=st.integers(0, 2**31))
    def check(tokens, k, experts, skew, seed):
        ids = _routed_ids(torch.Generator().manual_seed(seed), tokens, k, experts, skew)
        got = [t.cpu() for t in b.op("moe_dispatch")(b.to(ids), experts)]
        for name, g, w in zip(("rows", "inverse", "offsets"), got,
                              moe_dispatch_reference(ids, experts)):
            assert g.dtype == w.dtype and torch.equal(g, w), f"{b} {name}: {g} != {w}"

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_moe_dispatch_at_the_kernel_limit(backend):
    """MOE_DISPATCH_MAX_ENTRIES (the model's switch to the torch path) is what the kernel takes:
    that many entries sort right, one token more is refused (the CPU op has no limit)."""
    from dmax_ext.model.moe import MOE_DISPATCH_MAX_ENTRIES
    b = Backend(backend)
    gen = torch.Generator().manual_seed(3)
    ids = _routed_ids(gen, MOE_DISPATCH_MAX_ENTRIES // 8, 8, 2048, "uniform")
    got = [t.cpu() for t in b.op("moe_dispatch")(b.to(ids), 2048)]
    assert all(torch.equal(g, w) for g, w in zip(got, moe_dispatch_reference(ids, 2048)))
    more = _routed_ids(gen, MOE_DISPATCH_MAX_ENTRIES // 8 + 1, 8, 64, "uniform")
    if backend == "cpu":
        assert torch.equal(b.op("moe_dispatch")(more, 64)[1], moe_dispatch_reference(more, 64)[1])
    else:
        with pytest.raises(RuntimeError, match="at most 4096 routed entries"):
            b.op("moe_dispatch")(b.to(more), 64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_combine_matches_the_reference(backend, dtype):
    b = Backend(backend)

    @settings(max_examples=example_count(30, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(tokens=st.integers(0, 40), k=st.integers(1, 8), hidden=st.sampled_from([1, 33, 128, 512]),
           seed=st.integers(0, 2**31))
    def check(tokens, k, hidden, seed):
        gen = torch.Generator().manual_seed(seed)
        ids = _routed_ids(gen, tokens, k, 16, "uniform")
        _, inverse, _ = moe_dispatch_reference(ids, 16)
        sorted_out = (3 * torch.randn(tokens * k, hidden, generator=gen)).to(dtype)
        weights = torch.rand(tokens, k, generator=gen) * 2.5
        got = b.op("moe_combine")(*b.to(sorted_out, inverse, weights))
        assert got.shape == (tokens, hidden) and got.dtype == dtype
        exact = moe_combine_reference(sorted_out.double(), inverse, weights.double())
        _check_case(b, got, exact, moe_combine_reference(sorted_out, inverse, weights),
                    f"{dtype} N{tokens} k{k} H{hidden}", (k + 2) * UNIT_ROUNDOFF)
        # with the shared expert's output: the routed sum rounded, then the rounded add
        shared = (2 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
        with_shared = b.op("moe_combine")(*b.to(sorted_out, inverse, weights, shared)).cpu()
        assert torch.equal(with_shared, got.cpu() + shared), f"{b} {dtype}: the addend"
        # then the layer's residual: one more rounded add, with or without the shared output
        residual = (4 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
        both = b.op("moe_combine")(*b.to(sorted_out, inverse, weights, shared, residual)).cpu()
        assert torch.equal(both, with_shared + residual), f"{b} {dtype}: the residual"
        alone = b.op("moe_combine")(*b.to(sorted_out, inverse, weights), None,
                                    b.to(residual)).cpu()
        assert torch.equal(alone, got.cpu() + residual), f"{b} {dtype}: the residual alone"

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_moe_ops_argument_errors(backend):
    b = Backend(backend)
    ids = b.to(torch.randint(0, 8, (4, 2)))
    with pytest.raises(RuntimeError, match="moe_dispatch: ids must be int64"):
        b.op("moe_dispatch")(ids.int(), 8)
    with pytest.raises(RuntimeError, match="moe_dispatch: n_experts must be >= 1"):
        b.op("moe_dispatch")(ids, 0)
    sorted_out, inverse, weights = b.to(torch.randn(8, 16), torch.arange(8), torch.rand(4, 2))
    with pytest.raises(RuntimeError, match=r"moe_combine: weights \[N, k\] must have one entry"):
        b.op("moe_combine")(sorted_out, inverse, weights[:3])
    with pytest.raises(RuntimeError, match="moe_combine: inverse must be int64"):
        b.op("moe_combine")(sorted_out, inverse[:5], weights)
    with pytest.raises(RuntimeError, match="moe_combine: weights must be float32"):
        b.op("moe_combine")(sorted_out, inverse, weights.double())
    with pytest.raises(RuntimeError, match="moe_combine: addend must be"):
        b.op("moe_combine")(sorted_out, inverse, weights, sorted_out)
    with pytest.raises(RuntimeError, match="moe_combine: residual must be"):
        b.op("moe_combine")(sorted_out, inverse, weights, None, sorted_out.double()[:4])
    if backend == "cpu":  # values: the CPU op reads them; on a GPU the wrapper does (a sync)
        with pytest.raises(RuntimeError, match=r"moe_dispatch: ids must be in \[0, 8\)"):
            b.op("moe_dispatch")(ids + 8, 8)
        with pytest.raises(RuntimeError, match=r"moe_combine: inverse must be in \[0, 8\)"):
            b.op("moe_combine")(sorted_out, inverse + 1, weights)


def test_moe_wrappers_check_values():
    from dmax_ext import ops
    with pytest.raises(ValueError, match=r"ids must be in \[0, 8\) \(n_experts\)"):
        ops.moe_dispatch(torch.tensor([[0, 9]]), 8)
    with pytest.raises(ValueError, match="n_experts must be an int >= 1"):
        ops.moe_dispatch(torch.tensor([[0, 1]]), 0)
    with pytest.raises(ValueError, match=r"inverse must be in \[0, 2\)"):
        ops.moe_combine(torch.randn(2, 4), torch.tensor([0, 2]), torch.rand(1, 2))
    with pytest.raises(ValueError, match="residual"):
        ops.moe_combine(torch.randn(2, 4), torch.tensor([0, 1]), torch.rand(1, 2),
                        residual=torch.randn(2, 4))
    rows, inverse, offsets = ops.moe_dispatch(torch.tensor([[3, 1], [1, 0]]), 4)
    assert rows.tolist() == [1, 0, 1, 0] and inverse.tolist() == [3, 1, 2, 0]
    assert offsets.tolist() == [1, 3, 3, 4]


class _OnEmulatedKernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Sends every call of an op with a CUDA kernel (torch.ops.dmax.<op>: the model's layer ops,
    the SPD step's ops) to its emulated CUDA kernel (torch.ops.dmax_simt.<op>): with the CPU
    variants off, the GPU path on this CPU."""

    def __init__(self):
        super().__init__()
        self.calls = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "dmax" and hasattr(torch.ops.dmax_simt, name):
            self.calls.add(name)
            func = getattr(torch.ops.dmax_simt, name).default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_model_gpu_path_on_the_emulated_kernels(dtype):
    """The model as CUDA runs it (the CPU variants off, the grouped MoE path), with every
    kernel op on its emulated CUDA kernel, against the model's torch formulation (the same
    weights with gradients wanted: no native op): the layouts the model passes (strided q|k
    views, expert-sorted rows, the stacked gate|up product) are the ones the kernels read."""
    from dmax_ext.model import PRESETS, random_model
    Backend("simt-random")  # loads the emulated kernels (and their fake kernels)
    model = random_model("tiny", dtype=dtype)
    model.set_cpu_variants(False)
    model.set_moe_impl("grouped")
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(8))
    mode = _OnEmulatedKernels()
    with torch.no_grad(), mode:
        fast = model(input_ids=ids)
    # (no KV cache here: neither the cache-writing prologue nor a cached forward's tables; 12
    # tokens are one block, attended without a mask: SDPA, not block_attention)
    assert mode.calls == KERNEL_OPS - {"qk_norm_rotary_write_kv", "step_tables", "block_attention"}
    slow = model(input_ids=ids).detach()  # gradients wanted: torch's formulation throughout
    # (measured: float32 2.2e-7 apart at logits of ~0.6, bfloat16 the same bits)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2**-8)
    torch.testing.assert_close(fast.float(), slow.float(), **tol)


def test_a_decode_on_the_gpu_path_with_the_emulated_kernels():
    """decode() with the model on the GPU path and every dmax op (layer and SPD step ops) on its
    emulated CUDA kernel gives the CPU decode's tokens and forward counts (float32, two prompts
    of different lengths batched, two blocks)."""
    import dmax_ext
    from dmax_ext.model import random_model
    Backend("simt-random")
    model = random_model("tiny", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (7, 13)]
    want = dmax_ext.decode(model, prompts, gen_length=64, block_length=32, threshold=0.5)
    model.set_cpu_variants(False)
    model.set_moe_impl("grouped")
    mode = _OnEmulatedKernels()
    with mode:
        got = dmax_ext.decode(model, prompts, gen_length=64, block_length=32, threshold=0.5)
    # every forward writes the KV cache: the prologue is qk_norm_rotary_write_kv throughout;
    # the tables are step_tables' at the host write slots decode() feeds on the CPU too
    # (test_step_tables_in_a_cached_forward_at_any_slot)
    assert mode.calls == ((KERNEL_OPS - {"qk_norm_rotary"})
                          | {"logits_stats", "promote", "spd_update", "hybrid_embed"})
    assert got.tokens == want.tokens and got.seq_nfe == want.seq_nfe


# ---- qk_norm_rotary_write_kv ----------------------------------------------------------------------
SENTINEL = -7.25  # exact in every dtype: the cache's other slots must keep its bits


def _write_kv_case(gen, dtype, batch, length, n_q, n_kv, dim, rotary, slots_total, padded):
    qkv = (2 * torch.randn(batch, length, n_q + 2 * n_kv, dim + (3 if padded else 0),
                           generator=gen)).to(dtype)[..., :dim]
    positions = torch.randint(0, 4000, (batch, length), generator=gen)
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(rotary, 10000.0), dtype)
    q_w, k_w = ((1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype) for _ in range(2))
    slots = torch.randperm(slots_total, generator=gen)[:length]
    keys = torch.full((batch, n_kv, slots_total, dim), SENTINEL, dtype=dtype)
    return qkv, q_w, k_w, cos, sin, n_q, 1e-6, keys, keys.clone(), slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rotary_write_kv_matches_the_reference(backend, dtype):
    """The queries as qk_norm_rotary's, the cache's written slots as the reference writes them
    (keys within the same bound, values bit for bit), every other slot untouched."""
    b = Backend(backend)

    @settings(max_examples=example_count(25, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.integers(1, 3), length=st.integers(1, 9), n_kv=st.integers(1, 3),
           group=st.integers(1, 4), dim=st.sampled_from([8, 24, 64, 128]),
           padded=st.booleans(), data=st.data(), seed=st.integers(0, 2**31))
    def check(batch, length, n_kv, group, dim, padded, data, seed):
        rotary = data.draw(st.sampled_from(sorted({2, dim // 2, dim})), label="rotary")
        extra = data.draw(st.integers(0, 20), label="cache slots past the block")
        case = _write_kv_case(torch.Generator().manual_seed(seed), dtype, batch, length,
                              n_kv * group, n_kv, dim, rotary, length + extra, padded)
        keys_want, values_want = case[7].clone(), case[8].clone()
        want = qk_norm_rotary_write_kv_reference(*case[:7], keys_want, values_want, case[9])
        keys, values = b.to(case[7], case[8])
        got = b.op("qk_norm_rotary_write_kv")(*b.to(*case[:5]), *case[5:7], keys, values,
                                               b.to(case[9]))
        what = f"{dtype} B{batch} L{length} kv {n_kv}x{group} D{dim} R{rotary}"
        assert got.shape == want.shape and got.is_contiguous(), what
        exact = qk_norm_rotary_reference(*(t.double() if torch.is_tensor(t) else t
                                           for t in (case[0][:, :, :n_kv * (group + 1)],
                                                     *case[1:7])))
        n_q = n_kv * group
        _check_case(b, got, exact[:, :n_q], want, what + " queries", sum_error(dim))
        keys, values = keys.cpu(), values.cpu()
        written = torch.zeros(length + extra, dtype=torch.bool)
        written[case[9]] = True
        assert (keys[:, :, ~written] == SENTINEL).all() and (values[:, :, ~written] == SENTINEL).all()
        assert torch.equal(values, values_want), what + ": values"
        _check_case(b, keys[:, :, case[9]], exact[:, n_q:], keys_want[:, :, case[9]],
                    what + " keys", sum_error(dim))

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_qk_norm_rotary_write_kv_errors(backend):
    b = Backend(backend)
    case = list(b.to(*_write_kv_case(torch.Generator().manual_seed(0), torch.float32, 2, 4, 4, 2,
                                     16, 8, 10, False)))
    with pytest.raises(RuntimeError, match="qkv must hold n_q_heads"):
        b.op("qk_norm_rotary_write_kv")(*case[:5], 3, *case[6:])
    with pytest.raises(RuntimeError, match="values must have keys' strides"):
        b.op("qk_norm_rotary_write_kv")(*case[:8], case[8].transpose(2, 3).contiguous()
                                        .transpose(2, 3), case[9])
    with pytest.raises(RuntimeError, match=r"slots must be int64 \[4\]"):
        b.op("qk_norm_rotary_write_kv")(*case[:9], case[9][:3])
    if backend == "cpu":
        with pytest.raises(RuntimeError, match=r"slots must be in \[0, 10\)"):
            b.op("qk_norm_rotary_write_kv")(*case[:9], case[9] + 10)
    from dmax_ext import ops
    cpu_case = _write_kv_case(torch.Generator().manual_seed(0), torch.float32, 2, 4, 4, 2, 16, 8,
                              10, False)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 10\) \(keys' slots\)"):
        ops.qk_norm_rotary_write_kv(*cpu_case[:9], cpu_case[9] - 1 - cpu_case[9].max())


# ---- step_tables ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_tables_match_the_reference(backend, dtype):
    """fed and the mask exactly the reference's (every mask byte written: the emulated output
    starts at 2, neither false nor true), cos / sin within one rounding of the dtype past the
    float32 angle's (the exact cos of the same float32 angle as the yardstick)."""
    b = Backend(backend)

    @settings(max_examples=example_count(25, 10, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.integers(1, 4), block=st.sampled_from([4, 8, 32]), blocks=st.integers(1, 3),
           short=st.integers(0, 3), extra=st.integers(0, 40), half=st.sampled_from([1, 4, 16, 32]),
           seed=st.integers(0, 2**31))
    def check(batch, block, blocks, short, extra, half, seed):
        gen = torch.Generator().manual_seed(seed)
        length = block * blocks - short  # (short > 0: the fed tokens end inside a block)
        first = block * int(torch.randint(0, 4, (1,), generator=gen))
        span = first + length + extra
        positions = torch.randint(0, 5000, (batch, length), generator=gen)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(half).float() / half))
        valid_from = torch.randint(0, first + 1, (batch,), generator=gen)
        slot = torch.tensor([first])
        got = [t.cpu() for t in b.op("step_tables")(*b.to(positions, inv_freq, valid_from, slot),
                                                    span, block, dtype)]
        want = step_tables_reference(positions, inv_freq, valid_from, slot, span, block, dtype)
        what = f"{b} {dtype} B{batch} T{length} at {first} span {span} R{2 * half}"
        assert torch.equal(got[0], want[0]), what + ": fed"
        assert (got[3].view(torch.uint8) <= 1).all(), what + ": unwritten mask bytes"
        assert torch.equal(got[3], want[3]), what + ": mask"
        angles = positions.float()[..., None] * torch.cat((inv_freq, inv_freq))
        for name, g, w, exact in (("cos", got[1], want[1], angles.double().cos()),
                                  ("sin", got[2], want[2], angles.double().sin())):
            assert g.dtype == dtype and g.shape == w.shape, what + name
            _check_case(b, g, exact, w, what + " " + name, 4 * UNIT_ROUNDOFF)

    check()


def test_step_tables_in_a_cached_forward_at_any_slot():
    """On the GPU path the model's cached forward makes its tables with step_tables at a device
    write slot (a replayed CUDA graph's form) and at an int slot (an eager step) alike, so the
    two give the same logits bitwise; also with the op on its emulated kernel. The CPU path
    (variants on) makes torch's tables: the same logits within rounding (torch's float32 cos
    and sin may differ from the op's by an ulp)."""
    from dmax_calls import dmax_calls
    from dmax_ext.model import random_model
    Backend("simt-random")
    model = random_model("tiny", dtype=torch.float32)
    model.set_moe_impl("grouped")
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 500, (2, 8), generator=gen)
    positions, valid_from = torch.arange(8, 16).expand(2, 8), torch.tensor([0, 3])

    def forward(write_slot, mode=None):
        cache = model.new_cache(2, 24)
        with torch.no_grad(), (mode or dmax_calls()) as calls:
            out = model.forward_cached(cache, input_ids=x, position_ids=positions,
                                       write_slot=write_slot, valid_from=valid_from,
                                       block_length=8, span=24)
        return out, calls
    cpu_path, calls = forward(8)
    assert "step_tables" not in {name for name, _ in calls}
    model.set_cpu_variants(False)
    for slot in (8, torch.tensor(8)):
        got, calls = forward(slot)
        assert "step_tables" in {name for name, _ in calls}
        if isinstance(slot, int):
            want = got
        assert torch.equal(got, want)
    torch.testing.assert_close(want, cpu_path, rtol=1e-5, atol=1e-5)
    mode = _OnEmulatedKernels()
    emulated, _ = forward(torch.tensor(8), mode)
    assert "step_tables" in mode.calls
    torch.testing.assert_close(emulated, want, rtol=1e-5, atol=1e-5)
