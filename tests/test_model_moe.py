"""The router's selection rules on hand-checked cases; batched experts against the per-expert path."""
import pytest
import torch

from dmax_ext.model import PRESETS
from dmax_ext.model.moe import MoeBlock, Router, StackedExperts, select_experts


def test_group_selection_by_sum_of_two_best():
    # 4 groups of 2. Group 0 has the single best expert but a poor partner; group 1 wins on sum.
    biased = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.5, 0.45, 0.1, 0.1]])
    assert sorted(select_experts(biased, n_group=4, topk_group=1, top_k=2)[0].tolist()) == [2, 3]
    # Groups 1 and 2 kept (sums 1.0 and 0.95 beat 0.9 and 0.2): expert 0, the best, is out.
    ids = select_experts(biased, n_group=4, topk_group=2, top_k=3)
    assert sorted(ids[0].tolist()) == [2, 3, 4]


def test_dropped_groups_are_minus_inf_even_when_scores_are_negative():
    # Every kept expert scores below zero; masking dropped groups with 0 would select them.
    biased = torch.tensor([[-0.1, -0.2, -0.9, -0.9, -0.3, -0.4, -0.8, -0.9]])
    ids = select_experts(biased, n_group=4, topk_group=2, top_k=4)
    assert sorted(ids[0].tolist()) == [0, 1, 4, 5]


def test_bias_steers_selection_but_weights_are_unbiased_scores():
    config = PRESETS["tiny"].replace(num_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
                                     hidden_size=2, routed_scaling_factor=2.5)
    router = Router(config)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0])
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
    ids, weights = router(torch.tensor([[1.0, 0.0]]))
    assert sorted(ids[0].tolist()) == [6, 7]           # only the bias makes 6 and 7 win
    s = torch.sigmoid(torch.tensor(-1.0))
    torch.testing.assert_close(weights[0], torch.full((2,), 2.5 * s / (2 * s + 1e-20)))
    assert weights.dtype == torch.float32


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(6)
    block = MoeBlock(PRESETS["tiny"])
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.expert_bias.normal_(0, 0.05)
    return block


def _by_hand(block, x):
    """Per token, per chosen expert, through the checkpoint-named views."""
    ids, weights = block.gate(x)
    views = block.experts.checkpoint_views()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t]):
            gate = x[t] @ views[f"{e}.gate_proj.weight"].T
            up = x[t] @ views[f"{e}.up_proj.weight"].T
            out[t] += w * ((torch.nn.functional.silu(gate) * up) @ views[f"{e}.down_proj.weight"].T)
    return out + block.shared_experts(x)


