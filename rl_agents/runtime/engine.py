"""The runtime of a compiled agent: run episodes of a policy in tool environments, batched, KV cache reused.

The environments are slots: each runs one episode at a time and takes the next seed from the queue as
soon as its episode ends (continuous batching), so a batch never waits for its slowest episode. Every
slot keeps its episode's keys and values at the start of its row of one buffer per layer (``SlotCache``),
and a step costs one **packed forward pass** (``_Pass``): every slot feeds its pending tokens (a new
episode's prompt, the end-of-turn token and an observation, or the one token it decoded, with its draft
when drafting) and the model sees them side by side in one row, so its linear layers compute real tokens
only, and a slot that reads an observation never holds back the others. Each token's keys and values are
written in place at its slot's next column. The attention (``slot_attention``, switched on for the
run) reads each slot's own columns: the slots that feed one token (or a short draft) together, in one
call over the cache, and the longer rows (a prompt, an observation) one by one.

Position ids count each episode's own tokens, so an episode's context is exactly the token sequence
``trajectory.encode_trajectory`` builds for it, and the cache is never re-encoded. ``use_cache=False``
re-encodes every sequence at every token instead: the reference the tests compare against, and the cost
that orchestration pays.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain

import gymnasium as gym
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from envs.base import MALFORMED_KINDS
from rl_agents.runtime import cache as slot_cache
from rl_agents.runtime.attention import _NO_MASK, SLOT_ATTENTION, _Pass
from rl_agents.runtime.cache import SlotCache
from rl_agents.runtime.config import RuntimeConfig, check_workers
from rl_agents.runtime.drafting import NgramDrafter, NgramIndex, speculative_token, verify_draft
from rl_agents.runtime.workers import Done, Failed, Feed, Job, _Indices, _worker, env_spec
from rl_agents.trajectory import (
    END_OF_TURN,
    FORMAT_VERSION,
    Trajectory,
    Turn,
    observation_ids,
    prompt_ids,
    tokenizer_fingerprint,
)

POLL_S = 0.01
"""``Runtime.stream``: while every episode waits for its tools, the feed is polled this often"""


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
    started: float = 0.0
    done: bool = False
    reward: float = 0.0
    success: bool = False
    truncation: str | None = None
    forced: list[list[int]] | None = None  # teacher forcing: each turn's token ids (end-of-turn included)
    index: int = 0  # the episode's place in the seeds of ``Runtime.run``
    task_key: str | None = None  # what identifies the task (``ToolEnv.task_key``), and its split
    split: str | None = None
    ngrams: NgramIndex | None = None  # the drafter's index of ``ids`` (speculative decoding)
    generator: torch.Generator | None = None  # this episode's sampling draws (whatever slots share its passes)
    stepping: Future | None = None  # the environment's answer to the last turn, on its way (``env_workers``)


class Runtime:
    """Runs a policy in environments; returns trajectories in the teacher's format."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: RuntimeConfig, seed: int = 0
    ):
        self.model = model
        self.tokenizer = tokenizer
        positions = getattr(model.config, "max_position_embeddings", None)
        if config.max_context is None or positions is None:
            config = replace(config, max_context=config.max_context or positions or 2048)
        elif config.max_context > positions:
            raise ValueError(
                f"runtime.max_context={config.max_context} exceeds the model's max_position_embeddings={positions}: "
                "positions beyond it were never trained (set runtime.max_context <= it, or null for it)"
            )
        self.config = config
        self.eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id
        self.device = next(model.parameters()).device
        self.seed, self.runs = seed, 0  # an episode's sampling generator derives from (seed, run, its index)
        self.first_index = 0  # the offset of this run's episodes in a batch that several processes share
        self._pool: ThreadPoolExecutor | None = None  # steps the environments during a run (``env_workers``)
        self._no_mask = _NO_MASK.to(self.device)
        self._workers: list | None = None  # (process, pipe) of each worker process (``config.processes``)
        self._counter = None  # the workers' shared count of episodes started (``_Indices``)
        self._options, self._make_env, self._on_turn = None, None, None  # this run's hooks (``run``)
        self._attention = model.config._attn_implementation  # the model's own (``plain_attention``)
        check_workers(config)
        if config.processes > 1 and self.device.type != "cpu":
            raise ValueError(f"processes > 1 runs on CPU only (the model is on {self.device}); set processes=1")
        # prefills: the forward passes that fed some slot's prompt or observation
        self.stats = {"generated_tokens": 0, "forward_passes": 0, "prefills": 0, "wall_s": 0.0}
        self.drafter = NgramDrafter(config.draft_ngram, stop=self.eot_id) if config.draft_tokens > 0 else None
        if self.drafter is not None:
            self.stats |= {"drafted_tokens": 0, "accepted_tokens": 0}
        layer_types = getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"]
        if config.use_cache and set(layer_types) != {"full_attention"}:
            raise ValueError(
                f"the runtime's KV cache holds full-attention layers only; this model has {sorted(set(layer_types))} "
                "(run it with use_cache=false, or add a cache layer for these to rl_agents/runtime/cache.py)"
            )

    # --- public -------------------------------------------------------------------------------
    def run(
        self,
        env_id: str,
        seeds: list[int],
        env_kwargs: dict | None = None,
        policy: str = "policy",
        forced: list[list[list[int]]] | None = None,
        first_index: int = 0,
        options: list[dict | None] | None = None,
        make_env: Callable[[], gym.Env] | None = None,
        on_turn: Callable[[int, Turn, bool], None] | None = None,
    ) -> list[Trajectory]:
        """Run one episode per seed on ``config.batch_size`` environments; trajectories in the seeds' order.

        A sampled episode's generator derives from (the runtime's seed, the run's number, ``first_index`` + its
        place in ``seeds``): processes that run parts of one batch pass their part's offset, so no two of its
        episodes share a stream.

        ``forced`` (one entry per seed: each turn's token ids) feeds those tokens instead of the model's
        choices, through the same forward passes: a benchmark replays a teacher's episodes this way, so
        every approach decodes the same tokens and meets the same observations.

        ``options`` (one entry per seed) are each episode's ``reset`` options (``{"task": prompt}``: a user's own
        task); ``make_env`` builds each slot's environment instead of ``gym.make(env_id, **env_kwargs)`` (an
        agent's environment with the user's tools). ``on_turn(index, turn, done)`` is called as each turn ends (a
        server streams turns as they happen). None of them goes to worker processes: with them, processes=1.
        """
        processes = min(self.config.processes, self.config.batch_size)
        if (options is not None or make_env is not None or on_turn is not None) and processes > 1:
            raise ValueError("reset options and make_env run in this process: use runtime processes=1")
        if options is not None and len(options) != len(seeds):
            raise ValueError(f"options: one entry per seed ({len(seeds)}), got {len(options)}")
        self._options, self._make_env, self._on_turn = options, make_env, on_turn
        if processes > 1 and self._workers is None:
            self._start_workers(processes)  # before the clock: a worker takes seconds to start
        trajectories: list[Trajectory | None] = [None] * len(seeds)
        start = time.perf_counter()
        self.runs += 1
        self.first_index = first_index
        if self._workers:
            done = self._run_workers(env_id, seeds, env_kwargs, policy, forced)
        else:
            done = self._episodes(env_id, seeds, env_kwargs, policy, forced, _Indices(len(seeds)))
        for index, trajectory in done:
            trajectories[index] = trajectory
        self.stats["wall_s"] += time.perf_counter() - start
        return trajectories

    def stream(
        self,
        env_id: str,
        feed: Feed,
        poll: Callable[[], None],
        env_kwargs: dict | None = None,
        make_env: Callable[[], gym.Env] | None = None,
        on_turn: Callable[[int, Turn, bool], None] | None = None,
        policy: str = "policy",
    ) -> Iterator[tuple[int, Trajectory]]:
        """Continuous batching across callers: run ``feed``'s episodes on ``config.batch_size`` slots and yield
        each ``(index, trajectory)`` as it ends. ``poll()`` is called before every forward pass and may ``add``
        episodes to the feed: each starts in the next free slot, beside the running ones (a server's requests join
        the batch as they arrive, rather than waiting for it to end). Returns when no episode runs and none waits.
        Between passes the model is the runtime's (``plain_attention`` lends it out). ``processes=1`` only."""
        if min(self.config.processes, self.config.batch_size) > 1:
            raise ValueError("stream runs its episodes in this process: use runtime processes=1")
        self._options, self._make_env, self._on_turn = feed.options, make_env, on_turn
        start = time.perf_counter()
        self.runs += 1
        self.first_index = 0
        try:
            yield from self._each_episode(env_id, feed.seeds, env_kwargs, policy, None, feed, poll)
        finally:
            self.stats["wall_s"] += time.perf_counter() - start

    def plain_attention(self):
        """A context in which the model has its own attention back during a ``stream`` (between its forward
        passes): another caller (a server's one-turn request) can run ``model.generate`` there."""
        return _PlainAttention(self.model, self._attention)

    def close(self) -> None:
        """Stop the worker processes, if any (they stop with this process too)."""
        for process, conn in self._workers or []:
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
        self._workers = None

    def __del__(self):
        if getattr(self, "_workers", None):
            try:
                self.close()
            except Exception:  # noqa: BLE001  (at interpreter exit; the workers are daemons and stop with it)
                pass

    def _episodes(
        self, env_id: str, seeds: list[int], env_kwargs: dict | None, policy: str, forced, indices: _Indices
    ) -> list[tuple[int, Trajectory]]:
        """The episodes this process takes from ``indices``, on ``config.batch_size`` environments."""
        return list(self._each_episode(env_id, seeds, env_kwargs, policy, forced, indices))

    def _each_episode(
        self, env_id: str, seeds: list[int], env_kwargs, policy: str, forced, indices, poll=None
    ) -> Iterator[tuple[int, Trajectory]]:
        """Each episode of ``indices`` as it ends; with ``poll``, a stream's (``stream``)."""
        make = self._make_env or (lambda: gym.make(env_id, **(env_kwargs or {})))
        self._remake = make  # a slot whose reset raised gets a fresh environment
        # a stream adds slots as episodes arrive, up to batch_size (``_loop``), each environment when first used
        envs = [] if poll else [make() for _ in range(min(self.config.batch_size, len(seeds)))]
        was_training = self.model.training
        self.model.eval()  # and back afterwards: a trainer may call the runtime between its steps
        try:
            for e in self._run_slots(envs, seeds, forced, indices, poll):  # a remade environment lands in envs
                yield e.index, self._trajectory(e, env_id, policy)
        finally:
            self.model.train(was_training)
            for env in envs:
                if env is not None:
                    env.close()

    def _start_workers(self, processes: int) -> None:
        context = torch.multiprocessing.get_context("spawn")
        self._counter = context.Value("q", 0)
        config = replace(self.config, processes=1, batch_size=-(-self.config.batch_size // processes))
        threads = max(1, torch.get_num_threads() // processes)
        self._workers = []
        # a spawned process runs the parent's main module again unless it has no spec and no file: a Hydra app's
        # main (python -m rl_agents.bench) registers its configs at import, which fails there; the workers
        # need nothing of it (_worker and what it is sent come from importable modules)
        main = sys.modules["__main__"]
        saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
        main.__spec__ = None
        main.__dict__.pop("__file__", None)
        try:
            for _ in range(processes):
                conn, child = context.Pipe()
                args = (type(self), self.model, self.tokenizer, config, self.seed, threads, self._counter, child)
                process = context.Process(target=_worker, args=args, daemon=True)
                process.start()  # the weights go to shared memory, not copied
                child.close()
                self._workers.append((process, conn))
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
        for process, conn in self._workers:
            self._reply(process, conn)  # Ready

    def _reply(self, process, conn):
        """A worker's next message; a worker that died or failed stops them all with a ``RuntimeError``."""
        try:
            reply = conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"a runtime worker process died (exit code {process.exitcode})") from None
        if isinstance(reply, Failed):
            self.close()
            raise RuntimeError(f"a runtime worker process failed:\n{reply.traceback}")
        return reply

    def _run_workers(self, env_id, seeds, env_kwargs, policy, forced) -> list[tuple[int, Trajectory]]:
        self._counter.value = 0
        job = Job(env_spec(env_id), list(seeds), env_kwargs, policy, forced, self.runs, self.first_index)
        for _, conn in self._workers:
            conn.send(job)
        done = []
        for process, conn in self._workers:
            reply: Done = self._reply(process, conn)
            done += reply.episodes
            for key, value in reply.stats.items():
                self.stats[key] = self.stats.get(key, 0) + value
        return done

    # --- the loop -----------------------------------------------------------------------------
    def _start(self, env: gym.Env, index: int, seeds: list[int], forced) -> _Episode:
        task, info = env.reset(seed=int(seeds[index]), options=self._options[index] if self._options else None)
        ids = prompt_ids(self.tokenizer, task)
        episode = _Episode(env, int(seeds[index]), task, ids=list(ids), pending=list(ids))
        episode.task_key, episode.split = info.get("task_key"), info.get("split")
        episode.index, episode.turn_start = index, time.perf_counter()
        episode.started = episode.turn_start
        if self.drafter is not None:
            episode.ngrams = NgramIndex(self.drafter.ngram)
        episode.forced = forced[index] if forced is not None else None
        if not self.config.greedy:
            state = np.random.default_rng([self.seed, self.runs, self.first_index + index]).integers(2**62)
            episode.generator = torch.Generator(device=self.device).manual_seed(int(state))
        return episode

    @torch.no_grad()
    def _run_slots(
        self, envs: list[gym.Env], seeds: list[int], forced=None, indices: _Indices | Feed | None = None, poll=None
    ) -> Iterator[_Episode]:
        """Run every seed's episode, one per slot at a time; yields each episode when it ends."""
        cache = SlotCache(len(envs), self.model.config.get_text_config().num_hidden_layers)
        attention = self._attention = self.model.config._attn_implementation
        workers = min(self.config.env_workers, len(envs) if poll is None else self.config.batch_size)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="env") if workers else None
        try:
            if self.config.use_cache:  # and back when the episodes end: others may call the model between runs
                self.model.set_attn_implementation(SLOT_ATTENTION)
                if self.model.config._attn_implementation != SLOT_ATTENTION:
                    raise ValueError(
                        f"{type(self.model).__name__} does not take transformers' AttentionInterface, which the "
                        "runtime's KV cache needs (run it with use_cache=false)"
                    )
            yield from self._loop(envs, seeds, forced, cache, indices or _Indices(len(seeds)), poll)
        finally:
            self.model.set_attn_implementation(attention)
            if self._pool is not None:
                self._pool.shutdown(wait=poll is None, cancel_futures=True)  # a cancelled episode's tool may run on
                self._pool = None

    def _loop(
        self, envs: list[gym.Env], seeds: list[int], forced, cache: SlotCache, indices: _Indices | Feed, poll=None
    ) -> Iterator[_Episode]:
        slots: list[_Episode | None] = [None] * len(envs)
        while True:
            if poll is not None:  # a stream: take in what arrived, with slots for it (up to batch_size)
                poll()
                for s, e in enumerate(slots):
                    if e is not None and e.index in indices.cancelled and not e.done:
                        e.done, e.truncation = True, "cancelled"
                        if e.stepping is not None:  # its tool still runs: the slot gets a fresh environment
                            e.stepping.add_done_callback(lambda _, env=e.env: env.close())
                            e.stepping, envs[s] = None, None
                want = min(self.config.batch_size, sum(e is not None for e in slots) + indices.waiting())
                if want > len(slots):
                    envs.extend([None] * (want - len(slots)))
                    slots.extend([None] * (want - len(slots)))
                    cache.grow(want)
            for s in range(len(slots)):
                while slots[s] is None and not indices.empty():
                    index = indices.take()
                    if index is None:  # another process took the last one
                        break
                    s = self._make_room(cache, slots, envs, s)
                    if envs[s] is None:
                        envs[s] = self._remake()
                    try:
                        slots[s] = self._start(envs[s], index, seeds, forced)
                    except Exception as err:  # noqa: BLE001  (a feed leaves the episode out; a run stops)
                        indices.refuse(index, err)
                        envs[s].close()
                        envs[s] = self._remake()
                        continue
                    cache.lengths[s] = 0
            live = [s for s, e in enumerate(slots) if e is not None]
            if not live:
                return
            # none: every live slot waits for its environment (a stream's wait is short: ``poll`` may bring more)
            ready = self._answered(slots, live, timeout=None if poll is None else POLL_S)
            if ready and not self.config.use_cache:
                self._step(slots, ready, self._forward_full([slots[s] for s in ready]))
            elif ready:  # with drafts, a new turn's first tokens are verified with its observation
                self._feed(cache, slots, ready)
            for s in live:
                if slots[s].done:
                    yield slots[s]
                    slots[s] = None
            free = [s for s, e in enumerate(slots) if e is None]
            # none left to start: shrink the batch (a stream keeps its slots for what ``poll`` brings)
            if poll is None and indices.empty() and free and len(free) >= len(slots) // 4:
                keep = [s for s, e in enumerate(slots) if e is not None]
                slots, envs = [slots[s] for s in keep], [envs[s] for s in keep]
                cache.select(keep)

    @staticmethod
    def _make_room(cache: SlotCache, slots: list[_Episode | None], envs: list[gym.Env], s: int) -> int:
        """The slot a new episode starts in, for free slot ``s``: the longest episode of the next region
        (``REGION_SLOTS``) moves into ``s``, the longest of the region after into the slot it left, and so on.
        Episodes move towards the first regions as they grow, so that each region's width stays near its own
        episodes' lengths."""
        while True:
            n = slot_cache.REGION_SLOTS
            region = range((s // n + 1) * n, len(slots))[:n]
            longest = max((t for t in region if slots[t] is not None), key=cache.lengths.__getitem__, default=None)
            if longest is None:
                return s
            cache.move(longest, s)
            slots[s], slots[longest] = slots[longest], None
            envs[s], envs[longest] = envs[longest], envs[s]
            s = longest

    def _answered(self, slots: list[_Episode | None], live: list[int], timeout: float | None = None) -> list[int]:
        """The live slots that can feed the model now: their environments' answers are taken in first. When every
        live slot waits for its environment, waits for the first answer (at most ``timeout`` seconds)."""
        stepping = [slots[s] for s in live if slots[s].stepping is not None]
        if stepping and len(stepping) == len(live):
            wait([e.stepping for e in stepping], timeout=timeout, return_when=FIRST_COMPLETED)
        for e in stepping:
            if e.stepping.done():
                future, e.stepping = e.stepping, None
                self._observe(e, future.result())
        return [s for s in live if slots[s].stepping is None and not slots[s].done]

    def _step(self, slots: list[_Episode | None], rows: list[int], logits: torch.Tensor) -> None:
        """Sample a token for each of these slots from its logits and advance its episode."""
        next_ids, logprobs = self._sample(logits, [slots[s].generator for s in rows])
        for row, (token, logprob) in enumerate(zip(next_ids.tolist(), logprobs.tolist())):
            e = slots[rows[row]]
            e.pending = []
            forced = self._forced(e, logits, row)
            self._advance(e, *(forced or (token, logprob)))

    def _forced(self, e: _Episode, logits: torch.Tensor, *at: int) -> tuple[int, float] | None:
        """Teacher forcing: the forced token where this episode has one, and its log-probability under
        ``logits[at]``."""
        if e.forced is None or len(e.turns) >= len(e.forced):
            return None
        turn = e.forced[len(e.turns)]
        token = turn[min(len(e.turn_ids), len(turn) - 1)]
        return token, float(torch.log_softmax(logits[at].float(), dim=-1)[token])

    def _feed(self, cache: SlotCache, slots: list[_Episode | None], rows: list[int]) -> None:
        """Feed these slots' pending tokens (with a drafter, each slot's draft after them) in one packed forward
        pass and advance their episodes, keeping the draft tokens that verify."""
        drafts = None
        if self.drafter is not None:
            cap = self.config.draft_tokens
            if self.config.draft_budget is not None:
                cap = min(cap, self.config.draft_budget // len(cache.lengths))
            drafts = [self._draft(slots[s], cap) for s in rows]
        logits = self._forward(cache, slots, rows, drafts)
        if drafts is None:
            self._step(slots, rows, logits)
        else:
            self._verify(slots, rows, drafts, logits)
        for s in rows:  # each slot keeps its fed tokens (up to the last accepted draft token)
            cache.lengths[s] = len(slots[s].ids) - len(slots[s].pending)

    def _forward(
        self, cache: SlotCache, slots: list[_Episode | None], rows: list[int], drafts: list[list[int]] | None
    ) -> torch.Tensor:
        """One packed forward pass (``_Pass``) of these slots' pending tokens and drafts; each is written after
        its slot's tokens in the cache. Returns the logits of each row's last pending token, (rows, vocab), or
        with ``drafts`` those of its last pending token and its draft, (rows, 1 + longest draft, vocab), row
        ``r``'s from index 0 on; the caller sets the lengths."""
        fed = [slots[s].pending + (drafts[r] if drafts is not None else []) for r, s in enumerate(rows)]
        counts = [len(f) for f in fed]
        longest = max((len(d) for d in drafts), default=0) if drafts is not None else 0
        plan = _Pass(rows, counts, cache.lengths, 1 + longest if drafts is not None else 1, self.device)
        cache.reserve(plan.columns)
        cache.write_at = plan.write_at
        positions, keep = [], []
        for r, s in enumerate(rows):
            e, n = slots[s], counts[r]
            first = len(e.ids) - len(e.pending)  # position of the first pending token
            positions.extend(range(first, first + n))
            last = len(positions) - n + len(e.pending) - 1  # packed index of the last pending token
            keep.extend(range(last, len(positions)))
        out = self.model(
            input_ids=torch.tensor([list(chain.from_iterable(fed))], device=self.device),
            attention_mask=self._no_mask,  # a ready 4D mask: transformers builds none (``_Pass`` masks)
            position_ids=torch.tensor([positions], device=self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if len(keep) == len(positions) else torch.tensor(keep, device=self.device),  # 0: all
            slot_pass=plan,
        )
        self.stats["forward_passes"] += 1
        self.stats["prefills"] += any(len(slots[s].pending) > 1 for s in rows)
        logits = out.logits[0].float()
        if drafts is None:
            return logits
        padded = logits.new_zeros(len(rows), 1 + longest, logits.shape[-1])  # each row's own positions first
        at = 0
        for r, draft in enumerate(drafts):
            padded[r, : len(draft) + 1] = logits[at : at + len(draft) + 1]
            at += len(draft) + 1
        return padded

    def _draft(self, e: _Episode, cap: int) -> list[int]:
        """The drafter's guess at this episode's next tokens: at most ``cap``, and what its turn has room for."""
        cfg = self.config
        k = min(cap, cfg.max_new_tokens - len(e.turn_ids) - 1, cfg.max_context - len(e.ids) - 1)
        draft = self.drafter.propose(e.ids, e.ngrams, k)
        self.stats["drafted_tokens"] += len(draft)
        return draft

    def _verify(
        self, slots: list[_Episode | None], rows: list[int], drafts: list[list[int]], logits: torch.Tensor
    ) -> None:
        """Keep each row's draft tokens up to the first the policy would not have chosen, then one more.

        Position ``j`` of a row holds the policy's distribution after its pending token and ``j`` draft
        tokens. Greedy (and teacher forcing): the chosen token there is the argmax (the forced token); the
        draft token is kept when it is that token. Sampling (speculative sampling with a one-token draft
        distribution): the draft token ``d`` is kept with probability ``p(d)``, else the token is drawn from
        ``p`` without ``d``; every emitted token is then distributed exactly as ``p``. Each row emits its kept
        draft tokens and the token chosen at the first rejected position (or after the whole draft).
        """
        cfg = self.config
        logp = torch.log_softmax(logits if cfg.greedy else logits / cfg.temperature, dim=-1)
        choice = logp.argmax(dim=-1).tolist() if cfg.greedy else None
        probs = None
        if not cfg.greedy:
            probs = self._top_p(logp.exp())
            probs = probs / probs.sum(dim=-1, keepdim=True)

        def choose(e: _Episode, row: int, j: int, proposed: int | None) -> tuple[int, float]:
            forced = self._forced(e, logits, row, j)
            if forced is not None:
                return forced
            token = choice[row][j] if cfg.greedy else speculative_token(probs[row, j], proposed, e.generator)
            return token, float(logp[row, j, token])

        for row, s in enumerate(rows):
            e, draft = slots[s], drafts[row]
            e.pending = []
            for j, (token, logprob) in enumerate(verify_draft(draft, partial(choose, e, row))):
                turns = len(e.turns)
                self._advance(e, token, logprob)
                if j < len(draft) and token == draft[j]:
                    self.stats["accepted_tokens"] += 1
                if e.done or len(e.turns) > turns:
                    break

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

    def _sample(self, logits: torch.Tensor, generators: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token and its log-probability under the sampling distribution (temperature applied); row ``r``
        draws from ``generators[r]``."""
        cfg = self.config
        if cfg.greedy:
            logp = torch.log_softmax(logits, dim=-1)
            next_ids = logp.argmax(dim=-1)
        else:
            logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
            probs = self._top_p(logp.exp())
            next_ids = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
        return next_ids, logp.gather(-1, next_ids[:, None]).squeeze(-1)

    def _top_p(self, probs: torch.Tensor) -> torch.Tensor:
        """Nucleus truncation: zero the tail beyond ``top_p`` of the mass (not renormalised)."""
        if self.config.top_p >= 1.0:
            return probs
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > self.config.top_p
        return torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))

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
        if self.drafter is not None:  # ``e.ids`` holds every token of the turn but its last
            self.drafter.add_turn(e.ids[: len(e.ids) - len(ids) + 1], ids)
        e.turn_ids, e.turn_logprobs = [], []
        if truncation is not None:
            e.done, e.truncation = True, truncation
            self._finish_turn(e)
        elif self._pool is not None:  # the model goes on with the other slots meanwhile
            e.pending, e.stepping = [], self._pool.submit(e.env.step, text)
        else:
            self._observe(e, e.env.step(text))

    def _observe(self, e: _Episode, step: tuple) -> None:
        """Take in the environment's answer (``env.step``'s five values) to the episode's last turn."""
        observation, reward, terminated, truncated, info = step
        turn, truncation = e.turns[-1], None
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
        elif self.config.max_episode_s is not None and time.perf_counter() - e.started > self.config.max_episode_s:
            truncation = "wall_time"
        else:
            extra = [turn.token_ids[-1]] + observation_ids(self.tokenizer, observation)
            if len(e.ids) + len(extra) >= self.config.max_context:
                truncation = "context_length"
            else:
                e.ids.extend(extra)
                e.pending = extra
        e.done = terminated or truncated or truncation is not None
        e.truncation = truncation
        self._finish_turn(e)

    def _finish_turn(self, e: _Episode) -> None:
        """The last turn's latency (from the end of the one before, or the episode's start, to now), and the
        run's ``on_turn`` callback."""
        now = time.perf_counter()
        e.turns[-1].latency_ms = 1000.0 * (now - e.turn_start)
        e.turn_start = now
        if self._on_turn is not None:
            self._on_turn(e.index, e.turns[-1], e.done)

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
                "task_key": e.task_key,
                "split": e.split,
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
            },
        )


class _PlainAttention:
    def __init__(self, model, attention):
        self.model, self.attention = model, attention

    def __enter__(self):
        self.slot = self.model.config._attn_implementation
        if self.slot != self.attention:  # within a stream; otherwise the model is left alone
            self.model.set_attn_implementation(self.attention)

    def __exit__(self, *exc):
        if self.slot != self.attention:
            self.model.set_attn_implementation(self.slot)
