"""The forward of LLaDA2MoeModel against a straightforward re-implementation of SPEC section 1."""
import math

import pytest
import torch

from checkpoints import write_tiny_checkpoint
from dmax_ext.model import PRESETS, LLaDA2MoeModel, load_model, random_model
from dmax_ext.model.attention import block_causal_mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt"),
                      dtype=torch.float32)


# -- an independent reading of the spec: loops and explicit formulas, HF tensor names ------------
def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _swiglu(x, sd, prefix):
    gate = x @ sd[prefix + "gate_proj.weight"].T
    return (gate * torch.sigmoid(gate) * (x @ sd[prefix + "up_proj.weight"].T)) @ sd[prefix + "down_proj.weight"].T


def _rotate(x, pos, cfg):
    half = cfg.rotary_dim // 2
    out = x.clone()
    for d in range(half):
        angle = pos * cfg.rope_theta ** (-2 * d / cfg.rotary_dim)
        c, s = math.cos(angle), math.sin(angle)
        out[..., d] = x[..., d] * c - x[..., d + half] * s
        out[..., d + half] = x[..., d + half] * c + x[..., d] * s
    return out


def _route(x, sd, prefix, cfg):
    """Expert ids and weights of one token [H], by the rules read from the spec."""
    scores = torch.sigmoid(sd[prefix + "gate.weight"] @ x)
    biased = scores + sd[prefix + "gate.expert_bias"]
    size = cfg.experts_per_group
    group_score = [sorted(biased[g * size:(g + 1) * size].tolist())[-2:] for g in range(cfg.n_group)]
    groups = sorted(range(cfg.n_group), key=lambda g: -sum(group_score[g]))[:cfg.topk_group]
    candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda e: -biased[e].item())[:cfg.num_experts_per_tok]
    w = scores[chosen]
    return chosen, w / w.sum() * cfg.routed_scaling_factor


def reference_forward(model, ids, allowed):
    """ids [T]; allowed [T, T] bool (query, key). float32, one token / head / expert at a time."""
    cfg, sd = model.config, model.state_dict()
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = sd["model.word_embeddings.weight"][ids]
    length = len(ids)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        h = _rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = (h @ sd[p + "attention.query_key_value.weight"].T).view(length, nh + 2 * nkv, hd)
        q, k, v = qkv[:, :nh], qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
        q = _rms(q, sd[p + "attention.query_layernorm.weight"], cfg.rms_norm_eps)
        k = _rms(k, sd[p + "attention.key_layernorm.weight"], cfg.rms_norm_eps)
        for t in range(length):
            q[t], k[t] = _rotate(q[t], t, cfg), _rotate(k[t], t, cfg)
        heads = []
        for j in range(nh):
            logits = q[:, j] @ k[:, j // (nh // nkv)].T / math.sqrt(hd)
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            heads.append(probs @ v[:, j // (nh // nkv)])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attention.dense.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if n < cfg.first_k_dense_replace:
            x = x + _swiglu(h, sd, p + "mlp.")
            continue
        out = _swiglu(h, sd, p + "mlp.shared_experts.")
        for t in range(length):
            experts, weights = _route(h[t], sd, p + "mlp.", cfg)
            for e, w in zip(experts, weights):
                out[t] += w * _swiglu(h[t], sd, f"{p}mlp.experts.{e}.")
        x = x + out
    return _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("block_length", [None, 4])
def test_forward_matches_reference(tiny, block_length):
    ids = torch.randint(0, tiny.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    allowed = (block_causal_mask(11, block_length)[0, 0] if block_length
               else torch.ones(11, 11, dtype=torch.bool))
    with torch.no_grad():
        got = tiny(ids[None], block_length=block_length)[0]
        want = reference_forward(tiny, ids, allowed)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_block_length_masks(tiny):
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 500
    with torch.no_grad():
        full, full_changed = tiny(ids), tiny(changed)
        blocks, blocks_changed = tiny(ids, block_length=4), tiny(changed, block_length=4)
        one_block = tiny(ids, block_length=12)
        explicit = tiny(ids, attention_mask=block_causal_mask(12, 4))
    torch.testing.assert_close(one_block, full)   # one block covering everything = full attention
    torch.testing.assert_close(explicit, blocks)
    # Earlier blocks never see a later block; with full attention they do.
    torch.testing.assert_close(blocks[:, :8], blocks_changed[:, :8])
    assert not torch.allclose(full[:, :8], full_changed[:, :8])
    assert not torch.allclose(blocks, full)


def test_inputs_embeds_and_position_ids(tiny):
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        by_ids = tiny(input_ids=ids, block_length=3)
        by_embeds = tiny(inputs_embeds=tiny.embed(ids), block_length=3)
        explicit_positions = tiny(ids, block_length=3, position_ids=torch.arange(9).expand(2, 9))
    torch.testing.assert_close(by_embeds, by_ids, atol=0, rtol=0)
    torch.testing.assert_close(explicit_positions, by_ids, atol=0, rtol=0)
    assert tiny.embed(ids).shape == (2, 9, 64)
    assert tiny.embedding_weight.shape == (512, 64)


def test_input_errors(tiny):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        tiny(input_ids=ids, inputs_embeds=tiny.embed(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny(ids, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="block_length"):
        tiny(ids, block_length=0)


def test_longer_than_max_position_embeddings_is_an_error(tiny):
    limit = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny(torch.zeros(1, limit + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[0, limit]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny.new_cache(1, limit + 1)


def test_bf16_close_to_fp32():
    fp32 = random_model("tiny", dtype=torch.float32, seed=4)
    bf16 = random_model("tiny", dtype=torch.bfloat16, seed=4)
    assert bf16.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = fp32(ids, block_length=8), bf16(ids, block_length=8)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()


def test_mini_preset_names_and_shapes_match_the_checkpoint():
    with torch.device("meta"):
        model = LLaDA2MoeModel(PRESETS["llada2-mini"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.word_embeddings.weight"] == (157184, 2048)
    assert shapes["lm_head.weight"] == (157184, 2048)
    assert shapes["model.layers.0.attention.query_key_value.weight"] == (3072, 2048)
    assert shapes["model.layers.0.attention.query_layernorm.weight"] == (128,)
    assert shapes["model.layers.0.attention.dense.weight"] == (2048, 2048)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 5120)
    assert shapes["model.layers.19.mlp.gate.weight"] == (256, 2048)
    assert shapes["model.layers.19.mlp.gate.expert_bias"] == (256,)
    assert shapes["model.layers.1.mlp.experts.255.gate_proj.weight"] == (512, 2048)
    assert shapes["model.layers.1.mlp.experts.255.down_proj.weight"] == (2048, 512)
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (512, 2048)
    per_layer = 6  # two norms, qkv, q/k norms, dense
    assert len(shapes) == 3 + 20 * per_layer + 3 + 19 * (2 + 256 * 3 + 3)
