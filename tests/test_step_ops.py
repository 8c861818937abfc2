"""dmax.spd_step and dmax.threshold_step (CPU), a decoding step of a running batch as one op:
bitwise the step the native ops make one by one (decoding.step.spd_step_composed /
threshold_step_composed, what CUDA runs), and against the references composed
(dmax_ext.reference.spd_step_reference / threshold_step_reference) on hypothesis states with
converged rows, sampling, every dtype; the NaN error; argument errors; opcheck; and which path a
decode takes (the op on the CPU's own path, the ops one by one with the CPU variants off)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from dmax_calls import dmax_calls
from test_hybrid_embed import bits
from tolerances import assert_hybrid_embed_close

from dmax_ext import ops
from dmax_ext.decoding.backends import NativeOps
from dmax_ext.decoding.step import spd_step_composed, threshold_step_composed
from dmax_ext.reference import spd_step_reference, threshold_step_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THRESHOLD, ACCEPT = 0.5, 0.9


def random_state(gen, B, L, V, H, dtype, *, p_done=0.3, sampling=False, scale=4.0):
    """(logits, ids, embeds, done, step, active, weight, seeds): a block mid-decode. The logits
    are peaked at random so that confidences spread over [0, 1]."""
    mask_id = V - 1
    logits = torch.randn(B, L, V, generator=gen) * torch.rand(B, L, 1, generator=gen) * scale
    logits = logits.to(dtype)
    active = torch.rand(B, L, generator=gen) < 0.8
    ids = torch.randint(0, V - 1, (B, L), generator=gen)
    ids[active & (torch.rand(B, L, generator=gen) < 0.5)] = mask_id
    ids[~active & (torch.rand(B, L, generator=gen) < 0.1)] = mask_id  # a prompt with the mask id
    weight = torch.randn(V, H, generator=gen).to(dtype)
    embeds = torch.randn(B, L, H, generator=gen).to(dtype)
    done = torch.rand(B, generator=gen) < p_done
    step = torch.randint(0, 5, (), generator=gen)
    seeds = torch.randint(0, 2**40, (B,), generator=gen) if sampling else None
    return logits, ids, embeds, done, step, active, weight, seeds, mask_id


def run(fn, state, k, temperature):
    logits, ids, embeds, done, step, active, weight, seeds, mask_id = state
    ids, embeds, done, step = ids.clone(), embeds.clone(), done.clone(), step.clone()
    fn(logits, ids, embeds, done, step, active, weight, seeds, k, temperature, THRESHOLD, ACCEPT,
       mask_id)
    return ids, embeds, done, step


def composed(*args):
    spd_step_composed(NativeOps(), *args)


def run_threshold(fn, state, k, temperature):
    logits, ids, _, done, step, active, _, seeds, mask_id = state
    ids, done, step = ids.clone(), done.clone(), step.clone()
    fn(logits, ids, done, step, active, seeds, k, temperature, THRESHOLD, mask_id)
    return ids, done, step


def threshold_composed(*args):
    threshold_step_composed(NativeOps(), *args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_the_native_ops_one_by_one(dtype):
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 4), L=st.integers(1, 40), V=st.integers(3, 300),
           H=st.integers(1, 70), k=st.integers(1, 3), sampling=st.booleans(),
           p_done=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**31))
    def check(B, L, V, H, k, sampling, p_done, seed):
        gen = torch.Generator().manual_seed(seed)
        state = random_state(gen, B, L, V, H, dtype, p_done=p_done, sampling=sampling)
        k = min(k, V)
        temperature = 0.7 if sampling else 0.0
        got = run(ops.spd_step, state, k, temperature)
        want = run(composed, state, k, temperature)
        for name, g, w in zip(("ids", "embeds", "done", "step"), got, want):
            same = torch.equal(bits(g), bits(w)) if g.is_floating_point() else torch.equal(g, w)
            assert same, f"{name}: B{B} L{L} V{V} H{H} k{k} sampling {sampling} done {p_done}"
        done_before = state[3]
        assert torch.equal(got[0][done_before], state[1][done_before])  # converged rows kept
        assert torch.equal(bits(got[1][done_before]), bits(state[2][done_before]))
        assert got[3].item() == state[4].item() + 1

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_the_reference(dtype):
    """The reference composes the reference ops: the ids, convergence and step are the same
    wherever no confidence lies within 1e-4 of a threshold (there the two softmaxes may round
    to different sides), the embeddings within hybrid_embed's tolerance."""
    checked = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        state = random_state(gen, 3, 16, 60, 24, dtype, p_done=0.3)
        conf = torch.softmax(state[0].double(), -1).amax(-1)
        if ((conf - THRESHOLD).abs() < 1e-4).any() or ((conf - ACCEPT).abs() < 1e-4).any():
            continue
        got = run(ops.spd_step, state, 2, 0.0)
        want = spd_step_reference(*state[:8], 2, 0.0, THRESHOLD, ACCEPT, state[8])
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), seed
        assert torch.equal(got[3], want[3])
        logits, ids, embeds, done, step, active, weight, seeds, mask_id = state
        # hybrid_embed's inputs as the step fed them: the new ids, soft / changed positions of
        # the rows still running, the reference's top-2.
        _, _, topk_ids, topk_probs = ops.logits_stats(logits, 2)
        live = ~done[:, None]
        changed = (want[0] != ids) & live
        assert_hybrid_embed_close(got[1], embeds, weight, want[0], active & live, changed,
                                  topk_ids, topk_probs, mask_id)
        checked += 1
    assert checked >= 30


