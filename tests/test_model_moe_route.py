"""dmax.moe_route (CPU), the MoE router after its GEMM: the same ids and weights as the torch
formulation (model/moe.py Router with gradients) on the presets' shapes; the selection rules on
hand-checked cases; ties; what Router picks; opcheck; argument errors."""
import pytest
import torch

from dmax_ext import ops
from dmax_ext.model import PRESETS
from dmax_ext.model.modules import Linear
from dmax_ext.model.moe import Router
from dmax_calls import dmax_calls

pytestmark = pytest.mark.skipif(not ops.has_op("moe_route"),
                                reason="the native library predates moe_route: rebuild")


def _router(preset, seed=0):
    torch.manual_seed(seed)
    router = Router(PRESETS[preset])
    with torch.no_grad():
        router.weight.normal_(0, 0.05)
        router.expert_bias.normal_(0, 0.05)
    return router


def _torch_formulation(router, x):
    """The router's torch ops (what runs with gradients), without recording them."""
    with torch.enable_grad():
        ids, weights = router(x)
    return ids, weights.detach()


@pytest.mark.parametrize("preset", ["tiny", "llada2-small", "llada2-mini"])
def test_equals_the_torch_formulation(preset, monkeypatch):
    router = _router(preset)
    # More rows than skinny_linear takes (a cap set for the test): both sides get their logits
    # from F.linear, so only the route (moe_route against its torch ops) can differ.
    monkeypatch.setattr(Linear, "native_max_rows", staticmethod(lambda dtype: 64))
    rows = 65
    x = torch.randn(rows, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, weights = router(x)
    want_ids, want_weights = _torch_formulation(router, x)
    assert torch.equal(ids, want_ids)  # same order too: the experts sum in slot order
    # The scores are torch.sigmoid's; only the normalizing sum's order may differ.
    torch.testing.assert_close(weights, want_weights, rtol=2 * 2.0 ** -24, atol=0)


def test_group_selection_by_sum_of_two_best_and_minus_inf_for_dropped_groups():
    # 4 groups of 2 (as tests/test_model_moe.py's select_experts cases, through the op).
    logits = torch.logit(torch.tensor([[0.9, 0.01, 0.5, 0.5, 0.5, 0.45, 0.1, 0.1]]))
    bias = torch.zeros(8)
    ids, _ = ops.moe_route(logits, bias, 4, 1, 2, 1.0)
    assert sorted(ids[0].tolist()) == [2, 3]
    # Every biased score below 0 (masking dropped groups with 0 would select them): groups 1
    # and 2 stay (sums -1.0 and -1.05 beat -1.09 and -1.8); experts 2, 3, 4 tie, in id order.
    ids, weights = ops.moe_route(logits, bias - 1.0, 4, 2, 3, 2.5)
    assert ids[0].tolist() == [2, 3, 4]
    s = torch.sigmoid(logits[0, ids[0]])
    torch.testing.assert_close(weights[0], 2.5 * s / (s.sum() + 1e-20))


def test_ties_take_the_lowest_index_first():
    logits = torch.zeros(1, 8)
    ids, weights = ops.moe_route(logits, torch.zeros(8), 4, 2, 3, 1.0)
    assert ids[0].tolist() == [0, 1, 2]
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 3))


def _route_by_sorting(logits, bias, n_group, topk_group, top_k, scaling):
    """The selection rules as sorts with explicit tie-breaks (larger first, then lower index):
    an independent statement of what the kernel's insertion selection must give."""
    ids, weights = [], []
    for row in torch.sigmoid(logits):  # the kernel's scores are torch.sigmoid's
        biased = (row + bias).tolist()
        per = len(biased) // n_group
        group_score = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2])
                       for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        candidates = [e for g in sorted(kept) for e in range(g * per, (g + 1) * per)]
        chosen = sorted(candidates, key=lambda e: (-biased[e], e))[:top_k]
        ids.append(chosen)
        w = [row[e].item() for e in chosen]
        total = sum(w) + 1e-20 if top_k > 1 else 1.0
        weights.append([v / total * scaling for v in w])
    return torch.tensor(ids), torch.tensor(weights)


@pytest.mark.parametrize("preset", ["tiny", "llada2-small"])
def test_many_ties_select_as_sorting_does(preset):
    # Logits on a coarse grid: most biased scores (and group sums) tie with others, so every
    # tie-break of the group and expert selections is exercised.
    config = PRESETS[preset]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (64, config.num_experts), generator=gen).float() / 2
    bias = torch.randint(-1, 2, (config.num_experts,), generator=gen).float() / 8
    args = (config.n_group, config.topk_group, config.num_experts_per_tok,
            config.routed_scaling_factor)
    ids, weights = ops.moe_route(logits, bias, *args)
    want_ids, want_weights = _route_by_sorting(logits, bias, *args)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights.float(), rtol=4 * 2.0 ** -24, atol=0)


def test_top_1_is_not_normalized():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0]])
    ids, weights = ops.moe_route(logits, torch.zeros(4), 2, 1, 1, 2.5)
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(weights, 2.5 * torch.sigmoid(torch.tensor([[2.0]])))


def test_router_uses_it_without_grad_and_torch_with_grad():
    def routes(calls):
        return [tuple(args[0].shape) for name, args in calls if name == "moe_route"]
    router = _router("tiny")
    x = torch.randn(5, 64)
    with torch.no_grad(), dmax_calls() as calls:
        router(x)
    assert routes(calls) == [(5, 16)]
    with dmax_calls() as calls:
        _, weights = router(x)  # the parameters want gradients: the torch formulation
    assert routes(calls) == [] and weights.grad_fn is not None


def test_opcheck():
    logits = torch.randn(6, 16)
    torch.library.opcheck(torch.ops.dmax.moe_route.default,
                          (logits, torch.randn(16), 4, 2, 3, 2.5))


def test_argument_errors():
    logits, bias = torch.randn(3, 16), torch.zeros(16)
    with pytest.raises(TypeError, match="logits must have dtype"):
        ops.moe_route(logits.double(), bias, 4, 2, 3, 1.0)
    with pytest.raises(ValueError, match=r"expert_bias must have shape \(16,\)"):
        ops.moe_route(logits, bias[:8], 4, 2, 3, 1.0)
    with pytest.raises(ValueError, match="n_group must divide E = 16"):
        ops.moe_route(logits, bias, 3, 2, 3, 1.0)
    with pytest.raises(ValueError, match="n_group must divide E = 16"):
        ops.moe_route(logits, bias, 16, 2, 3, 1.0)  # groups of 1: no two best
    with pytest.raises(ValueError, match=r"topk_group must be in \[1, 4\]"):
        ops.moe_route(logits, bias, 4, 5, 3, 1.0)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 8\]"):
        ops.moe_route(logits, bias, 4, 2, 9, 1.0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        ops.moe_route(logits, bias, 4, 2, 3.0, 1.0)
    with pytest.raises(RuntimeError, match=r"moe_route: top_k must be in \[1, 8\]"):
        torch.ops.dmax.moe_route(logits, bias, 4, 2, 9, 1.0)
