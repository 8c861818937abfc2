"""hybrid_embed (SPEC section 3 step 6): the CPU op, the CUDA kernel on the simt emulation (several
schedules) and, with a GPU, on CUDA, against dmax_ext.reference.hybrid_embed_reference: soft rows
within tolerance (tests/tolerances.py), hard rows exact, every other element untouched bit for bit;
a hand-checked release case; opcheck; argument errors; the whole SPD step under torch.compile."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spd_step_cases import BACKENDS, BACKENDS_ONE_SCHEDULE, Backend, example_count, random_block
from tolerances import assert_hybrid_embed_close

from dmax_ext import ops
from dmax_ext.reference import hybrid_embed_reference, promote_reference, spd_update_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = -7.25  # exact in every dtype; untouched elements must keep its bits


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def random_case(gen, B, L, H, k, V, dtype, *, p_masked=0.3):
    mask_id = V - 1
    weight = (torch.randn(V, H, generator=gen) * torch.rand(V, 1, generator=gen) * 2).to(dtype)
    ids, _, _, active = random_block(gen, B, L, vocab=V, mask_id=mask_id, p_masked=p_masked)
    changed = torch.rand(B, L, generator=gen) < 0.5
    topk_ids = torch.randint(0, V, (B, L, k), generator=gen)
    probs = torch.rand(B, L, k, generator=gen).sort(dim=-1, descending=True).values
    # at times the k probabilities sum to 1: no share for the mask row
    total = torch.where(torch.rand(B, L, 1, generator=gen) < 0.2, 1.0,
                        torch.rand(B, L, 1, generator=gen))
    topk_probs = (probs / probs.sum(-1, keepdim=True) * total).float()
    return dict(weight=weight, ids=ids, active=active, changed=changed, topk_ids=topk_ids,
                topk_probs=topk_probs, mask_id=mask_id)


def run_and_check(backend, embeds, case):
    """Runs the op on `embeds` (poisoned with SENTINEL by the caller; may be a view into a larger
    poisoned buffer `embeds._base`) and checks it against the reference."""
    before = embeds.clone()
    want = hybrid_embed_reference(before, **case)
    base = embeds._base if embeds._base is not None else embeds
    base_before = base.clone()
    dev_base = backend.to(base)
    dev_embeds = dev_base.as_strided(embeds.shape, embeds.stride(), embeds.storage_offset())
    c = case
    backend.op("hybrid_embed")(dev_embeds, *backend.to(c["weight"], c["ids"], c["active"],
                               c["changed"], c["topk_ids"], c["topk_probs"]), c["mask_id"])
    got_base = dev_base.cpu()
    got = got_base.as_strided(embeds.shape, embeds.stride(), embeds.storage_offset())

    soft = c["active"] & (c["ids"] != c["mask_id"])
    hard = ~soft & c["changed"]
    untouched = ~(soft | hard)
    assert torch.equal(bits(got[untouched]), bits(before[untouched])), f"{backend}: untouched rows"
    assert torch.equal(bits(got[hard]), bits(c["weight"][c["ids"][hard]])), f"{backend}: hard rows"
    outside = torch.ones_like(base_before, dtype=torch.bool)
    outside.as_strided(embeds.shape, embeds.stride(), embeds.storage_offset()).fill_(False)
    assert torch.equal(bits(got_base[outside]), bits(base_before[outside])), (
        f"{backend}: wrote outside the view")
    assert_hybrid_embed_close(got, before, **c, what=repr(backend))
    return got, want


def poisoned(shape, dtype):
    return torch.full(shape, SENTINEL, dtype=dtype)


# -- random inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_cases_match_reference(backend, dtype):
    b = Backend(backend)
    simt = backend.startswith("simt")

    @settings(max_examples=example_count(40, 8, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 8), L=st.integers(1, 16 if simt else 64),
           H=st.sampled_from([1, 7, 8, 64, 100, 2048]), k=st.integers(1, 8),
           V=st.integers(2, 300), seed=st.integers(0, 2**31))
    def check(B, L, H, k, V, seed):
        gen = torch.Generator().manual_seed(seed)
        if simt and H == 2048:
            B, L = min(B, 2), min(L, 8)  # emulated threads are slow: keep the work bounded
        run_and_check(b, poisoned((B, L, H), dtype), random_case(gen, B, L, H, k, V, dtype))

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_block_shapes(backend):
    # B = 8, L = 64 (every position its own block), k = 8, with an H that keeps the emulation quick
    gen = torch.Generator().manual_seed(11)
    H = 2048 if backend in ("cpu", "cuda") else 48
    case = random_case(gen, 8, 64, H, 8, 64, torch.bfloat16, p_masked=0.5)
    run_and_check(Backend(backend), poisoned((8, 64, H), torch.bfloat16), case)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_views(backend, dtype):
    # embeds: positions 2..2+L of a longer poisoned buffer, and (second case) shifted by one
    # element so that no row start is 16-byte aligned (the kernel's scalar path); weight: a
    # column slice of a wider matrix (row stride > H).
    b = Backend(backend)
    gen = torch.Generator().manual_seed(7)
    B, L, H, k, V = 3, 5, 64, 2, 40
    case = random_case(gen, B, L, H, k, V, dtype)
    wide = torch.randn(V, H + 8, generator=gen).to(dtype)
    wide[:, :H] = case["weight"]
    case["weight"] = wide[:, :H]
    big = poisoned((B, L + 3, H + 1), dtype)
    run_and_check(b, big[:, 2:2 + L, :H], case)
    big = poisoned((B, L + 3, H + 1), dtype)
    run_and_check(b, big[:, 2:2 + L, 1:], case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_to_write_and_everything_soft(backend):
    b = Backend(backend)
    gen = torch.Generator().manual_seed(3)
    case = random_case(gen, 2, 8, 16, 3, 20, torch.float32)
    case["active"][:] = False
    case["changed"][:] = False
    got, _ = run_and_check(b, poisoned((2, 8, 16), torch.float32), case)
    assert (got == SENTINEL).all()
    case["active"][:] = True
    case["ids"][:] = 3  # nothing masked: all soft, `changed` does not matter
    got, _ = run_and_check(b, poisoned((2, 8, 16), torch.float32), case)
    assert (got != SENTINEL).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_release_case_by_hand(backend):
    # k = 1 (the release): E[t] = (3, 4), |E[t]| = 5; E[mask] = (0, 1); p = 0.5.
    # h = 0.5 (3, 4) + 0.5 (0, 1) = (1.5, 2.5), |h| = sqrt(8.5); target = 0.5 * 5 + 0.5 * 1 = 3.
    # Position 1 is masked and changed (its pred was the mask id): the hard mask row.
    b = Backend(backend)
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    embeds = poisoned((1, 3, 2), torch.float32)
    dev = b.to(embeds)
    b.op("hybrid_embed")(dev, *b.to(weight, torch.tensor([[0, 1, 0]]),
                                    torch.tensor([[True, True, False]]),
                                    torch.tensor([[False, True, False]]),
                                    torch.tensor([[[0], [0], [0]]]),
                                    torch.tensor([[[0.5], [0.9], [0.9]]])), 1)
    got = dev.cpu()[0]
    scale = 3.0 / (8.5 ** 0.5 + 1e-6)
    torch.testing.assert_close(got[0], torch.tensor([1.5 * scale, 2.5 * scale]), rtol=1e-6, atol=0)
    assert got[1].tolist() == [0.0, 1.0]
    assert got[2].tolist() == [SENTINEL, SENTINEL]


# -- ids outside the vocabulary --------------------------------------------------------------------
def _bad_ids_case():
    case = random_case(torch.Generator().manual_seed(0), 2, 4, 8, 2, 10, torch.float32)
    case["active"][:] = True
    case["ids"][:] = 1
    return case


@pytest.mark.parametrize("field, value",
                         [("ids", 10), ("ids", -1), ("topk_ids", 10), ("topk_ids", -3)])
def test_wrapper_rejects_ids_outside_the_vocabulary(field, value):
    case = _bad_ids_case()
    case["changed"][:] = True
    if field == "ids":
        case["active"][:] = False  # hard rows read weight[ids]
    case[field].view(-1)[0] = value
    with pytest.raises(ValueError, match=field):
        ops.hybrid_embed(poisoned((2, 4, 8), torch.float32), **case)


@pytest.mark.parametrize("field", ["ids", "topk_ids"])
def test_native_cpu_op_rejects_ids_outside_the_vocabulary(field):
    case = _bad_ids_case()
    case["changed"][:] = True
    if field == "ids":
        case["active"][:] = False
    case[field].view(-1)[0] = 10
    with pytest.raises(RuntimeError, match=field):
        torch.ops.dmax.hybrid_embed(poisoned((2, 4, 8), torch.float32), *case.values())


def test_simt_kernel_writes_nan_rows_for_ids_outside_the_vocabulary():
    # The CUDA kernel cannot raise: it writes NaN rows rather than read outside weight.
    b = Backend("simt-forward")
    case = _bad_ids_case()
    case["topk_ids"][0, 0, 1] = 10
    case["active"][1, 0] = False
    case["changed"][1, 0] = True
    case["ids"][1, 0] = -5
    embeds = poisoned((2, 4, 8), torch.float32)
    b.op("hybrid_embed")(embeds, *case.values())
    assert embeds[0, 0].isnan().all() and embeds[1, 0].isnan().all()
    assert not embeds[0, 1:].isnan().any()


# -- the op contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(backend, dtype):
    b = Backend(backend)
    case = random_case(torch.Generator().manual_seed(1), 2, 8, 16, 3, 20, dtype)
    args = b.to(poisoned((2, 8, 16), dtype), *list(case.values())[:-1]) + (case["mask_id"],)
    torch.library.opcheck(b.namespace.hybrid_embed.default, args)


def test_wrapper_matches_reference():
    case = random_case(torch.Generator().manual_seed(2), 2, 8, 32, 2, 20, torch.float32)
    embeds = poisoned((2, 8, 32), torch.float32)
    want = hybrid_embed_reference(embeds, **case)
    assert ops.hybrid_embed(embeds, **case) is None
    torch.testing.assert_close(embeds, want, rtol=1e-5, atol=1e-6)


def _args(**changes):
    case = random_case(torch.Generator().manual_seed(0), 2, 4, 8, 2, 10, torch.bfloat16)
    args = dict(embeds=poisoned((2, 4, 8), torch.bfloat16), **case)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, name", [
    (dict(embeds=torch.zeros(2, 4, 8, dtype=torch.float64)), TypeError, "embeds"),
    (dict(embeds=torch.zeros(8, 8, dtype=torch.bfloat16)), ValueError, "embeds"),
    (dict(embeds=torch.zeros(2, 8, 4, dtype=torch.bfloat16).transpose(1, 2)), ValueError, "embeds"),
    (dict(weight=torch.zeros(10, 8)), TypeError, "weight"),
    (dict(weight=torch.zeros(10, 9, dtype=torch.bfloat16)), ValueError, "weight"),
    (dict(ids=torch.zeros(2, 5, dtype=torch.int64)), ValueError, "ids"),
    (dict(active=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "active"),
    (dict(changed=torch.zeros(2, 4, dtype=torch.bool, device="meta")), ValueError, "changed"),
    (dict(topk_ids=torch.zeros(2, 4, 9, dtype=torch.int64),
          topk_probs=torch.zeros(2, 4, 9)), ValueError, "k "),
    (dict(topk_ids=torch.zeros(2, 4, 0, dtype=torch.int64),
          topk_probs=torch.zeros(2, 4, 0)), ValueError, "k "),
    (dict(topk_ids=torch.zeros(2, 4, 2, dtype=torch.int32)), TypeError, "topk_ids"),
    (dict(topk_probs=torch.zeros(2, 4, 3)), ValueError, "topk_probs"),
    (dict(topk_probs=torch.zeros(2, 4, 2, dtype=torch.float64)), TypeError, "topk_probs"),
    (dict(mask_id=10), ValueError, "mask_id"),
])
def test_wrapper_rejects_bad_arguments(changes, error, name):
    with pytest.raises(error, match=name):
        ops.hybrid_embed(**_args(**changes))


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("changes, name", [
    (dict(weight=torch.zeros(10, 8)), "weight"),
    (dict(topk_probs=torch.zeros(2, 4, 2, dtype=torch.float64)), "topk_probs"),
    (dict(topk_ids=torch.zeros(2, 4, 9, dtype=torch.int64), topk_probs=torch.zeros(2, 4, 9)), "k "),
    (dict(changed=torch.zeros(2, 3, dtype=torch.bool)), "changed"),
    (dict(mask_id=-1), "mask_id"),
])
def test_native_op_rejects_bad_arguments(backend, changes, name):
    b = Backend(backend)
    a = _args(**changes)
    mask_id = a.pop("mask_id")
    with pytest.raises(RuntimeError, match=name):
        b.op("hybrid_embed")(*b.to(*a.values()), mask_id)


# -- one SPD step, compiled ------------------------------------------------------------------------
def test_spd_step_compiles_fullgraph():
    """promote -> spd_update -> hybrid_embed through the dmax_ext.ops wrappers in one graph (fake
    kernels, hybrid_embed's in-place write functionalized), equal to the eager reference."""
    gen = torch.Generator().manual_seed(4)
    B, L, H, V = 2, 16, 32, 40
    mask_id = V - 1
    weight = torch.randn(V, H, generator=gen)
    ids, conf, pred, _ = random_block(gen, B, L, vocab=V, mask_id=mask_id)
    active = ids == mask_id
    topk_ids = torch.stack([pred, (pred + 1) % V], dim=-1)
    topk_probs = torch.stack([conf, (1 - conf) / 2], dim=-1)

    def step(embeds, ids):
        promoted = ops.promote(ids, conf, pred, 0.5, mask_id)
        new_ids, changed, converged = ops.spd_update(ids, active, promoted, pred, conf, 0.9,
                                                     mask_id)
        ops.hybrid_embed(embeds, weight, new_ids, active, changed, topk_ids, topk_probs, mask_id)
        return new_ids, converged

    # aot_eager: dynamo, the fake kernels and functionalization (what the ops must support),
    # without inductor compiling the glue in C++
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    embeds = weight[ids].clone()
    new_ids, converged = compiled(embeds, ids)

    promoted = promote_reference(ids, conf, pred, 0.5, mask_id)
    want_ids, changed, want_converged = spd_update_reference(ids, active, promoted, pred, conf,
                                                             0.9, mask_id)
    want_embeds = hybrid_embed_reference(weight[ids], weight, want_ids, active, changed, topk_ids,
                                         topk_probs, mask_id)
    assert torch.equal(new_ids, want_ids) and torch.equal(converged, want_converged)
    torch.testing.assert_close(embeds, want_embeds, rtol=1e-5, atol=1e-6)
