"""The tolerances of the op tests, in one place.

The rule (flash-attention's): integer, index and mask outputs match the reference exactly. A
float output may differ from a float64 computation of the same formula by at most
NAIVE_FACTOR = 2 times the error of a naive PyTorch computation in the same dtype on the same
inputs (e.g. torch.softmax on the float32 logits, for probabilities the kernels compute in
float32). `assert_within_naive_error` applies the rule as such; when no naive computation is at
hand, FLOAT_TOL gives per-dtype bounds derived from it (2x one rounding of the dtype, relative,
plus an absolute floor for values near 0).
"""
from __future__ import annotations

import torch

NAIVE_FACTOR = 2.0

# Per output dtype: rtol = 2 x the unit roundoff (one rounding of the result), atol = the same
# times the 1e-6 floor below which relative error is meaningless for probabilities / embeddings.
FLOAT_TOL = {
    torch.float32: dict(rtol=2 * 2.0**-24, atol=2 * 2.0**-24 * 1e-6),
    torch.float16: dict(rtol=2 * 2.0**-11, atol=2 * 2.0**-11 * 1e-6),
    torch.bfloat16: dict(rtol=2 * 2.0**-8, atol=2 * 2.0**-8 * 1e-6),
}


def assert_within_naive_error(actual: torch.Tensor, exact: torch.Tensor, naive: torch.Tensor,
                              what: str = "", rel_error: float = 0.0) -> None:
    """max|actual - exact| <= NAIVE_FACTOR * max(max|naive - exact|, rel_error * max|exact|)
    + one rounding of the dtype.

    exact: float64; naive: the same quantity computed plainly in actual's dtype. The rounding
    term (FLOAT_TOL's rtol x max|exact|) keeps the bound meaningful when the naive computation
    happens to be exact on these inputs. rel_error: an a-priori bound of the computation's
    relative error (its float32 sums' gamma_n, its roundings), for random inputs on which a
    differently ordered naive sum may happen to be far more accurate than its bound.
    """
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item() if actual.numel() else 0.0
    naive_err = (naive.double() - exact).abs().max().item() if naive.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = (NAIVE_FACTOR * max(naive_err, rel_error * scale)
             + FLOAT_TOL[actual.dtype]["rtol"] * scale)
    assert err <= bound, (f"{what}: max error {err:.3g} > {NAIVE_FACTOR} x max(naive error "
                          f"{naive_err:.3g}, a-priori {rel_error * scale:.3g}) + rounding "
                          f"({bound:.3g} in all)")


def assert_probs_close(actual: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                       what: str = "", device: torch.device | str = "cpu") -> None:
    """Probabilities softmax(logits)[ids] computed in float32 (conf, topk_probs), under the rule:
    exact = float64 softmax of the same (upcast) logits, naive = torch.softmax in float32 on
    `device` (the device the kernel ran on: CUDA's expf is not the CPU's)."""
    x = logits.float()
    idx = ids.long() if ids.dim() == x.dim() else ids.long().unsqueeze(-1)
    exact = torch.softmax(x.double(), dim=-1).gather(-1, idx)
    naive = torch.softmax(x.to(device), dim=-1).cpu().gather(-1, idx)
    assert_within_naive_error(actual.reshape(exact.shape), exact, naive, what)


# The float32 roundings of one element of a hybrid embedding, the norms' sums aside: the mix
# (1 - sum p, two products, their sum), the two norms' square roots and their weighted sum, the
# division by |h| + 1e-6, the final product.
HYBRID_EMBED_ROUNDINGS = 8


def assert_hybrid_embed_close(actual: torch.Tensor, embeds: torch.Tensor, weight: torch.Tensor,
                              ids: torch.Tensor, active: torch.Tensor, changed: torch.Tensor,
                              topk_ids: torch.Tensor, topk_probs: torch.Tensor, mask_id: int,
                              what: str = "") -> None:
    """The soft rows (active & ids != mask_id) of hybrid_embed's output `actual` under the rule:
    exact = the reference formula in float64, naive = the reference itself (float32 math, cast
    to the embeddings' dtype), with an a-priori relative error of HYBRID_EMBED_ROUNDINGS float32
    roundings: on a short row (H = 7, k = 1) the naive computation can land within half an ulp
    of exact while the kernel's few roundings reach 2.4 ulp (a case hypothesis found once).
    embeds: the input before the op."""
    from dmax_ext.reference import hybrid_embed_reference

    soft = active & (ids != mask_id)
    rest = (ids, active, changed, topk_ids, topk_probs, mask_id)
    exact = hybrid_embed_reference(embeds.double(), weight.double(), *rest)
    naive = hybrid_embed_reference(embeds, weight, *rest)
    assert_within_naive_error(actual[soft], exact[soft], naive[soft], what or "hybrid_embed",
                              rel_error=HYBRID_EMBED_ROUNDINGS * 2.0**-24)
