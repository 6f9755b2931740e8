"""The collect stage: run a teacher in the environments and keep its episodes as trajectories."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from rl_agents.trajectory import FORMAT_VERSION, Trajectory, Turn

log = logging.getLogger(__name__)


def teacher_episode(env: gym.Env, teacher: Any, seed: int, env_id: str, max_turns: int) -> Trajectory:
    """One episode of ``teacher`` in ``env`` from ``seed``, with the policy's turn budget ``max_turns``."""
    task, reset_info = env.reset(seed=int(seed))
    teacher.begin(env.unwrapped, np.random.default_rng([int(seed), 1]))
    turns: list[Turn] = []
    reward, success, truncation = 0.0, False, None
    for _ in range(max_turns):
        text = teacher.act(env.unwrapped, task, [(t.agent, t.observation) for t in turns])
        observation, r, terminated, truncated, info = env.step(text)
        turns.append(
            Turn(agent=text, observation=observation, tool=info.get("tool"), error=info.get("error"), reward=float(r))
        )
        reward += float(r)
        success = bool(info.get("success", False))
        if terminated or truncated:
            truncation = None if terminated else "max_steps"
            break
    else:
        truncation = "max_turns"
    metadata = {
        "env_id": env_id,
        "seed": int(seed),
        "teacher": teacher.name,
        "version": FORMAT_VERSION,
        "truncation": truncation,
        "task_key": reset_info.get("task_key"),
        "split": reset_info.get("split"),
    }
    return Trajectory(task=task, turns=turns, reward=reward, success=success, metadata=metadata)


def collect(
    env_id: str,
    env_kwargs: dict,
    teacher: Any,
    seeds: list[int],
    max_turns: int,
    keep: str = "success",
    progress: bool = True,
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Run ``teacher`` once per seed on *train* tasks; keep successful episodes (``keep="success"``) or all.

    Returns the kept trajectories and statistics of all episodes (success rate, turns, error kinds).
    """
    if keep not in ("success", "all"):
        raise ValueError(f"collect.keep must be 'success' or 'all', got {keep!r}")
    env = gym.make(env_id, **{**env_kwargs, "split": "train"})
    kept, successes, turns, errors = [], 0, 0, Counter()
    try:
        for seed in tqdm(seeds, desc=f"collect {env_id}", disable=not progress):
            trajectory = teacher_episode(env, teacher, seed, env_id, max_turns)
            successes += trajectory.success
            turns += len(trajectory.turns)
            errors.update(t.error for t in trajectory.turns if t.error)
            if keep == "all" or trajectory.success:
                kept.append(trajectory)
    finally:
        env.close()
    stats = {
        "env": env_id,
        "episodes": len(seeds),
        "kept": len(kept),
        "split": "train",
        "teacher_success_rate": successes / max(1, len(seeds)),
        "mean_turns": turns / max(1, len(seeds)),
        "error_kinds": dict(errors),
    }
    log.info("collect %s: %s", env_id, stats)
    return kept, stats
