"""The pipeline from Python, for those who do not want YAML: ``rl_agents.compile_agent``.

It composes the same config as ``python -m rl_agents.train`` (``conf/train.yaml``, the same schema and checks),
with the environment and its teacher given as Python objects, and runs the same stages into one run dir::

    from rl_agents import compile_agent
    from my_pkg.prices import PriceTeacher

    result = compile_agent("my_pkg.prices:Price-v0", PriceTeacher, budget="smoke", bc={"max_steps": 50})
    result.run_dir, result.eval["policies"]["bc"]["success_rate"], result.policy
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class Compiled:
    """What ``compile_agent`` made."""

    run_dir: Path
    eval: dict[str, Any]
    """eval.json's content (empty when the stages did not include eval)"""

    @property
    def policy(self) -> Path:
        """The last trained policy's dir (rl, else dagger, else bc)."""
        from rl_agents.export import STAGES

        for stage in STAGES:
            if (self.run_dir / stage / "policy").is_dir():
                return self.run_dir / stage / "policy"
        raise FileNotFoundError(f"{self.run_dir} holds no trained policy")


def compile_agent(
    env: str | Mapping[str, Any],
    teacher: type | str | None = None,
    *,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    **config: Any,
) -> Compiled:
    """Collect, clone (and, with ``stages``, run DAgger and RL), evaluate; returns the run dir and eval.json.

    - ``env``: a Gymnasium id (registered, or ``"my_pkg.module:MyEnv-v0"``, whose module registers it), or
      several as ``{id: {"teacher": ..., "kwargs": {...}, "weight": 1.0}}``, or an option of ``conf/env``
      (``"sql"``, ``"mix"``: the package's environments with their teachers).
    - ``teacher``: the scripted teacher of a single ``env`` id: its class or import path (called as
      ``teacher(**arguments)``, like ``env.envs.<id>.teacher._target_``). Not needed with ``teacher="openai"``
      among the config values, nor for an option of ``conf/env``.
    - ``run_dir``: default ``outputs/<date>/<time>``, as the command line's.
    - ``**config``: the command line's overrides as values: a group's option (``budget="smoke"``,
      ``model="hf"``) or keys, nested (``bc={"max_steps": 50}``, ``stages=["collect", "bc", "eval"]``);
      ``overrides`` takes Hydra override strings as written on the command line (``"++env.envs.X.kwargs.k=1"``).

    A wrong key, type or environment raises ``rl_agents.config.ConfigError`` before any work.
    """
    from rl_agents.config import ConfigError
    from rl_agents.train import run

    entries = None
    args = [*_overrides(config), *overrides]
    if isinstance(env, str) and ":" not in env and "-v" not in env:
        args.append(f"env={env}")  # an option of conf/env
        if teacher is not None:
            raise ConfigError(f"env={env!r} is a conf/env option with its own teachers: give no teacher")
    elif isinstance(env, str):
        if teacher is None and config.get("teacher") is None:
            raise ConfigError(f"env {env!r}: give its teacher (a class or import path), or teacher='openai'")
        entries = {env: {"teacher": _target(teacher)} if teacher is not None else {}}
    else:
        entries = {env_id: {**entry, "teacher": _target(entry["teacher"])} if entry.get("teacher") else dict(entry)
                   for env_id, entry in env.items()}  # fmt: skip
    with initialize_config_module("rl_agents.conf", version_base="1.3"):
        cfg = compose("train", args)
    if entries is not None:
        name = next(iter(entries)).rpartition(":")[2].split("-v")[0].lower() if len(entries) == 1 else "custom"
        with open_dict(cfg):
            cfg.env.envs = OmegaConf.create(entries)
            if not any(arg.lstrip("+").startswith("env.name=") for arg in args):
                cfg.env.name = name
    run_dir = Path(run_dir or Path("outputs") / datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    package = logging.getLogger("rl_agents")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        result = run(cfg, run_dir)
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()
    return Compiled(run_dir, result)


def _target(teacher: Any) -> dict[str, Any]:
    if isinstance(teacher, Mapping):
        return dict(teacher)
    if isinstance(teacher, str):
        return {"_target_": teacher}
    return {"_target_": f"{teacher.__module__}.{teacher.__qualname__}"}


def _overrides(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Values as Hydra overrides: nested mappings become dotted keys (``bc={"max_steps": 5}`` -> ``bc.max_steps=5``)."""
    args = []
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            args += _overrides(value, f"{prefix}{key}.")
        else:
            args.append(f"{prefix}{key}={_value(value)}")
    return args


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, str) and any(c in value for c in " ,:[]{}=\"'()"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)
