"""Checkpoints: load_model / save_model in the Hugging Face layout, random_model from a preset.

Only safetensors are read (no pickle). Tensors are materialized one at a time straight into the
preallocated parameters, so host memory never holds the model twice.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CONFIG_FILE, LLaDA2Config
from .llada2 import LLaDA2MoeModel
from .moe import FLOAT32_TENSORS
from .presets import preset_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def _empty_model(config: LLaDA2Config, device, dtype: torch.dtype) -> LLaDA2MoeModel:
    """The model with uninitialized storage on `device`: built on meta, then allocated once."""
    with torch.device("meta"):
        model = LLaDA2MoeModel(config).to(dtype)
    for module in model.modules():
        for name in FLOAT32_TENSORS:
            if name in module._buffers:
                module._buffers[name] = module._buffers[name].float()
    return model.to_empty(device=device).eval()


# -- load ------------------------------------------------------------------------------------------
def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> LLaDA2MoeModel:
    """Loads a LLaDA2-MoE folder (config.json + model.safetensors or shards + index).

    Every tensor of the checkpoint must match the model built from config.json by name and shape:
    missing, extra or misshapen tensors, corrupt shards and broken indexes are errors naming the
    file and the tensor. The tokenizer (if the folder has one) is loaded offline into .tokenizer."""
    path = Path(path)
    config = LLaDA2Config.from_json(path)
    files = _checkpoint_files(path)
    model = _empty_model(config, device, dtype)
    _fill_from_checkpoint(model, path, files)
    return model


def _fill_from_checkpoint(model, path: Path, files, expected_shapes=None, read=None) -> None:
    """Copies every shard into the model's tensors (see _copy_shard for expected_shapes and
    read), refuses a checkpoint that leaves one unfilled, and attaches the folder's tokenizer."""
    targets = model.state_dict()
    filled: set[str] = set()
    for file, listed in files.items():
        filled |= _copy_shard(file, listed, targets, expected_shapes, read or _read_full)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor {missing[0]!r} "
                         f"({len(missing)} missing in all) required by {path / CONFIG_FILE}")
    model.tokenizer = _load_tokenizer(path)


def _checkpoint_files(path: Path) -> dict[Path, set[str] | None]:
    """Shard file -> the tensor names the index assigns to it (None: a single unindexed file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: has no weight_map object")
        files: dict[Path, set[str]] = {}
        for name, file_name in weight_map.items():
            files.setdefault(path / file_name, set()).add(name)
        for file, names in files.items():
            if not file.is_file():
                raise FileNotFoundError(f"{index}: points to {file.name}, which does not exist "
                                        f"(tensor {sorted(names)[0]!r})")
        return files
    if (path / SINGLE_FILE).is_file():
        return {path / SINGLE_FILE: None}
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _read_full(name: str, tensor_slice) -> torch.Tensor:
    return tensor_slice[:]


def _copy_shard(file: Path, listed: set[str] | None, targets: dict[str, torch.Tensor],
                expected_shapes: dict[str, tuple] | None = None, read=_read_full) -> set[str]:
    """Checks one shard against the model and copies its tensors into `targets`.

    `expected_shapes` are the checkpoint's full shapes (default: the targets' own shapes);
    `read(name, slice)` returns what is copied (default the whole tensor; tensor parallelism
    passes a reader of the rank's slice, so no rank materialises a full tensor).
    """
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    with handle as shard:
        names = set(shard.keys())
        if listed is not None and listed - names:
            raise ValueError(f"{file}: lacks tensor {sorted(listed - names)[0]!r}, which "
                             f"{INDEX_FILE} places in it")
        for name in sorted(names):
            if name not in targets or (listed is not None and name not in listed):
                why = "not in the index" if name in targets else "not a tensor of this model"
                raise ValueError(f"{file}: unexpected tensor {name!r} ({why})")
            tensor_slice = shard.get_slice(name)
            shape = tuple(tensor_slice.get_shape())
            expected = tuple(expected_shapes[name] if expected_shapes else targets[name].shape)
            if shape != expected:
                raise ValueError(f"{file}: tensor {name!r} has shape {list(shape)}, expected "
                                 f"{list(expected)} from config.json")
            try:
                targets[name].copy_(read(name, tensor_slice))
            except SafetensorError as e:
                raise ValueError(f"{file}: tensor {name!r} cannot be read ({e})") from None
    return names


def _load_tokenizer(path: Path):
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    # transformers does not know model_type llada2_moe and logs a compatibility warning while it
    # reads config.json for the tokenizer class; the tokenizer itself is a plain fast tokenizer.
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        # transformers parses our config.json on the way and warns about its legacy rope keys.
        warnings.simplefilter("ignore", FutureWarning)
        # trust_remote_code=False: with an auto_map in config.json transformers would otherwise
        # stop and ask on stdin; the LLaDA2 tokenizer is a plain fast tokenizer.
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                             trust_remote_code=False)


# -- save ------------------------------------------------------------------------------------------
def save_model(model: LLaDA2MoeModel, path: str | Path, tokenizer=None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, n_shards: int | None = None) -> Path:
    """Writes config.json + safetensors (per-expert tensors, the HF names) + index, and the
    tokenizer (`tokenizer` or model.tokenizer). Built in a temporary folder next to `path` and
    renamed into place, so `path` never holds a half-written checkpoint."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = model.state_dict()
    shards = _split_into_shards(tensors, max_shard_bytes, n_shards)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weight_map = {}
        for k, names in enumerate(shards):
            file_name = (SINGLE_FILE if len(shards) == 1
                         else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
            save_file({n: tensors[n].detach().to("cpu").contiguous() for n in names},
                      str(tmp / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file_name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = model.config.to_dict()
        config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _split_into_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int,
                       n_shards: int | None) -> list[list[str]]:
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    total = sum(sizes.values())
    n_shards = n_shards or max(1, -(-total // max_shard_bytes))
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    before = 0
    for name, size in sizes.items():  # model order: a shard holds consecutive layers
        shards[min(n_shards - 1, before * n_shards // max(total, 1))].append(name)
        before += size
    return [s for s in shards if s]


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# -- random ----------------------------------------------------------------------------------------
def random_model(preset: str | LLaDA2Config, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, lm_head_gain: float = 1.0,
                 lm_head_from_embedding: bool = False) -> LLaDA2MoeModel:
    """A model with random weights: N(0, initializer_range) matrices, unit norms, zero expert
    bias; lm_head's std is multiplied by `lm_head_gain` (a large gain gives peaked, confident
    predictions, as a trained model has). Same seed -> same weights on every device.

    lm_head_from_embedding: lm_head = lm_head_gain x the input embedding (a copy, not tied),
    with the mask token's row zero. Then an unmasked position predicts its own token back, as a
    trained masked-diffusion model does, and a masked one what its context points at; SPD's soft
    positions settle instead of drifting (with independent random lm_head rows, SPD's feedback
    through the soft embeddings amplifies float rounding: two op implementations that differ by
    an ulp soon decode different tokens)."""
    config = preset_config(preset) if isinstance(preset, str) else preset
    model = _empty_model(config, device, dtype)
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif name.rsplit(".", 1)[-1] in FLOAT32_TENSORS:
                tensor.zero_()
            else:
                gain = lm_head_gain if name == "lm_head.weight" else 1.0
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (std * gain))
        if lm_head_from_embedding:
            model.lm_head.weight.copy_(model.embedding_weight * lm_head_gain)
            model.lm_head.weight[config.mask_token_id].zero_()  # never predicts the mask
    return model
