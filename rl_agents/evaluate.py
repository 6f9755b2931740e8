"""Evaluation on held-out tasks: the eval stage, and ``python -m rl_agents.evaluate checkpoint=DIR``.

Policies run greedy episodes (or sampled ones, with ``eval.temperature``) on the same *test* tasks of every
environment (``eval.split=val`` for validation tasks, the ones to tune on): the environments draw from the
evaluation seeds until a task lands in the split, and training only ever sees train tasks. Before any
policy runs, the evaluated tasks are checked against the run's training tasks (its trajectories, and
those of the run a policy came from): a run that would evaluate a task it trained on is refused.
``eval.json`` in the run dir maps each policy to its metrics::

    {"env": ..., "split": "test", "seeds": {...}, "decoding": "greedy", "policies": {"teacher": {...}, ...}}

Each policy's ``seen_in_training`` is the number of its evaluated tasks among the training tasks (0).
A later stage adds its policy (``rl``) to the same map: ``write_eval`` merges into an existing file.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gymnasium as gym
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, ValidationError

from rl_agents import distributed, tracking
from rl_agents.collect import teacher_episode
from rl_agents.config import ConfigError, EnvConfig, env_entries
from rl_agents.model import load_policy
from rl_agents.rundir import RunDirError, RunLock, digest, write_text
from rl_agents.runtime import Runtime, RuntimeConfig
from rl_agents.teachers import make_teacher
from rl_agents.trajectory import Trajectory, read_jsonl, write_jsonl
from rl_agents.validate import validate_evaluate

log = logging.getLogger(__name__)


def eval_seeds(cfg: DictConfig) -> list[int]:
    start = cfg.env.eval_seed_start
    return list(range(start, start + cfg.eval.episodes))


def eval_kwargs(cfg: DictConfig, env_id: str) -> dict[str, Any]:
    """The environment's keyword arguments for evaluation: its config's, on the evaluated split."""
    return {**env_entries(cfg)[env_id].kwargs, "split": cfg.eval.split}


class SeenTaskError(RuntimeError):
    """Evaluated tasks that a training stage saw."""


def _run_training_files(run_dir: Path) -> list[Path]:
    """A run's training trajectories: the teacher's, and every DAgger round's labelled samples."""
    return [run_dir / "trajectories" / "train.jsonl", *sorted(run_dir.glob("dagger/round-*/samples.jsonl"))]


def checkpoint_run(policy: str | Path) -> Path:
    """The run dir a policy was saved in: ``<run>/<stage>/policy``, or ``<run>/dagger/round-<i>/policy`` for a
    DAgger round's policy. Outside a run, the dir two levels up (which then holds no ``config.yaml``)."""
    path = Path(policy).resolve()
    if path.parent.parent.name == "dagger" and (path.parent.parent.parent / "config.yaml").is_file():
        return path.parent.parent.parent
    return path.parent.parent


def training_trajectory_files(cfg: DictConfig, run_dir: Path | None) -> list[Path]:
    """The trajectories the evaluated policies were trained on: this run's (the teacher's and DAgger's),
    ``trajectories=PATH``, and those of the runs that ``rl.init_from``, ``rl.ref_from`` or ``checkpoint`` come
    from."""
    candidates = []
    if run_dir is not None:
        candidates += _run_training_files(run_dir)
    if cfg.get("trajectories"):
        candidates.append(Path(cfg.trajectories))
    policies = [cfg.rl.get("init_from"), cfg.rl.get("ref_from")] if "rl" in cfg else []
    for policy in [*policies, cfg.get("checkpoint")]:
        if policy:
            candidates += _run_training_files(checkpoint_run(policy))
    seen, files = set(), []
    for path in candidates:
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            files.append(path)
    return files


def training_task_keys(files: list[Path]) -> tuple[set[tuple[str, str]], int]:
    """The (env id, task key) pairs of the training trajectories in ``files``, and how many had no key."""
    keys, unknown = set(), 0
    for path in files:
        for trajectory in read_jsonl(path):
            key = trajectory.metadata.get("task_key")
            if key is None:
                unknown += 1
            else:
                keys.add((trajectory.metadata.get("env_id"), key))
    return keys, unknown


def eval_task_keys(cfg: DictConfig) -> dict[str, list[str]]:
    """The task key of every evaluation episode (env id -> keys in the seeds' order), from resets alone."""
    keys = {}
    for env_id in env_entries(cfg):
        env = gym.make(env_id, **eval_kwargs(cfg, env_id))
        try:
            keys[env_id] = [env.reset(seed=seed)[1].get("task_key") for seed in eval_seeds(cfg)]
        finally:
            env.close()
    return keys


