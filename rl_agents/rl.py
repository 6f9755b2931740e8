"""The rl stage: refine a policy in the tool environments with GRPO (TRL) or PPO (``rl_agents.ppo``).

Both algorithms share what is defined here: the configuration, the reward (the environment's plus the
shaping terms declared in ``rl.shaping``), the handling of malformed tool calls (``rl.on_malformed``), the
training seeds of each step, and the episode metrics. The policy starts from the BC policy (or
``rl.init_from``) and is anchored by a KL penalty (``algo.beta``) to a frozen reference, the BC policy (or
``rl.ref_from``). Episodes come from the project's runtime, sampled at ``rl.temperature``; each step's
episode seeds and sampling generator derive from ``(seed, step)``, so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from envs.base import ERROR_KINDS, MALFORMED_KINDS
from rl_agents.config import RLConfig, env_entries
from rl_agents.runtime import Runtime, RuntimeConfig
from rl_agents.trajectory import Trajectory

log = logging.getLogger(__name__)


def mixed_precision(setting: str) -> str:
    """accelerate's ``mixed_precision`` for ``rl.mixed_precision``."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


# --- rewards ------------------------------------------------------------------------------------
def term_names(rl: RLConfig | DictConfig) -> list[str]:
    """The reward's terms under this config: ``env`` (the environment's) and each active shaping term (TRL
    needs the names before the first episode)."""
    names = ["env"] + (["malformed"] if rl.on_malformed == "penalize" else [])
    return names + [name for name in ("per_turn", "tool_error", "truncated") if rl.shaping[name]]


def turn_terms(trajectory: Trajectory, rl: RLConfig | DictConfig) -> list[dict[str, float]]:
    """Each turn's reward, term by term: the one place reward shaping is written (``reward_terms`` and
    ``turn_rewards`` sum it by episode and by turn)."""
    names, s = term_names(rl), rl.shaping
    truncated = bool(trajectory.metadata.get("truncation"))
    last = len(trajectory.turns) - 1
    rows = []
    for i, turn in enumerate(trajectory.turns):
        terms = {
            "env": float(turn.reward),
            "malformed": -rl.malformed_penalty * (turn.error in MALFORMED_KINDS),
            "per_turn": s.per_turn,
            "tool_error": s.tool_error * (turn.error == "tool_error"),
            "truncated": s.truncated * (truncated and i == last),
        }
        rows.append({name: float(terms[name]) for name in names})
    return rows


def reward_terms(trajectory: Trajectory, rl: RLConfig | DictConfig, gamma: float = 1.0) -> dict[str, float]:
    """The return of an episode, term by term: the sums of ``turn_terms``, turn ``t`` weighted ``gamma**t``."""
    rows = turn_terms(trajectory, rl)
    return {name: sum(gamma**t * row[name] for t, row in enumerate(rows)) for name in term_names(rl)}


def turn_rewards(trajectory: Trajectory, rl: RLConfig | DictConfig) -> list[float]:
    """The same reward, placed on the turn that earned it (for PPO's per-token credit assignment)."""
    return [sum(row.values()) for row in turn_terms(trajectory, rl)]


# --- episodes -----------------------------------------------------------------------------------
def step_seeds(cfg: DictConfig, step: int, n: int) -> dict[str, list[int]]:
    """The training seeds of one step, split across the environments by weight; a function of (seed, step)."""

    entries = env_entries(cfg)
    rng = np.random.default_rng([cfg.seed, step, 7])
    counts = split_by_weight(n, {env_id: e.weight for env_id, e in entries.items()}, rng)
    lo, hi = cfg.env.train_seed_start, cfg.env.eval_seed_start
    return {env_id: [int(s) for s in rng.integers(lo, hi, size=k)] for env_id, k in counts.items() if k}


def split_by_weight(n: int, weights: dict[str, float], rng: np.random.Generator) -> dict[str, int]:
    """``n`` items split in proportion to ``weights``: each gets the floor of its share, and the leftover
    items go by systematic sampling on the fractional parts, so every count's expectation is exactly its share.

    The counts always sum to ``n``; with fewer items than environments, each step draws which environments
    get one, so every environment is visited at its weight's rate over the steps.
    """
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(np.floor(x + 1e-9)) for k, x in exact.items()}
    keys = list(weights)
    rng.shuffle(keys)
    u, cum = rng.random(), 0.0
    for k in keys:
        lo, cum = cum, cum + max(0.0, exact[k] - counts[k])
        counts[k] += int(np.ceil(cum - u - 1e-9)) - int(np.ceil(lo - u - 1e-9))
    counts[keys[-1]] += n - sum(counts.values())  # floating-point leftovers, if any
    return counts


