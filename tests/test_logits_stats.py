"""logits_stats (SPEC section 3 step 2): the CPU op, the CUDA kernel on the simt emulation
(forward, reverse and random schedules) and, with a GPU, on CUDA, against
dmax_ext.reference.logits_stats_reference: ids exactly, probabilities within tests/tolerances.py.
Also: the counter-based RNG's PyTorch mirror, edge cases (ties, -inf, misaligned rows, NaN),
Gumbel sampling statistics, opcheck, torch.compile, argument errors."""
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cpu_flags import OTHER_CAPABILITIES, run_on_capability
from sampling_cases import LOGIT_KINDS, random_logits
from spd_step_cases import BACKENDS, BACKENDS_ONE_SCHEDULE, SANITIZER_RUN, Backend, example_count
from tolerances import assert_probs_close

from dmax_ext import ops
from dmax_ext.reference import logits_stats_reference, rng_uniform

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FULL_V = 157184  # LLaDA2's vocabulary


def run(b, logits, k, temperature=0.0, seeds=None):
    logits, seeds = b.to(logits, seeds)
    pred, conf, topk_ids, topk_probs = b.op("logits_stats")(logits, k, temperature, seeds)
    B, L, _ = logits.shape
    assert pred.shape == (B, L) and pred.dtype == torch.int64
    assert conf.shape == (B, L) and conf.dtype == torch.float32
    assert topk_ids.shape == (B, L, k) and topk_ids.dtype == torch.int64
    assert topk_probs.shape == (B, L, k) and topk_probs.dtype == torch.float32
    return pred.cpu(), conf.cpu(), topk_ids.cpu(), topk_probs.cpu()


def check_against_reference(b, logits, k, temperature=0.0, seeds=None):
    """logits may already be on the backend's device (a view run() must not copy)."""
    got = run(b, logits, k, temperature, seeds)
    logits = logits.cpu()
    want = logits_stats_reference(logits, k, temperature, seeds)
    what = f"{b} {tuple(logits.shape)} {logits.dtype} k={k} T={temperature}"
    assert torch.equal(got[2], want[2]), f"{what}: topk_ids\ngot={got[2]}\nwant={want[2]}"
    assert torch.equal(got[0], want[0]), f"{what}: pred\ngot={got[0]}\nwant={want[0]}"
    assert_probs_close(got[1], logits, got[0], f"{what}: conf", b.device)
    assert_probs_close(got[3], logits, got[2], f"{what}: topk_probs", b.device)
    return got


def seeds_for(gen: torch.Generator, B: int) -> torch.Tensor:
    return torch.randint(-2**63, 2**63 - 1, (B,), generator=gen)


