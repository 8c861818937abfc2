"""A scripted stand-in for the model (same interface as LLaDA2MoeModel for decoding): its logits
come from a script, so tests can walk the decoder through SPEC section 3 step by step.

script(block, step) -> list of block_length entries for the positions of absolute block `block`
at the `step`-th forward that decodes it (0-based): (token, conf) puts probability conf on token
and spreads the rest evenly over the other ids; None gives a flat distribution whose argmax is
FILLER. Every forward is recorded in model.calls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

VOCAB, HIDDEN = 16, 8
MASK, EOS, FILLER = 15, 14, 0


@dataclass(frozen=True)
class StubConfig:
    vocab_size: int = VOCAB
    hidden_size: int = HIDDEN
    mask_token_id: int = MASK
    eos_token_id: int = EOS


@dataclass
class Call:
    n_fed: int
    write_slot: int
    positions: torch.Tensor         # [B, T]
    valid_from: torch.Tensor        # [B]
    input_ids: torch.Tensor | None  # [B, T]
    inputs_embeds: torch.Tensor | None


@dataclass
class StubCache:
    batch_size: int
    max_slots: int
    selects: list = field(default_factory=list)

    def select(self, batch_index: torch.Tensor) -> "StubCache":
        self.selects.append(batch_index.tolist())
        return StubCache(len(batch_index), self.max_slots, self.selects)


def scripted_logits(entries, vocab: int = VOCAB) -> torch.Tensor:
    """[len(entries), vocab] log-probabilities for the (token, conf) / None entries."""
    rows = []
    for entry in entries:
        if entry is None:
            p = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
            p[FILLER] += 1e-3
        else:
            token, conf = entry
            p = torch.full((vocab,), (1.0 - conf) / (vocab - 1), dtype=torch.float64)
            p[token] = conf
        rows.append(p.log())
    return torch.stack(rows).float()


class StubModel:
    def __init__(self, script, block_length: int, config: StubConfig = StubConfig()):
        self.script, self.block_length, self.config = script, block_length, config
        generator = torch.Generator().manual_seed(0)
        self.embedding_weight = torch.randn(config.vocab_size, config.hidden_size,
                                            generator=generator)
        self.calls: list[Call] = []
        self.caches: list[StubCache] = []
        self._steps: dict[tuple[int, int], int] = {}   # (block, current slot) -> forwards so far

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_weight[ids]

    def frozen(self):  # decode() runs inside one (LLaDA2MoeModel.frozen); nothing to cache here
        return contextlib.nullcontext(self)

    def new_cache(self, batch_size: int, max_slots: int) -> StubCache:
        self.caches.append(StubCache(batch_size, max_slots))
        return self.caches[-1]

    def forward_cached(self, cache, *, input_ids=None, inputs_embeds=None, position_ids,
                       write_slot, valid_from, block_length, n_logits=None, span=None):
        assert (input_ids is None) != (inputs_embeds is None)
        write_slot = int(write_slot)  # a device write slot (a graph runner's) read back here
        assert block_length == self.block_length and write_slot % block_length == 0
        fed = input_ids if input_ids is not None else inputs_embeds
        batch, n_fed = fed.shape[:2]
        assert batch == cache.batch_size and write_slot + n_fed <= cache.max_slots
        assert span is None or write_slot + n_fed <= span <= cache.max_slots
        self.calls.append(Call(n_fed, write_slot, position_ids.clone(), valid_from.clone(),
                               None if input_ids is None else input_ids.clone(),
                               None if inputs_embeds is None else inputs_embeds.clone()))
        L = self.block_length
        logits = torch.zeros(batch, n_fed, self.config.vocab_size)
        current_slot = write_slot + n_fed - L
        for b in range(batch):
            block = int(position_ids[b, -1]) // L
            key = (block, current_slot)
            step = self._steps.get(key, 0)
            self._steps[key] = step + 1
            entries = self.script(block, step)
            if entries is not None:
                logits[b, -L:] = scripted_logits(entries, self.config.vocab_size)
        if n_logits is None:
            return logits
        return logits[:, n_fed - n_logits:] if n_logits else None


def hybrid_row(weight: torch.Tensor, token: int, conf: float, mask_id: int = MASK) -> torch.Tensor:
    """SPEC section 3 step 6 with k = 1, written out for one position."""
    e_t, e_m = weight[token].double(), weight[mask_id].double()
    h = conf * e_t + (1 - conf) * e_m
    target = conf * e_t.norm() + (1 - conf) * e_m.norm()
    return (h * target / (h.norm() + 1e-6)).float()
