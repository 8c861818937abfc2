"""Named model shapes: the real LLaDA2.0-mini, a small look-alike for CPU work, a tiny one for tests."""
from __future__ import annotations

from .config import LLaDA2Config

# LLaDA2.0-mini's config.json (the dataclass defaults are its values).
_MINI = LLaDA2Config()

# Same architecture at ~1/20 of the width: every code path of the real model (dense layer 0, GQA,
# partial rotary, grouped routing with bias, shared expert) with shapes a CPU runs in milliseconds.
_SMALL = LLaDA2Config(
    vocab_size=32768, hidden_size=512, num_hidden_layers=6, intermediate_size=1408,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.5,
    num_experts=64, moe_intermediate_size=128, num_experts_per_tok=8, n_group=8, topk_group=4,
    num_shared_experts=1, routed_scaling_factor=2.5, max_position_embeddings=8192,
    pad_token_id=32766, eos_token_id=32766, mask_token_id=32767)

# A few hundred thousand parameters: unit tests. Two MoE layers so the cache crosses MoE layers.
_TINY = LLaDA2Config(
    vocab_size=512, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
    num_experts=16, moe_intermediate_size=32, num_experts_per_tok=4, n_group=4, topk_group=2,
    num_shared_experts=1, routed_scaling_factor=2.5, max_position_embeddings=512,
    pad_token_id=510, eos_token_id=510, mask_token_id=511)

PRESETS: dict[str, LLaDA2Config] = {"llada2-mini": _MINI, "llada2-small": _SMALL, "tiny": _TINY}


def preset_config(name: str) -> LLaDA2Config:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
