"""Decoding parameters: their defaults (the one place) and their validation at the public boundary.

Semantics of every parameter: ../shared/SPEC.md sections 2-3 (thresholds, block layout) and 5
(counting); how our code splits the work: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The release's evaluation defaults (SPEC section 3).
DEFAULT_GEN_LENGTH = 256
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_THRESHOLD = 0.5          # tau_dec: promotion threshold (SPD) / hard threshold (baseline)
DEFAULT_ACCEPT_THRESHOLD = 0.9   # tau_acc: SPD convergence threshold
DEFAULT_TOP_K = 1                # hybrid embedding over the top-k predictions (k = 1: the release)
MAX_TOP_K = 8                    # the ops' limit (ARCHITECTURE.md, "Ops")
MODES = ("spd", "threshold")
# decode()'s schedules of a batch's blocks: engine.py (lockstep), rolling.py; "auto" picks
# rolling for a CUDA batch of 2 to ROLLING_MAX_BATCH sequences. Past it a forward of 2L tokens a
# row is no longer bound by the weights' bytes but by arithmetic: llada2-mini on an H200 at
# batch 64, projected 1.7x the time of lockstep's later step (docs/PERFORMANCE.md, "GPU
# projections", where this bound is printed from here), which fewer forwards may not repay.
SCHEDULERS = ("auto", "lockstep", "rolling")
ROLLING_MAX_BATCH = 32
OPS_BACKENDS = ("native", "reference")


@dataclass(frozen=True)
class DecodeConfig:
    """Everything the step needs besides the tensors: validated, with the special ids resolved."""
    mode: str
    gen_length: int
    block_length: int
    threshold: float
    accept_threshold: float
    top_k: int
    temperature: float
    eos_id: int
    mask_id: int
    seed: int | None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def max_steps_per_block(self) -> int:
        # SPEC section 3: "up to B steps". Also the loop guard of the threshold baseline, which
        # can make no progress when every masked prediction is the mask id itself.
        return self.block_length


def _int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def resolve_max_batch(max_batch, n_prompts: int) -> int:
    """decode()'s max_batch: the most sequences decoded at once (None: all of them)."""
    return n_prompts if max_batch is None else _int("max_batch", max_batch, 1)


def _unit_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def make_config(model_config, *, mode, gen_length, block_length, threshold, accept_threshold,
                top_k, temperature, eos_id, mask_id, seed) -> DecodeConfig:
    """Validates the scalar arguments of decode(); eos/mask default to the model config's ids."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    vocab = model_config.vocab_size
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    eos_id = (model_config.eos_token_id if eos_id is None
              else _int("eos_id", eos_id, 0, vocab - 1))
    mask_id = (model_config.mask_token_id if mask_id is None
               else _int("mask_id", mask_id, 0, vocab - 1))
    if eos_id == mask_id:
        raise ValueError(f"eos_id and mask_id must differ, both are {eos_id}")
    if seed is not None:
        _int("seed", seed, 0)
    return DecodeConfig(
        mode=mode, gen_length=_int("gen_length", gen_length, 1),
        block_length=_int("block_length", block_length, 1),
        threshold=_unit_float("threshold", threshold),
        accept_threshold=_unit_float("accept_threshold", accept_threshold),
        top_k=_int("top_k", top_k, 1, MAX_TOP_K), temperature=float(temperature),
        eos_id=eos_id, mask_id=mask_id, seed=seed)


def prompts_as_lists(input_ids, vocab_size: int, device: torch.device) -> list[list[int]]:
    """input_ids: a tensor [batch, prompt] (or [prompt]), a list of id lists / 1-D tensors of
    different lengths, or one flat list of ids. Returns host lists; checks ids, emptiness and
    devices."""
    if isinstance(input_ids, torch.Tensor):
        _check_device(input_ids, "input_ids", device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt] or [prompt], got shape "
                             f"{tuple(input_ids.shape)}")
        _check_int_dtype(input_ids, "input_ids")
        prompts = input_ids.tolist()
    elif isinstance(input_ids, (list, tuple)):
        if input_ids and all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            input_ids = [input_ids]  # one prompt given as a flat list of ids
        prompts = []
        devices = {x.device for x in input_ids if isinstance(x, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"input_ids: the prompts' tensors are on different devices "
                             f"{sorted(map(str, devices))}; put them on the model's device "
                             f"({device})")
        for i, prompt in enumerate(input_ids):
            if isinstance(prompt, torch.Tensor):
                _check_device(prompt, f"input_ids[{i}]", device)
                _check_int_dtype(prompt, f"input_ids[{i}]")
                if prompt.dim() != 1:
                    raise ValueError(f"input_ids[{i}] must be 1-D, got shape {tuple(prompt.shape)}")
                prompt = prompt.tolist()
            elif not isinstance(prompt, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise TypeError(f"input_ids[{i}] must be a list of ints or a 1-D tensor, got "
                                f"{type(prompt).__name__}")
            prompts.append(list(prompt))
    else:
        raise TypeError(f"input_ids must be a tensor or a list of id lists, got "
                        f"{type(input_ids).__name__}")
    if not prompts:
        raise ValueError("input_ids: the batch is empty")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"input_ids: prompt {i} is empty (a prompt needs at least one token)")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids: prompt {i} holds id {bad}, outside [0, {vocab_size}) "
                             "(the model's vocab_size)")
    return prompts


def check_positions(prompts: list[list[int]], gen_length: int, block_length: int,
                    max_positions: int | None) -> None:
    """Every sequence, decoded in whole blocks, must fit the model's positions."""
    if max_positions is None:
        return
    for i, prompt in enumerate(prompts):
        end = -(-(len(prompt) + gen_length) // block_length) * block_length
        if end > max_positions:
            raise ValueError(
                f"input_ids: prompt {i} ({len(prompt)} ids) + gen_length ({gen_length}), "
                f"rounded up to whole blocks of {block_length}, needs {end} positions; the "
                f"model has max_position_embeddings {max_positions}")


def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the model is on {device}; move one of them")


def _check_int_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
