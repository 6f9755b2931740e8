"""Sweep summaries from job dirs (no training): grouping by the overrides that vary, spread over seeds."""

import json

import yaml

from rl_agents.sweep import write_summary


def _job(sweep, num, overrides, success):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "eval.json").write_text(json.dumps({"env": "calculator", "policies": {"rl": {"success_rate": success}}}))


def test_configurations_are_the_overrides_that_vary_and_seeds_are_averaged(tmp_path):
    sweep = tmp_path / "sweep"
    results = {("grpo", "0"): 0.40, ("grpo", "1"): 0.50, ("ppo", "0"): 0.20, ("ppo", "1"): 0.30}
    for num, ((algo, seed), success) in enumerate(results.items()):
        _job(sweep, num, [f"algo={algo}", f"seed={seed}", "rl.steps=10", "budget=smoke"], success)
    (sweep / "9").mkdir()  # an unfinished job (no eval.json) is left out
    rows = {r["config"]: r for r in write_summary(sweep)}
    assert set(rows) == {"algo=grpo", "algo=ppo"}
    assert rows["algo=grpo"]["runs"] == 2 and abs(rows["algo=grpo"]["mean"] - 0.45) < 1e-9
    assert abs(rows["algo=ppo"]["std"] - 0.0707107) < 1e-6 and rows["algo=ppo"]["seeds"] == "0 1"
    md = (sweep / "sweep.md").read_text()
    assert "Every job: `budget=smoke rl.steps=10`" in md
    assert "| all | rl | `algo=grpo` | 2 | 45.0% ± 7.1 | 40.0% | 50.0% |" in md


def test_a_bad_eval_json_is_skipped_and_named_not_fatal(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["seed=0"], 0.5)
    _job(sweep, 1, ["seed=1"], 0.7)
    (sweep / "1" / "eval.json").write_text('{"env": "calculator", "poli')  # cut short
    rows = write_summary(sweep)
    assert [r["runs"] for r in rows] == [1]
    assert "skipping" in caplog.text and str(sweep / "1" / "eval.json") in caplog.text
