"""Tiny LLaDA2-MoE checkpoints in the exact Hugging Face layout, written by tests for tests.

    from checkpoints import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path / "ckpt")          # config.json + 2 shards + index
"""
from __future__ import annotations

from pathlib import Path

import torch

from dmax_ext.model import PRESETS, random_model, save_model


def write_tiny_checkpoint(path, config_overrides: dict | None = None, n_shards: int = 2,
                          seed: int = 0, dtype: torch.dtype = torch.float32,
                          lm_head_gain: float = 1.0, tokenizer=None) -> Path:
    """Writes the "tiny" preset (with `config_overrides`) with random weights to `path`.

    Unlike random_model, norm weights and router expert biases are perturbed too, so a test
    notices a norm applied in the wrong place or a bias that leaks into the routing weights."""
    config = PRESETS["tiny"].replace(**(config_overrides or {}))
    model = random_model(config, dtype=dtype, seed=seed, lm_head_gain=lm_head_gain)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("norm.weight"):
                tensor.add_(0.2 * noise)
            elif name.endswith("expert_bias"):
                tensor.copy_(0.05 * noise)
    return save_model(model, path, tokenizer=tokenizer, n_shards=n_shards)
