"""Pure-PyTorch reference of every dmax op: the spec, executable.

Each function states the semantics that the CPU and CUDA kernels must reproduce (integers and
masks exactly, floats within the tolerances of tests/tolerances.py). Written for clarity, not speed.
"""
from __future__ import annotations

import torch

# ---- one section per op -----------------------------------------------------------------------


# ---- promote / spd_update / hybrid_embed: one SPD step (SPEC section 3, steps 3-6) -------------
# Thresholds are compared in float32 (a Python float against a float32 tensor rounds the float to
# float32 first), exactly as the kernels do: conf = 0.9f passes threshold 0.9.


def promote_reference(ids: torch.Tensor, conf: torch.Tensor, pred: torch.Tensor,
                      threshold: float, mask_id: int, prefix: bool = True) -> torch.Tensor:
    """Which masked positions take their prediction this step: bool [B, L].

    prefix=True (SPD, SPEC step 3): every masked position before the first masked position with
    conf < threshold (unmasked positions neither count nor break the run); if that is empty and
    something is masked, the first masked position alone. pred is not looked at.
    prefix=False (the hard-threshold baseline): eligible = masked & pred != mask_id; the eligible
    positions with conf >= threshold, or, when none reaches it, those with
    conf >= best - 1e-5 (float32) where best is the highest eligible conf; nothing if none is
    eligible.
    """
    masked = ids == mask_id
    if prefix:
        low = masked & (conf < threshold)
        before_break = torch.cumsum(low.long(), dim=1) == 0
        promoted = masked & before_break
        first_masked = masked & (torch.cumsum(masked.long(), dim=1) == 1)
        return torch.where(promoted.any(dim=1, keepdim=True), promoted, first_masked)
    eligible = masked & (pred != mask_id)
    above = eligible & (conf >= threshold)
    best = torch.where(eligible, conf, float("-inf")).amax(dim=1, keepdim=True)
    near_best = eligible & (conf >= best - 1e-5)
    return torch.where(above.any(dim=1, keepdim=True), above, near_best)


def spd_update_reference(ids: torch.Tensor, active: torch.Tensor, promoted: torch.Tensor,
                         pred: torch.Tensor, conf: torch.Tensor, accept_threshold: float,
                         mask_id: int):
    """SPEC steps 4-5 per sequence: (new_ids int64 [B, L], changed bool [B, L], converged bool [B]).

    If the sequence has a masked position (before this update), the promoted positions and the
    active unmasked ones take pred; otherwise every active position does (the release's rule).
    changed = updated & pred != ids. converged = every active position has
    conf >= accept_threshold (float32; true when nothing is active) or nothing changed.
    """
    masked = ids == mask_id
    any_masked = masked.any(dim=1, keepdim=True)
    update = torch.where(any_masked, promoted | (active & ~masked), active)
    new_ids = torch.where(update, pred, ids)
    changed = update & (pred != ids)
    confident = (conf >= accept_threshold) | ~active
    converged = confident.all(dim=1) | ~changed.any(dim=1)
    return new_ids, changed, converged


