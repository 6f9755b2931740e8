"""DAgger: teachers label any state, labelled episodes become samples with each state a target once, and the
stage runs, resumes and is evaluated like the others."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from hydra.utils import instantiate
from transformers import AutoTokenizer

from envs.calculator import CalculatorTeacher
from envs.teacher import answer, tool_call
from rl_agents.agent import read_card
from rl_agents.dagger import dagger_samples, label_episode, same_action
from rl_agents.trajectory import Trajectory, Turn, encode_trajectory
from tests.helpers.cli import run_cli

CALL = tool_call("calculator", expression="2 + 3")

# A wrong turn for each environment: what a policy gets wrong (a malformed turn, a wrong tool call).
WRONG = {
    "Calculator-v0": [tool_call("calculator", expression="1 + 1"), "no action"],
    "SQL-v0": [tool_call("sql", query="SELECT 1"), "<tool_call>{bad json</tool_call>"],
    "Shop-v0": [  # a search for something else, a product that is not the one asked for, bought
        tool_call("search", query="red hat"),
        lambda env: tool_call("open", item_id=next(i for i in env.catalogue if i != env.goal.target)),
        tool_call("choose", option="color", value="red"),
        tool_call("buy"),
    ],
    "Code-v0": [tool_call("run_tests", code="def f(x):\n    return 0"), "no action"],
    "FrozenLakeText-v0": [tool_call("move", direction="up"), tool_call("move", direction="left")],
    "TaxiText-v0": [tool_call("move", direction="north"), tool_call("pickup")],
}
TEACHERS = {
    "Calculator-v0": "envs.calculator.CalculatorTeacher",
    "SQL-v0": "envs.sql.SQLTeacher",
    "Shop-v0": "envs.shop.ShopTeacher",
    "Code-v0": "envs.code.CodeTeacher",
    "FrozenLakeText-v0": "envs.gym_text.PlannerTeacher",
    "TaxiText-v0": "envs.gym_text.PlannerTeacher",
}


def test_same_action_compares_what_a_turn_does_not_its_thoughts():
    assert same_action("<think>a</think>" + CALL, "<think>b</think>" + CALL)
    assert not same_action(CALL, tool_call("calculator", expression="2 + 4"))
    assert same_action(answer("5"), answer(" 5 ")) and not same_action(answer("5"), CALL)
    assert not same_action("no action", "no action")  # neither does anything: never agreement


def test_each_labelled_state_is_a_target_exactly_once_and_the_policys_mistakes_stay_context():
    policy = ["P0", "P1", "P2", "P3"]
    labels = ["P0", "L1", "P2", "L3"]  # agrees, disagrees, agrees, disagrees
    same = {("P0", "P0"), ("P2", "P2")}
    episode = Trajectory("task", [Turn(agent=p, observation=f"o{i}") for i, p in enumerate(policy)])
    import rl_agents.dagger as dagger

    real = dagger.same_action
    dagger.same_action = lambda a, b: (a, b) in same
    try:
        samples, disagreements = dagger_samples(episode, labels)
    finally:
        dagger.same_action = real
    assert disagreements == 2
    targets = [(t.agent, i) for s in samples for i, t in enumerate(s.turns) if t.imitate]
    assert sorted(a for a, _ in targets) == ["L1", "L3", "P0", "P2"]  # every state once, the teacher's turn there
    assert [[t.agent for t in s.turns] for s in samples] == [["P0", "L1"], ["P0", "P1", "P2", "L3"]]
    assert [[t.imitate for t in s.turns] for s in samples] == [[True, True], [False, False, True, True]]
    assert all(t.observation == f"o{i}" for s in samples for i, t in enumerate(s.turns[:-1]))


def test_context_turns_carry_no_loss_in_the_encoded_sequence(tiny_policy):
    _, _, tokenizer = tiny_policy
    sample = Trajectory("What is 2 + 3?", [Turn(agent="no action", observation="ERROR: x", imitate=False), Turn(CALL)])
    encoded = encode_trajectory(sample, tokenizer)
    learned = [i for i, m in zip(encoded.input_ids, encoded.agent_mask) if m]
    assert tokenizer.decode(learned) == CALL + "<|im_end|>"


@pytest.mark.parametrize("env_id", list(WRONG))
def test_the_noise_free_teacher_recovers_from_the_states_a_wrong_policy_leads_to(env_id):
    """DAgger's premise: the expert's label at a state the policy led to is the right thing to do from there.
    After each prefix of wrong turns, following the teacher's labels from that state solves the task."""
    solved, tried = 0, 0
    for seed in range(8):
        for k in range(1, len(WRONG[env_id]) + 1):
            env = gym.make(env_id, split="train")
            teacher = instantiate({"_target_": TEACHERS[env_id]})
            task, _ = env.reset(seed=seed)
            teacher.begin(env.unwrapped, np.random.default_rng([seed, 1]))
            history, done, success = [], False, False
            for turn in WRONG[env_id][:k]:
                turn = turn(env.unwrapped) if callable(turn) else turn
                observation, _, terminated, truncated, info = env.step(turn)
                history.append((turn, observation))
                done, success = terminated or truncated, info.get("success", False)
                if done:
                    break
            if done:  # a wrong turn that ended the episode (a purchase): no state left to label
                continue
            tried += 1
            for _ in range(20):
                label = teacher.act(env.unwrapped, task, history)
                observation, _, terminated, truncated, info = env.step(label)
                history.append((label, observation))
                if terminated or truncated:
                    success = info.get("success", False)
                    break
            solved += bool(success)
    assert tried >= 8 and solved == tried


