"""The LLaDA2-MoE model: config, modules, static KV cache, safetensors loading and saving."""
from .cache import KVCache
from .config import LLaDA2Config
from .llada2 import LLaDA2MoeModel
from .loading import load_model, random_model, save_model
from .presets import PRESETS

__all__ = ["LLaDA2Config", "LLaDA2MoeModel", "KVCache", "load_model", "save_model",
           "random_model", "PRESETS"]
