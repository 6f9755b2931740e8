"""The pipeline's entry point: ``python -m rl_agents.train`` (or ``rl-agents-train``) with Hydra overrides.

Stages run in the order of ``stages`` (collect -> bc -> rl -> eval), handing off through files in the run dir::

    <run_dir>/config.yaml                    the resolved config
    <run_dir>/trajectories/train.jsonl       teacher trajectories (train seeds)  + collect_stats.json
    <run_dir>/model/init                     the initial policy (tiny model and its tokenizer)
    <run_dir>/bc/checkpoints, bc/policy      BC checkpoints and the BC policy
    <run_dir>/rl/checkpoints, rl/policy      RL checkpoints, the RL policy, rl/metrics.jsonl (the reward curve)
    <run_dir>/eval.json, eval/               held-out metrics and every evaluation episode
    <run_dir>/wandb                          the W&B run (offline unless a key is set)

``resume=true hydra.run.dir=<run_dir>`` continues an interrupted run: finished stages are reused and BC
and RL restart from their last checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from rl_agents import distributed, rundir, tracking
from rl_agents.agent import card_policy
from rl_agents.bc import BCConfig, train_bc
from rl_agents.collect import Health, collect
from rl_agents.config import TINY_MODEL, ConfigError, TrainConfig, env_entries
from rl_agents.dagger import train_dagger
from rl_agents.evaluate import SeenTaskError, check_held_out, evaluate_policy, write_eval
from rl_agents.grpo import train_grpo
from rl_agents.model import load_policy, lora_config
from rl_agents.ppo import train_ppo
from rl_agents.rl import policy_dirs
from rl_agents.teachers import ResponseCache, TeacherUnavailable, make_teacher
from rl_agents.trajectory import SPECIAL_TOKENS, Trajectory, read_jsonl, write_jsonl
from rl_agents.validate import validate_train

log = logging.getLogger(__name__)


def stage_collect(cfg: DictConfig, run_dir: Path, tracker: tracking.Tracker) -> list[Trajectory]:
    path = run_dir / "trajectories" / "train.jsonl"
    if _resume_or_start(cfg, run_dir, "collect", {}, {"trajectories": path}, []):
        log.info("collect: reusing %s", path)
        return read_jsonl(path)
    entries = env_entries(cfg)
    total = sum(entry.weight for entry in entries.values())
    trajectories, stats = [], {}
    for env_id, entry in entries.items():
        n = max(1, round(cfg.collect.episodes * entry.weight / total))
        seeds = list(range(cfg.env.train_seed_start, cfg.env.train_seed_start + n))
        teacher = make_teacher(cfg, env_id)
        health = None
        if getattr(teacher, "checks_health", False):  # an LLM teacher: its replies cached, its rates watched
            teacher.cache = ResponseCache(path.parent / "teacher_cache.jsonl")
            t = cfg.teacher
            health = Health(t.max_failure_rate, t.max_malformed_rate, t.health_check_after)
        try:
            kept, stats[env_id] = collect(env_id, entry.kwargs, teacher, seeds, cfg.runtime.max_turns,
                                          cfg.collect.keep, cfg.progress, cfg.collect.malformed, health,
                                          cfg.collect.workers, cfg.collect.perturb)  # fmt: skip
        except TeacherUnavailable as err:
            raise TeacherUnavailable(
                f"collect {env_id} stopped: {err}. Every reply received is cached in {path.parent}/teacher_cache.jsonl:"
                f" once fixed, `resume=true hydra.run.dir={run_dir}` continues without paying for them again"
            ) from None
        trajectories += kept
    write_jsonl(path, trajectories)
    rundir.write_text(path.parent / "collect_stats.json", json.dumps(stats, indent=2))
    rundir.finish_stage(run_dir, "collect", {"trajectories": path}, episodes=len(trajectories))
    tracker.log(stats, "collect")
    return trajectories


def initial_policy(cfg: DictConfig, run_dir: Path, trajectories: list[Trajectory]):
    """The policy BC starts from: the model group's builder (``model._target_``), e.g. the tiny model with a
    tokenizer trained on the run's data (``rl_agents.model.tiny_policy``) or a pretrained one."""
    return get_method(cfg.model._target_)(cfg, run_dir, trajectories)


def _resume_or_start(
    cfg: DictConfig, run_dir: Path, stage: str, inputs: dict, outputs: dict, partial: list[Path]
) -> bool:
    """True if ``stage`` is finished and valid (reuse it); else the main process records its start, after
    discarding its partial state (``partial``: checkpoints, histories) when that came from other inputs.
    (Changed settings were refused before any stage ran: ``run``.)"""
    inputs = rundir.digests(inputs)
    if cfg.resume:
        if rundir.finished(run_dir, stage, inputs, outputs):
            return True
        if rundir.inputs_changed(run_dir, stage, inputs) and distributed.is_main():
            log.warning("%s: its inputs changed since it started: discarding %s", stage, [str(p) for p in partial])
            for path in partial:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if distributed.is_main():
        rundir.start_stage(run_dir, stage, cfg, inputs)
    return False


