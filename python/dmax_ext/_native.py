"""Loads the native libraries once and says what was built.

`_C.so` holds torch.ops.dmax.* (CPU kernels, plus CUDA kernels when built with nvcc);
`_simt.so` / `_simt_asan.so` are test-only: the CUDA kernels executed on the CPU emulation of the
CUDA execution model (torch.ops.dmax_simt.*).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
_loaded: set[str] = set()


def _load(name: str) -> None:
    if name in _loaded:
        return
    path = _PACKAGE_DIR / f"{name}.so"
    if not path.exists():
        raise ImportError(
            f"dmax_ext: native library {path} is missing; build it with "
            "`pip install --no-build-isolation -e .` (see README)")
    torch.ops.load_library(str(path))
    _loaded.add(name)


def load_ops() -> None:
    """Registers torch.ops.dmax.* (idempotent)."""
    _load("_C")


def built_with_cuda() -> bool:
    try:
        from . import _build_info
    except ImportError:
        return False
    return bool(_build_info.BUILT_CUDA)


def build_summary() -> str:
    return "dmax_ext native ops: " + ("CPU + CUDA" if built_with_cuda() else "CPU only")


SIMT_VARIANTS = {"plain": "_simt", "asan": "_simt_asan"}


def load_simt(variant: str | None = None) -> None:
    """Registers torch.ops.dmax_simt.* from the plain or sanitizer build (test tool only).

    The variant defaults to $DMAX_SIMT_VARIANT (set by the sanitizer test run) or "plain".
    """
    variant = variant or os.environ.get("DMAX_SIMT_VARIANT", "plain")
    if variant not in SIMT_VARIANTS:
        raise ValueError(f"simt variant must be one of {sorted(SIMT_VARIANTS)}, got {variant!r}")
    _load(SIMT_VARIANTS[variant])