# -- the RNG ---------------------------------------------------------------------------------------
def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _rng_uniform_int(seed: int, a: int, b: int) -> float:
    s = seed & 0xFFFFFFFFFFFFFFFF
    h = _mix32_int((s & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _mix32_int(h ^ (s >> 32))
    h = _mix32_int(h ^ a)
    h = _mix32_int(h ^ b)
    return ((h >> 8) + 0.5) / 2**24


def test_rng_mirror_matches_plain_integer_arithmetic():
    rnd = random.Random(0)
    cases = [(0, 0, 0), (-1, 2**32 - 1, 2**32 - 1), (2**63 - 1, 5, 7), (-2**63, 1, 0)]
    cases += [(rnd.randrange(-2**63, 2**63), rnd.randrange(2**32), rnd.randrange(2**32))
              for _ in range(300)]
    seeds, a, b = (torch.tensor(c, dtype=torch.int64) for c in zip(*cases))
    got = rng_uniform(seeds, a, b)
    assert got.dtype == torch.float64
    assert got.tolist() == [_rng_uniform_int(*c) for c in cases]


def test_rng_uniform_is_uniform_and_decorrelated():
    u = rng_uniform(torch.tensor([[7], [8]]), 3, torch.arange(200_000)).flatten()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (hist - 20_000).abs().max() < 6 * math.sqrt(20_000)
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01


# -- random inputs against the reference -----------------------------------------------------------
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_random_logits_match_reference(backend_name):
    b = Backend(backend_name)
    simt = backend_name.startswith("simt")

    @settings(max_examples=example_count(40, 12, backend_name), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 8), L=st.integers(1, 64),
           V=st.sampled_from([1, 2, 7, 8, 31, 33, 100, 511, 512, 513, 1000, 4097, 20000, FULL_V])
           | st.integers(1, 3000),
           k=st.integers(1, 8), dtype=st.sampled_from(DTYPES), kind=st.sampled_from(LOGIT_KINDS),
           temperature=st.sampled_from([0.0, 0.0, 1.0]) | st.floats(0.05, 4.0),
           seed=st.integers(0, 2**31))
    def check(B, L, V, k, dtype, kind, temperature, seed):
        # Cost ~ rows x V on CPU (the reference sorts every row), ~ rows x block on the emulation.
        budget = 40_000 if simt else 1_000_000
        rows = max(1, min(B * L, budget // max(V, 512)))
        B = min(B, rows)
        L = max(1, min(L, rows // B))
        gen = torch.Generator().manual_seed(seed)
        logits = random_logits(gen, B, L, V, dtype, kind)
        check_against_reference(b, logits, min(k, V), temperature, seeds_for(gen, B))

    check()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_vocabulary(backend_name, dtype):
    b = Backend(backend_name)
    gen = torch.Generator().manual_seed(11)
    rows = 1 if SANITIZER_RUN and backend_name.startswith("simt") else 2
    logits = random_logits(gen, 1, rows, FULL_V, dtype, "peaked")
    for k, temperature in [(1, 0.0), (8, 0.0), (5, 1.0)]:
        check_against_reference(b, logits, k, temperature, seeds_for(gen, 1))


_CAPABILITY_SCRIPT = """
import torch
from sampling_cases import random_logits
from dmax_ext.reference import logits_stats_reference
print(torch.backends.cpu.get_cpu_capability())
gen = torch.Generator().manual_seed(0)
for V, k, T, dtype, kind in [(5000, 8, 0.0, torch.bfloat16, "normal"), (37, 3, 0.0, torch.float16,
                             "ties"), (3001, 1, 0.9, torch.float32, "peaked"),
                             (300, 8, 1.5, torch.float32, "neg_inf"),
                             (9000, 4, 0.0, torch.bfloat16, "far_tail")]:
    x = random_logits(gen, 2, 3, V, dtype, kind)
    seeds = torch.tensor([4, 5])
    got = torch.ops.dmax.logits_stats(x, k, T, seeds)
    want = logits_stats_reference(x, k, T, seeds)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), (V, k, T)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-7)
# a NaN far below a peak, past the first block: still the row's error (conf NaN)
x = torch.randn(1, 2, 9000)
x[..., 0] = 60.0
x[0, 1, 8777] = float("nan")
conf = torch.ops.dmax.logits_stats(x, 2, 0.0, None)[1]
assert not conf[0, 0].isnan() and conf[0, 1].isnan(), conf
"""


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_other_cpu_capabilities(capability):
    """The CPU kernel is compiled per capability; ATEN_CPU_CAPABILITY selects the copy."""
    run_on_capability(capability, _CAPABILITY_SCRIPT)


# -- edge cases ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_rows(backend_name, dtype):
    """A storage offset of one element: rows start off the 16-byte boundary (scalar head)."""
    b = Backend(backend_name)
    gen = torch.Generator().manual_seed(5)
    for V in (5, 37, 1000, 4099):
        base = b.to(random_logits(gen, 1, 1, 3 * V + 1, dtype).flatten())
        logits = base[1:].view(1, 3, V)
        assert logits.is_contiguous() and logits.data_ptr() % 16 != 0
        check_against_reference(b, logits, min(8, V), 0.0)
        check_against_reference(b, logits, 1, 0.7, torch.tensor([3]))


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("V", [1, 3, 64, 1000])
def test_all_equal_rows(backend_name, V):
    b = Backend(backend_name)
    k = min(8, V)
    pred, conf, topk_ids, topk_probs = run(b, torch.full((2, 3, V), 0.25), k)
    assert (pred == 0).all() and torch.equal(topk_ids, torch.arange(k).expand(2, 3, k))
    torch.testing.assert_close(conf, torch.full((2, 3), 1 / V), rtol=2e-6, atol=0)
    torch.testing.assert_close(topk_probs, torch.full((2, 3, k), 1 / V), rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_ties_go_to_the_lowest_id(backend_name):
    b = Backend(backend_name)
    V = 3000
    logits = torch.zeros(1, 2, V)
    logits[0, 0, [2999, 1500, 700, 3]] = 5.0     # four-way tie for the top
    logits[0, 1, [10, 2990]] = 4.0                # two tied, then a tie of many at 0
    pred, _, topk_ids, _ = run(b, logits, 6)
    assert pred.tolist() == [[3, 10]]
    assert topk_ids.tolist() == [[[3, 700, 1500, 2999, 0, 1], [10, 2990, 0, 1, 2, 3]]]


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_neg_inf_logits(backend_name):
    b = Backend(backend_name)
    V = 700
    logits = torch.full((1, 2, V), float("-inf"))
    logits[0, 0, 650] = 2.0
    logits[0, 0, 20] = 1.0
    logits[0, 1, :] = torch.linspace(-5, 5, V)
    logits[0, 1, ::3] = float("-inf")
    pred, conf, topk_ids, topk_probs = check_against_reference(b, logits, 4)
    # fewer finite logits than k: the rest of the top-k are -inf ones, lowest ids first, p = 0
    assert topk_ids[0, 0].tolist() == [650, 20, 0, 1]
    assert topk_probs[0, 0, 2:].tolist() == [0.0, 0.0]
    seeds = torch.arange(1)
    for s in range(20):  # a -inf logit is never sampled
        pred, _, _, _ = run(b, logits, 1, 3.0, seeds + s)
        assert pred[0, 0].item() in (650, 20) and logits[0, 1, pred[0, 1]] > float("-inf")


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [5000, FULL_V])
def test_small_terms_still_count(backend_name, dtype, V):
    """A peak, then a tail of logits 9 to 19 below it less ln V: together they weigh ~1.2e-5 of
    the sum, ~40 times the tolerance. The CPU kernel skips the exponentials of groups of logits
    below the peak - (ln V + 20) (together < 2.1e-9 of the sum): a kernel that skipped these
    (from less than ln V + 9 below the peak) fails here."""
    b = Backend(backend_name)
    gen = torch.Generator().manual_seed(V)
    shift = math.log(V)
    logits = -shift - 9 - 10 * torch.rand(1, 2, V, generator=gen)
    logits[0, 0, 0] = 0.0
    logits[0, 1, V // 3] = 0.0  # the peak after the tail: the tail's groups are all summed
    check_against_reference(b, logits.to(dtype), 4)


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("poison", ["nan", "inf", "all_neg_inf"])
@pytest.mark.parametrize("V,peak", [(1000, None), (9000, 60.0)])
def test_undefined_rows_give_nan_conf(backend_name, poison, V, peak):
    """The kernels' error contract: NaN conf / topk_probs on that row only, ids in [0, V). With a
    peak first, the poison sits far below it, past the first block of the CPU kernel: where the
    kernel skips the exponentials of logits too small to count."""
    b = Backend(backend_name)
    logits = torch.randn(2, 3, V)
    if peak is not None:
        logits[..., 0] = peak
    if poison == "all_neg_inf":
        logits[1, 2] = float("-inf")
    else:
        logits[1, 2, V - 223] = float(poison)
    for temperature in (0.0, 1.0):
        pred, conf, topk_ids, topk_probs = run(b, logits, 4, temperature, torch.tensor([1, 2]))
        assert conf[1, 2].isnan() and topk_probs[1, 2].isnan().all()
        assert not conf.flatten()[:-1].isnan().any() and not topk_probs[:, :2].isnan().any()
        assert 0 <= pred.min() and pred.max() < V and 0 <= topk_ids.min() and topk_ids.max() < V


@pytest.mark.parametrize("poison", ["nan", "inf", "all_neg_inf"])
def test_wrapper_raises_on_undefined_rows(poison):
    logits = torch.randn(2, 3, 50)
    if poison == "all_neg_inf":
        logits[0, 1] = float("-inf")
    else:
        logits[0, 1, 7] = float(poison)
    with pytest.raises(ValueError, match=r"logits\[0, 1\]"):
        ops.logits_stats(logits, 2)
    with pytest.raises(ValueError, match=r"logits\[0, 1\]"):
        logits_stats_reference(logits, 2)
    assert ops.logits_stats(logits, 2, validate=False)[1][0, 1].isnan()


def test_wrapper_copies_non_contiguous_logits():
    logits = torch.randn(3, 4, 100).transpose(0, 1)
    got = ops.logits_stats(logits, 3)
    want = logits_stats_reference(logits, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


def test_empty_batch():
    for shape in [(0, 4, 10), (2, 0, 10)]:
        pred, conf, topk_ids, topk_probs = ops.logits_stats(torch.randn(shape), 2)
        assert pred.shape == shape[:2] and topk_probs.shape == (*shape[:2], 2)


# -- sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_same_seed_same_sample(backend_name):
    b = Backend(backend_name)
    logits = torch.randn(3, 8, 500)
    logits[2] = logits[0]
    seeds = torch.tensor([1, 2, 1])
    first = run(b, logits, 2, 1.0, seeds)[0]
    assert torch.equal(first, run(b, logits, 2, 1.0, seeds)[0])
    assert torch.equal(first[0], first[2])            # the sample depends on (seed, l), not on b
    assert not torch.equal(first, run(b, logits, 2, 1.0, seeds + 100)[0])
    # p and the top-k do not depend on the temperature
    greedy = run(b, logits, 2)
    assert torch.equal(greedy[2], run(b, logits, 2, 1.0, seeds)[2])


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_frequencies_follow_the_tempered_softmax(backend_name, temperature):
    b = Backend(backend_name)
    V, draws = 6, 600 if backend_name.startswith("simt") else 4000
    row = torch.tensor([2.0, 1.5, 0.0, -1.0, float("-inf"), 1.9])
    logits = row.expand(draws, 1, V).contiguous()
    pred = run(b, logits, 1, temperature, torch.arange(draws) * 7919 + 13)[0].flatten()
    freq = torch.bincount(pred, minlength=V).double() / draws
    want = torch.softmax(row.double() / temperature, -1)
    sigma = (want * (1 - want) / draws).sqrt()
    assert freq[4] == 0
    assert ((freq - want).abs() <= 4.5 * sigma + 1e-9).all(), f"freq={freq}\nwant={want}"


# -- opcheck, torch.compile ------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_opcheck(backend_name):
    b = Backend(backend_name)
    op = b.namespace.logits_stats.default
    if b.schedule_seed is not None:
        torch.ops.dmax_simt.set_schedule_seed(b.schedule_seed)
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        logits = b.to(random_logits(gen, 2, 3, 300, dtype))
        torch.library.opcheck(op, (logits, 3, 0.0, None))
        torch.library.opcheck(op, (logits, 1, 0.8, b.to(torch.tensor([5, 6]))))


def test_torch_compile_fullgraph():
    def step(logits, noisy_ids, flags, seeds):
        pred, conf, topk_ids, topk_probs = ops.logits_stats(logits, 4, 0.0)
        rolled = ops.onpolicy_noise(noisy_ids, flags, topk_ids, topk_probs, 1.0, seeds, mask_id=9)
        return pred, conf, rolled

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logits = torch.randn(2, 5, 40)
    noisy = torch.randint(0, 12, (2, 5))
    flags = torch.tensor([True, False])
    seeds = torch.tensor([3, 4])
    for got, want in zip(compiled(logits, noisy, flags, seeds), step(logits, noisy, flags, seeds)):
        assert torch.equal(got, want)


# -- argument errors -------------------------------------------------------------------------------
def test_wrapper_errors_name_the_argument():
    x = torch.randn(2, 3, 10)
    with pytest.raises(TypeError, match="logits"):
        ops.logits_stats(x.long(), 1)
    with pytest.raises(TypeError, match="logits"):
        ops.logits_stats([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="logits"):
        ops.logits_stats(x[0], 1)
    for k in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            ops.logits_stats(x, k)
    with pytest.raises(ValueError, match="k must be <= V"):
        ops.logits_stats(x[..., :3], 4)
    for t in (-0.1, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="temperature"):
            ops.logits_stats(x, 1, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seeds"):
        ops.logits_stats(x, 1, 1.0)
    with pytest.raises(TypeError, match="seeds"):
        ops.logits_stats(x, 1, 1.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="seeds"):
        ops.logits_stats(x, 1, 1.0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="seeds"):
        ops.logits_stats(x, 1, 1.0, torch.tensor([1, 2], device="meta"))
    ops.logits_stats(x, 1, 0.0, torch.tensor([1.0]))  # seeds are ignored when T == 0


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_native_op_checks_its_arguments(backend_name):
    b = Backend(backend_name)
    op = b.op("logits_stats")
    x = b.to(torch.randn(2, 3, 10))
    seeds = b.to(torch.tensor([1, 2]))
    cases = [((x.int(), 1, 0.0, None), "logits must be float32"),
             ((x[0], 1, 0.0, None), "logits must be"),
             ((x.transpose(0, 1), 1, 0.0, None), "contiguous"),
             ((x, 0, 0.0, None), "k must be in 1..8"),
             ((x, 9, 0.0, None), "k must be in 1..8"),
             ((x[..., :2].contiguous(), 3, 0.0, None), "k must be <= V"),
             ((x, 1, -1.0, None), "temperature"),
             ((x, 1, 1.0, None), "seeds"),
             ((x, 1, 1.0, seeds[:1]), "seeds must have shape"),
             ((x, 1, 1.0, seeds.int()), "seeds must be Long")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
