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
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from rl_agents import rundir
from rl_agents.agent import CARD

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


def model_card(card: dict[str, Any], stage: str) -> str:
    """A Hugging Face model card: YAML header (with model-index results), the evaluation, how to run it."""
    envs = list(card["envs"])
    tools = sorted({t["function"]["name"] for env in card["envs"].values() for t in env["tools"]})
    evaluation = card.get("eval", {})
    mine = evaluation.get("policies", {}).get(stage, {})
    results = "".join(
        f"      - task: {{type: tool-use, name: {env}}}\n"
        f"        dataset: {{type: {env}, name: {env} {evaluation.get('split')} tasks}}\n"
        f"        metrics:\n          - {{type: success_rate, value: {mine.get('success_rate')}}}\n"
        for env in envs
        if mine
    )
    header = "---\nlibrary_name: transformers\ntags: [rl_agents, agent, tool-use]\n"
    if results:
        header += f"model-index:\n  - name: {stage}-policy\n    results:\n{results}"
    header += "---\n"
    rows = (
        "".join(
            f"| {name} | {m.get('success_rate')} | {m.get('episodes')} | {m.get('mean_turns')} |\n"
            for name, m in evaluation.get("policies", {}).items()
        )
        or "| (not evaluated) | | | |\n"
    )
    return (
        f"{header}\n# A compiled agent ({stage} policy)\n\n"
        f"Compiled by rl_agents {card['provenance']['package_version']} for {', '.join(envs)} "
        f"(tools: {', '.join(tools)}). Trajectory format version {card['format_version']}.\n\n"
        f"## Evaluation ({evaluation.get('split')} tasks, {evaluation.get('decoding')} decoding)\n\n"
        "| policy | success rate | episodes | mean turns |\n| --- | --- | --- | --- |\n"
        f"{rows}\n"
        "## Run it\n\n```python\nfrom rl_agents import Agent\n"
        'agent = Agent.from_pretrained("<this directory>")\nprint(agent.run("<your task>").answer)\n```\n\n'
        "```bash\npython -m rl_agents.serve agent=<this directory>\n```\n"
    )


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        print(export(Path(cfg.run), Path(cfg.out) if cfg.out else None, cfg.policy))
    except ExportError as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