def check_held_out(cfg: DictConfig, run_dir: Path | None) -> set[tuple[str, str]]:
    """Refuse an evaluation whose tasks a training stage saw; returns the training tasks' keys.

    RL episodes are drawn from the train split only (``rl.sample_episodes`` refuses any other), and the
    split is a function of the task key, so the teacher trajectories are what can overlap: data collected
    before task splits, or a ``trajectories=PATH`` file from elsewhere.
    """
    files = training_trajectory_files(cfg, run_dir)
    train_keys, unknown = training_task_keys(files)
    if cfg.eval.split == "train":  # the generalisation gap: the training distribution, on purpose
        return train_keys
    if unknown:
        raise SeenTaskError(
            f"{unknown} training trajectories in {', '.join(map(str, files))} have no task key (written before "
            "task splits): which tasks they hold is unknown, so no evaluation can be called held-out; collect "
            "them again"
        )
    evaluated = eval_task_keys(cfg)
    seen = sum((env_id, key) in train_keys for env_id, keys in evaluated.items() for key in keys)
    if seen:
        raise SeenTaskError(
            f"{seen} of the {sum(map(len, evaluated.values()))} evaluated {cfg.eval.split} tasks are among the "
            f"training tasks of {', '.join(map(str, files))}; evaluate on tasks no training stage saw"
        )
    return train_keys


def summarize(trajectories: list[Trajectory], wall_s: float, generated_tokens: int | None) -> dict[str, Any]:
    """The metrics of a set of episodes."""
    n = max(1, len(trajectories))
    turns = [t for tr in trajectories for t in tr.turns]
    latencies = [t.latency_ms for t in turns if t.latency_ms is not None]
    errors = Counter(t.error for t in turns if t.error)
    truncations = Counter(tr.metadata.get("truncation") for tr in trajectories if tr.metadata.get("truncation"))
    return {
        "success_rate": sum(tr.success for tr in trajectories) / n,
        "mean_reward": sum(tr.reward for tr in trajectories) / n,
        "mean_turns": len(turns) / n,
        "tool_error_rate": sum(errors.values()) / max(1, len(turns)),
        "step_latency_ms": statistics.median(latencies) if latencies else None,
        "tokens_per_s": (generated_tokens / wall_s) if generated_tokens and wall_s > 0 else None,
        "episodes": len(trajectories),
        "error_kinds": dict(errors),
        "truncations": dict(truncations),
    }


def run_teacher(cfg: DictConfig, env_id: str, seeds: list[int]) -> tuple[list[Trajectory], float]:
    teacher = make_teacher(cfg, env_id)
    env = gym.make(env_id, **eval_kwargs(cfg, env_id))
    start = time.perf_counter()
    trajectories = []
    try:
        for seed in seeds:
            step_start = time.perf_counter()
            trajectory = teacher_episode(env, teacher, seed, env_id, cfg.runtime.max_turns)
            per_turn = 1000.0 * (time.perf_counter() - step_start) / max(1, len(trajectory.turns))
            for turn in trajectory.turns:
                turn.latency_ms = per_turn
            trajectories.append(trajectory)
    finally:
        env.close()
    return trajectories, time.perf_counter() - start


def evaluate_policy(
    cfg: DictConfig,
    name: str,
    out_dir: Path,
    model=None,
    tokenizer=None,
    train_keys: set[tuple[str, str]] | None = None,
) -> tuple[dict[str, Any], list[Trajectory]]:
    """Run one policy (``teacher``, or a model) on the held-out tasks of every env; returns metrics.

    With ``train_keys`` (``check_held_out``'s), the metrics count the evaluated tasks among them
    (``seen_in_training``: 0, or the run is refused before evaluation)."""
    seeds = eval_seeds(cfg)
    per_env, everything, wall, tokens = {}, [], 0.0, 0
    for env_id in env_entries(cfg):
        if model is None:
            trajectories, seconds = run_teacher(cfg, env_id, seeds)
            generated = None
        else:
            runtime_cfg = RuntimeConfig(**OmegaConf.to_container(cfg.runtime))
            runtime_cfg.greedy = cfg.eval.get("temperature") is None
            if not runtime_cfg.greedy:
                runtime_cfg.temperature = cfg.eval.temperature
            runtime = Runtime(model, tokenizer, runtime_cfg, seed=cfg.seed)
            trajectories = runtime.run(env_id, seeds, eval_kwargs(cfg, env_id), policy=name)
            seconds, generated = runtime.stats["wall_s"], runtime.stats["generated_tokens"]
            tokens += generated
        wall += seconds
        per_env[env_id] = summarize(trajectories, seconds, generated)
        everything += trajectories
        log.info("eval %s on %s: success %.3f", name, env_id, per_env[env_id]["success_rate"])
    write_jsonl(out_dir / f"episodes_{name}.jsonl", everything)
    metrics = summarize(everything, wall, tokens if model is not None else None)
    keys = [(t.metadata["env_id"], t.metadata.get("task_key")) for t in everything]
    if train_keys is not None:
        metrics["seen_in_training"] = sum(key in train_keys for key in keys)
    metrics["distinct_tasks"] = len(set(keys))
    if len(per_env) > 1:
        metrics["per_env"] = per_env
    return metrics, everything


def decoding(cfg: DictConfig) -> str:
    """How the model policies chose their tokens: ``greedy``, or ``sampled, temperature T``."""
    temperature = cfg.eval.get("temperature")
    return "greedy" if temperature is None else f"sampled, temperature {temperature:g}"


