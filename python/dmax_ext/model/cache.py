"""KVCache: static, preallocated keys/values per layer, addressed by slot."""
from __future__ import annotations

import torch


class KVCache:
    """keys[l], values[l]: [B, n_kv_heads, max_slots, head_dim] in the model dtype.

    Slot space is shared by the batch: sequences of different prompt lengths are right-aligned so
    that the same slot range is written for every sequence at each step (model.forward_cached)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    @classmethod
    def allocate(cls, n_layers: int, batch_size: int, n_kv_heads: int, max_slots: int,
                 head_dim: int, dtype: torch.dtype, device) -> "KVCache":
        # Zeros, not empty: masked-out slots still enter SDPA's P @ V, and 0 * NaN would be NaN.
        shape = (batch_size, n_kv_heads, max_slots, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)])

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_slots(self) -> int:
        return self.keys[0].shape[2]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def select(self, batch_index: torch.Tensor) -> "KVCache":
        """A new cache holding the rows batch_index (int64 [B'] or bool [B]) of this one."""
        batch_index = torch.as_tensor(batch_index, device=self.keys[0].device)
        if batch_index.dtype == torch.bool:
            if batch_index.shape != (self.batch_size,):
                raise ValueError(f"batch_index: a bool mask must have shape ({self.batch_size},), "
                                 f"got {tuple(batch_index.shape)}")
            batch_index = batch_index.nonzero().flatten()
        return KVCache([k.index_select(0, batch_index) for k in self.keys],
                       [v.index_select(0, batch_index) for v in self.values])

    @classmethod
    def concat(cls, caches: list["KVCache"]) -> "KVCache":
        """A new cache holding the rows of `caches` in order (same layers and slots): sequences
        joining a running batch (decoding/rolling.py)."""
        return cls([torch.cat(ks) for ks in zip(*(c.keys for c in caches))],
                   [torch.cat(vs) for vs in zip(*(c.values for c in caches))])

    def put_rows(self, batch_index: torch.Tensor, other: "KVCache") -> None:
        """In place: rows batch_index (int64 [B'] on the device) take other's B' rows (same
        layers and slots): sequences taking finished ones' places in buffers a CUDA graph
        replays on (decoding/rolling.py)."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine.index_copy_(0, batch_index, theirs)

    def roll_rows(self, batch_index: torch.Tensor, shift: int) -> None:
        """Moves the rows batch_index (int64 [B'] on the cache's device) `shift` slots to the
        left, in place: slot t takes slot t + shift's keys and values, and the last `shift`
        slots the first ones' (the rolling schedule, decoding/rolling.py: a sequence moving on
        to its next block, whose feed then rewrites those last slots)."""
        if not 0 < shift <= self.max_slots:
            raise ValueError(f"shift must be in [1, {self.max_slots}] (the cache's slots), "
                             f"got {shift}")
        for t in self.keys + self.values:
            t.index_copy_(0, batch_index, t.index_select(0, batch_index).roll(-shift, dims=2))