def stage_bc(
    cfg: DictConfig, run_dir: Path, data: Path, trajectories: list[Trajectory], tracker: tracking.Tracker
) -> Path:
    policy_dir = run_dir / "bc" / "policy"
    inputs, outputs = {"trajectories": data}, {"policy": policy_dir}
    partial = [run_dir / "bc" / "checkpoints", run_dir / "model" / "init"]
    reuse = _resume_or_start(cfg, run_dir, "bc", inputs, outputs, partial)
    distributed.barrier()
    if reuse:
        log.info("bc: reusing the finished policy %s", policy_dir)
        return policy_dir
    if distributed.is_main():
        initial_policy(cfg, run_dir, trajectories)  # builds and saves the tiny model once
    distributed.barrier()
    model, tokenizer = initial_policy(cfg, run_dir, trajectories)
    peft = None
    if cfg.peft.enabled:
        # a pretrained vocabulary gained the format's tokens at load: their embeddings train fully (the tiny
        # model's tokenizer was built with them)
        new_ids = (
            [] if cfg.model._target_ == TINY_MODEL else [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
        )
        p = cfg.peft
        peft = lora_config(p.r, p.alpha, p.dropout, p.target_modules, new_ids)
    bc_config = BCConfig(**OmegaConf.to_container(cfg.bc))
    policy = train_bc(
        trajectories, model, tokenizer, run_dir / "bc", bc_config, cfg.seed, cfg.resume, peft, tracker.report_to
    )
    if distributed.is_main():
        card_policy(cfg, "bc", policy, data)
        rundir.finish_stage(run_dir, "bc", outputs, episodes=len(trajectories), steps=cfg.bc.max_steps)
    distributed.barrier()
    return policy


def stage_rl(cfg: DictConfig, run_dir: Path, tracker: tracking.Tracker) -> Path:
    policy_dir = run_dir / "rl" / "policy"
    init, ref = policy_dirs(cfg, run_dir)
    inputs, outputs = {"init": init, "reference": ref}, {"policy": policy_dir}
    partial = [run_dir / "rl" / name for name in ("checkpoints", "metrics.jsonl", "rollouts")]
    reuse = _resume_or_start(cfg, run_dir, "rl", inputs, outputs, partial)
    distributed.barrier()
    if reuse:
        log.info("rl: reusing the finished policy %s", policy_dir)
        return policy_dir
    log.info("rl: %s from %s, KL reference %s (beta %s)", cfg.algo.name, init, ref, cfg.algo.beta)
    train = train_grpo if cfg.algo.name == "grpo" else train_ppo
    policy = train(cfg, init, ref, run_dir / "rl", tracker)
    if distributed.is_main():
        card_policy(cfg, "rl", policy)
        rundir.finish_stage(run_dir, "rl", outputs, steps=cfg.rl.steps)
    distributed.barrier()
    return policy


def stage_dagger(
    cfg: DictConfig, run_dir: Path, data: Path, trajectories: list[Trajectory], tracker: tracking.Tracker
) -> Path:
    policy_dir = run_dir / "dagger" / "policy"
    init = run_dir / "bc" / "policy"
    inputs, outputs = {"trajectories": data, "bc_policy": init}, {"policy": policy_dir}
    if _resume_or_start(cfg, run_dir, "dagger", inputs, outputs, [run_dir / "dagger"]):
        log.info("dagger: reusing the finished policy %s", policy_dir)
        return policy_dir
    policy = train_dagger(cfg, run_dir, trajectories, init, tracker.report_to, tracker)
    card_policy(cfg, "dagger", policy, data)
    rundir.finish_stage(run_dir, "dagger", outputs, rounds=cfg.dagger.rounds)
    return policy


def stage_eval(cfg: DictConfig, run_dir: Path, tracker: tracking.Tracker) -> dict[str, Any]:
    train_keys = check_held_out(cfg, run_dir)
    results = {}
    for name in cfg.eval.policies:
        if name == "teacher":
            metrics, episodes = evaluate_policy(cfg, "teacher", run_dir / "eval", train_keys=train_keys)
        else:
            model, tokenizer = load_policy(run_dir / name / "policy", cfg.model.dtype, local_files_only=True)
            metrics, episodes = evaluate_policy(cfg, name, run_dir / "eval", model, tokenizer, train_keys)
        results[name] = metrics
        tracker.log_eval(name, metrics, episodes)
    sources = {name: run_dir / name / "policy" for name in results if name != "teacher"}
    return write_eval(run_dir / "eval.json", cfg, results, sources)


def run(cfg: DictConfig, run_dir: Path, parallel_jobs: int = 1) -> dict[str, Any]:
    """Run the configured stages in ``run_dir``; returns eval.json's content (empty without eval).

    Under a distributed launch only the main process collects, evaluates and writes (``rl_agents.distributed``).
    ``parallel_jobs``: the jobs a sweep's launcher runs at once on this machine (they share its CPUs).
    """
    validate_train(cfg, run_dir)
    distributed.process_settings(cfg.threads, cfg.progress, parallel_jobs)
    main = distributed.is_main()
    with rundir.RunLock(run_dir) if main else contextlib.nullcontext():
        if main:
            rundir.prepare(run_dir, cfg.resume, cfg.overwrite)
            if cfg.resume:  # every recorded stage, run now or not: config.yaml must stay true of the whole dir
                schema = OmegaConf.structured(TrainConfig)
                for stage in rundir.STAGE_KEYS:
                    rundir.check_stage(run_dir, stage, cfg, schema)
            rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        distributed.barrier()
        return _run_stages(cfg, run_dir, main)


def _run_stages(cfg: DictConfig, run_dir: Path, main: bool) -> dict[str, Any]:
    tracker = tracking.start(cfg, run_dir, job="train") if main else tracking.Tracker()
    try:
        name = cfg.env.name
        trajectories = None
        if "collect" in cfg.stages:
            trajectories = stage_collect(cfg, run_dir, tracker) if main else None
            distributed.barrier()
        if "bc" in cfg.stages:
            data = Path(cfg.trajectories) if cfg.trajectories else run_dir / "trajectories" / "train.jsonl"
            if trajectories is None:
                trajectories = read_jsonl(data)
            stats = data.parent / "collect_stats.json"
            tracker.log_artifact("trajectories", f"trajectories-{name}", "dataset", [data, stats],
                                 {"episodes": len(trajectories)})  # fmt: skip
            policy = stage_bc(cfg, run_dir, data, trajectories, tracker)
            tracker.log_artifact("bc", f"bc-policy-{name}", "model", [policy], {"max_steps": cfg.bc.max_steps},
                                 derived_from=["trajectories"])  # fmt: skip
        if "dagger" in cfg.stages:
            data = Path(cfg.trajectories) if cfg.trajectories else run_dir / "trajectories" / "train.jsonl"
            trajectories = trajectories if trajectories is not None else read_jsonl(data)
            policy = stage_dagger(cfg, run_dir, data, trajectories, tracker)
            tracker.log_artifact("dagger", f"dagger-policy-{name}", "model", [policy], {"rounds": cfg.dagger.rounds},
                                 derived_from=["bc"])  # fmt: skip
        if "rl" in cfg.stages:
            policy = stage_rl(cfg, run_dir, tracker)
            tracker.log_artifact("rl", f"rl-policy-{name}", "model", [policy],
                                 {"algo": cfg.algo.name, "steps": cfg.rl.steps}, derived_from=["bc"])  # fmt: skip
        if "eval" not in cfg.stages or not main:
            return {}
        result = stage_eval(cfg, run_dir, tracker)
        files = [run_dir / "eval.json", *sorted((run_dir / "eval").glob("episodes_*.jsonl"))]
        success = {p: m["success_rate"] for p, m in result["policies"].items()}
        tracker.log_artifact("eval", f"evaluation-{name}", "evaluation", files, {"success_rate": success},
                             derived_from=[p for p in cfg.eval.policies if p != "teacher"])  # fmt: skip
        return result
    finally:
        tracker.finish()
        distributed.barrier()


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The job's objective for Hydra sweepers (Optuna): success of the last policy in eval.policies on the
    evaluated tasks, which for a search must be validation tasks (``eval.split=val``)."""
    hydra_cfg = HydraConfig.get()
    try:
        if "optuna" in str(hydra_cfg.sweeper.get("_target_", "")).lower() and cfg.eval.split != "val":
            raise ConfigError(
                f"a hyper-parameter search chooses on validation tasks: eval.split={cfg.eval.split} must be val "
                "(report the chosen configuration on test tasks afterwards)"
            )
        parallel = hydra_cfg.launcher.get("n_jobs", 1) if hydra_cfg.mode == RunMode.MULTIRUN else 1
        result = run(cfg, Path(hydra_cfg.runtime.output_dir), max(1, parallel))
    except (ConfigError, rundir.RunDirError, rundir.DiskFullError, SeenTaskError, TeacherUnavailable) as err:
        log.error("%s", err)  # one message, no traceback: the key, the dir or the disk to fix
        sys.exit(2)
    policies = result.get("policies", {})
    for name, metrics in policies.items():
        log.info("%s: success %.3f on %d episodes of %s tasks", name, metrics["success_rate"], metrics["episodes"],
                 result["split"])  # fmt: skip
    last = next((name for name in reversed(list(cfg.eval.policies)) if name in policies), None)
    return float(policies[last]["success_rate"]) if last else None


if __name__ == "__main__":
    main()