def write_eval(path: Path, cfg: DictConfig, policies: dict[str, dict], sources: dict[str, Path] | None = None) -> dict:
    """Merge ``policies`` into ``eval.json`` (created if absent; same env, seeds, split and decoding required).

    ``sources`` names the policy directory each result came from: its digest is recorded, and an older entry
    whose policy has changed since (re-trained, removed) is dropped rather than shown beside new results."""
    seeds = {"start": cfg.env.eval_seed_start, "count": cfg.eval.episodes}
    data = {
        "env": cfg.env.name,
        "env_ids": list(cfg.env.envs),
        "split": cfg.eval.split,
        "seeds": seeds,
        "decoding": decoding(cfg),
        "policies": {},
    }
    for name, source in (sources or {}).items():
        policies[name]["policy_digest"] = digest(source)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON: its old entries are dropped", path)
            old = {}
        old.setdefault("decoding", "greedy")  # files written before sampled evaluation existed
        if all(old.get(key) == data[key] for key in ("env", "seeds", "env_ids", "split", "decoding")):
            parent = path.parent
            for name, entry in old.get("policies", {}).items():
                recorded = entry.get("policy_digest")
                if recorded is not None and recorded != digest(parent / name / "policy"):
                    log.warning(
                        "eval.json: dropping the %s entry: %s/policy changed since it was evaluated", name, name
                    )
                    continue
                data["policies"][name] = entry
    data["policies"].update(policies)
    write_text(path, json.dumps(data, indent=2))
    return data


# --- python -m rl_agents.evaluate ------------------------------------------------------------------
def settings_from_run(cfg: DictConfig, overrides: list[str]) -> Path | None:
    """Evaluate what was trained: a checkpoint inside a run (``<run>/<stage>/policy``, a DAgger round's
    ``<run>/dagger/round-<i>/policy``) takes its run's environments (``env``) and runtime settings
    (``runtime``) unless the command line names another env group (``env=...``); an ``env.*`` or
    ``runtime.*`` key overrides that key only, on top of the run's settings. Returns the run's config file,
    or None for a policy dir outside a run (the command line's settings then apply); logs which it used."""
    source = checkpoint_run(cfg.checkpoint) / "config.yaml"
    if not source.is_file():
        log.info("evaluate: %s is not inside a run: env and runtime from the command line", cfg.checkpoint)
        return None
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    run = OmegaConf.load(source)
    taken = []
    try:
        with open_dict(cfg):
            if "env" not in run or "env" in keys:
                log.info("evaluate: env from the command line (%s)", ", ".join(cfg.env.envs))
            else:
                mine = {k: OmegaConf.select(cfg, k) for k in sorted(keys) if k.startswith("env.")}
                cfg.env = OmegaConf.merge(OmegaConf.structured(EnvConfig), run.env)
                for key, value in mine.items():
                    env_id = key.split(".")[2] if key.startswith("env.envs.") else None
                    if env_id is not None and env_id not in cfg.env.envs:
                        raise ConfigError(f"{key}: the checkpoint's run trains on {', '.join(cfg.env.envs)}, not "
                                          f"{env_id}; name the env group (env=...) to evaluate on another")  # fmt: skip
                    OmegaConf.update(cfg, key, value, force_add=True)
                taken.append("env" + (f" (but {', '.join(mine)} from the command line)" if mine else ""))
            if "runtime" in run:
                mine = {k.split(".", 1)[1]: OmegaConf.select(cfg, k) for k in keys if k.startswith("runtime.")}
                cfg.runtime = OmegaConf.merge(OmegaConf.structured(RuntimeConfig), run.runtime, mine)
                taken.append("runtime" + (f" (but {', '.join(sorted(mine))} from the command line)" if mine else ""))
    except (ValidationError, ConfigKeyError) as err:
        raise ConfigError(f"{source}: its env or runtime settings do not fit this version's schema: {err}") from None
    if taken:
        log.info("evaluate: %s from the checkpoint's run %s (envs: %s)", " and ".join(taken), source,
                 ", ".join(cfg.env.envs))  # fmt: skip
    return source


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        settings_from_run(cfg, HydraConfig.get().overrides.task)
        validate_evaluate(cfg)
        distributed.process_settings(cfg.threads, cfg.progress)
        with RunLock(run_dir):
            _evaluate(cfg, run_dir)
    except (ConfigError, RunDirError, SeenTaskError) as err:
        log.error("%s", err)  # one message, no traceback
        sys.exit(2)


def _evaluate(cfg: DictConfig, run_dir: Path) -> None:
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    train_keys = check_held_out(cfg, None)
    tracker = tracking.start(cfg, run_dir, job="evaluate")
    results = {}
    model, tokenizer = load_policy(cfg.checkpoint, cfg.model.dtype, local_files_only=True)
    for name in cfg.eval.policies:
        if name == "teacher":
            metrics, episodes = evaluate_policy(cfg, name, run_dir, train_keys=train_keys)
        else:
            name = cfg.name
            metrics, episodes = evaluate_policy(cfg, name, run_dir, model, tokenizer, train_keys)
        results[name] = metrics
        tracker.log_eval(name, metrics, episodes)
    data = write_eval(run_dir / "eval.json", cfg, results)
    tracker.finish()
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
