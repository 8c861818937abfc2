"""spd_update (SPEC section 3 steps 4-5): the CPU op, the CUDA kernel on the simt emulation
(several schedules) and, with a GPU, on CUDA, against dmax_ext.reference.spd_update_reference;
hand-checked steps; opcheck; argument errors."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spd_step_cases import (BACKENDS, BACKENDS_ONE_SCHEDULE, MASK, Backend, example_count,
                             random_block)

from dmax_ext import ops
from dmax_ext.reference import promote_reference, spd_update_reference

M = MASK


def run_update(backend, ids, active, promoted, pred, conf, accept):
    out = backend.op("spd_update")(*backend.to(ids, active, promoted, pred, conf), accept, M)
    new_ids, changed, converged = (t.cpu() for t in out)
    B, L = ids.shape
    assert (new_ids.dtype, changed.dtype, converged.dtype) == (torch.int64, torch.bool, torch.bool)
    assert new_ids.shape == changed.shape == (B, L) and converged.shape == (B,)
    return new_ids, changed, converged


def check_against_reference(backend, ids, active, promoted, pred, conf, accept):
    got = run_update(backend, ids, active, promoted, pred, conf, accept)
    want = spd_update_reference(ids, active, promoted, pred, conf, accept, M)
    for name, g, w in zip(("new_ids", "changed", "converged"), got, want):
        assert torch.equal(g, w), (f"{backend} {name}\nids={ids}\nactive={active}\n"
                                   f"promoted={promoted}\npred={pred}\nconf={conf}\n"
                                   f"got={g}\nwant={w}")


# -- random inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_steps_match_reference(backend):
    b = Backend(backend)

    @settings(max_examples=example_count(250, 50, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 8),
           L=st.one_of(st.integers(1, 64), st.sampled_from([255, 256, 257, 600])),
           p_masked=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
           p_active=st.sampled_from([0.0, 0.5, 1.0]),
           conf_kind=st.sampled_from(["uniform", "coarse"]), realistic=st.booleans(),
           accept=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**31))
    def check(B, L, p_masked, p_active, conf_kind, realistic, accept, seed):
        gen = torch.Generator().manual_seed(seed)
        ids, conf, pred, active = random_block(gen, B, L, p_masked=p_masked, p_active=p_active,
                                               conf_kind=conf_kind)
        if realistic:  # masked positions are active; promoted comes from promote
            active |= ids == M
            promoted = promote_reference(ids, conf, pred, 0.5, M, True)
        else:  # any flags: the op is defined for them all
            promoted = torch.rand(B, L, generator=gen) < 0.3
        check_against_reference(b, ids, active, promoted, pred, conf, accept)

    check()


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_strided_inputs(backend):
    b = Backend(backend)
    ids, conf, pred, active = random_block(torch.Generator().manual_seed(5), 40, 6)
    promoted = promote_reference(ids, conf, pred, 0.5, M, True)
    views = [t.t().contiguous().t() for t in (ids, active, promoted, pred, conf)]
    check_against_reference(b, *views, 0.9)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_empty_block(backend):
    b = Backend(backend)
    e = torch.zeros(3, 0, dtype=torch.int64)
    f = torch.zeros(3, 0, dtype=torch.bool)
    new_ids, changed, converged = run_update(b, e, f, f, e, torch.zeros(3, 0), 0.9)
    assert converged.tolist() == [True] * 3  # nothing active is confident, nothing changed


# -- hand-checked steps (accept threshold 0.9); each row is one sequence of the same batch --------
F, T = False, True
CASES = [
    # ids, active, promoted, pred, conf -> new_ids, changed, converged
    # promoted take pred; the inactive prompt tail keeps its id even with another pred
    ([5, M, M, M], [F, T, T, T], [F, T, F, F], [9, 7, 8, 9], [.1, .8, .3, .6],
     [5, 7, M, M], [F, T, F, F], F),
    # the active unmasked position is revised (7 -> 10) while 8 is promoted
    ([5, 7, M, M], [F, T, T, T], [F, F, T, F], [9, 10, 8, 9], [.1, .95, .6, .4],
     [5, 10, 8, M], [F, T, T, F], F),
    # nothing masked: every active position takes pred; none differs: converged by nothing changed
    ([5, 7, 8, 9], [F, T, T, T], [F, F, F, F], [1, 7, 8, 9], [.1, .5, .5, .5],
     [5, 7, 8, 9], [F, F, F, F], T),
    # changes, but every active conf >= .9 (the prompt's .1 does not count): converged by confidence
    ([5, 7, M, M], [F, T, T, T], [F, F, T, T], [1, 8, 3, 4], [.1, .95, .91, .9],
     [5, 8, 3, 4], [F, T, T, T], T),
    # a promoted prediction equal to the mask id: masked again, nothing changed -> converged
    ([M, M, 1, 1], [T, T, F, F], [T, F, F, F], [M, 3, 1, 1], [.95, .2, .1, .1],
     [M, M, 1, 1], [F, F, F, F], T),
    # nothing active: nothing to update, converged
    ([1, 2, 3, 4], [F, F, F, F], [F, F, F, F], [5, 6, 7, 8], [0., 0., 0., 0.],
     [1, 2, 3, 4], [F, F, F, F], T),
    # a NaN confidence is not confident
    ([M, 2, 3, 4], [T, F, F, F], [T, F, F, F], [9, 2, 3, 4], [float("nan"), 1., 1., 1.],
     [9, 2, 3, 4], [T, F, F, F], F),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked_steps(backend):
    b = Backend(backend)
    cols = list(zip(*CASES))
    ids, active, promoted, pred, conf = (torch.tensor(c) for c in cols[:5])
    want = (torch.tensor(cols[5]), torch.tensor(cols[6]), torch.tensor(cols[7]))
    for got in (run_update(b, ids, active, promoted, pred, conf, 0.9),
                spd_update_reference(ids, active, promoted, pred, conf, 0.9, M)):
        for g, w in zip(got, want):
            assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_accept_threshold_is_compared_in_float32(backend):
    b = Backend(backend)
    ids = torch.tensor([[M, 4]])
    out = run_update(b, ids, torch.tensor([[T, T]]), torch.tensor([[T, F]]), torch.tensor([[3, 5]]),
                     torch.tensor([[0.9, 0.9]]), 0.9)
    assert out[1].tolist() == [[T, T]] and out[2].tolist() == [T]


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_long_block_converges_per_sequence(backend):
    # L = 600 > one block of threads: the kernel loops; row 0 has one unconfident position at
    # the very end, row 1 none.
    b = Backend(backend)
    L = 600
    ids = torch.full((2, L), M)
    active = torch.ones(2, L, dtype=torch.bool)
    promoted = torch.ones(2, L, dtype=torch.bool)
    pred = torch.arange(2 * L).view(2, L)
    conf = torch.ones(2, L)
    conf[0, -1] = 0.5
    new_ids, changed, converged = run_update(b, ids, active, promoted, pred, conf, 0.9)
    assert torch.equal(new_ids, pred) and changed.all()
    assert converged.tolist() == [False, True]


# -- the op contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_opcheck(backend):
    b = Backend(backend)
    ids, conf, pred, active = random_block(torch.Generator().manual_seed(1), 3, 32)
    promoted = promote_reference(ids, conf, pred, 0.5, M, True)
    inputs = (ids, active, promoted, pred, conf)
    for args in (inputs, [t.t().contiguous().t() for t in inputs]):  # outputs stay contiguous
        torch.library.opcheck(b.namespace.spd_update.default, b.to(*args) + (0.9, M))


def test_wrapper_matches_op():
    ids, conf, pred, active = random_block(torch.Generator().manual_seed(2), 4, 32)
    promoted = promote_reference(ids, conf, pred, 0.5, M, True)
    got = ops.spd_update(ids, active, promoted, pred, conf, 0.9, M)
    for g, w in zip(got, spd_update_reference(ids, active, promoted, pred, conf, 0.9, M)):
        assert torch.equal(g, w)


def _args(**changes):
    ids, conf, pred, active = random_block(torch.Generator().manual_seed(0), 2, 8)
    args = dict(ids=ids, active=active, promoted=active.clone(), pred=pred, conf=conf,
                accept_threshold=0.9, mask_id=M)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, name", [
    (dict(ids=torch.zeros(2, 8)), TypeError, "ids"),
    (dict(active=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "active"),
    (dict(promoted=torch.zeros(2, 9, dtype=torch.bool)), ValueError, "promoted"),
    (dict(pred=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "pred"),
    (dict(conf=torch.zeros(2, 8, dtype=torch.bfloat16)), TypeError, "conf"),
    (dict(active=torch.zeros(2, 8, dtype=torch.bool, device="meta")), ValueError, "active"),
    (dict(accept_threshold=1.01), ValueError, "accept_threshold"),
    (dict(accept_threshold="0.9"), ValueError, "accept_threshold"),
])
def test_wrapper_rejects_bad_arguments(changes, error, name):
    with pytest.raises(error, match=name):
        ops.spd_update(**_args(**changes))


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
@pytest.mark.parametrize("changes, name", [
    (dict(active=torch.zeros(2, 8, dtype=torch.uint8)), "active"),
    (dict(promoted=torch.zeros(2, 7, dtype=torch.bool)), "promoted"),
    (dict(conf=torch.zeros(2, 8, dtype=torch.float16)), "conf"),
    (dict(accept_threshold=-1.0), "accept_threshold"),
])
def test_native_op_rejects_bad_arguments(backend, changes, name):
    b = Backend(backend)
    a = _args(**changes)
    with pytest.raises(RuntimeError, match=name):
        b.op("spd_update")(*b.to(a["ids"], a["active"], a["promoted"], a["pred"], a["conf"]),
                           a["accept_threshold"], M)