def rollout_config(cfg: DictConfig) -> RuntimeConfig:
    """The runtime settings of training rollouts: sampled at rl.temperature, malformed turns per rl.on_malformed."""
    runtime = RuntimeConfig(**OmegaConf.to_container(cfg.runtime))
    runtime.greedy = False
    runtime.temperature = cfg.rl.temperature
    runtime.top_p = 1.0
    runtime.end_on_malformed = cfg.rl.on_malformed == "end"
    return runtime


def sample_episodes(
    cfg: DictConfig, model, tokenizer, seeds: dict[str, list[int]], step: int, first_index: int = 0
) -> list[Trajectory]:
    """Sampled episodes of ``model`` on the train tasks of ``seeds`` (env id -> seeds), reproducible from
    (seed, step); ``first_index`` is the global index of the first episode (a process's offset in the step's
    batch), so that each episode of a step samples from its own stream whichever process runs it."""

    generator_seed = int(np.random.default_rng([cfg.seed, step]).integers(2**31))
    runtime = Runtime(model, tokenizer, rollout_config(cfg), seed=generator_seed)
    entries = env_entries(cfg)
    episodes = []
    for env_id, env_seeds in seeds.items():
        kwargs = {**entries[env_id].kwargs, "split": "train"}
        episodes += runtime.run(env_id, env_seeds, kwargs, policy="rl", first_index=first_index + len(episodes))
    off_split = [e.metadata["env_id"] for e in episodes if e.metadata.get("split") != "train"]
    if off_split:
        raise RuntimeError(f"RL drew {len(off_split)} episodes off the train split (in {sorted(set(off_split))})")
    return episodes


def append_rollouts(path: Path, step: int, rank: int, episodes: list[Trajectory]) -> None:
    """One line per sampled episode in ``path`` (``rl/rollouts/rank<N>.jsonl``): which task it was, what it
    earned, and a digest of its tokens, so that a run's rollouts can be audited (repeats, splits, rewards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for e in episodes:
            ids = [i for t in e.turns for i in (t.token_ids or [])]
            record = {
                "step": step,
                "rank": rank,
                "env_id": e.metadata["env_id"],
                "seed": e.metadata["seed"],
                "task_key": e.metadata.get("task_key"),
                "split": e.metadata.get("split"),
                "reward": e.reward,
                "success": e.success,
                "turns": len(e.turns),
                "tokens_sha1": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
            }
            f.write(json.dumps(record) + "\n")


def episode_metrics(episodes: list[Trajectory], rl: RLConfig | DictConfig) -> dict[str, float]:
    """Success, reward (total and per term), turns, truncations and the rate of each error kind per episode."""
    n = max(1, len(episodes))
    terms = [reward_terms(e, rl) for e in episodes]
    metrics = {
        "success": sum(e.success for e in episodes) / n,
        "reward": sum(sum(t.values()) for t in terms) / n,
        "turns": sum(len(e.turns) for e in episodes) / n,
        "truncated": sum(bool(e.metadata.get("truncation")) for e in episodes) / n,
    }
    for name in terms[0] if terms else []:
        metrics[f"reward_{name}"] = sum(t[name] for t in terms) / n
    errors = Counter(t.error for e in episodes for t in e.turns if t.error)
    for kind in ERROR_KINDS:
        metrics[f"errors/{kind}"] = errors.get(kind, 0) / n
    metrics["errors/malformed"] = sum(errors.get(k, 0) for k in MALFORMED_KINDS) / n
    return metrics


# --- the stage ----------------------------------------------------------------------------------
def rl_lora(cfg: DictConfig):
    """With ``peft=lora``: a fresh LoRA adapter on the starting policy (its vocabulary is already the format's),
    whose disabled state is the KL reference; else None."""
    if not cfg.peft.enabled:
        return None
    from rl_agents.model import lora_config

    p = cfg.peft
    return lora_config(p.r, p.alpha, p.dropout, p.target_modules, [])


def save_rl_policy(model, tokenizer, out_dir: Path) -> Path:
    """``out_dir/policy``, a plain model directory; with LoRA also ``out_dir/adapter`` (the adapter and the
    tokenizer, on the starting policy), saved before the adapter is merged into the policy."""
    from rl_agents import rundir

    if hasattr(model, "merge_and_unload"):
        with rundir.atomic_dir(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        model = model.merge_and_unload()
    model.config._name_or_path = str(out_dir / "policy")
    rundir.save_policy(model, tokenizer, out_dir / "policy")
    return out_dir / "policy"


def policy_dirs(cfg: DictConfig, run_dir: Path) -> tuple[Path, Path]:
    """The policy RL starts from and its KL reference: by default the run's supervised policy (DAgger's when
    the run has the dagger stage, else BC's)."""
    bc = run_dir / ("dagger" if "dagger" in cfg.stages else "bc") / "policy"  # the supervised policy
    init = Path(cfg.rl.init_from) if cfg.rl.init_from else bc
    ref = Path(cfg.rl.ref_from) if cfg.rl.ref_from else (bc if (bc / "config.json").is_file() else init)
    return init, ref
