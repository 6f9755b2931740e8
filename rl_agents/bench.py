"""``python -m rl_agents.bench``: the compiled agent against an orchestrated one, and against the hardware.

One run measures, with the same model on the same test tasks:

- **compiled**: the project's runtime (``rl_agents.runtime``): one growing token sequence per episode, the
  KV cache kept across turns, no tool documentation in the prompt (the workflow is in the weights);
- **orchestrated**: the same model driven the way an orchestration framework drives a model: every step
  is a stateless call whose prompt is rebuilt as text (a system prompt with the tool descriptions and
  instructions, the task, the whole history), tokenised again, prefilled from scratch, decoded, and the
  reply parsed as text; nothing is cached between calls. The decoding loop is the same lean loop as the
  runtime's (prefill, then cached greedy decoding within the call), so the comparison isolates the
  orchestration pattern, not a slower generate();
- **limit**: the model's raw decode rate, cached forward passes of one token in a tight loop.

Both agents decode with ``runtime.draft_tokens`` n-gram drafting (``conf/bench.yaml``: 64), each from what
it has seen (the runtime: the episode and its earlier turns; the orchestrated agent: its prompt and earlier
replies); ``speedup_no_drafts``, ``turn_scaling_no_drafts``, ``limit_fraction`` and ``throughput`` are
measured with one token per forward pass, ``throughput_drafted`` with drafts.

Reported in ``bench.json`` (and ``bench.md``, ``bench.png``): per-step and per-episode latency (median and
p90), success, tokens per second, ``speedup`` (orchestrated / compiled median step latency),
``limit_fraction`` (the runtime's decode rate at one environment / the raw rate), ``turn_scaling``
(episode time at 2, 4, 8, 16 turns for both, replaying a teacher's episodes token for token so both
decode exactly the same tokens and meet the same observations), ``throughput`` (the runtime's tokens per
second against the number of parallel environments) and peak memory. The limit and throughput measurements
alternate their settings ``rounds`` times and report medians, with each round's figures beside them.

With ``scale.sizes`` (e.g. ``[128x4,256x6,512x8]``) the run adds ``model_scale``: the replayed speedup and the
throughput ratio of randomly initialised models of each size, replaying teacher tokens so that an untrained
model does a trained one's work.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_agents.collect import teacher_episode
from rl_agents.config import ConfigError, EnvConfig, ModelConfig, env_entries
from rl_agents.model import build_tiny_model, load_policy
from rl_agents.runtime import NgramDrafter, Runtime, RuntimeConfig, verify_draft
from rl_agents.teachers import SYSTEM_PROMPT
from rl_agents.trajectory import (
    END_OF_TURN,
    FORMAT_VERSION,
    IM_END,
    IM_START,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    Trajectory,
    Turn,
    agent_ids,
)
from rl_agents.validate import scale_size, validate_bench

log = logging.getLogger(__name__)


def _test_tasks(entry) -> dict:
    """An environment's keyword arguments on test tasks (the bench's success figures are held out by task)."""
    return {**entry.kwargs, "split": "test"}


@dataclass
class TurnScalingConfig:
    env_id: str = "Calculator-v0"
    """an environment whose teacher can be kept going for many turns"""
    env_kwargs: dict[str, Any] = field(default_factory=lambda: {"fail_prob": 0.95, "max_episode_steps": 40})
    """a flaky calculator: the teacher retries, so its episodes run past 16 turns"""
    teacher: dict[str, Any] = field(default_factory=lambda: {"_target_": "envs.calculator.CalculatorTeacher"})
    episodes: int = 3
    """teacher episodes replayed at each length (the median time is reported)"""


@dataclass
class ScaleConfig:
    sizes: list[str] = field(default_factory=list)
    """model sizes as HIDDENxLAYERS (e.g. 256x6): randomly initialised models of the tiny shape scaled up
    (heads of 32 dims, MLP 3x hidden), on the checkpoint's tokenizer; empty: no scale section"""
    episodes: int = 256
    """teacher episodes replayed at each size for the throughput ratio"""


