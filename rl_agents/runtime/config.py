"""The runtime's settings (``RuntimeConfig``) and the checks of its worker options (``check_workers``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RuntimeConfig:
    max_new_tokens: int = 128
    """longest agent turn, in tokens (truncation reason ``max_new_tokens``)"""
    max_turns: int = 8
    """most agent turns in an episode (truncation reason ``max_turns``)"""
    max_context: int | None = None
    """longest episode sequence, prompt and observations included (truncation reason ``context_length``);
    null: the model's ``max_position_embeddings`` (a larger value is refused: the model has no positions there)"""
    batch_size: int = 16
    """episodes run in parallel, one environment each"""
    greedy: bool = True
    """argmax decoding; otherwise sample with ``temperature`` and ``top_p``"""
    temperature: float = 1.0
    top_p: float = 1.0
    use_cache: bool = True
    """reuse the KV cache across tokens and turns (False re-encodes every sequence at every token)"""
    draft_tokens: int = 0
    """speculative decoding: draft up to this many tokens per step by n-gram lookup (``NgramDrafter``) and
    verify them in the same forward pass; exact: greedy episodes are unchanged and sampled tokens keep their
    distribution. 0: off"""
    draft_ngram: int = 3
    """longest n-gram the drafter matches (it tries n = draft_ngram down to 1)"""
    draft_budget: int | None = 64
    """most draft tokens a forward pass carries, shared by the slots (each drafts at most draft_budget //
    batch_size): with many slots a pass is compute-bound and long drafts cost more than they save. None: no cap"""
    env_workers: int = 0
    """threads that step the environments while the model goes on decoding for the other slots: a tool call
    that takes long (Code-v0's sandbox) then holds back its own slot only. 0: each environment steps in turn
    between forward passes. The episodes are the same either way (sampling draws from each episode's own
    generator); with sampled drafts they are not reproducible (the drafter sees turns end in the tools'
    order), so that combination is refused"""
    processes: int = 1
    """worker processes a run's episodes are spread over (CPU only), each with its share of the slots
    (``batch_size / processes``) and of torch's threads, pulling the next seed from a shared counter: a packed
    pass's small matmuls keep one core busy, so on a machine of N cores N processes use them all. Not for RL
    rollouts (the workers hold the weights they were started with). 1: the slots run in this process"""
    max_episode_s: float | None = None
    """wall time of one episode: a turn that ends past it ends the episode (truncation ``wall_time``); None: no
    limit (an agent serving users sets one)"""
    end_on_malformed: bool = False
    """end the episode at the first malformed turn (truncation reason ``malformed``) instead of feeding the
    error back (``envs.base.MALFORMED_KINDS``: no action, bad JSON, unknown tool, bad arguments, too long)"""


def check_workers(config) -> None:
    """Refuse ``env_workers`` < 0 and ``processes`` < 1, and either kind of worker with sampled drafts (not
    reproducible): a ``ValueError`` whose message starts with the field's name. ``config``: a ``RuntimeConfig``
    or the Hydra node of one."""
    if config.env_workers < 0:
        raise ValueError(f"env_workers must be >= 0 (0: the environments step in turn), got {config.env_workers}")
    if config.env_workers and config.draft_tokens and not config.greedy:
        raise ValueError(
            "env_workers with sampled drafts (draft_tokens > 0, greedy=false): the drafter would see turns end in "
            "the tools' order, so episodes would not be reproducible (set env_workers=0, draft_tokens=0 or greedy)"
        )
    if config.processes < 1:
        raise ValueError(f"processes must be >= 1 (1: the slots run in this process), got {config.processes}")
    if config.processes > 1 and config.draft_tokens and not config.greedy:
        raise ValueError(
            "processes > 1 with sampled drafts (draft_tokens > 0, greedy=false): each process's drafter sees "
            "other turns, so episodes would not be reproducible (set processes=1, draft_tokens=0 or greedy)"
        )
