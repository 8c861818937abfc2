"""Shared by test_logits_stats.py and test_onpolicy_noise.py: random logits of several kinds."""
from __future__ import annotations

import torch

LOGIT_KINDS = ["normal", "peaked", "far_tail", "ties", "neg_inf", "constant", "few_finite"]


def random_logits(gen: torch.Generator, B: int, L: int, V: int, dtype: torch.dtype,
                  kind: str = "normal") -> torch.Tensor:
    """[B, L, V] logits of `dtype`. Kinds: "normal" (Gaussian, random scale); "peaked" (a few
    large logits over a long flat tail, like a language model's); "far_tail" (a confident head:
    the tail ~40 below the peaks, most of it too small to reach float32's rounding of the sum,
    the part that the CPU kernel skips, with outliers that it must not skip); "ties" (a handful
    of distinct values: ties everywhere, also in the top-k); "neg_inf" (a random fifth is -inf);
    "constant" (one value per row); "few_finite" (only up to 3 finite logits per row, the rest
    -inf)."""
    scale = float(torch.empty(()).uniform_(0.5, 8.0, generator=gen))
    x = torch.randn(B, L, V, generator=gen) * scale
    if kind == "peaked":
        x = torch.randn(B, L, V, generator=gen) * 2 - 10
        n_peaks = min(V, 4)
        peaks = torch.randint(0, V, (B, L, n_peaks), generator=gen)
        x.scatter_(-1, peaks, torch.rand(B, L, n_peaks, generator=gen) * 10 + 5)
    elif kind == "far_tail":
        x = torch.randn(B, L, V, generator=gen) * 6 - 40
        n_peaks = min(V, 4)
        peaks = torch.randint(0, V, (B, L, n_peaks), generator=gen)
        x.scatter_(-1, peaks, torch.rand(B, L, n_peaks, generator=gen) * 10)
    elif kind == "ties":
        x = torch.randint(-3, 4, (B, L, V), generator=gen).float()
    elif kind == "neg_inf":
        x[torch.rand(B, L, V, generator=gen) < 0.2] = float("-inf")
        x[..., torch.randint(0, V, (), generator=gen)] = 1.0  # at least one finite logit per row
    elif kind == "constant":
        x = torch.randn(B, L, 1, generator=gen).expand(B, L, V).clone()
    elif kind == "few_finite":
        keep = torch.rand(B, L, V, generator=gen).argsort(-1)[..., :3]
        n = torch.randint(1, 4, (B, L, 1), generator=gen)
        finite = torch.zeros(B, L, V, dtype=torch.bool).scatter_(-1, keep, torch.arange(3) < n)
        x = torch.where(finite, x, float("-inf"))
    return x.to(dtype)