def hybrid_embed_reference(embeds: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                           active: torch.Tensor, changed: torch.Tensor, topk_ids: torch.Tensor,
                           topk_probs: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SPEC step 6: the next input embeddings. Returns a NEW tensor; `embeds` is left untouched
    (the op itself writes in place).

    soft = active & ids != mask_id: h = sum_i p_i E[t_i] + (1 - sum_i p_i) E[mask], rescaled by
    (sum_i p_i |E[t_i]| + (1 - sum_i p_i) |E[mask]|) / (|h| + 1e-6), float32 math, cast to the
    embeddings' dtype (float64 math for float64 inputs). Not soft but changed: E[ids] exactly.
    Every other position: untouched.
    """
    out = embeds.clone()
    soft = active & (ids != mask_id)
    hard = ~soft & changed
    if soft.any():
        acc = torch.promote_types(embeds.dtype, torch.float32)  # float64 in: the tests' exact value
        rows = weight[topk_ids[soft]].to(acc)                  # [N, k, H]
        p = topk_probs[soft].to(acc)                           # [N, k]
        p_mask = 1.0 - p.sum(dim=-1)                           # [N]
        e_mask = weight[mask_id].to(acc)                       # [H]
        h = (p.unsqueeze(-1) * rows).sum(dim=1) + p_mask.unsqueeze(-1) * e_mask
        target = (p * rows.norm(dim=-1)).sum(dim=-1) + p_mask * e_mask.norm()
        h = h * (target / (h.norm(dim=-1) + 1e-6)).unsqueeze(-1)
        out[soft] = h.to(out.dtype)
    if hard.any():
        out[hard] = weight[ids[hard]]
    return out


def spd_step_reference(logits: torch.Tensor, ids: torch.Tensor, embeds: torch.Tensor,
                       done: torch.Tensor, step: torch.Tensor, active: torch.Tensor,
                       weight: torch.Tensor, seeds: torch.Tensor | None, k: int,
                       temperature: float, threshold: float, accept_threshold: float,
                       mask_id: int):
    """dmax.spd_step (SPEC section 3 steps 2-6 for a running batch): the step that
    decoding.step.spd_step_composed makes of this module's references. Returns NEW tensors
    (ids, embeds, done, step); the arguments are left untouched (the op writes in place)."""
    from .decoding.backends import ReferenceOps
    from .decoding.step import spd_step_composed
    ids, embeds, done, step = ids.clone(), embeds.clone(), done.clone(), step.clone()
    spd_step_composed(ReferenceOps(), logits, ids, embeds, done, step, active, weight, seeds, k,
                      temperature, threshold, accept_threshold, mask_id)
    return ids, embeds, done, step


def threshold_step_reference(logits: torch.Tensor, ids: torch.Tensor, done: torch.Tensor,
                             step: torch.Tensor, active: torch.Tensor,
                             seeds: torch.Tensor | None, k: int, temperature: float,
                             threshold: float, mask_id: int):
    """dmax.threshold_step (the hard-threshold baseline's step, SPEC section 3): what
    decoding.step.threshold_step_composed makes of this module's references. Returns NEW
    tensors (ids, done, step)."""
    from .decoding.backends import ReferenceOps
    from .decoding.step import threshold_step_composed
    ids, done, step = ids.clone(), done.clone(), step.clone()
    threshold_step_composed(ReferenceOps(), logits, ids, done, step, active, seeds, k,
                            temperature, threshold, mask_id)
    return ids, done, step


# ---- rng_uniform: the shared counter-based RNG (bit-exact mirror of csrc/common/rng.h) --------
# All arithmetic is on int64 tensors holding uint32 values; 32-bit products are split into 16-bit
# halves of the constant so that no intermediate exceeds 2^49 (no int64 overflow).
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rng_uniform(seeds, a, b) -> torch.Tensor:
    """u = rng_uniform(seed, a, b) in (0, 1), float64, broadcast over seeds, a and b.

    h = mix32(lo32(seed) ^ 0x9E3779B9); h = mix32(h ^ hi32(seed)); h = mix32(h ^ a);
    h = mix32(h ^ b); u = ((h >> 8) + 0.5) / 2^24. seeds: int64 (any value); a, b: 0 <= a, b < 2^32.
    """
    seeds, a, b = (torch.as_tensor(t, dtype=torch.int64) for t in (seeds, a, b))
    h = _mix32((seeds & _MASK32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seeds >> 32) & _MASK32))
    h = _mix32(h ^ (a & _MASK32))
    h = _mix32(h ^ (b & _MASK32))
    return ((h >> 8).double() + 0.5) / 2.0**24


def gumbel_noise(seeds: torch.Tensor, L: int, V: int) -> torch.Tensor:
    """g = -log(-log(u)), u = rng_uniform(seeds[b], l, v), float64 [B, L, V]."""
    u = rng_uniform(seeds.view(-1, 1, 1), torch.arange(L).view(1, -1, 1),
                    torch.arange(V).view(1, 1, -1))
    return -torch.log(-torch.log(u))


# ---- logits_stats: per-position softmax statistics (SPEC section 3, step 2) --------------------


def check_logits_rows(x: torch.Tensor) -> None:
    """A NaN or +inf logit, or a row of only -inf, makes p undefined: an error."""
    bad = torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | (x == float("-inf")).all(-1)
    if bad.any():
        b, l = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"logits[{b}, {l}] has a NaN or +inf logit or is all -inf")


def logits_stats_reference(logits: torch.Tensor, k: int = 1, temperature: float = 0.0,
                           seeds: torch.Tensor | None = None):
    """(pred int64 [B, L], conf f32 [B, L], topk_ids int64 [B, L, k], topk_probs f32 [B, L, k]).

    p = softmax(logits) in float32 (the temperature does not change p).
    topk: the k largest p, descending; ranked by the logit itself (p is monotone in it, and the
    logit is what every implementation sees exactly), lowest id first among equal logits.
    pred: temperature == 0: argmax (= topk_ids[..., 0]); else Gumbel-max in float64:
    argmax_v(double(logit_v) / T + g_v), g = -log(-log(rng_uniform(seeds[b], l, v))), lowest id
    on ties. conf = p[pred]. -inf logits have p = 0 (never sampled).
    """
    B, L, V = logits.shape
    x = logits.float()
    check_logits_rows(x)
    p = torch.softmax(x, dim=-1)
    topk_ids = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()
    topk_probs = p.gather(-1, topk_ids)
    if temperature == 0:
        pred = topk_ids[..., 0].clone()
    else:
        # One sample at a time keeps the float64 scores at L x V.
        pred = torch.stack([
            (x[b].double() / temperature + gumbel_noise(seeds[b:b + 1], L, V)[0]).argmax(-1)
            for b in range(B)])
    conf = p.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    return pred, conf, topk_ids, topk_probs


# ---- onpolicy_noise: the on-policy rollout's replacement of masked positions (SPEC 4, step 3) --


def onpolicy_noise_reference(noisy_ids: torch.Tensor, sample_flags: torch.Tensor,
                             topk_ids: torch.Tensor, topk_probs: torch.Tensor,
                             temperature: float = 0.0, seeds: torch.Tensor | None = None, *,
                             mask_id: int) -> torch.Tensor:
    """new_ids int64 [B, L]: a new tensor; noisy_ids is untouched.

    In samples with sample_flags[b], every position with noisy_ids == mask_id takes
    topk_ids[b, l, 0] when k == 1 or temperature == 0, else a draw over the k candidates with
    q_i = (p_i / max_j p_j)^(1/T) (float64; proportional to p_i^(1/T), scaled so the largest is 1
    and small T cannot underflow them all): the first i with cumsum(q)_i > u * cumsum(q)_{k-1},
    u = rng_uniform(seeds[b], l, 0). A row with max_j p_j == 0 takes candidate 0.
    Other positions keep noisy_ids.
    """
    B, L, k = topk_ids.shape
    chosen = topk_ids[..., 0]
    if k > 1 and temperature > 0:
        p = topk_probs.double()
        p_max = p.amax(-1, keepdim=True)
        q = torch.where(p_max > 0, p / p_max, 0.0) ** (1.0 / temperature)
        c = torch.cumsum(q, dim=-1)
        u = rng_uniform(seeds.view(-1, 1), torch.arange(L).view(1, -1), 0)
        first = (c > (u * c[..., -1]).unsqueeze(-1)).int().argmax(-1)    # 0 when none passes
        chosen = topk_ids.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    replace = sample_flags.view(-1, 1) & (noisy_ids == mask_id)
    return torch.where(replace, chosen, noisy_ids)


# ---- moe_experts' packed weights ----------------------------------------------------------------
# (moe_experts' own reference is the model's torch formulation: dmax_ext.model.moe, impl
# "reference".)


def pack_moe_weights_reference(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N] (K even, N a multiple of 32) -> [E, N / 32, K / 2, 32, 2], element
    [e, j // 32, k // 2, j % 32, k % 2] = w[e, k, j] (ops.pack_moe_weights' layout)."""
    e, k, n = w.shape
    return w.reshape(e, k // 2, 2, n // 32, 32).permute(0, 3, 1, 4, 2).contiguous()


# ---- skinny_linear: a projection of a decoding block's few rows ---------------------------------


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T in x's dtype: F.linear without bias (the kernel sums in float32
    and rounds once, as the GEMM libraries do; only the summation order differs), then
    residual + that product, rounded again, when a residual [M, N] is given."""
    product = torch.nn.functional.linear(x, weight)
    return product if residual is None else residual + product


# ---- rms_norm / qk_norm_rotary: the model's own formulations ------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the model computes it with gradients (dmax_ext.model.modules.rms_normalize)."""
    from .model.modules import rms_normalize
    return rms_normalize(x, eps, weight)


def add_rms_norm_reference(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, normed): sum = x + update (torch's add, rounded to the dtype), normed =
    rms_norm_reference(sum): a decoder layer's residual add and the norm after it."""
    total = x + update
    return total, rms_norm_reference(total, weight, eps)


def qk_norm_rotary_reference(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int,
                             eps: float) -> torch.Tensor:
    """qk [B, L, heads, D] -> [B, heads, L, D]: each head RMS-normalized with its weight (q_weight
    for the first n_q_heads, k_weight for the others), then rotated (modules.apply_rotary)."""
    from .model.modules import apply_rotary, rms_normalize
    heads = qk.transpose(1, 2)
    q = rms_normalize(heads[:, :n_q_heads], eps, q_weight)
    k = rms_normalize(heads[:, n_q_heads:], eps, k_weight)
    return apply_rotary(torch.cat((q, k), dim=1), cos, sin)


# ---- moe_route: a MoE layer's router after its GEMM ---------------------------------------------


def moe_route_reference(logits: torch.Tensor, expert_bias: torch.Tensor, n_group: int,
                        topk_group: int, top_k: int, scaling: float):
    """(ids int64 [N, top_k], weights float32 [N, top_k]) of float32 logits [N, E]: as the
    model's Router computes them with gradients (model.moe.route): scores = sigmoid(logits); a
    group scores the sum of its two best biased scores (scores + expert_bias), the topk_group
    best groups stay; ids = the top_k best biased scores among their experts, descending, the
    lower id first on ties; weights = scores[ids] / (their sum + 1e-20) when top_k > 1, times
    scaling."""
    from .model.moe import route
    return route(logits, expert_bias, n_group, topk_group, top_k, scaling)


# ---- moe_dispatch / moe_combine: the permutation around a MoE layer's grouped GEMMs ------------


def moe_dispatch_reference(ids: torch.Tensor, n_experts: int):
    """ids int64 [N, k] (each in [0, n_experts); entry i = token i // k, slot i % k) ->
    (rows int64 [N k]: the token of each entry, entries sorted by expert, stable (entry order
    within an expert); inverse int64 [N k]: each entry's place in that order; offsets int32
    [n_experts]: the end of each expert's rows, as torch._grouped_mm's offs), as the model's
    torch formulation (model.moe.dispatch)."""
    from .model.moe import dispatch
    rows, inverse, counts = dispatch(ids, n_experts)
    return rows, inverse, counts.cumsum(0).to(torch.int32)


def moe_combine_reference(sorted_out: torch.Tensor, inverse: torch.Tensor,
                          weights: torch.Tensor, addend: torch.Tensor | None = None,
                          residual: torch.Tensor | None = None):
    """sorted_out [N k, H] (rows in dispatch order), inverse [N k], weights float32 [N, k] ->
    [N, H] in sorted_out's dtype: sum_j weights[n, j] sorted_out[inverse[n k + j]] in float32,
    each product rounded, then summed (torch's order; the kernels sum in j order), cast once;
    then + addend [N, H] if given, then + residual [N, H] if given (each torch's add of two
    rounded tensors) (model.moe.combine)."""
    from .model.moe import combine
    return combine(sorted_out, inverse, weights, addend, residual)


def qk_norm_rotary_write_kv_reference(qkv: torch.Tensor, q_weight: torch.Tensor,
                                      k_weight: torch.Tensor, cos: torch.Tensor,
                                      sin: torch.Tensor, n_q_heads: int, eps: float,
                                      keys: torch.Tensor, values: torch.Tensor,
                                      slots: torch.Tensor) -> torch.Tensor:
    """qkv [B, L, n_q + 2 n_kv, D] (the qkv projection's query, key, value heads; n_kv =
    keys.shape[1]): qk_norm_rotary_reference over the query and key heads; the key heads and the
    value heads (as they are) written into keys / values [B, n_kv, S, D] at slots [L] (int64);
    returns the query heads [B, n_q, L, D]. The cache's other slots are left as they were."""
    n_kv = keys.shape[1]
    qk = qk_norm_rotary_reference(qkv[:, :, :n_q_heads + n_kv], q_weight, k_weight, cos, sin,
                                  n_q_heads, eps)
    keys[:, :, slots] = qk[:, n_q_heads:]
    values[:, :, slots] = qkv[:, :, n_q_heads + n_kv:].transpose(1, 2)
    return qk[:, :n_q_heads]


# ---- step_tables: a cached forward's slots, rotary tables and mask ------------------------------


def step_tables_reference(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                          valid_from: torch.Tensor, write_slot: torch.Tensor, span: int,
                          block_length: int, dtype: torch.dtype):
    """(fed, cos, sin, mask) of a cached forward of T = position_ids.shape[1] tokens fed at the
    one-element int64 write_slot: fed = write_slot + arange(T); cos, sin [B, T, 2 len(inv_freq)]
    of the positions in dtype (model.modules.rotary_cos_sin); mask [B, 1, T, span] bool
    (model.attention.cached_attention_mask), as LLaDA2MoeModel.forward_cached makes them."""
    from .model.attention import cached_attention_mask
    from .model.modules import rotary_cos_sin
    fed = write_slot.reshape(()) + torch.arange(position_ids.shape[1], device=position_ids.device)
    cos, sin = rotary_cos_sin(position_ids, inv_freq, dtype)
    return fed, cos, sin, cached_attention_mask(valid_from, fed, span, block_length)


# ---- swiglu: a gated MLP's activation ----------------------------------------------------------


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] = [gate | up] -> silu(gate) * up, as the model's GatedMLP computes it
    with gradients."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---- block_attention: the model's SDPA call -----------------------------------------------------


def block_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, T, D], keys / values [B, kv_heads, S, D], mask bool [B or 1, 1, T, S] ->
    [B, T, heads * D] in q's dtype: softmax(scale q k^T) v in float32 over the allowed slots
    (query head j reads kv head j // (heads / kv_heads)); a query allowed no slot gets zeros.
    float64 inputs are computed in float64 (the tests' exact values)."""
    group = q.shape[1] // keys.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = keys.to(compute).repeat_interleave(group, dim=1)
    v = values.to(compute).repeat_interleave(group, dim=1)
    scores = (q.to(compute) * scale) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows: 0, not NaN
    out = (probs @ v).to(q.dtype)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