def test_labels_replay_the_policys_episode_and_stop_where_the_environment_differs(caplog):
    env = gym.make("Calculator-v0", fail_prob=0.0, split="train")
    task, _ = env.reset(seed=3)
    wrong = tool_call("calculator", expression="1 + 1")
    observation = env.step(wrong)[0]
    episode = Trajectory(task, [Turn(wrong, observation), Turn(answer("2"), "Incorrect.")], metadata={"seed": 3})
    labels = label_episode(env, CalculatorTeacher(), episode)
    expression = env.unwrapped.task.extra["expression"]
    assert len(labels) == 2 and all(same_action(x, tool_call("calculator", expression=expression)) for x in labels)
    episode.turns[0].observation = "something else"  # the environment would not repeat this episode
    assert len(label_episode(env, CalculatorTeacher(), episode)) == 1 and "diverged" in caplog.text
    caplog.clear()
    episode.turns[0].observation, episode.turns[1].observation = observation, None  # a turn the runtime cut
    assert len(label_episode(env, CalculatorTeacher(), episode)) == 2  # its state is labelled, not stepped
    assert "diverged" not in caplog.text


DAGGER = [
    "budget=smoke",
    "logger=none",
    "stages=[collect,bc,dagger,eval]",
    "eval.policies=[teacher,bc,dagger]",
    "dagger.rounds=2",
    "dagger.episodes=6",
    "dagger.steps=2",
    "dagger.val_episodes=4",
]


