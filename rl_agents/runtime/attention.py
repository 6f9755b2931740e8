"""The packed forward pass (``_Pass``): the pending tokens of every slot side by side in one row, each slot
attending over its own columns of the ``SlotCache``; ``slot_attention`` is the attention implementation the
runtime switches a model to while it runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rl_agents.runtime import cache

CALL_COLUMNS = 256
"""What one more attention call costs, in slot-columns read: ``_Pass`` splits a pass's attention by region
where that reads fewer columns than this per extra call."""
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
SLOT_ATTENTION = "rl_agents_slots"
"""The attention implementation the runtime sets while it runs (``slot_attention``)."""


def _groups(needs: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous ranges of slots to attend together, as (first slot, end slot, width): whole regions
    (``REGION_SLOTS``), each group as wide as its widest slot, chosen to read the fewest slot-columns counting
    ``CALL_COLUMNS`` per call. ``needs``: the columns each slot reads (0: none, skipped where a group can)."""
    if len(needs) <= cache.REGION_SLOTS:  # one region: one call (a run of few slots pays nothing for regions)
        return [(0, len(needs), max(needs))] if any(needs) else []
    edges = list(range(0, len(needs), cache.REGION_SLOTS)) + [len(needs)]
    regions = [max(needs[a:b]) for a, b in zip(edges, edges[1:])]
    best: list[tuple[float, list]] = [(0.0, [])]  # best[j]: the cheapest groups covering regions before j
    for j in range(1, len(regions) + 1):
        options = [best[j - 1]] if regions[j - 1] == 0 else []  # a region with nothing to attend: skipped
        for i in range(j):
            w = max(regions[i:j])
            if w:
                cost, groups = best[i]
                options.append((cost + (edges[j] - edges[i]) * w + CALL_COLUMNS, groups + [(edges[i], edges[j], w)]))
        best.append(min(options, key=lambda option: option[0]))
    return best[-1][1]


@dataclass
class _Batched:
    """The rows of a pass attended together (each feeds at most ``batch_limit`` tokens)."""

    queries: int
    """queries per slot: the longest batched row (shorter rows are padded to it)"""
    dense: bool
    """one token for every slot, in slot order: the packed tokens are the query rows as they are"""
    groups: list[tuple[int, int, int]]
    """(first slot, end slot, width) of each attention call (``_groups``)"""
    mask: torch.Tensor | None = None
    """(slots, 1, queries, width): query j of slot s sees columns up to its own; None: every column"""
    token: torch.Tensor | None = None
    """where each batched token sits when not dense: its packed index, its slot and its query index there"""
    slot: torch.Tensor | None = None
    query: torch.Tensor | None = None


@dataclass
class _Single:
    """A row attended alone (a prompt, an observation): its packed tokens over its slot's own columns."""

    first: int
    """its first packed token"""
    count: int
    slot: int
    columns: int
    """the slot's columns it reads (the cache's earlier ones and its own)"""
    mask: torch.Tensor | None
    """None: causal (the slot's cache was empty)"""


