"""The ops backend of a tensor-parallel model (model/tensor_parallel.py): every rank sees only
its vocab slice of the logits and of the embedding table, yet takes the same decisions as one
process holding everything.

- logits_stats: each rank reduces its slice to a few numbers per position (local max m_r,
  sum-exp s_r relative to m_r, its top-k logits and global ids, and when sampling its best
  Gumbel-max score with the noise hashed on GLOBAL ids); one small all_gather, then an exact
  merge on every rank: M = max m_r, S = sum s_r exp(m_r - M), p = exp(l - M) / S, top-k by logit
  with the lowest global id first on ties, pred = best score with the lowest id on ties. Vocab
  slices are contiguous and in rank order, so "first rank" means "lowest id".
- hybrid_embed: each rank adds p_i E[t_i], p_i |E[t_i]| for the ids it owns (and the mask row if
  it owns it); one all_reduce of [B, L, H + 1]; the rescaling of the op (ARCHITECTURE.md) runs on
  the sums. Rows that become a hard embedding E[id] travel in the same buffer from their owner.
- promote, spd_update: replicated (same inputs on every rank), the wrapped backend's.
Collectives return identical bits on every rank, so every rank's state stays identical.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..reference import rng_uniform


class TensorParallelOps:
    def __init__(self, inner, model):
        self.inner = inner
        self.group = model.tp_group
        self.vocab_start, self.vocab_stop = model.tp_plan.vocab
        self.world = dist.get_world_size(self.group)

    def promote(self, *args):
        return self.inner.promote(*args)

    def spd_update(self, *args):
        return self.inner.spd_update(*args)

    # -- logits_stats ----------------------------------------------------------------------------
    def logits_stats(self, logits: torch.Tensor, k: int, temperature: float, seeds):
        """As the op on the full vocabulary; logits [B, L, V_r] is this rank's slice."""
        # Local top-k (by logit, lowest id first on ties) from the wrapped op; its top-1
        # probability is 1 / s_r, and its top-1 logit is m_r.
        _, _, ids, probs = self.inner.logits_stats(logits, k, 0.0, None)
        top_logits = logits.gather(-1, ids).double()
        fields = [top_logits[..., :1], 1.0 / probs[..., :1].double(), top_logits,
                  (ids + self.vocab_start).double()]
        if temperature > 0:
            fields += self._local_sample(logits, temperature, seeds)
        stats = torch.cat(fields, dim=-1)                           # [B, L, F] float64
        gathered = [torch.empty_like(stats) for _ in range(self.world)]
        dist.all_gather(gathered, stats, group=self.group)
        g = torch.stack(gathered)                                   # [W, B, L, F]
        m_r, s_r = g[..., 0], g[..., 1]
        m = m_r.amax(0)
        s = (s_r * torch.exp(m_r - m)).sum(0)
        batch, length = m.shape
        # Candidates rank-major: within a rank by logit then id; across ranks ids increase. A
        # stable sort by logit therefore puts the lowest id first among equal logits.
        cand_logits = g[..., 2:2 + k].permute(1, 2, 0, 3).reshape(batch, length, -1)
        cand_ids = g[..., 2 + k:2 + 2 * k].permute(1, 2, 0, 3).reshape(batch, length, -1)
        order = cand_logits.argsort(dim=-1, descending=True, stable=True)[..., :k]
        topk_logits = cand_logits.gather(-1, order)
        topk_ids = cand_ids.gather(-1, order).long()
        topk_probs = (torch.exp(topk_logits - m[..., None]) / s[..., None]).float()
        if temperature > 0:
            # argmax over ranks returns the first maximum: the lowest id among equal scores.
            best = g[..., -3].argmax(0, keepdim=True)
            pred = g[..., -2].gather(0, best)[0].long()
            pred_logit = g[..., -1].gather(0, best)[0]
            conf = (torch.exp(pred_logit - m) / s).float()
        else:
            pred, conf = topk_ids[..., 0].clone(), topk_probs[..., 0].clone()
        return pred, conf, topk_ids.contiguous(), topk_probs.contiguous()

    def _local_sample(self, logits, temperature: float, seeds) -> list[torch.Tensor]:
        """[score, global id, logit] of this slice's Gumbel-max winner, float64 [B, L, 1] each.
        The noise of vocab id v is rng_uniform(seed, l, v) with v the GLOBAL id, as in the op."""
        batch, length, _ = logits.shape
        device = logits.device
        positions = torch.arange(length, device=device).view(-1, 1)
        vocab_ids = torch.arange(self.vocab_start, self.vocab_stop, device=device).view(1, -1)
        rows = []
        for b in range(batch):  # one row at a time keeps the float64 scores at L x V_r
            u = rng_uniform(seeds[b], positions, vocab_ids)
            score = logits[b].double() / temperature - torch.log(-torch.log(u))
            best = score.argmax(-1, keepdim=True)                   # first max: lowest id
            rows.append(torch.cat([score.gather(-1, best), (best + self.vocab_start).double(),
                                   logits[b].gather(-1, best).double()], dim=-1))
        out = torch.stack(rows)                                     # [B, L, 3]
        return [out[..., 0:1], out[..., 1:2], out[..., 2:3]]

    # -- hybrid_embed ----------------------------------------------------------------------------
    def hybrid_embed(self, embeds: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                     active: torch.Tensor, changed: torch.Tensor, topk_ids: torch.Tensor,
                     topk_probs: torch.Tensor, mask_id: int) -> None:
        """As the op, in place on embeds [B, L, H]; weight is this rank's rows of the table."""
        soft = active & (ids != mask_id)
        hard = ~soft & changed
        p = topk_probs.float()                                      # [B, L, k]
        p_mask = 1.0 - p.sum(-1)
        rows = self._owned_rows(weight, topk_ids)                   # [B, L, k, H]
        e_mask = self._owned_rows(weight, torch.tensor(mask_id, device=ids.device))  # [H]
        h = (p[..., None] * rows).sum(-2) + p_mask[..., None] * e_mask
        norm = (p * rows.norm(dim=-1)).sum(-1) + p_mask * e_mask.norm()
        partial = torch.where(soft[..., None], h, self._owned_rows(weight, ids))
        sums = torch.cat([partial, norm[..., None]], dim=-1)        # [B, L, H + 1] float32
        dist.all_reduce(sums, group=self.group)
        h, norm = sums[..., :-1], sums[..., -1]
        soft_h = h * (norm / (h.norm(dim=-1) + 1e-6))[..., None]
        new = torch.where(soft[..., None], soft_h, h).to(embeds.dtype)
        embeds.copy_(torch.where((soft | hard)[..., None], new, embeds))

    def _owned_rows(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] in float32 for the ids in this rank's slice, zero rows for the others."""
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= weight.shape[0])
        # F.embedding always copies (weight[0-d tensor] would be a view into the table).
        rows = F.embedding(local.masked_fill(outside, 0), weight).float()
        return rows.masked_fill_(outside[..., None], 0.0)
