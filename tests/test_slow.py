"""The promises of the main job and of the rl stage, measured: run with `pytest -m slow` (the BC test about 7
minutes on 2 cores; each RL test 20-30 minutes).

The first is issue 2's acceptance target (BC >= 90% on Calculator-v0 held-out seeds), the others issue 3's
(RL >= BC + 10 points with a noisy teacher). Neither passes yet; the README's results give the figures.
"""

import json

import pytest

from tests.test_pipeline import _run


@pytest.mark.slow
def test_default_launch_clones_calculator_to_90_percent_on_held_out_seeds(tmp_path):
    _run("rl_agents.train", f"hydra.run.dir={tmp_path}", "logger=none", "progress=false")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["seeds"]["start"] == 1_000_000 and data["seeds"]["count"] == 200
    assert data["policies"]["teacher"]["success_rate"] == 1.0
    assert data["policies"]["bc"]["success_rate"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("env", ["calculator", "sql"])
def test_rl_refines_the_bc_policy_of_a_noisy_teacher(tmp_path, env, algo):
    """Issue 3's target, per environment and algorithm (about 20-30 minutes each on 2 cores).

    RL must not lose to BC beyond noise (3 points on 200 episodes) and keep KL bounded; the issue also
    asks for +10 points on at least one environment, which the README's RL results do not reach yet.
    """
    _run("rl_agents.train", f"hydra.run.dir={tmp_path}", "logger=none", "progress=false", f"env={env}",
         "teacher.noise=0.3", "collect.keep=all", "stages=[collect,bc,rl,eval]", "eval.policies=[teacher,bc,rl]",
         f"algo={algo}")  # fmt: skip
    policies = json.loads((tmp_path / "eval.json").read_text())["policies"]
    assert policies["rl"]["success_rate"] >= policies["bc"]["success_rate"] - 0.03
    history = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert max(h["kl"] for h in history if "kl" in h) < 1.0  # per-token KL to the BC policy stays bounded
    assert policies["rl"]["success_rate"] >= policies["bc"]["success_rate"] + 0.10