def test_a_nan_probability_is_an_error():
    gen = torch.Generator().manual_seed(0)
    state = list(random_state(gen, 2, 5, 20, 8, torch.float32, p_done=0.0))
    state[0][1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1, 3\] has a NaN or \+inf logit"):
        run(ops.spd_step, state, 1, 0.0)
    with pytest.raises(ValueError, match=r"logits\[1, 3\] has a NaN or \+inf logit"):
        run(torch.ops.dmax.spd_step, state, 1, 0.0)  # the op itself, without the wrapper


def test_argument_errors():
    gen = torch.Generator().manual_seed(1)
    logits, ids, embeds, done, step, active, weight, seeds, mask_id = random_state(
        gen, 2, 4, 10, 8, torch.float32)

    def call(**changes):
        args = dict(logits=logits, ids=ids.clone(), embeds=embeds.clone(), done=done.clone(),
                    step=step.clone(), active=active, weight=weight, seeds=None, k=1,
                    temperature=0.0, threshold=THRESHOLD, accept_threshold=ACCEPT,
                    mask_id=mask_id)
        args.update(changes)
        ops.spd_step(**args)

    with pytest.raises(ValueError, match=r"done must have shape \(2,\)"):
        call(done=done[:1])
    with pytest.raises(TypeError, match="step must have dtype in"):
        call(step=step.float())
    with pytest.raises(ValueError, match=r"embeds must have shape \(2, 4, 8\)"):
        call(embeds=embeds[:, :3])
    with pytest.raises(TypeError, match="weight must have dtype in"):
        call(weight=weight.double())
    with pytest.raises(ValueError, match="seeds .* are required when temperature > 0"):
        call(temperature=0.5)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
        call(threshold=1.5)
    with pytest.raises(ValueError, match=r"mask_id must be in \[0, 10\)"):
        call(mask_id=10)
    with pytest.raises(ValueError, match="the step ops are CPU only"):
        call(logits=logits.to("meta"))
    # the op's own checks, past the wrapper
    with pytest.raises(RuntimeError, match="spd_step: done must be Bool"):
        torch.ops.dmax.spd_step(logits, ids.clone(), embeds.clone(), done.long(), step.clone(),
                                active, weight, None, 1, 0.0, THRESHOLD, ACCEPT, mask_id)
    with pytest.raises(RuntimeError, match="spd_step: sampling .* needs the rows' seeds"):
        torch.ops.dmax.spd_step(logits, ids.clone(), embeds.clone(), done.clone(), step.clone(),
                                active, weight, None, 1, 0.5, THRESHOLD, ACCEPT, mask_id)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    logits, ids, embeds, done, step, active, weight, seeds, mask_id = random_state(
        gen, 2, 6, 30, 16, torch.bfloat16, sampling=True)
    torch.library.opcheck(torch.ops.dmax.spd_step.default,
                          (logits, ids, embeds, done, step, active, weight, seeds, 2, 0.8,
                           THRESHOLD, ACCEPT, mask_id))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_step_bitwise_the_native_ops_one_by_one(dtype):
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 4), L=st.integers(1, 40), V=st.integers(3, 300),
           sampling=st.booleans(), p_done=st.sampled_from([0.0, 0.5, 1.0]),
           seed=st.integers(0, 2**31))
    def check(B, L, V, sampling, p_done, seed):
        gen = torch.Generator().manual_seed(seed)
        state = random_state(gen, B, L, V, 4, dtype, p_done=p_done, sampling=sampling)
        temperature = 0.7 if sampling else 0.0
        got = run_threshold(ops.threshold_step, state, 1, temperature)
        want = run_threshold(threshold_composed, state, 1, temperature)
        for name, g, w in zip(("ids", "done", "step"), got, want):
            assert torch.equal(g, w), f"{name}: B{B} L{L} V{V} sampling {sampling} done {p_done}"
        done_before = state[3]
        assert torch.equal(got[0][done_before], state[1][done_before])

    check()


