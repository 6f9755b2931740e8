"""End to end through the CLI on budget=smoke: collect -> bc -> eval, resume, evaluate, W&B offline."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rl_agents.trajectory import read_jsonl
from tests.helpers.cli import ROOT  # noqa: F401
from tests.helpers.cli import run_cli as _run


def test_smoke_run_writes_every_artifact(smoke_run):
    expected = [
        "config.yaml", ".hydra/config.yaml", "train.log", "trajectories/train.jsonl", "trajectories/collect_stats.json",
        "model/init/config.json", "bc/policy/config.json", "bc/policy/tokenizer.json", "eval.json",
        "eval/episodes_bc.jsonl", "eval/episodes_teacher.jsonl",
    ]  # fmt: skip
    for path in expected:
        assert (smoke_run / path).exists(), path
    assert list((smoke_run / "bc" / "checkpoints").glob("checkpoint-*"))
    trajectories = read_jsonl(smoke_run / "trajectories" / "train.jsonl")
    assert {t.metadata["env_id"] for t in trajectories} == {"Calculator-v0", "SQL-v0"}
    assert all(t.success for t in trajectories)  # rejection sampling keeps successes


def test_eval_json_has_the_documented_shape(smoke_run):
    data = json.loads((smoke_run / "eval.json").read_text())
    assert data["env"] == "calculator_sql" and data["seeds"] == {"start": 1_000_000, "count": 4}
    keys = {
        "success_rate",
        "mean_reward",
        "mean_turns",
        "tool_error_rate",
        "step_latency_ms",
        "tokens_per_s",
        "episodes",
    }
    for name in ("teacher", "bc"):
        policy = data["policies"][name]
        assert keys <= set(policy) and policy["episodes"] == 8
        assert set(policy["per_env"]) == {"Calculator-v0", "SQL-v0"}
    assert data["policies"]["teacher"]["success_rate"] == 1.0
    assert data["policies"]["bc"]["tokens_per_s"] > 0
    assert data["split"] == "test" and all(p["seen_in_training"] == 0 for p in data["policies"].values())
    episodes = read_jsonl(smoke_run / "eval" / "episodes_bc.jsonl")
    assert {e.metadata["split"] for e in episodes} == {"test"}
    trained = {t.metadata["task_key"] for t in read_jsonl(smoke_run / "trajectories" / "train.jsonl")}
    assert trained and not trained & {e.metadata["task_key"] for e in episodes}


def test_evaluating_a_task_seen_in_training_is_refused_before_any_episode(tmp_path):
    """Trajectories that hold an evaluated task (or whose tasks are unknown) make the eval stage refuse."""
    from hydra import compose, initialize_config_dir

    from rl_agents.evaluate import SeenTaskError, check_held_out, eval_task_keys
    from rl_agents.trajectory import Trajectory, write_jsonl

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["budget=smoke", "logger=none"])
    evaluated = eval_task_keys(cfg)["Calculator-v0"]
    data = tmp_path / "trajectories" / "train.jsonl"

    def trained_on(*keys):
        meta = [{"env_id": "Calculator-v0", "seed": 0, **({"task_key": k} if k else {})} for k in keys]
        write_jsonl(data, [Trajectory("t", [], metadata=m) for m in meta])

    trained_on("1 + 2", "3 * 4")
    assert check_held_out(cfg, tmp_path) == {("Calculator-v0", "1 + 2"), ("Calculator-v0", "3 * 4")}
    trained_on("1 + 2", evaluated[2])
    with pytest.raises(SeenTaskError, match="1 of the 4 evaluated test tasks are among the training tasks"):
        check_held_out(cfg, tmp_path)
    trained_on("1 + 2", None)
    with pytest.raises(SeenTaskError, match="1 training trajectories .* have no task key"):
        check_held_out(cfg, tmp_path)


def test_wandb_offline_run_lands_in_the_run_dir(smoke_run):
    runs = list((smoke_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))


def test_resume_reuses_finished_stages_and_bc_checkpoints(smoke_run):
    before = (smoke_run / "trajectories" / "train.jsonl").read_text()
    proc = _run(
        "rl_agents.train",
        "budget=smoke",
        f"hydra.run.dir={smoke_run}",
        "env=calculator_sql",
        "resume=true",
        "logger=none",
    )
    assert "collect: reusing" in proc.stderr + proc.stdout + (smoke_run / "train.log").read_text()
    assert (smoke_run / "trajectories" / "train.jsonl").read_text() == before


def test_evaluate_cli_on_a_saved_policy(smoke_run, tmp_path):
    out = tmp_path / "ev"
    _run("rl_agents.evaluate", f"checkpoint={smoke_run / 'bc' / 'policy'}", "env=sql", "eval.episodes=3",
         "eval.policies=[teacher,policy]", f"hydra.run.dir={out}", "runtime.max_new_tokens=16")  # fmt: skip
    data = json.loads((out / "eval.json").read_text())
    assert set(data["policies"]) == {"teacher", "policy"} and data["policies"]["policy"]["episodes"] == 3


def test_sampled_evaluation_is_seeded_and_never_merged_with_greedy_results(smoke_run, tmp_path):
    """eval.temperature samples the episodes: the same seed gives the same tokens, eval.json says how the
    tokens were chosen, and a greedy evaluation into the same dir replaces the sampled results."""
    policy = f"checkpoint={smoke_run / 'bc' / 'policy'}"
    common = ("env=calculator", "eval.episodes=4", "runtime.max_new_tokens=16")
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        _run("rl_agents.evaluate", policy, *common, "eval.temperature=1.5", "name=sampled", f"hydra.run.dir={out}")
    tokens = [[t.token_ids for e in read_jsonl(d / "episodes_sampled.jsonl") for t in e.turns] for d in (first, second)]
    assert tokens[0] == tokens[1]
    data = json.loads((first / "eval.json").read_text())
    assert data["decoding"] == "sampled, temperature 1.5" and set(data["policies"]) == {"sampled"}
    _run("rl_agents.evaluate", policy, *common, "name=greedy", f"hydra.run.dir={first}")
    data = json.loads((first / "eval.json").read_text())
    greedy = [t.token_ids for e in read_jsonl(first / "episodes_greedy.jsonl") for t in e.turns]
    assert tokens[0] != greedy  # sampling did change the tokens
    assert data["decoding"] == "greedy" and set(data["policies"]) == {"greedy"}


def test_config_error_fails_before_any_work(tmp_path):
    proc = _run("rl_agents.train", "+env.envs.Calcuator-v0.weight=1.0", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "unknown env 'Calcuator-v0'" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr  # one message, no traceback
    assert not (tmp_path / "r" / "trajectories").exists()


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_stage_through_the_cli(tmp_path, algo):
    """collect -> bc -> rl -> eval on budget=smoke: the RL policy is evaluated on the same seeds, KL is logged."""
    run_dir = tmp_path / algo
    _run(
        "rl_agents.train",
        "budget=smoke",
        f"hydra.run.dir={run_dir}",
        f"algo={algo}",
        "rl.steps=3",
        "stages=[collect,bc,rl,eval]",
        "eval.policies=[teacher,bc,rl]",
        "algo.warmup_steps=0",
        "algo.learning_rate=1e-2",
        "rl.shaping.per_turn=-0.1",
    )  # fmt: skip (shaping: rewards that vary)
    data = json.loads((run_dir / "eval.json").read_text())
    assert set(data["policies"]) == {"teacher", "bc", "rl"} and data["policies"]["rl"]["episodes"] == 4
    assert (run_dir / "rl" / "policy" / "config.json").is_file()
    history = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in history if "kl" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]  # KL logged at every step
    reward_key = "reward" if algo == "grpo" else "reward_env"
    assert all(reward_key in h for h in steps)
    # per-token k3 KL to the reference (the BC policy): positive once the policy has moved; GRPO logs the first
    # step's KL on its batch scored before any update, where the policy is the reference: exactly 0
    assert steps[-1]["kl"] > 0.0 and (algo == "ppo" or steps[0]["kl"] == 0.0)
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_mixed_training_over_every_environment(tmp_path):
    """env=mix: one policy trained (bc, then GRPO) over all six environments; eval.json reports each one."""
    run_dir = tmp_path / "mix"
    _run("rl_agents.train", "budget=smoke", "env=mix", f"hydra.run.dir={run_dir}", "logger=none",
         "collect.episodes=36", "stages=[collect,bc,rl,eval]", "eval.policies=[teacher,bc,rl]",
         "rl.episodes_per_step=16", "eval.episodes=2", "runtime.max_turns=24")  # fmt: skip
    ids = {"Calculator-v0", "SQL-v0", "Shop-v0", "Code-v0", "FrozenLakeText-v0", "TaxiText-v0"}
    trajectories = read_jsonl(run_dir / "trajectories" / "train.jsonl")
    assert {t.metadata["env_id"] for t in trajectories} == ids
    data = json.loads((run_dir / "eval.json").read_text())
    for name in ("teacher", "bc", "rl"):
        per_env = data["policies"][name]["per_env"]
        assert set(per_env) == ids and all(m["episodes"] == 2 for m in per_env.values())
    assert all(m["success_rate"] == 1.0 for m in data["policies"]["teacher"]["per_env"].values())
    history = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "kl" in h] == [1, 2]


def test_multirun_sweep_summarises_across_seeds_and_groups_wandb_runs(tmp_path):
    """Two seeds through the joblib launcher: one sweep.csv row per policy with 2 runs, one W&B group."""
    import csv

    sweep = tmp_path / "sweep"
    _run("rl_agents.train", "-m", "hydra/launcher=local", "budget=smoke", "seed=0,1", "eval.policies=[teacher,bc]",
         f"hydra.sweep.dir={sweep}")  # fmt: skip
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    overall = {r["policy"]: r for r in rows if r["env"] == "all"}
    assert set(overall) == {"teacher", "bc"}
    assert overall["bc"]["runs"] == "2" and overall["bc"]["seeds"] == "0 1"
    values = [json.loads((sweep / str(i) / "eval.json").read_text())["policies"]["bc"]["success_rate"] for i in (0, 1)]
    assert float(overall["bc"]["mean"]) == pytest.approx(sum(values) / 2)
    assert "| all | bc |" in (sweep / "sweep.md").read_text()
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    groups = {
        line.rsplit("group ", 1)[1]
        for i in (0, 1)
        for line in (sweep / str(i) / "train.log").read_text().splitlines()
        if "wandb:" in line and "group" in line
    }
    assert len(groups) == 1 and groups.pop().startswith("sweep-")


def test_the_same_seed_gives_the_same_eval_json_on_cpu(smoke_run, tmp_path):
    """Reproducibility: a second run with the smoke run's seed and config reproduces eval.json and every
    evaluation episode token for token (timings aside)."""
    again = tmp_path / "again"
    _run("rl_agents.train", "budget=smoke", f"hydra.run.dir={again}", "env=calculator_sql")
    timing = {"step_latency_ms", "tokens_per_s"}

    def strip(data):
        if isinstance(data, dict):
            return {k: strip(v) for k, v in data.items() if k not in timing}
        return data

    first, second = (json.loads((d / "eval.json").read_text()) for d in (smoke_run, again))
    assert strip(first) == strip(second)
    for name in ("bc", "teacher"):
        a, b = (read_jsonl(d / "eval" / f"episodes_{name}.jsonl") for d in (smoke_run, again))
        assert [[(t.agent, t.token_ids, t.observation) for t in e.turns] for e in a] == [
            [(t.agent, t.token_ids, t.observation) for t in e.turns] for e in b
        ]


def test_wandb_run_read_back_has_artifact_lineage_and_whole_episode_tables(smoke_run):
    """The offline run the real library wrote: trajectories -> bc policy -> evaluation artifacts, each naming
    its parent, and episode tables whose transcripts hold every turn."""
    from tests.helpers.wandb_records import run_records

    records = run_records(smoke_run)
    artifacts = {r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    data = artifacts["trajectories-calculator_sql"]
    bc = artifacts["bc-policy-calculator_sql"]
    evaluation = artifacts["evaluation-calculator_sql"]
    assert (data.type, bc.type, evaluation.type) == ("dataset", "model", "evaluation")
    assert {c.path for c in data.manifest.contents} == {"train.jsonl", "collect_stats.json"}
    assert "policy/model.safetensors" in {c.path for c in bc.manifest.contents}
    assert json.loads(bc.metadata)["derived_from"] == [f"{data.name}:{data.digest}"]
    assert json.loads(evaluation.metadata)["derived_from"] == [f"{bc.name}:{bc.digest}"]
    (table_path,) = (smoke_run / "wandb").glob("offline-run-*/files/media/table/episodes/bc_*.table.json")
    table = json.loads(table_path.read_text())
    episodes = read_jsonl(smoke_run / "eval" / "episodes_bc.jsonl")
    transcripts = [row[table["columns"].index("transcript")] for row in table["data"]]
    for transcript, episode in zip(transcripts, episodes):
        assert transcript.count("AGENT: ") == len(episode.turns) and episode.task in transcript


def test_two_cpu_processes_train_bc_and_grpo_data_parallel(tmp_path):
    """torchrun with 2 CPU processes (gloo, accelerate's MULTI_CPU): one collects and evaluates, both train."""
    import shutil

    run_dir = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "rl_agents.train", "budget=smoke", "logger=none",
         "stages=[collect,bc,rl,eval]", "eval.policies=[teacher,bc,rl]", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("collect Calculator-v0: {") == 1  # only the main process collects
    (checkpoint,) = sorted((run_dir / "bc" / "checkpoints").glob("checkpoint-*"))[-1:]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    episodes = len(read_jsonl(run_dir / "trajectories" / "train.jsonl"))
    rows = episodes + round(OmegaConf.load(run_dir / "config.yaml").bc.copy_mix * episodes)  # with the copy rows
    # each optimizer step saw a batch from each of the 2 processes: an epoch is each process's half of the rows
    steps_per_epoch = math.ceil(math.ceil(rows / 2) / state["train_batch_size"])
    assert state["epoch"] == pytest.approx(state["global_step"] / steps_per_epoch, rel=1e-3)
    data = json.loads((run_dir / "eval.json").read_text())
    assert set(data["policies"]) == {"teacher", "bc", "rl"}
    # each rank sampled its share of every step's groups, and no two episodes of a group are the same
    rollouts = [json.loads(line) for f in sorted((run_dir / "rl" / "rollouts").glob("rank*.jsonl"))
                for line in f.read_text().splitlines()]  # fmt: skip
    assert {r["rank"] for r in rollouts} == {0, 1} and {r["split"] for r in rollouts} == {"train"}
    groups: dict[tuple, list] = {}
    for r in rollouts:
        groups.setdefault((r["step"], r["env_id"], r["seed"]), []).append(r)
    split = [g for g in groups.values() if len({r["rank"] for r in g}) == 2]
    assert split, "the smoke budget splits a group across the ranks"
    for group in groups.values():
        assert len({r["tokens_sha1"] for r in group}) == len(group)


def test_ppo_refuses_a_distributed_launch_before_any_work(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "rl_agents.train", "budget=smoke", "algo=ppo", "stages=[collect,bc,rl,eval]",
         f"hydra.run.dir={tmp_path / 'p'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "algo=ppo runs in one process" in proc.stdout + proc.stderr
    assert not (tmp_path / "p" / "trajectories").exists()