class _Pass:
    """The layout of one packed forward pass: the fed tokens of every slot that takes part, in one row.

    Linear layers see only real tokens, whatever mix of prompts, observations, single decoded tokens and drafts
    the slots feed, so a step costs one forward pass. The attention (``attend``) reads each slot's own
    columns of the ``SlotCache``:

    * **batched** rows, which feed at most ``batch_limit`` tokens (a decoded token and its draft), are attended
      together: one attention call per group of slots (``_groups``: whole regions of the cache, merged where
      another call would cost more than it saves), queries padded to the longest such row and keys to the
      group's longest slot, under a mask that lets each query see its slot's columns up to its own;
    * longer rows (a prompt, an observation) are attended one by one, each over its own slot's columns,
      causal within the row.
    """

    def __init__(self, rows: list[int], counts: list[int], lengths: list[int], batch_limit: int, device):
        token_rows, token_columns, batched = [], [], []
        self.singles: list[_Single] = []  # the rows attended alone
        first = 0
        for s, n in zip(rows, counts):
            c = lengths[s]
            token_rows += [s] * n
            token_columns += range(c, c + n)
            if n <= batch_limit:
                batched.append((first, s, n))
            else:  # query i sees the slot's c earlier columns and the row's tokens up to its own
                mask = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None] if c else None
                self.singles.append(_Single(first, n, s, c + n, None if mask is None else mask.to(device)))
            first += n
        self.write_at = (torch.tensor(token_rows, device=device), torch.tensor(token_columns, device=device))
        self.columns = max(token_columns) + 1  # the cache columns this pass needs
        self.batched: _Batched | None = None
        if not batched:
            return
        slots, queries = len(lengths), max(n for _, _, n in batched)
        width = max(lengths[s] + n for _, s, n in batched)
        dense = queries == 1 and len(batched) == slots  # one token for every slot, in slot order
        needs = [0] * slots  # the columns each slot's batched row reads (0: no batched row)
        for _, s, n in batched:
            needs[s] = lengths[s] + n
        groups = _groups(needs)  # ranges of slots attended together, each over its own width
        self.batched = _Batched(queries, dense, groups)
        if not dense:  # where each batched token sits: packed index, slot, and query index in its slot
            self.batched.token = torch.tensor([f + j for f, _, n in batched for j in range(n)], device=device)
            self.batched.slot = torch.tensor([s for _, s, n in batched for _ in range(n)], device=device)
            self.batched.query = torch.tensor([j for _, _, n in batched for j in range(n)], device=device)
        if not (dense and len(set(lengths)) == 1):
            # query j of slot s sees columns up to lengths[s] + j (slots without a batched row: column 0 only,
            # a finite result that is discarded)
            base = [0] * slots
            for _, s, _ in batched:
                base[s] = lengths[s]
            last = torch.tensor(base)[:, None] + torch.arange(queries)[None, :]
            allowed = torch.arange(width)[None, None, :] <= last[:, :, None]
            self.batched.mask = allowed[:, None].to(device)

    @staticmethod
    def _attend_groups(query, key, value, mask, groups, scale, gqa) -> torch.Tensor:
        """SDPA of queries (slots, heads, queries, head_dim) over each group of slots' own width; the rows of
        slots outside every group are left unset."""

        def one(a: int, b: int, w: int) -> torch.Tensor:
            m = None if mask is None else mask[a:b, ..., :w]
            return F.scaled_dot_product_attention(
                query[a:b], key[a:b, :, :w], value[a:b, :, :w], attn_mask=m, scale=scale, enable_gqa=gqa
            )

        if len(groups) == 1 and groups[0][:2] == (0, query.shape[0]):
            return one(*groups[0])
        out = query.new_empty(query.shape)
        for a, b, w in groups:
            out[a:b] = one(a, b, w)
        return out

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None):
        """Attention output (1, tokens, heads, head_dim) of the packed queries (1, heads, tokens, head_dim)
        over the cache's whole buffers (slots, kv heads, capacity, head_dim)."""
        gqa = key.shape[1] != query.shape[1]
        query = query.to(key.dtype)  # float32 rotary queries beside the cache's autocast dtype (``_SlotLayer``)
        rows = query[0].transpose(0, 1)  # (tokens, heads, head_dim)
        b = self.batched
        if b is not None:
            if b.dense:
                o = self._attend_groups(rows[:, :, None], key, value, b.mask, b.groups, scale, gqa)
                return o.transpose(1, 2).transpose(0, 1)  # (1, slots, heads, head_dim)
            q = rows.new_zeros(key.shape[0], b.queries, *rows.shape[1:])
            q[b.slot, b.query] = rows[b.token]
            o = self._attend_groups(q.transpose(1, 2), key, value, b.mask, b.groups, scale, gqa)
        out = torch.empty_like(rows)
        if b is not None:
            out[b.token] = o.transpose(1, 2)[b.slot, b.query]
        for one in self.singles:
            s, end = one.slot, one.first + one.count
            o = F.scaled_dot_product_attention(
                query[:, :, one.first : end],
                key[s : s + 1, :, : one.columns],
                value[s : s + 1, :, : one.columns],
                attn_mask=one.mask,
                is_causal=one.mask is None,
                scale=scale,
                enable_gqa=gqa,
            )
            out[one.first : end] = o[0].transpose(0, 1)
        return out[None]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, slot_pass=None, **kwargs):
    """The runtime's attention (``SLOT_ATTENTION``): a packed pass's layout (``_Pass``) where the runtime gives
    one, and SDPA otherwise (a model the runtime has switched may still be called by others)."""
    if slot_pass is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return slot_pass.attend(query, key, value, scaling), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)
