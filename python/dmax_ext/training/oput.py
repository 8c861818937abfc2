"""On-Policy Uniform Training (SPEC section 4) and the plain masked-diffusion objective.

Both modes share one layout, the one the decoder runs on: the input is [noisy (L) ; clean (L)]
with position ids 0..L-1 twice and the 2L x 2L block mask of SPEC 4 step 2, so a noisy block is
predicted from its own (partly masked) block and the clean earlier blocks, exactly as the decoder
sees a block against its KV cache.

- mode "oput": every example comes twice per epoch (flag true: on-policy input, flag false:
  masked input); flagged samples have their masked positions replaced by the model's own
  predictions (no grad, eval mode); the loss covers every label position.
- mode "mdm" (training a base model from scratch): the same block-diffusion layout without the
  rollout; the loss covers the masked label positions only (the masked-diffusion objective; an
  unmasked position would only teach copying its input), sigma drawn per sample from
  [noise_low, noise_high] (default 0..1, every noise level).
Both losses are sums of token cross-entropies divided by the number of label tokens of the
global batch (the trainer passes that count).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MODES = ("oput", "mdm")


@dataclass
class DiffusionConfig:
    mode: str = "oput"
    block_length: int = 32
    noise_low: float = 0.75   # the release's sigma range for OPUT
    noise_high: float = 0.75
    eos_label_tail: int = 32  # eos/padding positions after the response that carry labels
    rollout_top_k: int = 1    # 1 with temperature 0: the release's argmax rollout
    rollout_temperature: float = 0.0
    mask_id: int = 156895
    eos_id: int = 156892

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.noise_low <= self.noise_high <= 1.0:
            raise ValueError("need 0 <= noise_low <= noise_high <= 1, got "
                             f"[{self.noise_low}, {self.noise_high}]")
        if self.block_length < 1 or self.eos_label_tail < 0:
            raise ValueError(f"block_length must be >= 1 and eos_label_tail >= 0, got "
                             f"{self.block_length}, {self.eos_label_tail}")
        if not 1 <= self.rollout_top_k <= 8:
            raise ValueError(f"rollout_top_k must be in 1..8, got {self.rollout_top_k}")


def two_half_attention_mask(seq_len: int, block_length: int, device=None) -> torch.Tensor:
    """bool [1, 1, 2L, 2L], True = may attend; b(i) = (i mod L) // block (SPEC 4 step 2)."""
    i = torch.arange(2 * seq_len, device=device)
    clean = i >= seq_len
    block = (i % seq_len) // block_length
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    noisy_query = ~q_clean & ((~k_clean & (k_block == q_block)) | (k_clean & (k_block < q_block)))
    clean_query = q_clean & k_clean & (k_block <= q_block)
    return (noisy_query | clean_query)[None, None]


def two_half_position_ids(batch: int, seq_len: int, device=None) -> torch.Tensor:
    return torch.arange(seq_len, device=device).repeat(2).expand(batch, -1)


def response_labels(clean_ids, prompt_len, response_end, eos_label_tail: int) -> torch.Tensor:
    """Clean ids at every response position and the first eos_label_tail padding positions
    after it; IGNORE_INDEX elsewhere (prompt, later padding)."""
    pos = torch.arange(clean_ids.shape[1], device=clean_ids.device)[None, :]
    keep = (pos >= prompt_len[:, None]) & (pos < (response_end + eos_label_tail)[:, None])
    return torch.where(keep, clean_ids, torch.full_like(clean_ids, IGNORE_INDEX))


def noisy_copy(clean_ids, prompt_len, sigma, mask_id: int, generator=None):
    """Masks each response/padding position with probability sigma[b]; the prompt never.
    Returns (noisy ids, masked bool)."""
    pos = torch.arange(clean_ids.shape[1], device=clean_ids.device)[None, :]
    u = torch.rand(clean_ids.shape, generator=generator, device=clean_ids.device)
    masked = (pos >= prompt_len[:, None]) & (u < sigma[:, None])
    return torch.where(masked, torch.full_like(clean_ids, mask_id), clean_ids), masked


