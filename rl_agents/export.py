"""Gather a run's compiled agent into one directory to ship: ``python -m rl_agents.export run=<run dir>``.

The exported directory is the run's last policy (``rl``, else ``dagger``, else ``bc``; or ``policy=bc``) with
its agent card completed by the run's evaluation (``eval`` in ``agent.json``: split, decoding, episodes,
success and the other metrics of that policy and of the teacher) and a ``README.md`` model card in Hugging
Face's format (YAML header with ``model-index`` results; the eval table; how to run it).
"""

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from rl_agents import rundir
from rl_agents.agent import CARD, model_card

log = logging.getLogger(__name__)
STAGES = ("rl", "dagger", "bc")


@dataclass
class ExportConfig:
    run: str = MISSING
    """a run dir (outputs/<date>/<time>)"""
    policy: str | None = None
    """rl, dagger or bc; null: the last one the run trained"""
    out: str | None = None
    """null: <run>/export"""


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


class ExportError(ValueError):
    pass


def export(run: Path, out: Path | None = None, policy: str | None = None) -> Path:
    run = Path(run)
    stages = [policy] if policy else [s for s in STAGES if (run / s / "policy" / CARD).is_file()]
    if not stages or not (run / stages[0] / "policy" / CARD).is_file():
        raise ExportError(f"{run} holds no {policy or 'trained'} policy with an agent card ({CARD})")
    stage = stages[0]
    out = Path(out) if out else run / "export"
    card = json.loads((run / stage / "policy" / CARD).read_text())
    evaluated = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    policies = evaluated.get("policies", {})
    keys = ("success_rate", "episodes", "distinct_tasks", "mean_turns", "tool_error_rate", "step_latency_ms")
    card["eval"] = {
        "split": evaluated.get("split"),
        "decoding": evaluated.get("decoding"),
        "policies": {name: {k: m.get(k) for k in keys} for name, m in policies.items() if name in (stage, "teacher")},
    }
    with rundir.atomic_dir(out) as tmp:
        shutil.copytree(run / stage / "policy", tmp, dirs_exist_ok=True)
        (tmp / CARD).write_text(json.dumps(card, indent=2))
        (tmp / "README.md").write_text(model_card(card, stage))
    log.info("export: %s/policy of %s -> %s", stage, run, out)
    return out


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        print(export(Path(cfg.run), Path(cfg.out) if cfg.out else None, cfg.policy))
    except ExportError as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