def test_the_dagger_stage_runs_end_to_end_resumes_and_counts_its_tasks_as_seen(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("rl_agents.train", *DAGGER, f"hydra.run.dir={run_dir}")
    rounds = [json.loads(line) for line in (run_dir / "dagger" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["episodes"] == 6 and r["states"] >= 6 and 0 <= r["disagreement_rate"] <= 1 for r in rounds)
    assert all(r["val_success"] is not None for r in rounds) and rounds[1]["targets"] > rounds[0]["targets"]
    kept = [r["round"] for r in rounds if r["kept"]]  # dagger.keep=best_val: the policy of the round best on val
    assert len(kept) == 1 and rounds[kept[0] - 1]["val_success"] == max(r["val_success"] for r in rounds)
    kept_policy = run_dir / "dagger" / f"round-{kept[0]}" / "policy" / "model.safetensors"
    assert (run_dir / "dagger" / "policy" / "model.safetensors").read_bytes() == kept_policy.read_bytes()
    samples = [json.loads(line) for line in (run_dir / "dagger" / "round-1" / "samples.jsonl").read_text().splitlines()]
    seeds = {s["metadata"]["seed"] for s in samples}
    assert seeds and min(seeds) >= 24  # after the collect stage's 24 seeds: new train tasks
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results["policies"]) == {"teacher", "bc", "dagger"}
    assert all(p["seen_in_training"] == 0 for p in results["policies"].values())
    assert (run_dir / "stages" / "dagger.json").is_file()
    for i in (1, 2):  # every round's policy is a compiled agent of its own: evaluate, serve and export load it
        round_policy = run_dir / "dagger" / f"round-{i}" / "policy"
        card = read_card(round_policy, AutoTokenizer.from_pretrained(round_policy, local_files_only=True))
        assert card["provenance"]["stage"] == f"dagger round {i}" and set(card["envs"]) == {"Calculator-v0"}
        assert f"# A compiled agent (dagger round {i} policy)" in (round_policy / "README.md").read_text()

    before = (run_dir / "dagger" / "round-2" / "policy" / "model.safetensors").stat().st_mtime_ns
    proc = run_cli("rl_agents.train", *DAGGER, f"hydra.run.dir={run_dir}", "resume=true")
    assert "dagger: reusing the finished policy" in proc.stdout + proc.stderr
    assert (run_dir / "dagger" / "round-2" / "policy" / "model.safetensors").stat().st_mtime_ns == before


def test_a_dagger_run_whose_rounds_would_reach_the_evaluation_seeds_is_refused(tmp_path):
    proc = run_cli("rl_agents.train", *DAGGER, "dagger.episodes=600000", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "env.eval_seed_start" in proc.stdout + proc.stderr


def test_dagger_samples_count_as_training_tasks_of_the_run(tmp_path):
    from omegaconf import OmegaConf

    from rl_agents.evaluate import training_trajectory_files

    (tmp_path / "trajectories").mkdir()
    (tmp_path / "trajectories" / "train.jsonl").write_text("")
    for i in (1, 2):
        (tmp_path / "dagger" / f"round-{i}").mkdir(parents=True)
        (tmp_path / "dagger" / f"round-{i}" / "samples.jsonl").write_text("")
    files = training_trajectory_files(OmegaConf.create({}), tmp_path)
    assert [Path(f).relative_to(tmp_path).as_posix() for f in files] == [
        "trajectories/train.jsonl",
        "dagger/round-1/samples.jsonl",
        "dagger/round-2/samples.jsonl",
    ]


def test_the_stage_keeps_the_round_best_on_validation_or_the_last():
    from rl_agents.dagger import kept_round

    rounds = [{"round": 1, "val_success": 0.31}, {"round": 2, "val_success": 0.08}, {"round": 3, "val_success": 0.2}]
    assert kept_round(rounds, "best_val") == 1 and kept_round(rounds, "last") == 3
    tied = [{"round": 1, "val_success": 0.0}, {"round": 2, "val_success": 0.0}]
    assert kept_round(tied, "best_val") == 2  # a tie keeps the later round
    assert kept_round([{"round": 1, "val_success": None}, {"round": 2, "val_success": None}], "best_val") == 2


def test_a_rounds_policy_is_evaluated_with_its_runs_settings_and_training_tasks(tmp_path):
    """``<run>/dagger/round-<i>/policy`` belongs to ``<run>``: evaluate takes that run's env (not the default
    one) and counts that run's teacher and DAgger trajectories as its training tasks."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rl_agents.evaluate import settings_from_run, training_trajectory_files

    run = tmp_path / "run"
    policy = run / "dagger" / "round-1" / "policy"
    policy.mkdir(parents=True)
    (run / "trajectories").mkdir()
    (run / "trajectories" / "train.jsonl").write_text("")
    (run / "dagger" / "round-1" / "samples.jsonl").write_text("")
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        OmegaConf.save(compose(config_name="train", overrides=["env=shop"]), run / "config.yaml")
        cfg = compose(config_name="evaluate", overrides=[f"checkpoint={policy}"])
    assert list(cfg.env.envs) == ["Calculator-v0"]  # the default, before the run's settings
    assert settings_from_run(cfg, [f"checkpoint={policy}"]) == run / "config.yaml"
    assert list(cfg.env.envs) == ["Shop-v0"]
    files = [f.relative_to(run).as_posix() for f in training_trajectory_files(cfg, None)]
    assert files == ["trajectories/train.jsonl", "dagger/round-1/samples.jsonl"]


def test_an_llm_teacher_labels_the_policys_states_from_the_policys_history():
    """DAgger with teacher=openai: at each state the endpoint is asked with the policy's own history."""
    from rl_agents.teachers import OpenAITeacher
    from tests.test_teachers import FakeClient

    env = gym.make("Calculator-v0", fail_prob=0.0, split="train")
    task, _ = env.reset(seed=5)
    wrong = tool_call("calculator", expression="1 + 1")
    episode = Trajectory(task, [Turn(wrong, env.step(wrong)[0]), Turn(answer("2"), "Incorrect.")], metadata={"seed": 5})
    right = tool_call("calculator", expression=env.unwrapped.task.extra["expression"])
    client = FakeClient([right, right])
    labels = label_episode(env, OpenAITeacher(model="m", client=client), episode)
    assert labels == [right, right]
    first, second = (r["messages"] for r in client.requests)
    assert len(first) == 2 and second[2] == {"role": "assistant", "content": wrong}  # the policy's turn, as history


def test_an_env_key_on_the_command_line_overrides_that_key_of_the_runs_env(tmp_path):
    """``env.eval_seed_start=0`` on a SQL run's checkpoint evaluates SQL-v0 from seed 0, not the default env;
    ``env=...`` names another env; a key for an env the run never had is refused with its name."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rl_agents.config import ConfigError
    from rl_agents.evaluate import settings_from_run

    policy = tmp_path / "run" / "bc" / "policy"
    policy.mkdir(parents=True)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        OmegaConf.save(compose(config_name="train", overrides=["env=sql"]), tmp_path / "run" / "config.yaml")
        overrides = {
            "key": [f"checkpoint={policy}", "env.eval_seed_start=0", "++env.envs.SQL-v0.weight=0.5"],
            "group": [f"checkpoint={policy}", "env=frozenlake"],
            "foreign": [f"checkpoint={policy}", "env.envs.Calculator-v0.weight=0.5"],
        }
        cfgs = {name: compose(config_name="evaluate", overrides=o) for name, o in overrides.items()}
    settings_from_run(cfgs["key"], overrides["key"])
    assert list(cfgs["key"].env.envs) == ["SQL-v0"] and cfgs["key"].env.eval_seed_start == 0
    assert cfgs["key"].env.envs["SQL-v0"].weight == 0.5
    settings_from_run(cfgs["group"], overrides["group"])
    assert list(cfgs["group"].env.envs) == ["FrozenLakeText-v0"]
    with pytest.raises(ConfigError, match="Calculator-v0"):
        settings_from_run(cfgs["foreign"], overrides["foreign"])
