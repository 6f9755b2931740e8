"""The slot cache: each running episode's keys and values at the start of its row, one buffer per layer,
written in place; slots are grouped in regions of ``REGION_SLOTS`` (the packed attention reads by region)."""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer of a ``SlotCache``: the model's ``update`` writes each new token's keys and values at its
    slot's next free column and hands the attention the whole buffers (``_Pass.attend`` reads each slot's own
    columns)."""

    def __init__(self, cache: SlotCache, index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # under autocast (accelerate's mixed precision wraps the forward of a model being trained) values come
        # in the autocast dtype, while Llama's rotary embedding hands keys back in float32: the buffers take
        # the values' dtype, the one the attention computes in
        keys, values = self.cache.buffers(self.index, value_states)
        rows, columns = self.cache.write_at  # one entry per packed token
        keys[rows, :, columns] = key_states[0].transpose(0, 1).to(keys.dtype)
        values[rows, :, columns] = value_states[0].transpose(0, 1)
        return keys, values

    def get_seq_length(self) -> int:
        return max(self.cache.lengths, default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.capacity, 0


class SlotCache(Cache):
    """Keys and values of a batch of slots, one buffer per layer of shape (slots, kv heads, capacity, head_dim).

    Slot ``s`` holds its episode's ``lengths[s]`` tokens in columns ``[0, lengths[s])``; what lies beyond is
    spare room, never attended. A forward pass writes each fed token in place at its slot's next column
    (``_SlotLayer``), so its cost does not grow with the cache; the capacity doubles when a slot needs more.
    Keys carry their rotary positions (``position_ids`` are explicit), so where a slot's tokens sit in its row,
    or which row holds an episode (``move``), changes nothing.
    """

    def __init__(self, slots: int, num_layers: int):
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        self.lengths = [0] * slots
        self.keys: list[torch.Tensor] = []  # allocated by the first forward pass, layer by layer
        self.values: list[torch.Tensor] = []
        self.capacity = 64
        self.write_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (slot, column) of each packed token

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            shape = (len(self.lengths), like.shape[1], self.capacity, like.shape[3])
            self.keys.append(like.new_zeros(shape))
            self.values.append(like.new_zeros(shape))
        return self.keys[layer], self.values[layer]

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` tokens per slot."""
        if columns <= self.capacity:
            return
        capacity = max(columns, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                buffers[i][:, :, : self.capacity] = old
        self.capacity = capacity

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s tokens to slot ``dst`` (whose own are dropped); ``src`` is left empty."""
        n = self.lengths[src]
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[dst, :, :n] = buffer[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def grow(self, slots: int) -> None:
        """Add empty slots after the others, ``slots`` in all."""
        extra = slots - len(self.lengths)
        if extra <= 0:
            return
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = torch.cat([old, old.new_zeros(extra, *old.shape[1:])])
        self.lengths += [0] * extra

    def select(self, keep: list[int]) -> None:
        """Keep only these slots (in this order)."""
        if self.keys:
            index = torch.tensor(keep, dtype=torch.long, device=self.keys[0].device)
            self.keys = [k[index] for k in self.keys]
            self.values = [v[index] for v in self.values]
        self.lengths = [self.lengths[s] for s in keep]


REGION_SLOTS = 8
"""Slots per region of a ``SlotCache``: a slot that frees up in a region takes the longest episode of the next
region, so the regions hold ever shorter episodes and a pass attends each over its own width (``_Pass``)."""
