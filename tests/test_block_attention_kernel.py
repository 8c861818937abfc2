"""dmax.block_attention's CUDA kernels (csrc/kernels/block_attention.cuh) on the simt emulation
under three schedules and, with a GPU, on CUDA: against a float64 computation of the same
attention within 2x the error of SDPA in the same dtype (the CPU op's rule,
tests/test_model_block_attention.py), on hypothesis shapes that take both the one-launch path and
the split keys with their merge (the emulation stands for a 4-multiprocessor device, so the
modest shapes here split); rows that may attend nothing; strided cache slices; the head-dim
limit the model relies on; argument errors; opcheck; the model's attention on the kernel."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spd_step_cases import BACKENDS, BACKENDS_ONE_SCHEDULE, Backend, example_count
from test_model_block_attention import _case, _exact, _sdpa
from tolerances import assert_within_naive_error

from dmax_ext.model.attention import BLOCK_ATTENTION_MAX_HEAD_DIM
from dmax_ext.reference import block_attention_reference

KERNEL_BACKENDS = [name for name in BACKENDS if name != "cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The emulation's multiprocessor count (csrc/cuda/bindings/common.h) and the kernels' tiles:
# enough to tell which kernel a call takes and whether it splits its keys (mirrors
# block_attention.cu's uses_tensor_cores and choose_block_attention_splits).
EMULATED_MULTIPROCESSORS, MIN_KEYS_PER_SPLIT = 4, 64
ROWS_PER_BLOCK = 16      # the CUDA-core kernel: tokens of one head
TC_ROWS_PER_BLOCK = 64   # the tensor-core kernel: rows of a key head's group of query heads


def tensor_cores(dtype, dim) -> bool:
    return dtype != torch.float32 and dim % 16 == 0 and dim <= BLOCK_ATTENTION_MAX_HEAD_DIM


def splits_keys(batch, heads, length, slots, kv_heads=1, dtype=torch.float32, dim=8) -> bool:
    if tensor_cores(dtype, dim):
        row_blocks = batch * kv_heads * -(-(heads // kv_heads * length) // TC_ROWS_PER_BLOCK)
    else:
        row_blocks = batch * heads * -(-length // ROWS_PER_BLOCK)
    wanted = -(-2 * EMULATED_MULTIPROCESSORS // row_blocks)
    return min(wanted, -(-slots // MIN_KEYS_PER_SPLIT)) > 1


def kernel_path(dtype, dim, split) -> str:
    return ("tensor cores" if tensor_cores(dtype, dim) else "CUDA cores") + (
        ", split keys" if split else ", one launch")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_attention_within_sdpa_error(backend, dtype):
    b = Backend(backend)
    seen = set()

    @settings(max_examples=example_count(0, 14, backend), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 4),
           length=st.integers(1, 40), extra=st.integers(0, 300),
           dim=st.sampled_from([8, 20, 33, 48, 64, 128]), shared_mask=st.booleans(),
           seed=st.integers(0, 2**31))
    def check(batch, kv_heads, group, length, extra, dim, shared_mask, seed):
        heads, slots = kv_heads * group, length + extra
        case = _case(dtype, batch, heads, kv_heads, length, slots, dim,
                     shared_mask=shared_mask, seed=seed)
        got = b.op("block_attention")(*b.to(*case[:4]), case[4]).cpu()
        assert got.dtype == dtype and got.shape == (batch, length, heads * dim)
        path = kernel_path(dtype, dim, splits_keys(batch, heads, length, slots, kv_heads, dtype,
                                                   dim))
        seen.add(path)
        assert_within_naive_error(got, _exact(case), _sdpa(*case),
                                  f"{b} {dtype} B{batch} H{heads}/{kv_heads} T{length} S{slots} "
                                  f"D{dim} {path}")

    check()
    # every path, whatever hypothesis drew: one launch and split keys, at head dims of both
    # kernels in 16-bit dtypes (20: CUDA cores; 64: tensor cores, LLaDA2.0-mini's group of 4)
    for batch, heads, kv_heads, length, slots, dim in (
            (1, 2, 1, 12, 333, 20), (2, 8, 2, 32, 100, 20),
            (1, 4, 1, 12, 333, 64), (3, 8, 2, 40, 90, 64)):
        case = _case(dtype, batch, heads, kv_heads, length, slots, dim, seed=5)
        path = kernel_path(dtype, dim, splits_keys(batch, heads, length, slots, kv_heads, dtype,
                                                   dim))
        seen.add(path)
        got = b.op("block_attention")(*b.to(*case[:4]), case[4]).cpu()
        assert_within_naive_error(got, _exact(case), _sdpa(*case), f"{b} {dtype} {path}")
    kernels = ["CUDA cores"] + (["tensor cores"] if dtype != torch.float32 else [])
    assert seen == {f"{k}, {s}" for k in kernels for s in ("one launch", "split keys")}, seen


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_outputs_are_the_references_bits(backend, dtype):
    """The 16-bit outputs of both kernels, one launch and split keys, are the reference's
    (float32 scores, softmax and sums, one rounding) on >= 99% of elements. The tensor-core
    kernel's products of 16-bit probabilities keep that only with each probability in two terms
    (block_attention_tc.cuh): with one, ~63% of the bits."""
    b = Backend(backend)
    seen = set()
    for dim in (20, 64, 128):
        for batch, heads, kv_heads, length, slots in ((2, 8, 2, 32, 40), (1, 2, 1, 16, 300)):
            same = total = 0
            for seed in range(2):
                case = _case(dtype, batch, heads, kv_heads, length, slots, dim, seed=seed)
                got = b.op("block_attention")(*b.to(*case[:4]), case[4]).cpu()
                same += (got == block_attention_reference(*case)).sum().item()
                total += got.numel()
            path = kernel_path(dtype, dim, splits_keys(batch, heads, length, slots, kv_heads,
                                                       dtype, dim))
            seen.add(path)
            assert same >= 0.99 * total, f"{b} {dtype} D{dim} {path}: {same / total:.1%}"
    assert len(seen) == 4, seen


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("slots", [40, 400], ids=["one-launch", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_query_that_may_attend_nothing_gets_zeros(backend, slots, dtype):
    """Zeros (not NaN) for a row masked everywhere, in one launch and through the merge, where
    a split may see no allowed key while the others do; the other rows as the reference. Both
    kernels: float32 takes the CUDA-core one, bfloat16 at D 64 the tensor-core one."""
    b = Backend(backend)
    q, keys, values, mask, scale = _case(dtype, batch=1, heads=2, kv_heads=1, length=8,
                                         slots=slots, dim=64)
    mask = mask.clone()
    mask[0, 0, 3] = False
    mask[0, 0, 5, :slots - 30] = False  # row 5 sees only the last keys: other splits see none
    assert splits_keys(1, 2, 8, slots, 1, dtype, 64) == (slots == 400)
    got = b.op("block_attention")(*b.to(q, keys, values, mask), scale).cpu()
    assert got[0, 3].eq(0).all() and got.isfinite().all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, block_attention_reference(q, keys, values, mask, scale),
                               **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_slices_read_like_contiguous_copies(backend):
    b = Backend(backend)
    for slots in (50, 300):
        q, keys, values, mask, scale = _case(torch.bfloat16, batch=1, heads=4, kv_heads=2,
                                             length=16, slots=slots, max_slots=slots + 40)
        op = b.op("block_attention")
        want = op(*b.to(q.contiguous(), keys.contiguous(), values.contiguous(), mask), scale)
        got = op(*b.to(q, keys, values, mask.expand(1, 1, 16, slots)), scale)
        assert torch.equal(got.cpu(), want.cpu()), slots


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_misaligned_rows_read_like_aligned_ones(backend, dtype):
    """The tensor-core kernel copies rows 16 bytes a lane when every row starts 16-byte aligned
    (block_attention_tc_vector_rows) and an element a lane otherwise: keys and values one
    element past an aligned start give the same bits as aligned copies, in one launch and with
    split keys."""
    b = Backend(backend)

    def shifted(t):  # the same values, starting 2 bytes past torch's aligned allocation
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    for batch, heads, kv_heads, length, slots in ((2, 8, 2, 32, 60), (1, 2, 1, 16, 300)):
        q, keys, values, mask, scale = _case(dtype, batch, heads, kv_heads, length, slots, 64)
        op = b.op("block_attention")
        want = op(*b.to(q, keys.contiguous(), values.contiguous(), mask), scale).cpu()
        got = op(*b.to(shifted(q), shifted(keys), shifted(values), mask), scale).cpu()
        assert keys.contiguous().data_ptr() % 16 == 0 and shifted(keys).data_ptr() % 16 != 0
        assert torch.equal(got, want), (batch, slots)


@pytest.mark.parametrize("backend", BACKENDS_ONE_SCHEDULE)
def test_the_head_dim_limit(backend):
    """The kernel takes the head dims the model sends it (BLOCK_ATTENTION_MAX_HEAD_DIM) and
    refuses one more; the CPU op has no limit."""
    b = Backend(backend)
    for dim in (BLOCK_ATTENTION_MAX_HEAD_DIM, BLOCK_ATTENTION_MAX_HEAD_DIM + 8):
        case = _case(torch.float32, batch=1, heads=2, kv_heads=1, length=4, slots=9, dim=dim)
        call = lambda: b.op("block_attention")(*b.to(*case[:4]), case[4]).cpu()  # noqa: E731
        if backend == "cpu" or dim <= BLOCK_ATTENTION_MAX_HEAD_DIM:
            assert_within_naive_error(call(), _exact(case), _sdpa(*case), f"{b} D{dim}")
        else:
            with pytest.raises(RuntimeError, match=f"head dims up to "
                                                   f"{BLOCK_ATTENTION_MAX_HEAD_DIM}, got {dim}"):
                call()


@pytest.mark.parametrize("backend", [name for name in BACKENDS_ONE_SCHEDULE if name != "cpu"])
def test_kernel_path_argument_errors(backend):
    b = Backend(backend)
    q, keys, values, mask, scale = b.to(*_case(torch.float32, batch=2, heads=4, kv_heads=2,
                                               length=8, slots=20))
    op = b.op("block_attention")
    with pytest.raises(RuntimeError, match="block_attention: mask must be bool"):
        op(q, keys, values, mask[:, :, :4], scale)
    with pytest.raises(RuntimeError, match="block_attention: keys must be"):
        op(q, keys.double(), values, mask, scale)
    with pytest.raises(RuntimeError, match=r"the query heads \(4\) must be a multiple"):
        op(q, keys[:, :1].expand(2, 3, 20, 64), values[:, :1].expand(2, 3, 20, 64), mask, scale)
    with pytest.raises(RuntimeError, match="block_attention: q must be"):
        op(q.transpose(2, 3), keys, values, mask, scale)


@pytest.mark.parametrize("backend", [name for name in BACKENDS_ONE_SCHEDULE if name != "cpu"])
def test_opcheck(backend):
    b = Backend(backend)
    for slots in (20, 300):  # one launch; split keys
        case = _case(torch.bfloat16, batch=1, heads=2, kv_heads=1, length=6, slots=slots)
        torch.library.opcheck(b.namespace.block_attention.default, (*b.to(*case[:4]), case[4]))


def test_past_the_head_dim_limit_the_gpu_path_keeps_sdpa():
    """A decode on the GPU path (the CPU variants off, standing for CUDA) attends through
    dmax.block_attention up to the kernel's head dims and through SDPA past them, with the
    same tokens. (That a cached step's attention is the op alone: tests/test_roofline.py.)"""
    import dataclasses

    import dmax_ext
    from dmax_ext.model import PRESETS, random_model
    from dmax_calls import dmax_calls

    for head_dim in (BLOCK_ATTENTION_MAX_HEAD_DIM, BLOCK_ATTENTION_MAX_HEAD_DIM + 32):
        model = random_model(dataclasses.replace(PRESETS["tiny"], head_dim=head_dim),
                             dtype=torch.float32, lm_head_gain=25.0, lm_head_from_embedding=True)
        prompt = [[5, 17, 29, 41, 53, 65, 77]]
        want = dmax_ext.decode(model, prompt, gen_length=32, block_length=32, threshold=0.5)
        model.set_cpu_variants(False)
        with dmax_calls() as calls:
            got = dmax_ext.decode(model, prompt, gen_length=32, block_length=32, threshold=0.5)
        names = {name for name, _ in calls}
        assert ("block_attention" in names) == (head_dim <= BLOCK_ATTENTION_MAX_HEAD_DIM), names
        assert got.tokens == want.tokens, head_dim
