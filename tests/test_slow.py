"""The promises of the main job and of the rl stage, measured: run with `pytest -m slow` (the BC test about 8
minutes on 2 cores; each RL test 20-30 minutes).

The first is the main job's promise (BC >= 90% greedy on Calculator-v0's test tasks), the others the rl
stage's (RL >= BC + 10 points with a noisy teacher on one environment, no loss beyond noise on the other),
checked on the sampled policy at the rollout temperature (docs/results.md and docs/log.md say where each
was last measured).
"""

import json

import pytest

from tests.test_pipeline import _run


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the suite's 600 s limit is for unit tests; this is a whole launch
def test_default_launch_clones_calculator_to_90_percent_on_test_tasks(tmp_path):
    _run("rl_agents.train", f"hydra.run.dir={tmp_path}", "logger=none", "progress=false", timeout=3500)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["split"] == "test" and data["seeds"]["count"] == 200
    assert all(p["seen_in_training"] == 0 for p in data["policies"].values())
    assert data["policies"]["teacher"]["success_rate"] == 1.0
    assert data["policies"]["bc"]["success_rate"] >= 0.9


@pytest.mark.slow
@pytest.mark.timeout(5400)
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("env", ["calculator", "sql"])
def test_rl_refines_the_bc_policy_of_a_noisy_teacher(tmp_path, env, algo):
    """Issue 3's target, per environment and algorithm (about 20-30 minutes each on 2 cores), evaluated
    sampled at the rollout temperature: the policy RL optimises.

    RL must not lose to BC beyond noise (3 points on 200 episodes), must gain 10 points on Calculator, and
    its KL to the BC policy stays bounded (the median over steps of the per-token k3 estimate: single
    steps of PPO's k3 mean spike when one sampled token has become far less likely than under BC).
    """
    _run("rl_agents.train", f"hydra.run.dir={tmp_path}", "logger=none", "progress=false", f"env={env}",
         "teacher.noise=0.3", "collect.keep=all", "stages=[collect,bc,rl,eval]", "eval.policies=[teacher,bc,rl]",
         f"algo={algo}", "eval.temperature=1.0", timeout=5300)  # fmt: skip
    data = json.loads((tmp_path / "eval.json").read_text())
    policies = data["policies"]
    assert data["decoding"] == "sampled, temperature 1"
    assert policies["rl"]["success_rate"] >= policies["bc"]["success_rate"] - 0.03
    history = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    kl = sorted(h["kl"] for h in history if "kl" in h)
    assert kl[len(kl) // 2] < 0.5
    if env == "calculator":
        assert policies["rl"]["success_rate"] >= policies["bc"]["success_rate"] + 0.10
