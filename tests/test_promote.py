"""promote (SPEC section 3 step 3, and the hard-threshold baseline): the CPU op, the CUDA kernel
on the simt emulation (several schedules) and, with a GPU, on CUDA, against
dmax_ext.reference.promote_reference; hand-checked cases; opcheck; argument errors."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spd_step_cases import (BACKENDS, BACKENDS_ONE_SCHEDULE, MASK, Backend, example_count,
                             random_block)

from dmax_ext import ops
from dmax_ext.reference import promote_reference

M = MASK


def run_promote(backend, ids, conf, pred, threshold, prefix):
    out = backend.op("promote")(*backend.to(ids, conf, pred), threshold, M, prefix)
    assert out.dtype == torch.bool and out.shape == ids.shape
    return out.cpu()


def check_against_reference(backend, ids, conf, pred, threshold, prefix):
    got = run_promote(backend, ids, conf, pred, threshold, prefix)
    want = promote_reference(ids, conf, pred, threshold, M, prefix)
    assert torch.equal(got, want), (
        f"{backend} prefix={prefix} threshold={threshold}\nids={ids}\nconf={conf}\npred={pred}\n"
        f"got={got}\nwant={want}")


# -- random inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix", [True, False], ids=["spd", "baseline"])
def test_random_blocks_match_reference(backend, prefix):
    b = Backend(backend)

    @settings(max_examples=example_count(200, 40, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 8),
           L=st.one_of(st.integers(1, 64), st.sampled_from([255, 256, 257, 600])),
           p_masked=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
           conf_kind=st.sampled_from(["uniform", "coarse", "near"]),
           threshold=st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]) | st.floats(0, 1),
           seed=st.integers(0, 2**31))
    def check(B, L, p_masked, conf_kind, threshold, seed):
        gen = torch.Generator().manual_seed(seed)
        ids, conf, pred, _ = random_block(gen, B, L, p_masked=p_masked, conf_kind=conf_kind)
        check_against_reference(b, ids, conf, pred, threshold, prefix)

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_strided_inputs(backend):
    b = Backend(backend)
    ids, conf, pred, _ = random_block(torch.Generator().manual_seed(3), 40, 6)
    # [L, B] storage read as [B, L]: non-contiguous views
    ids, conf, pred = ids.t().contiguous().t(), conf.t().contiguous().t(), pred.t().contiguous().t()
    assert not ids.is_contiguous()
    for prefix in (True, False):
        check_against_reference(b, ids, conf, pred, 0.5, prefix)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_empty_batch_and_block(backend):
    b = Backend(backend)
    for shape in [(0, 32), (3, 0)]:
        ids = torch.full(shape, M)
        out = run_promote(b, ids, torch.zeros(shape), ids.clone(), 0.5, True)
        assert out.shape == shape


# -- hand-checked cases, straight from SPEC step 3 (threshold 0.5) ---------------------------------
# Each row of a case is one sequence of a batch: rows must not influence each other.
SPD_CASES = [
    # (ids, conf, expected)
    ([M, M, M, M], [.9, .8, .3, .9], [1, 1, 0, 0]),      # the run stops at the first masked < .5
    ([5, M, 6, M], [.1, .9, 0., .7], [0, 1, 0, 1]),      # unmasked lows neither count nor break
    ([M, M, 7, M], [.2, .9, .9, .9], [1, 0, 0, 0]),      # empty run: the first masked alone
    ([5, 6, M, M], [.9, .9, .1, .95], [0, 0, 1, 0]),     # ... also when it is not at position 0
    ([1, 2, 3, 4], [.1, .1, .1, .1], [0, 0, 0, 0]),      # nothing masked: nothing promoted
    ([M, M, M, M], [.6, .7, .8, .5], [1, 1, 1, 1]),      # all masked, all >= .5 (.5 itself passes)
    ([M, 3, M, 4], [.4, .9, .3, .9], [1, 0, 0, 0]),      # every masked one low: the first alone
    ([7, M, 8, M], [.0, .55, .0, .45], [0, 1, 0, 0]),    # interleaved, run of one
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_spd_hand_checked(backend):
    b = Backend(backend)
    ids = torch.tensor([c[0] for c in SPD_CASES])
    conf = torch.tensor([c[1] for c in SPD_CASES])
    pred = torch.full_like(ids, M)  # SPD promotion ignores pred, even the mask id itself
    want = torch.tensor([c[2] for c in SPD_CASES], dtype=torch.bool)
    assert torch.equal(run_promote(b, ids, conf, pred, 0.5, True), want)
    assert torch.equal(promote_reference(ids, conf, pred, 0.5, M, True), want)


BASELINE_CASES = [
    # (ids, pred, conf, expected) with threshold 0.5
    ([M, 5, M, M], [3, 5, 4, M], [.6, .99, .4, .9], [1, 0, 0, 0]),   # pred == mask is not eligible
    ([M, M, M, M], [1, 2, 3, 4], [.1, .9, .2, .8], [0, 1, 0, 1]),    # anywhere, not only a prefix
    # none reaches .5: those within 1e-5 of the best
    ([M, M, M, 9], [1, 2, 3, 9], [.3, .3 - 5e-6, .29, .9], [1, 1, 0, 0]),
    ([M, M, 1, 2], [M, M, 3, 4], [.9, .9, .9, .9], [0, 0, 0, 0]),    # nothing eligible
    ([M, M, M, M], [1, 2, 3, 4], [.2, .2, .2, .2], [1, 1, 1, 1]),    # all tied below the threshold
    # Something reaches .5: only those (SPEC). The release would also take .499999 here, since its
    # limit is min(best - 1e-5, tau) = .499994.
    ([M, M, 1, 2], [5, 6, 3, 4], [.500004, .499999, .1, .1], [1, 0, 0, 0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_baseline_hand_checked(backend):
    b = Backend(backend)
    ids = torch.tensor([c[0] for c in BASELINE_CASES])
    pred = torch.tensor([c[1] for c in BASELINE_CASES])
    conf = torch.tensor([c[2] for c in BASELINE_CASES])
    want = torch.tensor([c[3] for c in BASELINE_CASES], dtype=torch.bool)
    assert torch.equal(run_promote(b, ids, conf, pred, 0.5, False), want)
    assert torch.equal(promote_reference(ids, conf, pred, 0.5, M, False), want)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("prefix", [True, False], ids=["spd", "baseline"])
def test_threshold_is_compared_in_float32(backend, prefix):
    # float32(0.9) < 0.9 in double: conf = 0.9f must still reach threshold 0.9.
    b = Backend(backend)
    ids = torch.tensor([[M, M]])
    out = run_promote(b, ids, torch.tensor([[0.9, 0.9]]), torch.tensor([[1, 2]]), 0.9, prefix)
    assert out.tolist() == [[True, True]]


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_threshold_extremes(backend):
    b = Backend(backend)
    ids = torch.tensor([[M, 4, M, M]])
    conf, pred = torch.tensor([[0.0, 0.3, 0.999, 1.0]]), torch.tensor([[1, 2, 3, 4]])
    assert run_promote(b, ids, conf, pred, 0.0, True).tolist() == [[True, False, True, True]]
    assert run_promote(b, ids, conf, pred, 1.0, True).tolist() == [[True, False, False, False]]
    assert run_promote(b, ids, conf, pred, 1.0, False).tolist() == [[False, False, False, True]]


# -- the op contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_opcheck(backend):
    b = Backend(backend)
    ids, conf, pred, _ = random_block(torch.Generator().manual_seed(1), 3, 32)
    strided = [t.t().contiguous().t() for t in (ids, conf, pred)]  # outputs stay contiguous
    for inputs in ((ids, conf, pred), strided):
        for prefix in (True, False):
            torch.library.opcheck(b.namespace.promote.default, b.to(*inputs) + (0.5, M, prefix))


def test_wrapper_matches_op():
    ids, conf, pred, _ = random_block(torch.Generator().manual_seed(2), 4, 32)
    assert torch.equal(ops.promote(ids, conf, pred, 0.5, M),
                       promote_reference(ids, conf, pred, 0.5, M))
    assert torch.equal(ops.promote(ids, conf, pred, 0.5, M, prefix=False),
                       promote_reference(ids, conf, pred, 0.5, M, False))


def _args(**changes):
    ids, conf, pred, _ = random_block(torch.Generator().manual_seed(0), 2, 8)
    args = dict(ids=ids, conf=conf, pred=pred, threshold=0.5, mask_id=M)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, name", [
    (dict(ids=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "ids"),
    (dict(ids=torch.zeros(2, 8, 1, dtype=torch.int64)), ValueError, "ids"),
    (dict(conf=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "conf"),
    (dict(conf=torch.zeros(2, 7)), ValueError, "conf"),
    (dict(pred=torch.zeros(8, 2, dtype=torch.int64)), ValueError, "pred"),
    (dict(pred=[1, 2]), TypeError, "pred"),
    (dict(conf=torch.zeros(2, 8, device="meta")), ValueError, "conf"),
    (dict(threshold=1.5), ValueError, "threshold"),
    (dict(threshold=-0.01), ValueError, "threshold"),
    (dict(threshold=float("nan")), ValueError, "threshold"),
])
def test_wrapper_rejects_bad_arguments(changes, error, name):
    with pytest.raises(error, match=name):
        ops.promote(**_args(**changes))


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("changes, name", [
    (dict(conf=torch.zeros(2, 8, dtype=torch.float64)), "conf"),
    (dict(pred=torch.zeros(2, 9, dtype=torch.int64)), "pred"),
    (dict(ids=torch.zeros(16, dtype=torch.int64)), "ids"),
    (dict(threshold=2.0), "threshold"),
])
def test_native_op_rejects_bad_arguments(backend, changes, name):
    b = Backend(backend)
    a = _args(**changes)
    with pytest.raises(RuntimeError, match=name):
        b.op("promote")(*b.to(a["ids"], a["conf"], a["pred"]), a["threshold"], M, True)