def test_threshold_step_against_the_reference():
    checked = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        state = random_state(gen, 3, 16, 60, 4, torch.float32, p_done=0.3)
        conf = torch.softmax(state[0].double(), -1).amax(-1)
        if ((conf - THRESHOLD).abs() < 1e-4).any():
            continue
        got = run_threshold(ops.threshold_step, state, 1, 0.0)
        logits, ids, _, done, step, active, _, seeds, mask_id = state
        want = threshold_step_reference(logits, ids, done, step, active, seeds, 1, 0.0,
                                        THRESHOLD, mask_id)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), seed
        checked += 1
    assert checked >= 30


def test_threshold_step_errors_and_opcheck():
    gen = torch.Generator().manual_seed(3)
    logits, ids, _, done, step, active, _, seeds, mask_id = random_state(
        gen, 2, 6, 30, 4, torch.bfloat16, sampling=True)
    torch.library.opcheck(torch.ops.dmax.threshold_step.default,
                          (logits, ids, done, step, active, seeds, 1, 0.8, THRESHOLD, mask_id))
    with pytest.raises(ValueError, match=r"done must have shape \(2,\)"):
        ops.threshold_step(logits, ids, done[:1], step, active, None, 1, 0.0, THRESHOLD, mask_id)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
        ops.threshold_step(logits, ids, done, step, active, None, 1, 0.0, 2.0, mask_id)
    bad = logits.clone()
    bad[0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[0, 2\] has a NaN or \+inf logit"):
        ops.threshold_step(bad, ids, done, step, active, None, 1, 0.0, THRESHOLD, mask_id)


# mode -> (the step's op, an op the step runs one by one: spd_update and promote are CUDA's)
STEP_OPS = {"spd": ("spd_step", "spd_update"), "threshold": ("threshold_step", "promote")}


@pytest.mark.parametrize("mode", list(STEP_OPS))
def test_a_decode_takes_the_op_on_the_cpus_own_path_only(mode):
    """The same tokens either way; with the CPU variants off (the CPU standing for CUDA) the
    step runs the ops one by one, as a CUDA graph captures them."""
    import dmax_ext
    from dmax_ext.model import random_model

    fused, one_by_one = STEP_OPS[mode]
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=25.0,
                         lm_head_from_embedding=True)
    prompt = [[5, 17, 29, 41, 53, 65, 77]]
    kwargs = dict(gen_length=64, block_length=32, threshold=0.5, mode=mode)
    with dmax_calls() as calls:
        own = dmax_ext.decode(model, prompt, **kwargs)
    names = [name for name, _ in calls]
    assert names.count(fused) == own.nfe and one_by_one not in names, names
    model.set_cpu_variants(False)
    with dmax_calls() as calls:
        cuda_like = dmax_ext.decode(model, prompt, **kwargs)
    names = [name for name, _ in calls]
    assert fused not in names and names.count(one_by_one) == cuda_like.nfe, names
    assert own.tokens == cuda_like.tokens and own.nfe == cuda_like.nfe