@dataclass
class BenchConfig:
    checkpoint: str | None = None
    """a saved policy directory; none: train a quick one first (``quick``)"""
    quick: list[str] = field(
        default_factory=lambda: ["collect.episodes=2000", "bc.max_steps=400", "stages=[collect,bc]", "logger=none"]
    )
    """overrides of ``python -m rl_agents.train`` for the quick policy (written under the bench run dir)"""
    seed: int = 0
    episodes: int = 20
    """held-out episodes per approach and environment (latency and success)"""
    turns: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    parallel: list[int] = field(default_factory=lambda: [1, 8, 32])
    throughput_episodes: int = 256
    """episodes per parallel setting (at least the largest setting)"""
    limit_tokens: int = 256
    """tokens decoded by the raw-rate loop"""
    rounds: int = 3
    """the limit and throughput measurements alternate their settings this many times and report medians (the
    machine's speed drifts by 10-20% over minutes)"""
    threads: int | None = None
    """torch threads (none: torch's default)"""
    device: str = "auto"
    """auto: cuda when available, else cpu"""
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    turn_scaling: TurnScalingConfig = field(default_factory=TurnScalingConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


# --- the orchestrated agent ---------------------------------------------------------------------
class Orchestrated:
    """The same model, driven statelessly: each step rebuilds the prompt text and re-encodes it."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: RuntimeConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.device = next(model.parameters()).device
        self.stats = {"generated_tokens": 0, "prompt_tokens": 0, "wall_s": 0.0}
        self.drafter = NgramDrafter(config.draft_ngram, stop=self.eot_id) if config.draft_tokens > 0 else None

    def prompt(self, tools: list[dict], task: str, history: list[tuple[str, str]]) -> str:
        """The chat prompt an orchestrator sends: system prompt with the tools, the task, the whole history."""
        system = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
        text = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{task}{IM_END}\n{IM_START}assistant\n"
        for agent, observation in history:
            text += (
                f"{agent}{IM_END}\n{IM_START}user\n{TOOL_RESPONSE_OPEN}\n{observation}\n"
                f"{TOOL_RESPONSE_CLOSE}{IM_END}\n{IM_START}assistant\n"
            )
        return text

    @torch.no_grad()
    def call(self, text: str, forced: list[int] | None = None) -> str:
        """One stateless model call: tokenise, prefill, greedy-decode (or replay ``forced``) one reply.

        With ``draft_tokens`` the call drafts as the runtime does (``NgramDrafter``: the prompt, and the
        replies of earlier calls, as a serving engine's n-gram speculation would) and verifies each draft
        in one forward pass, dropping the rejected tokens' keys and values from the cache.
        """
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.stats["prompt_tokens"] += len(prompt)
        draft = []
        if self.drafter is not None:  # the reply's first tokens are drafted and verified with the prompt
            draft = self.drafter.propose(prompt, None, min(self.config.draft_tokens, self.config.max_new_tokens - 1))
        step = torch.tensor([prompt + draft], device=self.device)
        out = self.model(input_ids=step, use_cache=True, logits_to_keep=1 + len(draft))
        generated: list[int] = []
        while True:
            choices = out.logits[0, -1 - len(draft) :].argmax(-1).tolist()

            def choose(j: int, proposed: int | None, choices=choices) -> tuple[int, float]:  # greedy, or replayed
                return (choices[j] if forced is None else forced[min(len(generated), len(forced) - 1)]), 0.0

            for token, _ in verify_draft(draft, choose):  # the runtime's rule: the draft up to its first miss
                generated.append(token)
                if token == self.eot_id or len(generated) >= self.config.max_new_tokens:
                    break
            if generated[-1] == self.eot_id or len(generated) >= self.config.max_new_tokens:
                break
            out.cache.crop(len(prompt) + len(generated) - 1 - out.cache.get_seq_length())  # the rejected drafts
            if self.drafter is not None:
                k = min(self.config.draft_tokens, self.config.max_new_tokens - len(generated) - 1)
                draft = self.drafter.propose(prompt + generated, None, k)
            step = torch.tensor([generated[-1:] + draft], device=self.device)
            out = self.model(input_ids=step, cache=out.cache, use_cache=True, logits_to_keep=step.shape[1])
        if self.drafter is not None:
            self.drafter.add_turn(prompt, generated)
        self.stats["generated_tokens"] += len(generated)
        body = generated[:-1] if generated[-1] == self.eot_id else generated
        return self.tokenizer.decode(body, skip_special_tokens=False)

    def run(
        self,
        env_id: str,
        seeds: list[int],
        env_kwargs: dict | None = None,
        forced: list[list[list[int]]] | None = None,
    ) -> list[Trajectory]:
        env = gym.make(env_id, **(env_kwargs or {}))
        trajectories = []
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            for k, seed in enumerate(seeds):
                task, info = env.reset(seed=int(seed))
                turns: list[Turn] = []
                success, truncation = False, "max_turns"
                for t in range(self.config.max_turns):
                    turn_start = time.perf_counter()
                    replay = forced[k][t] if forced is not None and t < len(forced[k]) else None
                    text = self.call(
                        self.prompt(info["tools"], task, [(u.agent, u.observation) for u in turns]), replay
                    )
                    observation, reward, terminated, truncated, step_info = env.step(text)
                    turn = Turn(text, observation, step_info.get("tool"), step_info.get("error"), float(reward))
                    turn.latency_ms = 1000.0 * (time.perf_counter() - turn_start)
                    turns.append(turn)
                    success = bool(step_info.get("success", False))
                    if terminated or truncated:
                        truncation = None if terminated else "max_steps"
                        break
                metadata = {"env_id": env_id, "seed": int(seed), "teacher": "orchestrated", "version": FORMAT_VERSION}
                metadata["truncation"] = truncation
                reward = sum(u.reward for u in turns)
                trajectories.append(
                    Trajectory(task=task, turns=turns, reward=reward, success=success, metadata=metadata)
                )
        finally:
            self.model.train(was_training)
            env.close()
        self.stats["wall_s"] += time.perf_counter() - start
        return trajectories


# --- measurements -------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def latency_summary(trajectories: list[Trajectory], generated_tokens: int, wall_s: float) -> dict[str, Any]:
    steps = [t.latency_ms for tr in trajectories for t in tr.turns if t.latency_ms is not None]
    episodes = [sum(t.latency_ms or 0.0 for t in tr.turns) for tr in trajectories]
    return {
        "step_latency_ms": percentiles(steps),
        "episode_latency_ms": percentiles(episodes),
        "success_rate": sum(tr.success for tr in trajectories) / max(1, len(trajectories)),
        "mean_turns": len(steps) / max(1, len(trajectories)),
        "tokens_per_s": generated_tokens / wall_s if wall_s > 0 else None,
        "episodes": len(trajectories),
    }


@torch.no_grad()
def raw_decode_rate(model: PreTrainedModel, n_tokens: int, prompt_len: int = 32) -> float:
    """Tokens per second of cached one-token forward passes and argmax in a tight loop (batch 1)."""
    device = next(model.parameters()).device
    model.eval()
    ids = torch.randint(5, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids.to(device), use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(n_tokens):
        out = model(input_ids=token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return n_tokens / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def long_teacher_episodes(
    cfg: DictConfig, tokenizer, n_turns: int, count: int | None = None
) -> tuple[list[int], list[list[list[int]]]]:
    """``count`` held-out seeds (default ``turn_scaling.episodes``) whose teacher episode lasts at least
    ``n_turns`` turns, and each turn's token ids."""
    ts = cfg.turn_scaling
    count = count or ts.episodes
    env = gym.make(ts.env_id, **OmegaConf.to_container(ts.env_kwargs))
    teacher = hydra.utils.instantiate(ts.teacher)
    seeds, forced = [], []
    seed = cfg.env.eval_seed_start
    try:
        while len(seeds) < count and seed < cfg.env.eval_seed_start + 10_000:
            trajectory = teacher_episode(env, teacher, seed, ts.env_id, max_turns=n_turns)
            if len(trajectory.turns) >= n_turns:
                seeds.append(seed)
                forced.append([agent_ids(tokenizer, turn.agent) for turn in trajectory.turns])
            seed += 1
    finally:
        env.close()
    if len(seeds) < count:
        raise ConfigError(f"turn_scaling: fewer than {count} teacher episodes of {n_turns} turns on {ts.env_id}")
    return seeds, forced


def turn_scaling(cfg: DictConfig, model, tokenizer, runtime_cfg: RuntimeConfig) -> dict[str, Any]:
    """Episode time at each length, both approaches replaying the same teacher episodes token for token.

    Each approach is one long-lived agent (a deployed one's drafter has seen earlier episodes), warmed up on
    one more teacher episode that is not measured.
    """
    ts = cfg.turn_scaling
    kwargs = OmegaConf.to_container(ts.env_kwargs)
    seeds, forced = long_teacher_episodes(cfg, tokenizer, max(cfg.turns), ts.episodes + 1)
    longest = max(len(t) for f in forced for t in f)
    config = replace(runtime_cfg, batch_size=1, max_new_tokens=max(runtime_cfg.max_new_tokens, longest))
    compiled = Runtime(model, tokenizer, config)
    config = compiled.config  # with max_context resolved against the model
    agents = {"compiled": compiled, "orchestrated": Orchestrated(model, tokenizer, config)}
    for agent in agents.values():
        agent.config = replace(config, max_turns=max(cfg.turns))
        agent.run(ts.env_id, seeds[-1:], kwargs, forced=forced[-1:])  # the warm-up episode
    seeds, forced = seeds[:-1], forced[:-1]
    out: dict[str, Any] = {"compiled": {}, "orchestrated": {}, "env_id": ts.env_id, "episodes": len(seeds)}
    steps: dict[str, list[float]] = {"compiled": [], "orchestrated": []}
    for n in cfg.turns:
        times = {"compiled": [], "orchestrated": []}
        for seed, replay in zip(seeds, forced):
            for approach, agent in agents.items():
                agent.config = replace(config, max_turns=n)
                before = agent.stats["wall_s"]
                episode = agent.run(ts.env_id, [seed], kwargs, forced=[replay])[0]
                times[approach].append(agent.stats["wall_s"] - before)
                steps[approach] += [t.latency_ms for t in episode.turns]
        for approach, values in times.items():
            out[approach][str(n)] = 1000.0 * statistics.median(values)
    first, last = min(cfg.turns), max(cfg.turns)
    for approach in ("compiled", "orchestrated"):
        # growth of the per-turn cost from the shortest to the longest episode: 1.0 is exactly linear
        per_turn = {n: out[approach][str(n)] / n for n in cfg.turns}
        out[f"{approach}_per_turn_growth"] = per_turn[last] / per_turn[first]
        out[f"{approach}_step_latency_ms"] = percentiles(steps[approach])
    return out


def throughput(
    cfg: DictConfig,
    model,
    tokenizer,
    runtime_cfg: RuntimeConfig,
    env_id: str,
    kwargs: dict,
    seeds: list[int] | None = None,
    forced: list[list[list[int]]] | None = None,
) -> dict:
    """The runtime's generated tokens per second against the number of parallel environments."""
    if seeds is None:
        n = max(cfg.throughput_episodes, max(cfg.parallel))
        seeds = list(range(cfg.env.eval_seed_start, cfg.env.eval_seed_start + n))
    rounds: dict[str, list[float]] = {str(p): [] for p in cfg.parallel}
    for _ in range(cfg.rounds):
        for parallel in cfg.parallel:
            config = RuntimeConfig(**{**vars(runtime_cfg), "batch_size": parallel})
            runtime = Runtime(model, tokenizer, config)
            runtime.run(env_id, seeds, kwargs, forced=forced)
            runtime.close()  # its worker processes, with runtime.processes
            rounds[str(parallel)].append(runtime.stats["generated_tokens"] / runtime.stats["wall_s"])
    rates = {p: statistics.median(r) for p, r in rounds.items()}
    lo, hi = str(min(cfg.parallel)), str(max(cfg.parallel))
    return {
        "tokens_per_s": rates,
        "rounds": rounds,
        "env_id": env_id,
        "episodes": len(seeds),
        "ratio": rates[hi] / rates[lo],
    }


def model_scale(cfg: DictConfig, tokenizer, runtime_cfg: RuntimeConfig, env_id: str, entry, device) -> dict:
    """Speedup and throughput ratio of randomly initialised models of each size in ``cfg.scale.sizes``.

    Both figures replay teacher tokens (the turn-scaling episodes; the env's teacher on ``scale.episodes``
    held-out seeds), so an untrained model does exactly a trained one's work.
    """
    env = gym.make(env_id, **_test_tasks(entry))
    teacher = hydra.utils.instantiate(entry.teacher)
    seeds = list(range(cfg.env.eval_seed_start, cfg.env.eval_seed_start + cfg.scale.episodes))
    try:
        forced = [
            [
                agent_ids(tokenizer, t.agent)
                for t in teacher_episode(env, teacher, s, env_id, runtime_cfg.max_turns).turns
            ]
            for s in seeds
        ]
    finally:
        env.close()
    config = RuntimeConfig(**vars(runtime_cfg))
    config.max_new_tokens = max(config.max_new_tokens, max(len(t) for f in forced for t in f))
    out = {}
    for size in cfg.scale.sizes:
        hidden, layers = scale_size(size)
        model = build_tiny_model(
            tokenizer, cfg.seed, hidden, layers, max(1, hidden // 32), 3 * hidden, config.max_context or 2048
        )
        model.to(device).eval()
        Runtime(model, tokenizer, config).run(env_id, seeds[:1], _test_tasks(entry), forced=forced[:1])  # warm-up
        plain = replace(config, draft_tokens=0)
        scaling = turn_scaling(cfg, model, tokenizer, config)
        scaling_plain = turn_scaling(cfg, model, tokenizer, plain) if config.draft_tokens else scaling
        tp = throughput(cfg, model, tokenizer, plain, env_id, _test_tasks(entry), seeds, forced)
        out[str(size)] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "speedup": _speedup(scaling),
            "speedup_no_drafts": _speedup(scaling_plain),
            "step_latency_ms": {a: scaling[f"{a}_step_latency_ms"]["median"] for a in ("compiled", "orchestrated")},
            "throughput": tp,
        }
        log.info("bench scale %s: %s", size, out[str(size)])
    return out


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if children:  # the largest of the finished child processes (runtime.processes' workers)
        memory["peak_rss_child_mb"] = children
    if device.type == "cuda":
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def bench(cfg: DictConfig, model, tokenizer) -> dict[str, Any]:
    """Every measurement of one benchmark run (see the module docstring)."""
    device = next(model.parameters()).device
    runtime_cfg = RuntimeConfig(**OmegaConf.to_container(cfg.runtime))
    runtime_cfg.greedy, runtime_cfg.batch_size = True, 1
    if device.type != "cpu" and runtime_cfg.processes > 1:
        log.info("runtime.processes=%d is for CPUs: one process on %s", runtime_cfg.processes, device)
        runtime_cfg.processes = 1
    plain_cfg = replace(runtime_cfg, draft_tokens=0)  # one token per forward pass
    seeds = list(range(cfg.env.eval_seed_start, cfg.env.eval_seed_start + cfg.episodes))
    entries = env_entries(cfg)
    first_env = next(iter(entries))
    # warm-up: first calls pay for allocation and kernel selection
    Runtime(model, tokenizer, runtime_cfg).run(first_env, seeds[:1], _test_tasks(entries[first_env]))
    Orchestrated(model, tokenizer, runtime_cfg).run(first_env, seeds[:1], _test_tasks(entries[first_env]))
    approaches: dict[str, dict[str, Any]] = {"compiled": {}, "orchestrated": {}}
    for env_id, entry in entries.items():
        runtime = Runtime(model, tokenizer, runtime_cfg)
        episodes = runtime.run(env_id, seeds, _test_tasks(entry))
        approaches["compiled"][env_id] = latency_summary(
            episodes, runtime.stats["generated_tokens"], runtime.stats["wall_s"]
        )
        orchestrated = Orchestrated(model, tokenizer, runtime_cfg)
        episodes = orchestrated.run(env_id, seeds, _test_tasks(entry))
        summary = latency_summary(episodes, orchestrated.stats["generated_tokens"], orchestrated.stats["wall_s"])
        summary["prompt_tokens_per_step"] = orchestrated.stats["prompt_tokens"] / max(
            1, summary["mean_turns"] * len(seeds)
        )
        approaches["orchestrated"][env_id] = summary
        log.info("bench %s: compiled %s / orchestrated %s", env_id, approaches["compiled"][env_id], summary)
    # the raw rate decodes one token per forward pass: the runtime's overhead is measured doing the same
    limit = {"raw_decode_tokens_per_s": [], "runtime_decode_tokens_per_s": []}
    for _ in range(cfg.rounds):
        limit["raw_decode_tokens_per_s"].append(raw_decode_rate(model, cfg.limit_tokens))
        plain = Runtime(model, tokenizer, plain_cfg)
        plain.run(first_env, seeds, _test_tasks(entries[first_env]))
        limit["runtime_decode_tokens_per_s"].append(plain.stats["generated_tokens"] / plain.stats["wall_s"])
    raw, compiled_rate = (statistics.median(rates) for rates in limit.values())
    scaling = turn_scaling(cfg, model, tokenizer, runtime_cfg)
    scaling_plain = turn_scaling(cfg, model, tokenizer, plain_cfg) if runtime_cfg.draft_tokens else scaling
    free = {a: approaches[a][first_env]["step_latency_ms"]["median"] for a in approaches}
    kwargs = _test_tasks(entries[first_env])
    result = {
        # per-step latency with both approaches decoding the same tokens (the teacher replay), both drafting
        # with runtime.draft_tokens
        "speedup": _speedup(scaling),
        "speedup_no_drafts": _speedup(scaling_plain),  # both decoding one token per forward pass
        # per-step latency of free-running greedy episodes: each approach generates what the model writes
        "speedup_free_running": free["orchestrated"] / free["compiled"],
        "limit_fraction": compiled_rate / raw,
        "turn_scaling": scaling,
        "turn_scaling_no_drafts": scaling_plain,
        # rollouts decode without drafts unless runtime.draft_tokens is set
        "throughput": throughput(cfg, model, tokenizer, plain_cfg, first_env, kwargs),
        "throughput_drafted": throughput(cfg, model, tokenizer, runtime_cfg, first_env, kwargs)
        if runtime_cfg.draft_tokens
        else None,
        "draft_tokens": runtime_cfg.draft_tokens,
        "success": {a: {e: m["success_rate"] for e, m in approaches[a].items()} for a in approaches},
        "approaches": approaches,
        "limit": {"raw_decode_tokens_per_s": raw, "runtime_decode_tokens_per_s": compiled_rate, "rounds": limit},
        "memory": peak_memory_mb(device),  # before the scale section's larger models
        "env_id": first_env,
        "seeds": {"start": cfg.env.eval_seed_start, "count": cfg.episodes},
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }
    if cfg.scale.sizes:
        result["model_scale"] = model_scale(cfg, tokenizer, runtime_cfg, first_env, entries[first_env], device)
    return result


def _speedup(scaling: dict[str, Any]) -> float:
    return scaling["orchestrated_step_latency_ms"]["median"] / scaling["compiled_step_latency_ms"]["median"]


# --- reports ------------------------------------------------------------------------------------
def _runtime_lines() -> int:
    """Non-blank lines of the runtime package, every module of it (the compiled agent's whole infrastructure)."""
    from rl_agents import runtime

    files = Path(runtime.__file__).parent.glob("*.py")
    return sum(1 for path in files for line in path.read_text().splitlines() if line.strip())


def markdown(result: dict[str, Any], command: str) -> str:
    envs = list(result["success"]["compiled"])
    header = "| approach | step latency, median (p90) | episode latency, median | " + " | ".join(
        f"success {e}" for e in envs
    )
    lines = [header + " | infrastructure |", "|" + " --- |" * (4 + len(envs))]
    infra = {
        "compiled": f"one process: the weights and a {_runtime_lines()}-line runtime; no prompt engineering",
        "orchestrated": "a framework re-prompting the model every step (tool docs + history), no cache kept",
    }
    env = result["env_id"]
    for approach in ("compiled", "orchestrated"):
        m = result["approaches"][approach][env]
        success = " | ".join(f"{100 * result['success'][approach][e]:.0f}%" for e in envs)
        step, episode = m["step_latency_ms"], m["episode_latency_ms"]
        lines.append(
            f"| {approach} | {step['median']:.1f} ms ({step['p90']:.1f} ms) | {episode['median']:.0f} ms | "
            f"{success} | {infra[approach]} |"
        )
    limit = result["limit"]
    lines.append(
        f"| limit | {1000.0 / limit['raw_decode_tokens_per_s']:.2f} ms a token | | "
        + " | ".join("" for _ in envs)
        + " | raw cached decoding in a tight loop |"
    )
    ts, tp, drafted = result["turn_scaling"], result["throughput"], result.get("throughput_drafted")
    drafting = f"both drafting up to {result['draft_tokens']} tokens a step" if result["draft_tokens"] else "no drafts"
    lines += [
        "",
        f"- speedup (orchestrated / compiled median step latency, both replaying the same teacher tokens on "
        f"{result['turn_scaling']['env_id']}, {drafting}): **{result['speedup']:.2f}x**; one token per forward "
        f"pass: {result['speedup_no_drafts']:.2f}x; free-running greedy episodes on {env}: "
        f"{result['speedup_free_running']:.2f}x (each approach generates its own tokens)",
        f"- limit_fraction (runtime decode rate at 1 env / raw decode rate): **{result['limit_fraction']:.2f}**",
        "- episode time by turns (ms, teacher episodes replayed token for token on "
        f"{ts['env_id']}): "
        + ", ".join(f"{n}: {ts['compiled'][n]:.0f} vs {ts['orchestrated'][n]:.0f}" for n in ts["compiled"])
        + f" (compiled vs orchestrated); per-turn cost growth {ts['compiled_per_turn_growth']:.2f}x compiled, "
        f"{ts['orchestrated_per_turn_growth']:.2f}x orchestrated (1.0 = linear episode time)",
        f"- throughput (generated tokens/s by parallel environments, {tp['episodes']} episodes on {tp['env_id']}): "
        + ", ".join(f"{k}: {v:.0f}" for k, v in tp["tokens_per_s"].items())
        + f"; {max(tp['tokens_per_s'], key=int)} vs {min(tp['tokens_per_s'], key=int)}: **{tp['ratio']:.1f}x**",
        *(
            [
                "- throughput with drafts (tokens/s): "
                + ", ".join(f"{k}: {v:.0f}" for k, v in drafted["tokens_per_s"].items())
                + f"; {drafted['ratio']:.1f}x"
            ]
            if drafted
            else []
        ),
        *(
            f"- model scale {size} ({m['parameters']:,} parameters, random init, teacher tokens replayed): "
            f"speedup {m['speedup']:.2f}x ({m['speedup_no_drafts']:.2f}x without drafts), "
            f"throughput {m['throughput']['ratio']:.1f}x "
            f"({', '.join(f'{k}: {v:.0f}' for k, v in m['throughput']['tokens_per_s'].items())} tokens/s)"
            for size, m in result.get("model_scale", {}).items()
        ),
        f"- peak memory: {', '.join(f'{k} {v:.0f}' for k, v in result['memory'].items())}",
        f"- device: {result['device']}; model: {result['model_parameters']:,} parameters",
        "",
        f"Regenerate: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ts = result["turn_scaling"]
    turns = [int(n) for n in ts["compiled"]]
    for approach, style in (("compiled", "o-"), ("orchestrated", "s--")):
        left.plot(turns, [ts[approach][str(n)] for n in turns], style, label=approach)
    left.set(xlabel="turns in the episode", ylabel="episode time (ms)", title=f"Episode time ({ts['env_id']})")
    left.legend()
    tp = result["throughput"]["tokens_per_s"]
    parallel = [int(k) for k in tp]
    right.plot(parallel, [tp[str(k)] for k in parallel], "o-")
    right.set(xscale="log", xlabel="parallel environments", ylabel="generated tokens / s", title="Runtime throughput")
    right.set_xticks(parallel, [str(k) for k in parallel])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quick_policy(cfg: DictConfig, run_dir: Path) -> Path:
    """Train a quick policy with ``python -m rl_agents.train`` (the bench's own env and model)."""
    train_dir = run_dir / "quick_policy"
    env_name = HydraConfig.get().runtime.choices.get("env", "calculator")
    command = [sys.executable, "-m", "rl_agents.train", f"env={env_name}", f"seed={cfg.seed}", *cfg.quick]
    command.append(f"hydra.run.dir={train_dir}")
    log.info("bench: no checkpoint given; training a quick policy: %s", " ".join(command))
    subprocess.run(command, check=True)
    return train_dir / "bc" / "policy"


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        validate_bench(cfg)
    except ConfigError as err:
        log.error("%s", err)  # one message, no traceback
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else quick_policy(cfg, run_dir)
    model, tokenizer = load_policy(checkpoint, cfg.model.dtype, local_files_only=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    if cfg.device not in ("auto", "cpu"):
        device = torch.device(cfg.device)
    model.to(device)
    result = bench(cfg, model, tokenizer)
    result["checkpoint"] = str(checkpoint)
    command = "python -m rl_agents.bench " + " ".join(HydraConfig.get().overrides.task)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (run_dir / "bench.md").write_text(markdown(result, command.strip()))
    plot(result, run_dir / "bench.png")
    print((run_dir / "bench.md").read_text())


if __name__ == "__main__":
    main()
