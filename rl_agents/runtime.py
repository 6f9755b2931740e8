"""The runtime of a compiled agent: run episodes of a policy in tool environments, batched, KV cache reused.

All episodes of a batch share one growing key/value cache. Every forward pass feeds each episode the
tokens it has not fed yet, right-aligned in a block and left-padded with masked positions:

* while generating: the token it just sampled;
* at the end of a turn: the end-of-turn token and the observation segment, in one block;
* when finished, or waiting: nothing (masked padding).

The attention mask covers the whole cache, so masked positions are holes no token attends to, and
position ids count only an episode's real tokens. An episode's context is therefore exactly the token
sequence ``trajectory.encode_trajectory`` builds for it, and the cache is never re-encoded.
``use_cache=False`` re-encodes every sequence at every token instead: the reference the tests compare
against, and the cost that orchestration pays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gymnasium as gym
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from envs.base import MALFORMED_KINDS
from rl_agents.trajectory import (
    END_OF_TURN,
    FORMAT_VERSION,
    Trajectory,
    Turn,
    observation_ids,
    prompt_ids,
    tokenizer_fingerprint,
)


@dataclass
class RuntimeConfig:
    max_new_tokens: int = 128
    """longest agent turn, in tokens (truncation reason ``max_new_tokens``)"""
    max_turns: int = 8
    """most agent turns in an episode (truncation reason ``max_turns``)"""
    max_context: int = 2048
    """longest episode sequence, prompt and observations included (truncation reason ``context_length``)"""
    batch_size: int = 16
    """episodes run in parallel, one environment each"""
    greedy: bool = True
    """argmax decoding; otherwise sample with ``temperature`` and ``top_p``"""
    temperature: float = 1.0
    top_p: float = 1.0
    use_cache: bool = True
    """reuse the KV cache across tokens and turns (False re-encodes every sequence at every token)"""
    end_on_malformed: bool = False
    """end the episode at the first malformed turn (truncation reason ``malformed``) instead of feeding the
    error back (``envs.base.MALFORMED_KINDS``: no action, bad JSON, unknown tool, bad arguments, too long)"""


@dataclass
class _Episode:
    """The state of one running episode (one slot of the batch)."""

    env: gym.Env
    seed: int
    task: str
    ids: list[int]  # every real token of the sequence so far (fed or pending)
    pending: list[int]  # tokens not yet fed to the model
    turns: list[Turn] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    turn_logprobs: list[float] = field(default_factory=list)
    turn_start: float = 0.0
    done: bool = False
    reward: float = 0.0
    success: bool = False
    truncation: str | None = None
    forced: list[list[int]] | None = None  # teacher forcing: each turn's token ids (end-of-turn included)


COMPACT_MIN_WIDTH = 64  # compact a batch's cache once it is this wide
COMPACT_HOLE_FRACTION = 0.5  # and more than this fraction of it is holes even in its fullest row


def _compact(cache, mask: torch.Tensor):
    """Squeeze the holes out of a batched KV cache: each row's real positions, in order, left-padded.

    Rows of a batch receive observations of different lengths at different steps, and the others get
    masked padding in the same columns, so without this the cache (and every step's attention) grows with
    the sum of all rows' observations instead of the longest row. Keys already carry their rotary
    positions (``position_ids`` are explicit) and attention over past entries ignores their order, so
    moving entries changes nothing but the cost.
    """
    real = mask.bool()
    counts = real.sum(1)
    width = int(counts.max())
    rows, cols = real.nonzero(as_tuple=True)
    dest = (width - counts)[rows] + (real.cumsum(1) - 1)[rows, cols]
    compacted = torch.zeros(mask.shape[0], width, dtype=mask.dtype, device=mask.device)
    compacted[rows, dest] = 1
    for layer in cache.layers:
        for name in ("keys", "values"):
            old = getattr(layer, name)  # (batch, heads, length, head_dim)
            new = old.new_zeros(old.shape[0], old.shape[1], width, old.shape[3])
            new[rows, :, dest] = old[rows, :, cols]
            setattr(layer, name, new)
    return cache, compacted


class Runtime:
    """Runs a policy in environments; returns trajectories in the teacher's format."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: RuntimeConfig, seed: int = 0
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = {"generated_tokens": 0, "forward_passes": 0, "compactions": 0, "wall_s": 0.0}
        self.holes = False

    # --- public -------------------------------------------------------------------------------
    def run(
        self,
        env_id: str,
        seeds: list[int],
        env_kwargs: dict | None = None,
        policy: str = "policy",
        forced: list[list[list[int]]] | None = None,
    ) -> list[Trajectory]:
        """Run one episode per seed; batches of ``config.batch_size`` environments at a time.

        ``forced`` (one entry per seed: each turn's token ids) feeds those tokens instead of the model's
        choices, through the same forward passes: a benchmark replays a teacher's episodes this way, so
        every approach decodes the same tokens and meets the same observations.
        """
        envs = [gym.make(env_id, **(env_kwargs or {})) for _ in range(min(self.config.batch_size, len(seeds)))]
        trajectories: list[Trajectory] = []
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # and back afterwards: a trainer may call the runtime between its steps
        try:
            for i in range(0, len(seeds), len(envs)):
                batch = seeds[i : i + len(envs)]
                batch_forced = forced[i : i + len(envs)] if forced is not None else None
                for episode in self._run_batch(envs[: len(batch)], batch, batch_forced):
                    trajectories.append(self._trajectory(episode, env_id, policy))
        finally:
            self.model.train(was_training)
            for env in envs:
                env.close()
        self.stats["wall_s"] += time.perf_counter() - start
        return trajectories

    # --- the loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def _run_batch(self, envs: list[gym.Env], seeds: list[int], forced=None) -> list[_Episode]:
        episodes = []
        for row, (env, seed) in enumerate(zip(envs, seeds)):
            task, _ = env.reset(seed=int(seed))
            ids = prompt_ids(self.tokenizer, task)
            episode = _Episode(env, int(seed), task, ids=list(ids), pending=list(ids), turn_start=time.perf_counter())
            episode.forced = forced[row] if forced is not None else None
            episodes.append(episode)
        cache, mask = None, torch.zeros(len(episodes), 0, dtype=torch.long, device=self.device)
        self.holes = False  # whether any masked position is in the cache yet
        active = list(episodes)  # the rows of the batch: finished episodes leave it
        while active:
            if self.config.use_cache:
                logits, cache, mask = self._forward_cached(active, cache, mask)
            else:
                logits = self._forward_full(active)
            for e in active:
                e.pending = []
            next_ids, logprobs = self._sample(logits)
            for row, e in enumerate(active):
                token, logprob = int(next_ids[row]), float(logprobs[row])
                if e.forced is not None and len(e.turns) < len(e.forced):
                    token = e.forced[len(e.turns)][min(len(e.turn_ids), len(e.forced[len(e.turns)]) - 1)]
                    logprob = float(torch.log_softmax(logits[row], dim=-1)[token])
                self._advance(e, token, logprob)
            keep = [row for row, e in enumerate(active) if not e.done]
            if len(keep) < len(active):
                active = [active[row] for row in keep]
                if cache is not None and keep:
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask = mask[index]
            width = mask.shape[1]
            if (
                cache is not None
                and active
                and width >= COMPACT_MIN_WIDTH
                and (width - int(mask.sum(1).max()) > COMPACT_HOLE_FRACTION * width)
            ):
                cache, mask = _compact(cache, mask)
                self.stats["compactions"] += 1
        return episodes

    def _forward_cached(self, episodes: list[_Episode], cache, mask: torch.Tensor):
        """Feed each episode's pending tokens, right-aligned; returns last-position logits, cache, mask."""
        width = max(len(e.pending) for e in episodes)
        block = torch.full((len(episodes), width), self.pad_id, dtype=torch.long)
        block_mask = torch.zeros((len(episodes), width), dtype=torch.long)
        positions = torch.zeros((len(episodes), width), dtype=torch.long)
        for row, e in enumerate(episodes):
            n = len(e.pending)
            if n:
                block[row, width - n :] = torch.tensor(e.pending)
                block_mask[row, width - n :] = 1
                first = len(e.ids) - n  # position of the first pending token
                positions[row, width - n :] = torch.arange(first, first + n)
        mask = torch.cat([mask, block_mask.to(self.device)], dim=1)
        self.holes = self.holes or not bool(block_mask.all())
        out = self.model(
            input_ids=block.to(self.device),
            attention_mask=mask if self.holes else None,  # no holes (one episode): plain causal attention
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
        self.stats["forward_passes"] += 1
        return out.logits[:, -1, :].float(), out.past_key_values, mask

    def _forward_full(self, episodes: list[_Episode]) -> torch.Tensor:
        """Re-encode every sequence from scratch (left-padded); returns last-position logits."""
        width = max(len(e.ids) for e in episodes)
        block = torch.full((len(episodes), width), self.pad_id, dtype=torch.long)
        block_mask = torch.zeros((len(episodes), width), dtype=torch.long)
        for row, e in enumerate(episodes):
            block[row, width - len(e.ids) :] = torch.tensor(e.ids)
            block_mask[row, width - len(e.ids) :] = 1
        positions = (block_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=block.to(self.device),
            attention_mask=block_mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=False,
        )
        self.stats["forward_passes"] += 1
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token and its log-probability under the sampling distribution (temperature applied)."""
        cfg = self.config
        if cfg.greedy:
            logp = torch.log_softmax(logits, dim=-1)
            next_ids = logp.argmax(dim=-1)
        else:
            logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
            probs = logp.exp()
            if cfg.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            next_ids = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return next_ids, logp.gather(-1, next_ids[:, None]).squeeze(-1)

    def _advance(self, e: _Episode, token: int, logprob: float) -> None:
        """Append a sampled token; at the end of a turn, step the environment and queue its reply."""
        cfg = self.config
        e.turn_ids.append(token)
        e.turn_logprobs.append(logprob)
        self.stats["generated_tokens"] += 1
        if token != self.eot_id:
            if len(e.turn_ids) >= cfg.max_new_tokens:
                self._end_turn(e, truncation="max_new_tokens")
            elif len(e.ids) + 1 >= cfg.max_context:
                self._end_turn(e, truncation="context_length")
            else:
                e.ids.append(token)
                e.pending = [token]
            return
        self._end_turn(e)

    def _end_turn(self, e: _Episode, truncation: str | None = None) -> None:
        ids = e.turn_ids
        text = self.tokenizer.decode(ids[:-1] if ids[-1] == self.eot_id else ids, skip_special_tokens=False)
        turn = Turn(agent=text, token_ids=list(ids), logprobs=list(e.turn_logprobs))
        e.turns.append(turn)
        e.turn_ids, e.turn_logprobs = [], []
        if truncation is None:
            observation, reward, terminated, truncated, info = e.env.step(text)
            turn.observation, turn.reward, turn.tool, turn.error = (
                observation,
                float(reward),
                info.get("tool"),
                info.get("error"),
            )
            e.reward += float(reward)
            e.success = bool(info.get("success", False))
            if terminated or truncated:
                truncation = None if terminated else "max_steps"
            elif self.config.end_on_malformed and turn.error in MALFORMED_KINDS:
                truncation = "malformed"
            elif len(e.turns) >= self.config.max_turns:
                truncation = "max_turns"
            else:
                extra = [ids[-1]] + observation_ids(self.tokenizer, observation)
                if len(e.ids) + len(extra) >= self.config.max_context:
                    truncation = "context_length"
                else:
                    e.ids.extend(extra)
                    e.pending = extra
            e.done = terminated or truncated or truncation is not None
        else:
            e.done = True
        e.truncation = truncation
        now = time.perf_counter()
        turn.latency_ms = 1000.0 * (now - e.turn_start)
        e.turn_start = now

    def _trajectory(self, e: _Episode, env_id: str, policy: str) -> Trajectory:
        return Trajectory(
            task=e.task,
            turns=e.turns,
            reward=e.reward,
            success=e.success,
            metadata={
                "env_id": env_id,
                "seed": e.seed,
                "teacher": policy,
                "version": FORMAT_VERSION,
                "truncation": e.truncation,
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
            },
        )
