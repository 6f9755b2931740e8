"""The collect stage: run a teacher in the environments and keep its episodes as trajectories.

A teacher with ``concurrency > 1`` (the LLM teacher) runs that many episodes at once, each in its own
environment; a scripted teacher, which keeps per-episode state, runs ``collect.workers`` episodes at once, each
thread with its own copy of the teacher and its own environment (for environments whose steps wait on a sandbox
or a slow tool). The trajectories come back in seed order whatever the order they finished in, and an episode
depends on its seed only, so the workers change nothing but the wall time. A teacher with
``checks_health`` is watched (``Health``): the collection stops with ``TeacherUnavailable`` when too many of
its requests fail or too many of its turns are malformed, instead of paying for the whole budget.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from envs.base import MALFORMED_KINDS
from rl_agents.teachers import RequestFailed, TeacherUnavailable
from rl_agents.trajectory import FORMAT_VERSION, Trajectory, Turn

log = logging.getLogger(__name__)


@dataclass
class Health:
    """The teacher's last turns, and the rates at which the collection gives up on it (thread-safe). Rates are
    over a window of recent turns, so an endpoint that dies late in a long collection is noticed as fast as one
    that never worked."""

    max_failure_rate: float = 0.5
    """turns whose request still failed after its retries, among the window's turns"""
    max_malformed_rate: float = 0.5
    """malformed replies among the window's turns that got one"""
    check_after: int = 20
    """the window: the last turns the rates are measured on (nothing is checked before it is full)"""
    window: deque = field(default_factory=deque, repr=False)
    example: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, error: str | None = None, failed: bool = False, text: str = "", why: str = "") -> None:
        """Count one turn; raises ``TeacherUnavailable`` once a rate is over its limit."""
        with self.lock:
            self.window.append("failed" if failed else "malformed" if error in MALFORMED_KINDS else "ok")
            if len(self.window) > self.check_after:
                self.window.popleft()
            if failed:
                self.example = why
            elif error in MALFORMED_KINDS:
                self.example = text[:200]
            if len(self.window) < self.check_after:
                return
            counts = Counter(self.window)
            replied = len(self.window) - counts["failed"]
            if counts["failed"] / len(self.window) > self.max_failure_rate:
                raise TeacherUnavailable(
                    f"the teacher's endpoint is failing: {counts['failed']} of the last {len(self.window)} turns got "
                    f"no reply after their retries (last: {self.example}); check it, teacher.timeout_s and "
                    "teacher.max_retries"
                )
            if replied and counts["malformed"] / replied > self.max_malformed_rate:
                raise TeacherUnavailable(
                    f"the teacher does not write the format: {counts['malformed']} of its last {replied} replies "
                    f"were malformed (e.g. {self.example!r}); check teacher.model and the system prompt "
                    "(rl_agents.teachers.SYSTEM_PROMPT)"
                )


