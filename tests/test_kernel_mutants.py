"""Targeted cases from the mutation campaign (docs/TESTING.md, "Mutation campaign"): inputs and
schedule seeds that kill kernel mutants the general random tests let survive. Emulated kernels
only (torch.ops.dmax_simt); every case is checked against dmax_ext.reference.

block_first_true (csrc/kernels/block_reduce.cuh) ends with a __syncthreads so that promote's
second call may reuse `scratch`: without it, a warp that has already finished the first call's
min over the warps writes its second-call vote (first *low* masked position) while a thread of
another warp has not read the first-call votes (first *masked* position) yet. The row below
makes that visible: warp 0's first masked position (0) is confident, warp 1's first masked
position (32) is the first low one. Correct result: only position 0 is promoted; a thread of
warp 1 that reads warp 0's second-call vote (64 = none) takes 32 as the first masked position
and promotes position 32 too. The emulator runs each ready thread until it blocks, and the lane
that completes a warp collective runs on, so the race shows only when lane 0 of warp 0 is the last
of its warp to reach the second call's ballot and thread 32 comes after it in the random order:
about 1 block in 1000. Hence 4096 rows (each block draws its own order) under 8 random schedule
seeds (deterministic: measured 2-4 wrong rows per 1024 on the mutant); ~0.2 s per launch.
"""
import pytest
import torch
from spd_step_cases import MASK, _load_simt

from dmax_ext.reference import promote_reference

pytestmark = pytest.mark.simt

SCHEDULE_SEEDS = [0, 1, *range(2, 10)]


def _prefix_row(L: int = 64, rows: int = 4096):
    ids = torch.full((rows, L), 7, dtype=torch.int64)
    conf = torch.full((rows, L), 0.9)
    pred = torch.full((rows, L), 3, dtype=torch.int64)
    ids[:, 0] = MASK                     # warp 0: first masked, confident
    ids[:, 32] = MASK                    # warp 1: first masked, and the first low one
    conf[:, 32] = 0.1
    ids[:, 40:] = MASK                   # more masked positions in warp 1, confident
    return ids, conf, pred


@pytest.mark.parametrize("L", [64, 96])  # 2 and 3 warps
def test_promote_prefix_scratch_reuse_simt(L):
    _load_simt()
    ids, conf, pred = _prefix_row(L)
    want = promote_reference(ids, conf, pred, 0.5, MASK, True)
    assert want[:, 0].all() and not want[:, 1:].any()
    for seed in SCHEDULE_SEEDS:
        torch.ops.dmax_simt.set_schedule_seed(seed)
        got = torch.ops.dmax_simt.promote(ids, conf, pred, 0.5, MASK, True)
        bad = (got != want).any(1).nonzero().flatten().tolist()
        assert not bad, f"schedule seed {seed}, L={L}: {len(bad)} wrong rows, e.g. row {bad[0]}: " \
                        f"promoted {got[bad[0]].nonzero().flatten().tolist()}"
