"""The dagger stage: DAgger (Ross, Gordon & Bagnell 2011) on the runtime's rollouts.

Behavioural cloning sees only the teacher's states, so one early mistake leads the policy into states it
never saw (an error observation, a wrong item open) where it has no idea what to do. Each DAgger round:

1. **roll out** the current policy on fresh *train* tasks with the runtime (greedy by default: the states
   the deployed agent visits);
2. **label** every state it visited: the episode is replayed from its seed in a fresh environment, turn by
   turn, and before each of the policy's turns the teacher writes the turn it would have written there
   (``label_episode``; a scripted teacher acts from any state, an LLM teacher is asked the same way);
3. **aggregate**: each labelled state becomes a training sample (``dagger_samples``): the policy's own
   earlier turns as context (no loss) and the teacher's turn as the target. Turns where the policy already
   did what the teacher would have done are targets too, so no state is lost and none counted twice;
4. **train**: BC continues from the current policy on the teacher's trajectories plus every round's
   samples (``dagger.steps`` steps).

Departures from the paper, each a choice a reader should know:

1. Mixing is per episode, not per step: a round-``i`` episode is the teacher's own with probability
   ``beta ** i`` (``dagger.beta``, 0 by default: round 0, the BC data, is the teacher's, as with Ross et al.'s
   ``beta_i = I(i = 1)``), so the runtime rolls out the policy's episodes batched, uninterrupted.
2. Each round continues training the previous round's policy on the aggregate (``dagger.steps``) instead
   of training a new policy from scratch.
3. Every round draws new train tasks (after the collect stage's seeds), so the labels also widen the task
   coverage; ``eval.json`` still counts every labelled task as seen in training.

Per round, ``dagger/metrics.jsonl`` (and W&B) records the states labelled, how many the teacher disagreed
with (``disagreement_rate``), the policy's success on the round's train tasks, and its success on
validation tasks (``dagger.val_episodes``). Each round's samples and policy are kept in
``dagger/round-<i>/``; ``dagger/policy`` is the last round's policy.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig, OmegaConf

from envs.base import Answer, ToolCall, parse_turn
from rl_agents import rundir
from rl_agents.agent import card_policy
from rl_agents.bc import train_bc
from rl_agents.collect import teacher_episode
from rl_agents.config import BCConfig, env_entries
from rl_agents.model import load_policy
from rl_agents.rl import split_by_weight
from rl_agents.runtime import Runtime, RuntimeConfig
from rl_agents.teachers import make_teacher
from rl_agents.trajectory import Trajectory, Turn, read_jsonl, write_jsonl

log = logging.getLogger(__name__)


# --- labels and samples (pure: tested on their own) -----------------------------------------------
def same_action(a: str, b: str) -> bool:
    """Whether two turns do the same thing: the same tool with the same arguments, or the same answer
    (their ``<think>`` text may differ)."""
    pa, pb = parse_turn(a), parse_turn(b)
    if isinstance(pa, ToolCall) and isinstance(pb, ToolCall):
        return pa.name == pb.name and pa.arguments == pb.arguments
    if isinstance(pa, Answer) and isinstance(pb, Answer):
        return pa.text.strip() == pb.text.strip()
    return False


def label_episode(env: gym.Env, teacher: Any, episode: Trajectory) -> list[str]:
    """The teacher's turn at each state ``episode`` visited: the episode is replayed from its seed, and before
    each of its turns the teacher acts on that state. Stops early (fewer labels than turns) where the replay's
    observation differs from the recorded one: the environment did not repeat itself, so the states after
    that point are not the ones the policy saw."""
    seed = int(episode.metadata["seed"])
    task, _ = env.reset(seed=seed)
    teacher.begin(env.unwrapped, np.random.default_rng([seed, 1]))
    labels, history = [], []
    for turn in episode.turns:
        labels.append(teacher.act(env.unwrapped, task, history))
        if turn.observation is None:  # a turn the runtime cut (token or context budget): never stepped
            break
        observation, _, terminated, truncated, _ = env.step(turn.agent)
        if observation != turn.observation:
            log.warning("dagger: the replay of seed %d diverged at turn %d; labelled up to it", seed, len(labels))
            break
        history.append((turn.agent, observation))
        if terminated or truncated:
            break
    return labels


def dagger_samples(episode: Trajectory, labels: list[str]) -> tuple[list[Trajectory], int]:
    """The training samples of a labelled episode, and the number of its states the teacher disagreed with.

    Where the policy did what the teacher would have done, its turn stays in the sequence with the teacher's
    text as a target; at a state where it did not, the sample so far ends with the teacher's turn, and the
    policy's own turn continues the next sample's context (no loss), as do the turns already learned. Every
    labelled state is a target exactly once."""
    samples, context, disagreements = [], [], 0
    keep = ("env_id", "seed", "task_key", "split", "tokenizer", "version")
    meta = {k: episode.metadata[k] for k in keep if k in episode.metadata} | {"teacher": "dagger-label"}
    for turn, label in zip(episode.turns, labels):
        if same_action(turn.agent, label):
            context.append(Turn(agent=label, observation=turn.observation, tool=turn.tool, error=turn.error))
            continue
        disagreements += 1
        samples.append(Trajectory(episode.task, context + [Turn(agent=label)], metadata=dict(meta)))
        context = [replace(t, imitate=False) for t in context]
        context.append(replace(turn, imitate=False, logprobs=None, latency_ms=None))
    if any(t.imitate for t in context):
        samples.append(Trajectory(episode.task, context, metadata=dict(meta)))
    return samples, disagreements


# --- the stage ------------------------------------------------------------------------------------
def dagger_seeds(cfg: DictConfig, round_index: int) -> tuple[int, int]:
    """The seed range of round ``round_index`` (1-based): train tasks after the collect stage's."""
    start = cfg.env.train_seed_start + cfg.collect.episodes + (round_index - 1) * cfg.dagger.episodes
    return start, start + cfg.dagger.episodes


