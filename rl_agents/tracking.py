"""Weights & Biases through the real ``wandb`` library, offline unless the user has a key.

``logger.mode=auto`` (the default) runs online when ``WANDB_API_KEY`` is set and offline otherwise; an
offline run lands in ``<run_dir>/wandb`` and ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it
later. ``logger=none`` turns logging off. The Trainer's W&B callback reuses the run started here, so
losses, collect statistics, evaluation metrics and episode tables all land in one run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from rl_agents.trajectory import Trajectory

log = logging.getLogger(__name__)


def _flat(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def transcript(trajectory: Trajectory) -> str:
    lines = [f"TASK: {trajectory.task}"]
    for turn in trajectory.turns:
        lines += [f"AGENT: {turn.agent}", f"OBS: {turn.observation}"]
    return "\n".join(lines)


class Tracker:
    """A thin handle on the W&B run (or nothing, with ``logger=none``)."""

    def __init__(self, run=None, table_episodes: int = 8, artifacts: bool = False):
        self.run = run
        self.table_episodes = table_episodes
        self.artifacts = artifacts
        self.logged: dict[str, str] = {}  # artifact kind -> "name:digest" of this run's artifacts

    @property
    def report_to(self) -> str:
        """What to pass as the Trainer's ``report_to``."""
        return "wandb" if self.run is not None else "none"

    def log(self, metrics: dict[str, Any], prefix: str) -> None:
        if self.run is not None:
            self.run.log(_flat(prefix, metrics))

    def log_eval(self, policy: str, metrics: dict[str, Any], episodes: list[Trajectory]) -> None:
        if self.run is None:
            return
        self.log(metrics, f"eval/{policy}")
        for key, value in _flat("eval", {policy: metrics}).items():
            self.run.summary[key] = value
        self.log_episodes(policy, episodes)

    def log_episodes(self, policy: str, episodes: list[Trajectory]) -> None:
        """A W&B table of the first ``table_episodes`` episodes, under ``episodes/<policy>``."""
        if self.run is None:
            return
        import wandb

        table = wandb.Table(columns=["policy", "env", "seed", "success", "reward", "turns", "truncation", "transcript"])
        for trajectory in episodes[: self.table_episodes]:
            meta = trajectory.metadata
            table.add_data(
                policy, meta.get("env_id"), meta.get("seed"), trajectory.success, trajectory.reward,
                len(trajectory.turns), meta.get("truncation"), transcript(trajectory),
            )  # fmt: skip
        self.run.log({f"episodes/{policy}": table})

    def log_artifact(
        self,
        kind: str,
        name: str,
        artifact_type: str,
        paths: list[Path],
        metadata: dict[str, Any] | None = None,
        derived_from: list[str] = (),
    ) -> None:
        """Log files or directories as a W&B artifact; ``derived_from`` names the kinds it was made from.

        The lineage (trajectories -> bc policy -> rl policy -> evaluation) is recorded in each artifact's
        metadata (``derived_from``: the parents' names and content digests): W&B's own input edges
        (``run.use_artifact``) cannot be written by an offline run, and one run produces all of them.
        """
        if self.run is None or not self.artifacts:
            return
        import wandb

        parents = [self.logged[k] for k in derived_from if k in self.logged]
        artifact = wandb.Artifact(name, type=artifact_type, metadata={**(metadata or {}), "derived_from": parents})
        for path in paths:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            elif path.is_file():
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)
        self.logged[kind] = f"{name}:{artifact.digest}"

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class LogToPython(TrainerCallback):
    """Trainer logs (loss, learning rate, ...) into the run's log file and, given a path, a JSONL history."""

    def __init__(self, stage: str = "bc", history: Path | None = None):
        self.stage, self.history = stage, history

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # one log under a distributed launch
            return
        logs = {k: round(v, 5) if isinstance(v, float) else v for k, v in (logs or {}).items()}
        log.info("%s step %d: %s", self.stage, state.global_step, logs)
        if self.history is not None:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            with self.history.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep's W&B group: every job of one sweep lands in the same group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "sweep-" + Path(HydraConfig.get().sweep.dir).as_posix().replace("/", "-").strip("-")


def start(cfg: DictConfig, run_dir: Path, job: str) -> Tracker:
    """Start the run's logging: the logger group's builder (``logger._target_``)."""
    return get_method(cfg.logger._target_)(cfg, run_dir, job)


def no_tracking(cfg: DictConfig, run_dir: Path, job: str) -> Tracker:
    """``logger=none``: nothing is logged beyond the run dir's own files."""
    return Tracker()


def wandb_tracking(cfg: DictConfig, run_dir: Path, job: str) -> Tracker:
    """``logger=wandb``: a Weights & Biases run in ``<run_dir>/wandb`` (offline unless ``WANDB_API_KEY`` is set)."""
    logger = cfg.logger
    import wandb

    mode = logger.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=logger.group or sweep_group(),
        tags=list(logger.tags) or None,
        job_type=job,
        name=f"{job}-{run_dir.name}",
        dir=str(run_dir),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    log.info("wandb: %s run in %s, group %s", mode, run.dir if mode != "disabled" else "(disabled)", run.group)
    return Tracker(run, logger.table_episodes, logger.get("artifacts", False))