@dataclass
class DiffusionBatch:
    noisy: torch.Tensor         # [B, L] int64
    clean: torch.Tensor         # [B, L] int64
    labels: torch.Tensor        # [B, L] int64, IGNORE_INDEX where no loss
    flags: torch.Tensor         # [B] bool: on-policy rollout for these samples
    seeds: torch.Tensor         # [B] int64: rollout sampling seeds (used when temperature > 0)

    @property
    def n_labels(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "DiffusionBatch":
        return DiffusionBatch(*(t.to(device) for t in
                                (self.noisy, self.clean, self.labels, self.flags, self.seeds)))


def make_batch(clean_ids, prompt_len, response_end, flags, cfg: DiffusionConfig,
               generator: torch.Generator) -> DiffusionBatch:
    """Noise + labels for one micro batch (CPU tensors; every random draw from `generator`)."""
    b = clean_ids.shape[0]
    sigma = cfg.noise_low + (cfg.noise_high - cfg.noise_low) * torch.rand(b, generator=generator)
    noisy, masked = noisy_copy(clean_ids, prompt_len, sigma, cfg.mask_id, generator)
    labels = response_labels(clean_ids, prompt_len, response_end, cfg.eos_label_tail)
    if cfg.mode == "mdm":
        labels = torch.where(masked, labels, torch.full_like(labels, IGNORE_INDEX))
        flags = torch.zeros_like(flags)
    seeds = torch.randint(0, 2**62, (b,), generator=generator, dtype=torch.int64)
    return DiffusionBatch(noisy, clean_ids, labels, flags.bool(), seeds)


def concat_batches(batches: list[DiffusionBatch]) -> DiffusionBatch:
    fields = ("noisy", "clean", "labels", "flags", "seeds")
    return DiffusionBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in fields))


def forward_two_half(model, noisy, clean, attention_mask, keep=None) -> torch.Tensor:
    """Logits of the noisy half, [B, L, V]; with `keep` (bool [B, L]), of its kept positions
    only, [N, V] in row-major order (what indexing the former by `keep` gives). Only those rows
    go through the lm_head, the largest matmul of the forward: the clean half's logits are
    never read, and a loss reads only its label positions."""
    b, seq_len = noisy.shape
    device = noisy.device
    # Token t of sample i's noisy half is row i * 2L + t of the flattened [noisy ; clean] input.
    rows = (torch.arange(b, device=device)[:, None] * (2 * seq_len)
            + torch.arange(seq_len, device=device)[None, :])
    logits = model(input_ids=torch.cat([noisy, clean], dim=1), attention_mask=attention_mask,
                   position_ids=two_half_position_ids(b, seq_len, device),
                   logits_rows=rows.flatten() if keep is None else rows[keep])
    return logits.view(b, seq_len, -1) if keep is None else logits


@torch.no_grad()
def rollout(model, batch: DiffusionBatch, cfg: DiffusionConfig, attention_mask,
            always_forward: bool = False) -> torch.Tensor:
    """SPEC 4 step 3: the noisy ids with every masked position of a flagged sample replaced by
    the model's prediction (argmax, or a top-k draw at temperature > 0). Unflagged samples and
    the clean half are untouched. `always_forward` keeps collective-bearing wrappers (FSDP)
    in step across ranks when a rank has nothing flagged."""
    from .. import ops

    rows = batch.flags.nonzero().flatten()
    if rows.numel() == 0 and not always_forward:
        return batch.noisy
    if rows.numel() == 0:
        rows = torch.zeros(1, dtype=torch.int64, device=batch.noisy.device)
    noisy_rows = batch.noisy[rows].contiguous()
    masked = noisy_rows == cfg.mask_id  # the positions a rollout replaces: only their logits
    was_training = model.training
    model.eval()
    try:
        logits = forward_two_half(model, noisy_rows, batch.clean[rows], attention_mask, masked)
    finally:
        model.train(was_training)
    # The top k (what onpolicy_noise reads) does not depend on the temperature, only the unused
    # pred does; the other positions' candidates are never read (zeros).
    k = cfg.rollout_top_k
    topk_ids = torch.zeros(*masked.shape, k, dtype=torch.int64, device=masked.device)
    topk_probs = torch.zeros(*masked.shape, k, dtype=torch.float32, device=masked.device)
    if logits.shape[0]:
        _, _, ids, probs = ops.logits_stats(logits.float()[None].contiguous(), k)
        topk_ids[masked], topk_probs[masked] = ids[0], probs[0]
    seeds = batch.seeds[rows] if cfg.rollout_temperature > 0 else None
    new_rows = ops.onpolicy_noise(noisy_rows, batch.flags[rows].contiguous(), topk_ids, topk_probs,
                                  cfg.rollout_temperature, seeds, mask_id=cfg.mask_id)
    noisy = batch.noisy.clone()
    noisy[rows] = new_rows
    return noisy


def loss_sum(model, batch: DiffusionBatch, cfg: DiffusionConfig, attention_mask,
             rollout_model=None, always_forward: bool = False) -> torch.Tensor:
    """Summed cross-entropy of the noisy half's logits against the labels (fp32 scalar); the
    caller divides by the global number of labels. `rollout_model` (default `model`) runs the
    no-grad rollout: the trainer passes the module inside a DDP wrapper there."""
    noisy = batch.noisy
    if cfg.mode == "oput":
        noisy = rollout(rollout_model or model, batch, cfg, attention_mask, always_forward)
    keep = batch.labels != IGNORE_INDEX
    logits = forward_two_half(model, noisy, batch.clean, attention_mask, keep)
    return F.cross_entropy(logits.float(), batch.labels[keep], reduction="sum")
