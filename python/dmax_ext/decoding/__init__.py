"""Block-diffusion decoding: soft parallel decoding (SPD) and the hard-threshold baseline."""
from .engine import DecodeResult, decode
from .params import (DEFAULT_ACCEPT_THRESHOLD, DEFAULT_BLOCK_LENGTH, DEFAULT_GEN_LENGTH,
                     DEFAULT_THRESHOLD, DEFAULT_TOP_K, MODES, SCHEDULERS)

__all__ = ["decode", "DecodeResult", "DEFAULT_GEN_LENGTH", "DEFAULT_BLOCK_LENGTH",
           "DEFAULT_THRESHOLD", "DEFAULT_ACCEPT_THRESHOLD", "DEFAULT_TOP_K", "MODES",
           "SCHEDULERS"]