def _policy_runtime(cfg: DictConfig, model, tokenizer, temperature: float | None) -> Runtime:
    runtime_cfg = RuntimeConfig(**OmegaConf.to_container(cfg.runtime))
    runtime_cfg.greedy = temperature is None
    if temperature is not None:
        runtime_cfg.temperature = temperature
    return Runtime(model, tokenizer, runtime_cfg, seed=cfg.seed)


def _round(cfg: DictConfig, index: int, model, tokenizer) -> tuple[list[Trajectory], dict[str, Any]]:
    """Roll out, label and turn into samples one round's episodes; returns the samples and the round's counts."""
    d = cfg.dagger
    entries = env_entries(cfg)
    rng = np.random.default_rng([cfg.seed, index])
    counts = split_by_weight(d.episodes, {env_id: e.weight for env_id, e in entries.items()}, rng)
    runtime = _policy_runtime(cfg, model, tokenizer, d.temperature)
    start, _ = dagger_seeds(cfg, index)
    samples, stats = [], {"round": index, "episodes": 0, "teacher_episodes": 0, "states": 0, "disagreements": 0}
    successes = 0
    for env_id, entry in entries.items():
        seeds = list(range(start, start + counts[env_id]))
        start += counts[env_id]
        teacher = make_teacher(cfg, env_id)
        env = gym.make(env_id, **{**entry.kwargs, "split": "train"})
        try:
            by_teacher = rng.random(len(seeds)) < d.beta**index
            for seed in np.asarray(seeds)[by_teacher]:  # beta's share: the teacher's own episodes, kept whole
                episode = teacher_episode(env, teacher, int(seed), env_id, cfg.runtime.max_turns)
                if episode.success:
                    samples.append(episode)
                stats["teacher_episodes"] += 1
            mine = [s for s, t in zip(seeds, by_teacher) if not t]
            for episode in runtime.run(env_id, mine, {**entry.kwargs, "split": "train"}, policy=f"round-{index}"):
                labels = label_episode(env, teacher, episode)
                new, disagreed = dagger_samples(episode, labels)
                samples += new
                stats["states"] += len(labels)
                stats["disagreements"] += disagreed
                successes += episode.success
            stats["episodes"] += len(mine)
        finally:
            env.close()
    stats["disagreement_rate"] = stats["disagreements"] / max(1, stats["states"])
    stats["train_success"] = successes / max(1, stats["episodes"])
    stats["samples"] = len(samples)
    return samples, stats


