"""Summaries of a Hydra multirun sweep: ``sweep.csv``, ``sweep.md`` and ``sweep.png`` in the sweep dir.

``python -m rl_agents.train -m algo=grpo,ppo algo.beta=0.0,0.05 seed=0,1,2`` runs each job in
``<sweep dir>/<job number>``; when the sweep ends, the ``SweepSummary`` callback (registered in
``conf/train.yaml``) reads every job's ``eval.json`` and ``.hydra/overrides.yaml``, groups the jobs by their
overrides without ``seed``, and writes the mean and spread of held-out success per configuration, policy
and environment. ``python -m rl_agents.sweep SWEEP_DIR`` writes the same files for a finished (or
interrupted) sweep.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
FIELDS = ["config", "policy", "env", "runs", "mean", "std", "min", "max", "seeds"]


def _jobs(sweep_dir: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Each finished job's overrides (key -> value) and its eval.json."""
    jobs = []
    for eval_path in sorted(sweep_dir.glob("*/eval.json")):
        overrides_path = eval_path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        pairs = dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides)
        try:
            data = json.loads(eval_path.read_text())
            data["policies"]  # noqa: B018 - the one key every summary needs
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            log.warning("sweep: skipping %s: not a valid eval.json (%s: %s)", eval_path, type(err).__name__, err)
            continue
        jobs.append((pairs, data))
    return jobs


def fixed_overrides(jobs: list[tuple[dict[str, str], dict[str, Any]]]) -> dict[str, str]:
    """Overrides every job shares (they name the sweep, not a configuration in it)."""
    if len(jobs) < 2:
        return {}
    first = jobs[0][0]
    return {k: v for k, v in first.items() if k != "seed" and all(j[0].get(k) == v for j in jobs)}


def job_records(jobs: list[tuple[dict[str, str], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per (job, policy, environment): the overrides that vary (not seed), seed and success rate."""
    fixed = fixed_overrides(jobs)
    records = []
    for pairs, data in jobs:
        seed = pairs.get("seed", "0")
        varying = sorted(f"{k}={v}" for k, v in pairs.items() if k != "seed" and k not in fixed)
        config = " ".join(varying) or "(defaults)"
        for policy, metrics in data.get("policies", {}).items():
            rows = {"all": metrics, **metrics.get("per_env", {})}
            for env, m in rows.items():
                records.append(
                    {"config": config, "policy": policy, "env": env, "seed": seed, "success": m["success_rate"]}
                )
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation (over seeds), min and max of success per configuration, policy and env."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["config"], r["policy"], r["env"])].append(r)
    rows = []
    for (config, policy, env), members in groups.items():
        values = [m["success"] for m in members]
        rows.append(
            {
                "config": config,
                "policy": policy,
                "env": env,
                "runs": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "seeds": " ".join(sorted(m["seed"] for m in members)),
            }
        )
    return sorted(rows, key=lambda r: (r["env"] != "all", r["env"], r["policy"], r["config"]))


def markdown(rows: list[dict[str, Any]], sweep_dir: Path, fixed: dict[str, str] | None = None) -> str:
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        "Held-out success per configuration (the overrides that vary, without `seed`): mean ± standard "
        "deviation over seeds.",
        "",
    ]
    if fixed:
        lines += ["Every job: `" + " ".join(f"{k}={v}" for k, v in sorted(fixed.items())) + "`", ""]
    lines += [
        "| env | policy | configuration | runs | success | min | max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['policy']} | `{r['config']}` | {r['runs']} | "
            f"{100 * r['mean']:.1f}% ± {100 * r['std']:.1f} | {100 * r['min']:.1f}% | {100 * r['max']:.1f}% |"
        )
    lines += ["", f"Regenerate: `python -m rl_agents.sweep {sweep_dir}`"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["env"] == "all"]
    configs = sorted({r["config"] for r in rows})
    policies = sorted({r["policy"] for r in rows})
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(configs) + 2), 4))
    for i, policy in enumerate(policies):
        xs, means, stds = [], [], []
        for j, config in enumerate(configs):
            match = [r for r in rows if r["config"] == config and r["policy"] == policy]
            if match:
                xs.append(j + i * width)
                means.append(100 * match[0]["mean"])
                stds.append(100 * match[0]["std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=policy)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="held-out success (%)", ylim=(0, 105), title="Sweep: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write sweep.csv, sweep.md and sweep.png into ``sweep_dir``; returns the summary rows."""
    sweep_dir = Path(sweep_dir)
    jobs = _jobs(sweep_dir)
    rows = summarize(job_records(jobs))
    if not rows:
        log.warning("sweep %s: no job has an eval.json yet; nothing to summarise", sweep_dir)
        return rows
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "sweep.md").write_text(markdown(rows, sweep_dir, fixed_overrides(jobs)))
    try:
        plot(rows, sweep_dir / "sweep.png")
    except ImportError:
        log.warning("matplotlib is not installed: no sweep.png (pip install 'rl_agents[bench]')")
    log.info("sweep summary: %s", sweep_dir / "sweep.md")
    return rows


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        raise SystemExit("usage: python -m rl_agents.sweep SWEEP_DIR  (a Hydra multirun dir holding job dirs)")
    rows = write_summary(args[0])
    print(markdown(rows, Path(args[0])) if rows else f"no eval.json under {args[0]}/*/")


if __name__ == "__main__":
    main()
