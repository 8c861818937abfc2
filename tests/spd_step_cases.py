"""Shared by test_promote.py, test_spd_update.py and test_hybrid_embed.py: the implementations
under test and random inputs for one SPD step.

Backends: "cpu" (torch.ops.dmax on CPU tensors), "simt-forward" / "simt-reverse" / "simt-random"
(the CUDA kernels on the simt emulation, torch.ops.dmax_simt, under schedule seeds 0, 1 and a
random one) and "cuda" (torch.ops.dmax on a GPU; marked gpu, skipped without one). Test ids carry
the backend name, so `pytest -k simt` selects the emulated runs (the sanitizer test does).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from dmax_ext import ops
from dmax_ext._native import load_simt
from dmax_ext.model.config import LLaDA2Config

MASK = LLaDA2Config().mask_token_id
# Under the sanitizer build (test_simt_sanitizers.py) every emulated case runs ~10x slower.
SANITIZER_RUN = bool(os.environ.get("DMAX_SANITIZER_RUN"))
# The random schedule: $SIMT_RANDOM_SEED replays a failure; every assertion message names it.
RANDOM_SCHEDULE_SEED = int(os.environ.get("SIMT_RANDOM_SEED")
                           or random.SystemRandom().randrange(2, 2**32))
SCHEDULE_SEEDS = {"simt-forward": 0, "simt-reverse": 1, "simt-random": RANDOM_SCHEDULE_SEED}

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = ["cpu", *SCHEDULE_SEEDS, pytest.param("cuda", marks=[pytest.mark.gpu, _needs_cuda])]
# opcheck and error paths do not depend on the schedule.
BACKENDS_ONE_SCHEDULE = ["cpu", "simt-forward",
                         pytest.param("cuda", marks=[pytest.mark.gpu, _needs_cuda])]

_simt_fakes_registered = False


def _load_simt() -> None:
    """dmax_simt ops with the fake kernels of their dmax twins (for opcheck / compile)."""
    global _simt_fakes_registered
    load_simt()
    if not _simt_fakes_registered:
        ops.register_fake_kernels("dmax_simt")
        _simt_fakes_registered = True


class Backend:
    """One implementation of the ops: `backend.op("promote")` is the op to call on tensors that
    `backend.to(...)` moved to its device."""

    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.schedule_seed = SCHEDULE_SEEDS.get(name)
        if self.schedule_seed is not None:
            _load_simt()

    @property
    def namespace(self):
        return torch.ops.dmax_simt if self.schedule_seed is not None else torch.ops.dmax

    def op(self, name: str):
        packet = getattr(self.namespace, name)

        def call(*args):
            if self.schedule_seed is not None:  # set at every call: other tests change it
                torch.ops.dmax_simt.set_schedule_seed(self.schedule_seed)
            return packet(*args)
        return call

    def to(self, *tensors):
        moved = tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in tensors)
        return moved if len(moved) > 1 else moved[0]

    def __repr__(self):
        seed = "" if self.schedule_seed is None else f", schedule seed {self.schedule_seed}"
        return f"<backend {self.name}{seed}>"


def example_count(cpu: int, simt: int, backend: str) -> int:
    """Random examples per test: fewer on the emulation, fewer still under the sanitizers."""
    if backend.startswith("simt"):
        return max(3, simt // 4) if SANITIZER_RUN else simt
    return cpu


def random_block(gen: torch.Generator, B: int, L: int, *, vocab: int = 50, mask_id: int = MASK,
                 p_masked: float = 0.5, p_active: float = 0.8, conf_kind: str = "uniform"):
    """Random (ids, conf, pred, active) of one step. conf_kind: "uniform"; "coarse" (values in
    {0, .25, .5, .75, 1}: ties and exact threshold hits); "near" (within 1e-5 of each other, for
    the baseline's tie rule). pred is sometimes the mask id itself."""
    ids = torch.randint(0, vocab, (B, L), generator=gen)
    ids[torch.rand(B, L, generator=gen) < p_masked] = mask_id
    pred = torch.randint(0, vocab, (B, L), generator=gen)
    pred[torch.rand(B, L, generator=gen) < 0.1] = mask_id
    conf = torch.rand(B, L, generator=gen)
    if conf_kind == "coarse":
        conf = (conf * 4).round() / 4
    elif conf_kind == "near":
        conf = 0.5 + (torch.rand(B, L, generator=gen) - 0.5) * 4e-5
    active = torch.rand(B, L, generator=gen) < p_active
    return ids, conf.float(), pred, active
