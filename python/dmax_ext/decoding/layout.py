"""Where each sequence's blocks sit: absolute positions and cache slots (SPEC section 2).

A sequence with prompt length P decodes the blocks of absolute positions
[j * L, (j + 1) * L) for j = P // L .. ceil((P + G) / L) - 1: the prompt's tail shares the first
generated block, and the prompt's full blocks 0 .. P // L - 1 are prefilled into the cache.

A batch moves from block to block together, over *slot blocks* (within a block, engine.py lets
converged rows leave the steps). Sequence b's absolute block j lives in slot block j + shift_b
with shift_b = F - P_b // L and F = max_b P_b // L: every sequence's first generated block sits
in slot block F (prompts right-aligned on block boundaries, ARCHITECTURE.md "The model"), and
valid_from[b] = shift_b * L is its first slot. Slots before it are padding that no query of b
attends to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    block_length: int
    prompt_lengths: tuple[int, ...]
    first_blocks: tuple[int, ...]     # absolute index of each sequence's first generated block
    n_blocks: tuple[int, ...]         # generated blocks of each sequence
    first_slot_block: int             # F: the slot block where every first generated block sits

    @property
    def batch_size(self) -> int:
        return len(self.prompt_lengths)

    @property
    def end_slot_block(self) -> int:
        return self.first_slot_block + max(self.n_blocks)

    @property
    def max_slots(self) -> int:
        return self.end_slot_block * self.block_length

    def shift(self, b: int) -> int:
        return self.first_slot_block - self.first_blocks[b]

    def valid_from(self, b: int) -> int:
        return self.shift(b) * self.block_length

    def absolute_block(self, b: int, slot_block: int) -> int:
        return slot_block - self.shift(b)

    def is_last_block(self, b: int, slot_block: int) -> bool:
        return slot_block - self.first_slot_block == self.n_blocks[b] - 1

    # The rolling schedule (rolling.py) keeps every row's current block at the same slots,
    # [rolling_slot, rolling_slot + L), whichever of its blocks that is, and its previous block
    # just before them: a row moving on to its next block shifts its cache rows left by L
    # (KVCache.roll_rows). rolling_slot leaves room for the longest sequence's earlier blocks,
    # and at least one block for the previous block's slots.

    @property
    def rolling_slot(self) -> int:
        longest = max(f + n for f, n in zip(self.first_blocks, self.n_blocks))
        return max(1, longest - 1) * self.block_length

    def rolling_valid_from(self, b: int, block: int) -> int:
        """Sequence b's first slot while it decodes its generated block `block` (0-based)."""
        return self.rolling_slot - (self.first_blocks[b] + block) * self.block_length


def plan_layout(prompt_lengths: list[int], gen_length: int, block_length: int) -> BatchLayout:
    first = tuple(p // block_length for p in prompt_lengths)
    total_blocks = tuple(-(-(p + gen_length) // block_length) for p in prompt_lengths)
    return BatchLayout(
        block_length=block_length, prompt_lengths=tuple(prompt_lengths), first_blocks=first,
        n_blocks=tuple(t - f for t, f in zip(total_blocks, first)),
        first_slot_block=max(first))


def prefill_inputs(layout: BatchLayout, prompts: list[list[int]], pad_id: int, device):
    """ids, position_ids [B, F * L] of the prompts' full blocks, right-aligned in slot space.

    Padding slots hold pad_id at position 0: their keys/values are never attended to."""
    length = layout.first_slot_block * layout.block_length
    ids = torch.full((layout.batch_size, length), pad_id, dtype=torch.int64)
    positions = torch.zeros((layout.batch_size, length), dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        start, n = layout.valid_from(b), layout.first_blocks[b] * layout.block_length
        ids[b, start:] = torch.tensor(prompt[:n], dtype=torch.int64)
        positions[b, start:] = torch.arange(n)
    return ids.to(device), positions.to(device)


def block_before_ids(layout: BatchLayout, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """[B, L] host ids of the block before each sequence's first generated block: the prompt's
    last full block, or pad_id where the prompt has none (the rolling schedule feeds it anyway:
    its slots lie before the sequence's first slot, so no query attends to them)."""
    L = layout.block_length
    ids = torch.full((layout.batch_size, L), pad_id, dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        first = layout.first_blocks[b]
        if first > 0:
            ids[b] = torch.tensor(prompt[(first - 1) * L:first * L], dtype=torch.int64)
    return ids


def first_block_ids(layout: BatchLayout, prompts: list[list[int]], mask_id: int) -> torch.Tensor:
    """[B, L] host ids of each sequence's first generated block: its prompt tail, then masks."""
    ids = torch.full((layout.batch_size, layout.block_length), mask_id, dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        tail = prompt[layout.first_blocks[b] * layout.block_length:]
        ids[b, :len(tail)] = torch.tensor(tail, dtype=torch.int64)
    return ids