def teacher_episode(
    env: gym.Env,
    teacher: Any,
    seed: int,
    env_id: str,
    max_turns: int,
    health: Health | None = None,
    perturb: float = 0.0,
) -> Trajectory:
    """One episode of ``teacher`` in ``env`` from ``seed``, with the policy's turn budget ``max_turns``; a
    request that fails after its retries raises ``RequestFailed`` (the episode is lost).

    ``perturb``: the probability that a turn is the teacher's ``perturbation`` instead of its own action (DART's
    noise injection); such a turn is context only (``imitate=False``), drawn from a generator of ``seed`` alone.
    """
    task, reset_info = env.reset(seed=int(seed))
    teacher.begin(env.unwrapped, np.random.default_rng([int(seed), 1]))
    noise = np.random.default_rng([int(seed), 2])
    turns: list[Turn] = []
    reward, success, truncation = 0.0, False, None
    for _ in range(max_turns):
        history = [(t.agent, t.observation) for t in turns]
        perturbed = perturb > 0 and noise.random() < perturb
        try:
            if perturbed:
                text = teacher.perturbation(env.unwrapped, history, noise)
            else:
                text = teacher.act(env.unwrapped, task, history)
        except RequestFailed as err:
            if health is not None:
                health.record(failed=True, why=str(err))
            raise
        observation, r, terminated, truncated, info = env.step(text)
        if health is not None and not perturbed:
            health.record(info.get("error"), text=text)
        turns.append(
            Turn(
                agent=text,
                observation=observation,
                tool=info.get("tool"),
                error=info.get("error"),
                reward=float(r),
                imitate=not perturbed,
            )
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
    malformed: str = "mask",
    health: Health | None = None,
    workers: int = 1,
    perturb: float = 0.0,
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Run ``teacher`` once per seed on *train* tasks; keep successful episodes (``keep="success"``) or all.

    A kept episode's malformed teacher turns are masked out of the loss (``malformed="mask"``), drop the
    episode (``"drop"``) or stay (``"keep"``). ``health`` (default for a teacher with ``checks_health``)
    stops the collection early. ``workers``: episodes at once for a teacher without its own ``concurrency``
    (each worker thread copies the teacher). ``perturb``: per-turn probability of the teacher's ``perturbation``
    in place of its action (``teacher_episode``). Returns the kept trajectories and statistics of all episodes
    (success rate, turns, error kinds, lost, masked and perturbed counts, and the teacher's ``usage()``: requests,
    tokens, cost).
    """
    if keep not in ("success", "all"):
        raise ValueError(f"collect.keep must be 'success' or 'all', got {keep!r}")
    if malformed not in ("mask", "drop", "keep"):
        raise ValueError(f"collect.malformed must be mask, drop or keep, got {malformed!r}")
    if health is None and getattr(teacher, "checks_health", False):
        health = Health()
    if workers < 1:
        raise ValueError(f"collect.workers must be at least 1, got {workers}")
    if not 0.0 <= perturb < 1.0:
        raise ValueError(f"collect.perturb must be in [0, 1), got {perturb}")
    if perturb > 0 and not callable(getattr(teacher, "perturbation", None)):
        raise ValueError(
            f"collect.perturb={perturb} needs a teacher with perturbation(env, history, rng) (an action taken in "
            f"place of its own); {type(teacher).__name__} for {env_id} has none"
        )
    episodes = _episodes(
        env_id, {**env_kwargs, "split": "train"}, teacher, seeds, max_turns, progress, health, workers, perturb
    )
    kept, successes, turns, errors, counts = [], 0, 0, Counter(), Counter()
    for trajectory in episodes:
        if trajectory is None:
            counts["lost_episodes"] += 1
            continue
        successes += trajectory.success
        turns += len(trajectory.turns)
        counts["perturbed_turns"] += sum(not t.imitate for t in trajectory.turns)
        errors.update(t.error for t in trajectory.turns if t.error)
        if not (keep == "all" or trajectory.success):
            continue
        bad = [t for t in trajectory.turns if t.error in MALFORMED_KINDS]
        if bad and malformed == "drop":
            counts["dropped_malformed"] += 1
            continue
        if malformed == "mask":
            for turn in bad:
                turn.imitate = False
            counts["masked_turns"] += len(bad)
        kept.append(trajectory)
    stats = {
        "env": env_id,
        "episodes": len(seeds),
        "kept": len(kept),
        "split": "train",
        "teacher_success_rate": successes / max(1, len(seeds)),
        "mean_turns": turns / max(1, len(seeds)),
        "error_kinds": dict(errors),
        "malformed": str(malformed),
        **{k: counts.get(k, 0) for k in ("lost_episodes", "masked_turns", "dropped_malformed", "perturbed_turns")},
    }
    if hasattr(teacher, "usage"):
        stats["teacher_usage"] = teacher.usage()
    log.info("collect %s: %s", env_id, stats)
    return kept, stats


def _episodes(
    env_id, env_kwargs, teacher, seeds, max_turns, progress, health, workers, perturb=0.0
) -> list[Trajectory | None]:
    """The teacher's episodes in seed order (None: lost to a failed request), ``teacher.concurrency`` at once
    (a thread-safe teacher, shared) or else ``workers`` at once (a copy of the teacher per thread)."""
    shared = hasattr(teacher, "concurrency")
    workers = max(1, int(teacher.concurrency if shared else workers))
    bar = tqdm(total=len(seeds), desc=f"collect {env_id}", disable=not progress)
    local, made = threading.local(), []

    def run(seed: int) -> Trajectory | None:
        if not hasattr(local, "env"):
            local.env = gym.make(env_id, **env_kwargs)
            local.teacher = teacher if shared or workers == 1 else copy.deepcopy(teacher)
            made.append(local.env)
        try:
            return teacher_episode(local.env, local.teacher, seed, env_id, max_turns, health, perturb)
        except RequestFailed:
            return None
        finally:
            bar.update()

    try:
        if workers == 1:
            return [run(seed) for seed in seeds]
        with ThreadPoolExecutor(workers, thread_name_prefix="teacher") as pool:
            futures = [pool.submit(run, seed) for seed in seeds]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is not None:  # TeacherUnavailable: stop what has not started
                        for other in pending:
                            other.cancel()
                        raise future.exception()
            return [future.result() for future in futures]
    finally:
        bar.close()
        for env in made:
            env.close()


def bench(env_id: str, teacher: Any, episodes: int, workers: list[int], rounds: int = 2, max_turns: int = 8):
    """Wall seconds to collect ``episodes`` teacher episodes at each worker count, the counts alternating for
    ``rounds`` rounds (best of each, so a busy moment hurts every count alike)."""
    import time

    seconds: dict[int, float] = {}
    for _ in range(rounds):
        for n in workers:
            start = time.perf_counter()
            collect(env_id, {}, teacher, list(range(episodes)), max_turns, "all", False, workers=n)
            seconds[n] = min(seconds.get(n, float("inf")), time.perf_counter() - start)
    return seconds


if __name__ == "__main__":  # python -m rl_agents.collect Code-v0 envs.code.CodeTeacher --episodes 300 --workers 1 4
    import argparse

    from hydra.utils import get_class

    import envs  # noqa: F401  (registers the environments)

    parser = argparse.ArgumentParser(description="Time a scripted teacher's collection at several collect.workers.")
    parser.add_argument("env_id")
    parser.add_argument("teacher", help="the teacher's class, e.g. envs.code.CodeTeacher")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    times = bench(args.env_id, get_class(args.teacher)(), args.episodes, args.workers)
    for n, s in times.items():
        print(f"workers={n}: {s:.1f} s for {args.episodes} episodes, {times[args.workers[0]] / s:.2f}x")