@pytest.mark.parametrize("n_tokens", [1, 5, 37])
@pytest.mark.parametrize("impl", ["reference", "padded", "grouped", "auto"])
def test_batched_experts_match_by_hand(moe, impl, n_tokens):
    x = torch.randn(n_tokens, 64, generator=torch.Generator().manual_seed(n_tokens))
    moe.impl = impl
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _by_hand(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["padded", "grouped", "auto"])
def test_bf16_batched_experts_match_reference(moe, impl):
    block = MoeBlock(PRESETS["tiny"])
    block.load_state_dict(moe.state_dict())
    block = block.to(torch.bfloat16)
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.no_grad():
        block.impl = "reference"
        want = block(x)
        block.impl = impl
        torch.testing.assert_close(block(x), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_busy", [2, 16])
def test_cpu_auto_choice_matches_reference_at_any_skew(moe, dtype, n_busy):
    experts = StackedExperts(PRESETS["tiny"]).to(dtype)
    experts.load_state_dict(moe.experts.state_dict())
    gen = torch.Generator().manual_seed(n_busy)
    ids = torch.stack([torch.randperm(n_busy, generator=gen)[:2] for _ in range(24)])
    x = torch.randn(24, 64, generator=gen).to(dtype)
    weights = torch.rand(24, 2, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, weights, "cpu"),
                                   experts(x, ids, weights, "reference"), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl", ["padded", "grouped"])
def test_batched_paths_give_the_reference_gradients(moe, impl):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(8))
    grads = {}
    for name in ("reference", impl):
        moe.impl = name
        moe.zero_grad()
        moe(x).square().sum().backward()
        grads[name] = (moe.experts.gate_up_proj.grad.clone(), moe.gate.weight.grad.clone())
    moe.zero_grad()
    for got, want in zip(grads[impl], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_state_dict_speaks_per_expert_names():
    experts = StackedExperts(PRESETS["tiny"])
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    state = experts.state_dict()
    assert sorted(state)[:3] == ["0.down_proj.weight", "0.gate_proj.weight", "0.up_proj.weight"]
    assert state["3.gate_proj.weight"].shape == (32, 64) and state["3.down_proj.weight"].shape == (64, 32)
    torch.testing.assert_close(state["3.up_proj.weight"], experts.gate_up_proj[3, :, 32:].T)
    copy = StackedExperts(PRESETS["tiny"])
    copy.load_state_dict(state)
    assert torch.equal(copy.gate_up_proj, experts.gate_up_proj)
    assert torch.equal(copy.down_proj, experts.down_proj)


def test_router_stays_float32_under_autocast(moe):
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(9))
    want = moe.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe.gate(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_router_float_weight_is_the_parameter_or_a_copy_kept_until_it_changes():
    router = Router(PRESETS["tiny"])
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    assert router.float_weight() is router.weight  # float32: no copy
    router = router.to(torch.bfloat16)
    copy = router.float_weight()
    assert copy.dtype == torch.float32 and torch.equal(copy, router.weight.float())
    assert router.float_weight() is copy
    with torch.no_grad():
        router.weight.mul_(2)  # an optimizer step or a load writes in place
    again = router.float_weight()
    assert again is not copy and torch.equal(again, router.weight.float())
    assert "_float_weight" not in router.state_dict()


def test_bf16_router_routes_alike_with_and_without_gradients():
    # Without gradients the projection reads the kept copy; with them, the parameter through
    # autograd: the same routing, and a gradient reaches the weight.
    router = Router(PRESETS["tiny"])
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    router = router.to(torch.bfloat16)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    with torch.no_grad():
        ids, weights = router(x)
    got_ids, got_weights = router(x)  # (F.linear then, not the kernel: sums may differ by ulps)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_weights.detach(), weights, rtol=1e-5, atol=1e-6)
    got_weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# ---- the CUDA MoE path ("grouped") must not read device data to the host -----------------------
# A host read syncs the stream (twice per MoE layer with torch.bincount) and is an error during
# CUDA-graph capture. Without a GPU: trace the ops the CPU run dispatches (step_ops.is_host_sync
# lists the ops whose CUDA kernels read to the host) and check the source for value reads the
# dispatcher does not see (.tolist(), .cpu(), ...).

def _step_ops():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import step_ops
    return step_ops


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_dispatches_no_host_sync(first_step, dtype):
    counts = _step_ops().count_step_ops("tiny", dtype, moe_impl="grouped", first_step=first_step)
    assert {"attention", "moe", "final_norm", "lm_head"} <= set(counts.kernels)  # saw the forward
    assert dict(counts.syncs) == {}


def test_host_sync_detector_sees_what_it_must():
    step_ops = _step_ops()
    seen = []

    class Mode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            seen.append(step_ops.is_host_sync(func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))
    x, ids = torch.arange(6.0), torch.tensor([0, 2, 2])
    cases = [lambda: torch.bincount(ids), lambda: int(x.max()), lambda: x[x > 2],
             lambda: torch.repeat_interleave(x[:3], ids),
             lambda: torch.zeros(3, dtype=torch.int64).scatter_add_(0, ids, torch.ones_like(ids)),
             lambda: x.index_select(0, ids), lambda: x[ids]]
    found = []
    for case in cases:
        seen.clear()
        with Mode():
            case()
        found.append(any(seen))
    assert found == [True, True, True, True, False, False, False]


def test_grouped_path_source_has_no_value_reads():
    """What the dispatcher cannot see: tensor data read in Python on the forward_cached path."""
    import inspect
    import re
    from dmax_ext.model import attention, llada2, modules, moe
    functions = [moe.select_experts, moe.Router.forward, moe.expert_counts, moe._swiglu,
                 moe._experts_grouped, moe.StackedExperts.forward, moe.MoeBlock.forward,
                 attention.cached_attention_mask, attention.Attention.forward,
                 llada2.DecoderLayer.forward, llada2.LLaDA2MoeModel.forward_cached,
                 llada2.LLaDA2MoeModel._run, modules.RMSNorm.forward, modules.apply_rotary,
                 modules.GatedMLP.forward]
    # int(t), float(t), `if t:` dispatch a value read, which the trace above catches.
    reads = re.compile(r"\.(tolist|item|cpu|numpy)\(|bincount|nonzero")
    for fn in functions:
        source = "\n".join(line.split("#")[0] for line in inspect.getsource(fn).splitlines())
        body = source.split('"""')[-1]  # past the docstring
        assert not reads.search(body), f"{fn.__qualname__}: {reads.search(body).group(0)}"


@pytest.mark.gpu
def test_grouped_forward_captures_in_a_cuda_graph():
    """Captured once with the write slot as a device tensor, the forward replays at any slot the
    tensor holds: each replay equals the eager forward at that slot and key span."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dmax_ext.model import random_model
    model = random_model("tiny", device="cuda", dtype=torch.bfloat16)
    model.set_moe_impl("grouped")
    caches = [model.new_cache(1, 128) for _ in range(2)]
    slot = torch.zeros((), dtype=torch.int64, device="cuda")
    positions = torch.zeros(1, 32, dtype=torch.int64, device="cuda")
    kwargs = dict(inputs_embeds=torch.randn(1, 32, 64, device="cuda", dtype=torch.bfloat16),
                  position_ids=positions, valid_from=torch.zeros(1, dtype=torch.int64,
                                                                 device="cuda"),
                  block_length=32, span=128)

    def move_to(write_slot: int) -> None:
        slot.fill_(write_slot)
        positions.copy_(torch.arange(write_slot, write_slot + 32, device="cuda")[None])
    with torch.inference_mode():
        move_to(32)
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.forward_cached(caches[0], write_slot=slot, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = model.forward_cached(caches[0], write_slot=slot, **kwargs)
        for write_slot in (32, 64, 96):
            move_to(write_slot)
            graph.replay()
            want = model.forward_cached(caches[1], write_slot=write_slot, **kwargs)
            torch.testing.assert_close(got, want)
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            torch.testing.assert_close(a, b)
