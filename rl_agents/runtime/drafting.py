"""Speculative decoding without a draft model: n-gram drafts taken from the episode itself (``NgramDrafter``),
which tokens of a draft a verifying forward pass keeps (``verify_draft``: the runtime's and the bench's
orchestrated agent's one rule), and the token a sampled step keeps given a draft (``speculative_token``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch


def speculative_token(probs: torch.Tensor, proposed: int | None, generator: torch.Generator) -> int:
    """A token distributed as ``probs`` given a drafted ``proposed`` one (speculative sampling, point draft).

    The draft is kept with probability ``probs[proposed]``; otherwise the token is drawn from ``probs``
    without it (the residual ``max(0, p - q)`` of a one-token draft distribution ``q``), renormalised. Over
    both branches every token ``t`` comes out with probability ``probs[t]``.
    """
    if proposed is None:
        return int(torch.multinomial(probs, 1, generator=generator))
    if float(torch.rand((), generator=generator, device=probs.device)) < float(probs[proposed]):
        return proposed
    residual = probs.clone()
    residual[proposed] = 0.0
    return int(torch.multinomial(residual, 1, generator=generator))


def verify_draft(
    draft: list[int], choose: Callable[[int, int | None], tuple[int, float]]
) -> Iterator[tuple[int, float]]:
    """Draft-and-verify: the tokens one forward pass over a draft emits.

    The pass gives a distribution at each of the ``len(draft) + 1`` positions (after the fed token, after
    each draft token). ``choose(j, proposed)`` picks position ``j``'s token and its log-probability (the
    argmax, a forced token, or ``speculative_token``), given the draft's token there (None after the whole
    draft). Each choice is yielded; the draft is kept up to the first position whose choice differs from it,
    which is the last one emitted. The caller leaves the loop earlier where its sequence ends (an end of turn,
    a token budget).
    """
    for j in range(len(draft) + 1):
        proposed = draft[j] if j < len(draft) else None
        token, logprob = choose(j, proposed)
        yield token, logprob
        if token != proposed:
            return


def _ngrams_before(tokens: list[int], j: int, ngram: int) -> Iterator[tuple[int, ...]]:
    """The n-grams (n = 1..``ngram``) that end just before position ``j``: the keys that ``j`` follows."""
    return (tuple(tokens[j - n : j]) for n in range(1, min(ngram, j) + 1))


class NgramIndex:
    """Where each n-gram (n = 1..``ngram``) of a growing token sequence last occurred: the position after it."""

    def __init__(self, ngram: int):
        self.ngram, self.table, self.seen = ngram, {}, 0

    def extend(self, ids: list[int]) -> None:
        """Index the positions added since the last call (each one follows the n-grams ending before it)."""
        for j in range(max(1, self.seen), len(ids)):
            for key in _ngrams_before(ids, j, self.ngram):
                self.table[key] = j
        self.seen = len(ids)


def _last_match(ids: np.ndarray, n: int) -> int | None:
    """The position after the latest earlier occurrence of the last ``n`` tokens (None: there is none)."""
    if len(ids) <= n:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
    hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
    return int(hits[-1]) + n if len(hits) else None


class NgramDrafter:
    """Drafts a sequence's next tokens by n-gram lookup (prompt-lookup and suffix decoding).

    The sequence's last ``n`` tokens (n = ``ngram`` down to 1: the longest match wins) are looked up in the
    sequence itself (an agent copies numbers, names and rows from its task and observations) and in the
    agent turns this drafter has seen end (a compiled agent writes the same tool-call frames turn after
    turn); the tokens that followed the latest occurrence are the draft. Drafting needs no second model,
    and a wrong draft costs only the extra columns of one forward pass.
    """

    def __init__(self, ngram: int = 3, stop: int | None = None):
        if ngram < 1:
            raise ValueError(f"draft_ngram must be at least 1, got {ngram}")
        self.ngram, self.stop = ngram, stop  # a draft ends at ``stop`` (the end of a turn): nothing after it counts
        self.turns: dict[tuple[int, ...], tuple[list[int], int]] = {}

    def add_turn(self, context: list[int], turn: list[int]) -> None:
        """Remember an ended turn (its tokens after ``context``, the sequence before it)."""
        prefix = list(context[-self.ngram :])
        tokens = prefix + list(turn)
        for j in range(max(1, len(prefix)), len(tokens)):
            for key in _ngrams_before(tokens, j, self.ngram):
                self.turns[key] = (tokens, j)

    def propose(self, ids: list[int], index: NgramIndex | None, k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``ids``.

        ``index`` indexes ``ids`` and is brought up to date (a sequence that grows token by token); without
        one, ``ids`` is searched (a prompt seen once, as a stateless call sees it).
        """
        if k <= 0:
            return []
        if index is not None:
            index.extend(ids)
        array = np.asarray(ids) if index is None else None
        for n in range(min(self.ngram, len(ids)), 0, -1):
            key = tuple(ids[-n:])
            j = index.table.get(key) if index is not None else _last_match(array, n)
            if j is not None:
                return self._cut(ids[j : j + k])
            if key in self.turns:
                tokens, j = self.turns[key]
                return self._cut(tokens[j : j + k])
        return []

    def _cut(self, draft: list[int]) -> list[int]:
        return draft[: draft.index(self.stop) + 1] if self.stop in draft else draft
