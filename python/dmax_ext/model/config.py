"""LLaDA2Config: the one source of the config field names and of the special token ids.

Field names and meanings are those of the Hugging Face `config.json` of LLaDA2-MoE checkpoints
(../shared/SPEC.md section 1). Keys we do not model (auto_map, output_router_logits, ...) are kept
in `extra` so that a load -> save round trip writes them back unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "llada2_moe"
ARCHITECTURE = "LLaDA2MoeModelLM"
CONFIG_FILE = "config.json"

# The special ids of LLaDA2.0-mini's tokenizer; the defaults when config.json does not state them.
DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892


@dataclass(frozen=True)
class LLaDA2Config:
    """Defaults are the values of LLaDA2.0-mini (the "llada2-mini" preset)."""
    vocab_size: int = 157184
    hidden_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 16384  # SPEC section 1
    rms_norm_eps: float = 1e-6
    intermediate_size: int = 5120
    first_k_dense_replace: int = 1
    num_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    score_function: str = "sigmoid"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    use_bias: bool = False
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = DEFAULT_EOS_TOKEN_ID
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    eos_token_id: int = DEFAULT_EOS_TOKEN_ID
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(f"LLaDA2Config: {problem}")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    # -- (de)serialization ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LLaDA2Config":
        """Builds a config from config.json's dict; `source` names the file in errors."""
        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or [ARCHITECTURE]
        if model_type != MODEL_TYPE or ARCHITECTURE not in architectures:
            raise ValueError(
                f"{source}: not a LLaDA2-MoE checkpoint (expected model_type {MODEL_TYPE!r} and "
                f"architectures containing {ARCHITECTURE!r}; got model_type {model_type!r}, "
                f"architectures {architectures!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        if "torch_dtype" not in raw and isinstance(raw.get("dtype"), str):
            kwargs["torch_dtype"] = raw["dtype"]
        if isinstance(kwargs.get("eos_token_id"), list):  # HF allows a list of eos ids
            extra["eos_token_id"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs["architectures"] = tuple(architectures)
        try:
            return cls(**kwargs, extra=extra)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "LLaDA2Config":
        """Reads `path` (a config.json, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (a LLaDA2-MoE folder needs {CONFIG_FILE})")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["architectures"] = list(self.architectures)
        if isinstance(self.extra.get("eos_token_id"), list):
            out["eos_token_id"] = self.extra["eos_token_id"]
        return out

    def replace(self, **changes) -> "LLaDA2Config":
        return dataclasses.replace(self, **changes)

    # -- validation ----------------------------------------------------------------------------
    def problem(self) -> str | None:
        """The first reason this config cannot be run by our model, or None."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "intermediate_size", "num_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                return f"{name} must be a positive integer, got {value!r}"
        unsupported = {"score_function": "sigmoid", "hidden_act": "silu", "rope_scaling": None,
                       "use_bias": False, "use_qkv_bias": False, "use_qk_norm": True,
                       "norm_topk_prob": True, "moe_router_enable_expert_bias": True,
                       "tie_word_embeddings": False}
        for name, supported in unsupported.items():
            if getattr(self, name) != supported:
                return f"{name}={getattr(self, name)!r} is not supported (only {supported!r})"
        if self.num_attention_heads % self.num_key_value_heads:
            return (f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})")
        rotary = self.head_dim * self.partial_rotary_factor
        if rotary != int(rotary) or int(rotary) % 2 or not 0 < rotary <= self.head_dim:
            return (f"head_dim * partial_rotary_factor must be an even number of dims in "
                    f"(0, head_dim], got {rotary}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            return f"first_k_dense_replace must be in [0, num_hidden_layers], got {self.first_k_dense_replace}"
        if self.num_experts % self.n_group or self.experts_per_group < 2:
            return (f"num_experts ({self.num_experts}) must split into n_group ({self.n_group}) "
                    "groups of at least 2 experts (a group scores by its two best experts)")
        if self.topk_group > self.n_group:
            return f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"
        if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            return (f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                    f"{self.topk_group} kept groups")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            return f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}"
        for name in ("mask_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                return f"{name} ({value!r}) must be a token id < vocab_size ({self.vocab_size})"
        if self.mask_token_id == self.eos_token_id:
            return f"mask_token_id and eos_token_id must differ (both {self.mask_token_id})"
        return None
