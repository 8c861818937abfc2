"""onpolicy_noise (SPEC section 4 step 3): the CPU op, the CUDA kernel on the simt emulation
(forward, reverse and random schedules) and, with a GPU, on CUDA, against
dmax_ext.reference.onpolicy_noise_reference (exactly: the output is ids). Also: draws stay
inside the top-k and follow q ~ p^(1/T), same seeds give the same ids, what is left untouched,
opcheck, argument errors."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spd_step_cases import BACKENDS, BACKENDS_ONE_SCHEDULE, MASK, Backend, example_count

from dmax_ext import ops
from dmax_ext.reference import onpolicy_noise_reference


def run(b, noisy_ids, flags, topk_ids, topk_probs, temperature=0.0, seeds=None, mask_id=MASK):
    args = b.to(noisy_ids, flags, topk_ids, topk_probs, seeds)
    out = b.op("onpolicy_noise")(*args[:4], temperature, args[4], mask_id)
    assert out.dtype == torch.int64 and out.shape == noisy_ids.shape
    return out.cpu()


def random_case(gen, B, L, k, p_masked=0.6, prob_kind="sorted"):
    """noisy_ids with masked positions, flags, and top-k candidates with descending probs
    ("sorted"), some exactly tied or zero ("coarse"), or all zero ("zero")."""
    noisy = torch.randint(0, 1000, (B, L), generator=gen)
    noisy[torch.rand(B, L, generator=gen) < p_masked] = MASK
    flags = torch.rand(B, generator=gen) < 0.7
    topk_ids = torch.randint(0, 150_000, (B, L, k), generator=gen)
    probs = torch.rand(B, L, k, generator=gen)
    if prob_kind == "coarse":
        probs = (probs * 3).round() / 3
    elif prob_kind == "zero":
        probs.zero_()
    probs = probs.sort(-1, descending=True).values
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1.0)
    return noisy, flags, topk_ids, probs.float()


def check_against_reference(b, noisy, flags, topk_ids, topk_probs, temperature, seeds):
    got = run(b, noisy, flags, topk_ids, topk_probs, temperature, seeds)
    want = onpolicy_noise_reference(noisy, flags, topk_ids, topk_probs, temperature, seeds,
                                    mask_id=MASK)
    assert torch.equal(got, want), f"{b} T={temperature}\ngot={got}\nwant={want}"
    return got


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_random_cases_match_reference(backend_name):
    b = Backend(backend_name)

    @settings(max_examples=example_count(150, 30, backend_name), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 8), L=st.one_of(st.integers(1, 64), st.sampled_from([255, 256, 257])),
           k=st.integers(1, 8), p_masked=st.sampled_from([0.0, 0.5, 1.0]),
           prob_kind=st.sampled_from(["sorted", "sorted", "coarse", "zero"]),
           temperature=st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0.01, 20.0),
           seed=st.integers(0, 2**31))
    def check(B, L, k, p_masked, prob_kind, temperature, seed):
        gen = torch.Generator().manual_seed(seed)
        case = random_case(gen, B, L, k, p_masked, prob_kind)
        seeds = torch.randint(-2**63, 2**63 - 1, (B,), generator=gen)
        check_against_reference(b, *case, temperature, seeds)

    check()


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_only_masked_positions_of_flagged_samples_change(backend_name):
    b = Backend(backend_name)
    noisy = torch.tensor([[MASK, 5, MASK, 7], [MASK, MASK, 3, MASK]])
    flags = torch.tensor([True, False])
    topk_ids = torch.arange(100, 132).view(2, 4, 4)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(2, 4, 4).contiguous()
    for temperature in (0.0, 1.0):
        out = run(b, noisy, flags, topk_ids, probs, temperature, torch.tensor([1, 2]))
        assert out[0, 1] == 5 and out[0, 3] == 7 and torch.equal(out[1], noisy[1])
        for l in (0, 2):
            assert out[0, l] in topk_ids[0, l]
        if temperature == 0.0:
            assert out[0].tolist() == [100, 5, 108, 7]


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_k1_and_zero_probabilities_take_the_first_candidate(backend_name):
    b = Backend(backend_name)
    noisy = torch.full((2, 3), MASK)
    flags = torch.tensor([True, True])
    topk_ids = torch.arange(2 * 3 * 4).view(2, 3, 4)
    probs = torch.zeros(2, 3, 4)
    probs[1, :, 0] = float("nan")  # an undefined logits row (logits_stats' NaN contract)
    out = run(b, noisy, flags, topk_ids, probs, 1.0, torch.tensor([1, 2]))
    assert torch.equal(out, topk_ids[..., 0])
    out = run(b, noisy, flags, topk_ids[..., :1].contiguous(), torch.rand(2, 3, 1), 1.0, None)
    assert torch.equal(out, topk_ids[..., 0])


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_draw_frequencies_follow_tempered_probabilities(backend_name, temperature):
    b = Backend(backend_name)
    B, L, k = 40, 256, 5
    p = torch.tensor([0.35, 0.3, 0.2, 0.1, 0.05])
    topk_ids = torch.tensor([11, 22, 33, 44, 55]).expand(B, L, k).contiguous()
    out = run(b, torch.full((B, L), MASK), torch.ones(B, dtype=torch.bool), topk_ids,
              p.expand(B, L, k).contiguous(), temperature, torch.arange(B) * 104729 + 7)
    assert torch.isin(out, topk_ids[0, 0]).all()  # never outside the top-k
    freq = torch.stack([(out == i).double().mean() for i in topk_ids[0, 0]])
    q = p.double() ** (1 / temperature)
    want = q / q.sum()
    sigma = (want * (1 - want) / (B * L)).sqrt()
    assert ((freq - want).abs() <= 4.5 * sigma).all(), f"freq={freq}\nwant={want}"


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_same_seed_same_draws(backend_name):
    b = Backend(backend_name)
    gen = torch.Generator().manual_seed(4)
    noisy, _, topk_ids, probs = random_case(gen, 3, 64, 8, p_masked=1.0)
    flags = torch.ones(3, dtype=torch.bool)
    topk_ids[2], probs[2] = topk_ids[0], probs[0]
    seeds = torch.tensor([5, 6, 5])
    first = run(b, noisy, flags, topk_ids, probs, 1.0, seeds)
    assert torch.equal(first, run(b, noisy, flags, topk_ids, probs, 1.0, seeds))
    assert torch.equal(first[0], first[2])  # the draw depends on (seed, l), not on b
    assert not torch.equal(first, run(b, noisy, flags, topk_ids, probs, 1.0, seeds + 1))


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_opcheck(backend_name):
    b = Backend(backend_name)
    if b.schedule_seed is not None:
        torch.ops.dmax_simt.set_schedule_seed(b.schedule_seed)
    gen = torch.Generator().manual_seed(1)
    noisy, flags, topk_ids, probs = b.to(*random_case(gen, 3, 17, 4))
    op = b.namespace.onpolicy_noise.default
    torch.library.opcheck(op, (noisy, flags, topk_ids, probs, 0.0, None, MASK))
    torch.library.opcheck(op, (noisy, flags, topk_ids, probs, 0.7, b.to(torch.tensor([1, 2, 3])),
                               MASK))


def test_wrapper_errors_name_the_argument():
    gen = torch.Generator().manual_seed(2)
    noisy, flags, topk_ids, probs = random_case(gen, 2, 5, 3)
    seeds = torch.tensor([1, 2])
    good = dict(noisy_ids=noisy, sample_flags=flags, topk_ids=topk_ids, topk_probs=probs,
                temperature=1.0, seeds=seeds, mask_id=MASK)
    ops.onpolicy_noise(**good)
    bad_cases = [
        (dict(noisy_ids=noisy.int()), TypeError, "noisy_ids"),
        (dict(noisy_ids=noisy[0]), ValueError, "noisy_ids"),
        (dict(sample_flags=flags.int()), TypeError, "sample_flags"),
        (dict(sample_flags=flags[:1]), ValueError, "sample_flags"),
        (dict(topk_ids=topk_ids[:, :4]), ValueError, "topk_ids"),
        (dict(topk_ids=torch.zeros(2, 5, 9, dtype=torch.int64)), ValueError, "k"),
        (dict(topk_probs=probs.double()), TypeError, "topk_probs"),
        (dict(topk_probs=probs[..., :2]), ValueError, "topk_probs"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(seeds=None), ValueError, "seeds"),
        (dict(seeds=seeds[:1]), ValueError, "seeds"),
        (dict(seeds=seeds.to("meta")), ValueError, "seeds"),
        (dict(mask_id=1.5), TypeError, "mask_id"),
        (dict(vocab_size=1000), ValueError, "mask_id"),
        (dict(vocab_size=MASK + 1, topk_ids=topk_ids - 150_000), ValueError, "topk_ids"),
        (dict(vocab_size=MASK + 1, topk_ids=topk_ids + MASK), ValueError, "topk_ids"),
    ]
    for change, error, name in bad_cases:
        with pytest.raises(error, match=name):
            ops.onpolicy_noise(**{**good, **change})
    ops.onpolicy_noise(**{**good, "seeds": None, "temperature": 0.0})  # no draw: no seeds needed
    ops.onpolicy_noise(**{**good, "vocab_size": MASK + 1})


@pytest.mark.parametrize("backend_name", BACKENDS_ONE_SCHEDULE)
def test_native_op_checks_its_arguments(backend_name):
    b = Backend(backend_name)
    op = b.op("onpolicy_noise")
    gen = torch.Generator().manual_seed(3)
    noisy, flags, topk_ids, probs = b.to(*random_case(gen, 2, 5, 3))
    seeds = b.to(torch.tensor([1, 2]))
    cases = [((noisy.int(), flags, topk_ids, probs, 0.0, None, MASK), "noisy_ids must be Long"),
             ((noisy, flags[:1], topk_ids, probs, 0.0, None, MASK), "sample_flags must have shape"),
             ((noisy, flags, topk_ids[..., :0], probs, 0.0, None, MASK),
              r"k \(last dim of topk_ids\)"),
             ((noisy, flags, topk_ids, probs.double(), 0.0, None, MASK),
              "topk_probs must be Float"),
             ((noisy, flags, topk_ids, probs, -2.0, None, MASK), "temperature"),
             ((noisy, flags, topk_ids, probs, 1.0, None, MASK), "seeds"),
             ((noisy, flags, topk_ids, probs, 1.0, seeds[:1], MASK), "seeds must have shape")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
