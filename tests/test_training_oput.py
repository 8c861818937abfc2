"""OPUT's pieces (SPEC section 4): the 2L mask, noise, labels, the rollout, the loss."""
import pytest
import torch
import torch.nn.functional as F
from training_fixtures import EOS, MASK, synthetic_data, tiny_model

from dmax_ext import reference
from dmax_ext.training.oput import (IGNORE_INDEX, DiffusionConfig, forward_two_half, loss_sum,
                                    make_batch, noisy_copy, response_labels, rollout,
                                    two_half_attention_mask)


def brute_force_mask(L: int, block: int) -> torch.Tensor:
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(2 * L):
        for j in range(2 * L):
            bi, bj = (i % L) // block, (j % L) // block
            noisy_i, noisy_j = i < L, j < L
            if noisy_i:
                m[i, j] = (noisy_j and bi == bj) or (not noisy_j and bj < bi)
            else:
                m[i, j] = (not noisy_j) and bj <= bi
    return m


@pytest.mark.parametrize("L,block", [(8, 4), (12, 4), (10, 4), (6, 1), (5, 8)])
def test_two_half_mask_matches_brute_force(L, block):
    mask = two_half_attention_mask(L, block)
    assert mask.shape == (1, 1, 2 * L, 2 * L) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], brute_force_mask(L, block))


def test_noisy_copy_never_masks_the_prompt():
    clean = torch.arange(2, 34).repeat(3, 1)
    prompt_len = torch.tensor([0, 5, 31])
    for sigma, expect_all in ((1.0, True), (0.0, False)):
        noisy, masked = noisy_copy(clean, prompt_len, torch.full((3,), sigma), MASK)
        pos = torch.arange(32)[None]
        assert not masked[pos < prompt_len[:, None]].any()
        assert masked[pos >= prompt_len[:, None]].all() == expect_all
        assert torch.equal(noisy == MASK, masked)
    noisy, masked = noisy_copy(clean, prompt_len, torch.full((3,), 0.5), MASK,
                               torch.Generator().manual_seed(0))
    assert torch.equal(noisy[~masked], clean[~masked])


def test_labels_cover_response_and_eos_tail():
    L = 20
    clean = torch.full((3, L), EOS)
    clean[:, :12] = 7
    prompt_len, end = torch.tensor([3, 3, 0]), torch.tensor([12, 18, 12])
    labels = response_labels(clean, prompt_len, end, eos_label_tail=4)
    for b in range(3):
        for pos in range(L):
            want = prompt_len[b] <= pos < min(end[b] + 4, L)
            assert (labels[b, pos] != IGNORE_INDEX) == want
            if want:
                assert labels[b, pos] == clean[b, pos]


def test_mdm_labels_only_masked_positions_and_no_flags():
    data = synthetic_data(6, 24)
    cfg = DiffusionConfig(mode="mdm", block_length=8, noise_low=0.3, noise_high=0.9,
                          eos_label_tail=8, mask_id=MASK, eos_id=EOS)
    batch = make_batch(data.ids, data.prompt_len, data.response_end, torch.ones(6, dtype=torch.bool),
                       cfg, torch.Generator().manual_seed(1))
    assert not batch.flags.any()
    full = response_labels(data.ids, data.prompt_len, data.response_end, 8)
    has = batch.labels != IGNORE_INDEX
    assert torch.equal(has, (batch.noisy == MASK) & (full != IGNORE_INDEX))


def oput_batch(flags, seed=0, temperature=0.0, k=1):
    data = synthetic_data(len(flags), 24, seed=seed)
    cfg = DiffusionConfig(mode="oput", block_length=8, noise_low=0.5, noise_high=0.9,
                          eos_label_tail=8, mask_id=MASK, eos_id=EOS, rollout_top_k=k,
                          rollout_temperature=temperature)
    batch = make_batch(data.ids, data.prompt_len, data.response_end, torch.tensor(flags), cfg,
                       torch.Generator().manual_seed(seed))
    return batch, cfg, two_half_attention_mask(24, 8)


def test_rollout_replaces_exactly_masked_positions_of_flagged_samples():
    model = tiny_model().train()
    batch, cfg, attn = oput_batch([True, False, True, False])
    with torch.no_grad():
        model.eval()
        pred = forward_two_half(model, batch.noisy, batch.clean, attn).argmax(-1)
        model.train()
    new = rollout(model, batch, cfg, attn)
    assert model.training  # restored
    masked = batch.noisy == MASK
    flagged = batch.flags[:, None].expand_as(masked)
    assert masked[batch.flags].any()
    assert torch.equal(new[flagged & masked], pred[flagged & masked])
    assert torch.equal(new[~(flagged & masked)], batch.noisy[~(flagged & masked)])


def test_rollout_touches_nothing_without_flags():
    model = tiny_model()
    batch, cfg, attn = oput_batch([False, False])
    assert rollout(model, batch, cfg, attn) is batch.noisy
    assert torch.equal(rollout(model, batch, cfg, attn, always_forward=True), batch.noisy)


def test_rollout_sampling_stays_in_top_k_and_matches_reference():
    model = tiny_model()
    batch, cfg, attn = oput_batch([True, True, False], temperature=1.0, k=3)
    new = rollout(model, batch, cfg, attn)
    with torch.no_grad():
        model.eval()
        logits = forward_two_half(model, batch.noisy, batch.clean, attn).float().contiguous()
    _, _, topk_ids, topk_probs = reference.logits_stats_reference(logits, 3, 1.0, batch.seeds)
    expect = reference.onpolicy_noise_reference(batch.noisy, batch.flags, topk_ids, topk_probs,
                                                1.0, batch.seeds, mask_id=MASK)
    assert torch.equal(new, expect)
    replaced = (batch.noisy == MASK) & batch.flags[:, None]
    assert (new[replaced][:, None] == topk_ids[replaced]).any(-1).all()


@pytest.mark.parametrize("mode", ["oput", "mdm"])
def test_loss_is_cross_entropy_over_label_positions(mode):
    model = tiny_model()
    batch, cfg, attn = oput_batch([True, False, True])
    cfg.mode = mode
    noisy = rollout(model, batch, cfg, attn) if mode == "oput" else batch.noisy
    total = loss_sum(model, batch, cfg, attn)
    with torch.no_grad():
        logits = forward_two_half(model, noisy, batch.clean, attn).float()
    keep = batch.labels != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep], batch.labels[keep], reduction="sum")
    torch.testing.assert_close(total.detach(), manual, rtol=1e-5, atol=1e-5)
    assert batch.n_labels == int(keep.sum())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        DiffusionConfig(mode="ar")
    with pytest.raises(ValueError, match="noise_low"):
        DiffusionConfig(noise_low=0.9, noise_high=0.5)
    with pytest.raises(ValueError, match="rollout_top_k"):
        DiffusionConfig(rollout_top_k=9)