def _val_success(cfg: DictConfig, model, tokenizer) -> float | None:
    """Greedy success on ``dagger.val_episodes`` validation tasks (the evaluation's seeds, split val)."""
    n = cfg.dagger.val_episodes
    if not n:
        return None
    runtime = _policy_runtime(cfg, model, tokenizer, None)
    seeds = list(range(cfg.env.eval_seed_start, cfg.env.eval_seed_start + n))
    done = []
    for env_id, entry in env_entries(cfg).items():
        done += runtime.run(env_id, seeds, {**entry.kwargs, "split": "val"}, policy="dagger")
    return sum(t.success for t in done) / len(done)


def train_dagger(
    cfg: DictConfig, run_dir: Path, data: list[Trajectory], init: Path, report_to: str = "none", tracker=None
) -> Path:
    """``dagger.rounds`` rounds from the policy in ``init`` (the BC policy), aggregating on ``data`` (the
    teacher's trajectories); returns ``<run_dir>/dagger/policy``. A resumed run reuses every finished round."""
    out = run_dir / "dagger"
    d = cfg.dagger
    bc_config = BCConfig(**OmegaConf.to_container(cfg.bc))
    bc_config.max_steps = d.steps
    bc_config.save_steps = max(1, min(bc_config.save_steps, d.steps))
    if d.learning_rate is not None:
        bc_config.learning_rate = d.learning_rate
    aggregate, policy, rounds = list(data), init, []
    for index in range(1, d.rounds + 1):
        round_dir = out / f"round-{index}"
        samples_file, round_file, done_policy = (
            round_dir / "samples.jsonl",
            round_dir / "round.json",
            round_dir / "policy",
        )
        stats = json.loads(round_file.read_text()) if round_file.is_file() else None
        if stats is not None and "val_success" in stats and (done_policy / "config.json").is_file():
            log.info("dagger: reusing finished round %d", index)
            aggregate += read_jsonl(samples_file)
            policy = done_policy
            rounds.append(stats)
            continue
        model, tokenizer = load_policy(policy, cfg.model.dtype, local_files_only=True)
        if stats is not None and samples_file.is_file():  # labelled before an interruption: BC resumes
            samples = read_jsonl(samples_file)
        else:
            samples, stats = _round(cfg, index, model, tokenizer)
            write_jsonl(samples_file, samples)
            rundir.write_text(round_file, json.dumps(stats, indent=2))
        aggregate += samples
        log.info("dagger round %d: %s", index, stats)
        policy = train_bc(aggregate, model, tokenizer, round_dir, bc_config, cfg.seed, cfg.resume, None, report_to)
        model, tokenizer = load_policy(policy, cfg.model.dtype, local_files_only=True)
        card_policy(cfg, f"dagger round {index}", policy, tokenizer=tokenizer)  # evaluate, serve and export take it
        stats["val_success"] = _val_success(cfg, model, tokenizer)
        stats["targets"] = sum(t.imitate for trajectory in aggregate for t in trajectory.turns)  # turns trained on
        rundir.write_text(round_file, json.dumps(stats, indent=2))  # with val_success: the round is finished
        rounds.append(stats)
        if tracker is not None:
            tracker.log({k: v for k, v in stats.items() if v is not None}, "dagger")
        log.info("dagger round %d: val success %s", index, stats["val_success"])
    chosen = kept_round(rounds, d.keep)
    for r in rounds:
        r["kept"] = r["round"] == chosen
    rundir.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rounds))
    log.info("dagger: keeping round %d's policy (dagger.keep=%s)", chosen, d.keep)
    with rundir.atomic_dir(out / "policy") as tmp:  # the kept round's policy, as files: no reload and re-save
        shutil.copytree(out / f"round-{chosen}" / "policy", tmp, dirs_exist_ok=True)
    return out / "policy"


def kept_round(rounds: list[dict], keep: str) -> int:
    """The round whose policy the stage returns: the last, or the one with the highest ``val_success`` (the later
    on a tie, and the last where no round was validated)."""
    if keep == "last" or all(r.get("val_success") is None for r in rounds):
        return rounds[-1]["round"]
    validated = [r for r in rounds if r.get("val_success") is not None]
    return max(validated, key=lambda r: (r["val_success"], r["round"]))["round"]
